"""Stroke thickness ("ink mass") of digit images: a differentiable second condition for multi-condition guidance
(``tagdiff bench multicond``) and the ink-bin labels of the ``class_ink`` conditional time predictor.

Images are ``(B, C, H, W)`` in [-1, 1]; ink mass is the mean over pixels of ``(x + 1) / 2`` (0 = blank, 1 = full).
The generic per-class helpers (any attribute of :mod:`tagdiff.data.attributes`) live there; the ``ink_*`` names
here are their ink versions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .attributes import INK_LEVELS, attribute_bins, attribute_quantiles, ink_mass, joint_condition, parse_targets

__all__ = ["INK_LEVELS", "ink_mass", "ink_loss", "ink_quantiles", "ink_bins", "joint_condition", "parse_targets"]

def ink_loss(target: Tensor | float, scale: float):
    """Per-sample ink loss ``ℓ(x) = (m(x) − target)² / scale²``, a function ``(B, *D) -> (B,)``.

    ``target`` is a number or a ``(B,)`` tensor of target ink masses. Gradient: ``2 (m − target) / (scale² · 2D)``
    per pixel, i.e. a uniform brightening (m < target) or darkening of the image.

    Raises:
        ValueError: for a scale that is not a positive finite number.
    """
    scale = float(scale)
    if not (scale > 0 and scale < float("inf")):
        raise ValueError(f"ink_scale must be a positive number, got {scale!r}")

    def loss(x: Tensor) -> Tensor:
        t = torch.as_tensor(target, dtype=x.dtype, device=x.device).reshape(-1)
        return (ink_mass(x) - t) ** 2 / scale**2

    return loss


def ink_quantiles(x: Tensor, y: Tensor, num_classes: int, qs: Sequence[float] = (0.25, 0.5, 0.75)) -> Tensor:
    """Per-class quantiles of the ink mass, shape ``(num_classes, len(qs))``, float64.

    Raises:
        ValueError: if a class has no image.
    """
    return attribute_quantiles("ink", x, y, num_classes, qs)


def ink_bins(x: Tensor, y: Tensor, num_classes: int, medians: Tensor | None = None) -> Tensor:
    """Ink bin per image: 1 (thick) if its ink mass is above its class median, else 0 (thin); ``(N,)`` int64.

    ``medians`` (``(num_classes,)``) default to the medians of ``x`` itself (the training split when building the
    joint condition labels of the class_ink time predictor).
    """
    return attribute_bins("ink", x, y, num_classes, medians)
