"""Stroke thickness ("ink mass") of digit images: a differentiable second condition for multi-condition guidance
(``tagdiff bench multicond``) and the ink-bin labels of the ``class_ink`` conditional time predictor.

Images are ``(B, C, H, W)`` in [-1, 1]; ink mass is the mean over pixels of ``(x + 1) / 2`` (0 = blank, 1 = full).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["INK_LEVELS", "ink_mass", "ink_loss", "ink_quantiles", "ink_bins", "joint_condition", "parse_targets"]

INK_LEVELS = ("thin", "thick")  # ink bin b: 0 = thin (below the class median), 1 = thick (above)


def ink_mass(x: Tensor) -> Tensor:
    """Ink mass ``m(x) = mean over pixels (and channels) of (x + 1) / 2``, shape ``(B,)``; in [0, 1] for x in [-1, 1].

    Differentiable: ``∂m/∂x = 1 / (2 D)`` for every one of the D = C·H·W pixels.
    """
    return ((x + 1) / 2).flatten(1).mean(1)


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
    m = ink_mass(x.double())
    out = []
    for c in range(num_classes):
        mc = m[y == c]
        if mc.numel() == 0:
            raise ValueError(f"class {c} has no image to compute its ink quantiles from")
        out.append(torch.quantile(mc, torch.tensor(list(qs), dtype=torch.float64)))
    return torch.stack(out)


def ink_bins(x: Tensor, y: Tensor, num_classes: int, medians: Tensor | None = None) -> Tensor:
    """Ink bin per image: 1 (thick) if its ink mass is above its class median, else 0 (thin); ``(N,)`` int64.

    ``medians`` (``(num_classes,)``) default to the medians of ``x`` itself (the training split when building the
    joint condition labels of the class_ink time predictor).
    """
    if medians is None:
        medians = ink_quantiles(x, y, num_classes, (0.5,))[:, 0]
    return (ink_mass(x.double()) > medians.double()[y]).long()


def joint_condition(classes: Tensor | int, bins: Tensor | int) -> Tensor:
    """The joint condition index ``c = 2 · class + ink_bin`` (0..2K−1) of the class_ink time predictor."""
    return 2 * torch.as_tensor(classes).long() + torch.as_tensor(bins).long()


def parse_targets(targets: Sequence[str], num_classes: int) -> tuple[Tensor, Tensor]:
    """``("0:thick", "1:thin", ...)`` -> ``(classes, bins)``, both ``(P,)`` int64; ``("all",)`` = every class × both.

    Raises:
        ValueError: a malformed pair, a class outside ``0..num_classes-1`` or an ink level other than thin/thick.
    """
    if tuple(targets) == ("all",):
        targets = tuple(f"{c}:{lvl}" for c in range(num_classes) for lvl in INK_LEVELS)
    if not targets:
        raise ValueError("no targets given; expected pairs like 0:thick,1:thin or 'all'")
    classes, bins = [], []
    for spec in targets:
        cls, _, level = str(spec).partition(":")
        try:
            c = int(cls)
        except ValueError:
            raise ValueError(f"target {spec!r} is not CLASS:thin or CLASS:thick") from None
        if not 0 <= c < num_classes:
            raise ValueError(f"target class {c} (in {spec!r}) out of range; the classifiers have classes "
                             f"0..{num_classes - 1}")
        if level not in INK_LEVELS:
            raise ValueError(f"target {spec!r}: ink level must be 'thin' or 'thick', got {level!r}")
        classes.append(c)
        bins.append(INK_LEVELS.index(level))
    return torch.tensor(classes), torch.tensor(bins)
