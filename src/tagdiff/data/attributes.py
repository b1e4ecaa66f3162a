"""Image attributes of digits for multi-condition guidance (``tagdiff bench multicond``): stroke thickness ("ink")
and slant, their per-class bins, and the joint condition labels of the ``class_ink`` / ``class_slant`` conditional
time predictors and of the slant attribute classifier.

Images are ``(B, C, H, W)`` in [-1, 1]. Each attribute is a scalar *measure* m(x) of shape ``(B,)`` and two levels,
judged per class: level 1 if m(x) is above the held-out (or training) median of the image's class, level 0 below.

* **ink**: ``ink_mass(x)``, the mean over pixels of (x + 1)/2; levels ``thin`` / ``thick``.
* **slant**: ``slant(x)``, the shear of the stroke (the moment-based skew of MNIST deskewing); levels ``left`` /
  ``right`` (less / more right-leaning than the class median).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ATTRIBUTES", "INK_LEVELS", "Attribute", "get_attribute", "ink_mass", "slant", "attribute_quantiles",
           "attribute_bins", "joint_condition", "parse_targets"]


def ink_mass(x: Tensor) -> Tensor:
    """Ink mass ``m(x) = mean over pixels (and channels) of (x + 1) / 2``, shape ``(B,)``; in [0, 1] for x in [-1, 1].

    Differentiable: ``∂m/∂x = 1 / (2 D)`` for every one of the D = C·H·W pixels.
    """
    return ((x + 1) / 2).flatten(1).mean(1)


def slant(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Slant of the stroke, ``s(x) = −μ₁₁ / μ₀₂``, shape ``(B,)``, dimensionless (horizontal pixels per vertical
    pixel; > 0 leans right, i.e. the top of the digit is to the right of its bottom).

    With ink weights ``w = clamp((x + 1)/2, 0, 1)`` (summed over channels), column u and row v (v grows downwards),
    μ₁₁ and μ₀₂ are the central moments ``Σ w (u − ū)(v − v̄) / Σ w`` and ``Σ w (v − v̄)² / Σ w``. s is the
    least-squares slope of u on v with the sign flipped: the skew that MNIST deskewing removes (LeCun et al. 1998).
    Independent of image size and ink mass; differentiable almost everywhere. ``eps`` guards blank images.
    """
    w = ((x + 1) / 2).clamp(0, 1).sum(1)  # (B, H, W)
    H, W = w.shape[-2:]
    v = torch.arange(H, dtype=w.dtype, device=w.device)[:, None]
    u = torch.arange(W, dtype=w.dtype, device=w.device)[None, :]
    total = w.sum((-2, -1)) + eps
    ub = (w * u).sum((-2, -1)) / total
    vb = (w * v).sum((-2, -1)) / total
    du, dv = u - ub[:, None, None], v - vb[:, None, None]
    mu11 = (w * du * dv).sum((-2, -1)) / total
    mu02 = (w * dv * dv).sum((-2, -1)) / total
    return -mu11 / (mu02 + eps)


@dataclass(frozen=True)
class Attribute:
    """A scalar image attribute: ``measure(x) -> (B,)`` and its two level names (0 = below the class median)."""

    name: str
    measure: Callable[[Tensor], Tensor]
    levels: tuple[str, str]
    description: str


INK_LEVELS = ("thin", "thick")  # level 0 = thin (below the class median), 1 = thick (above)

ATTRIBUTES: dict[str, Attribute] = {
    "ink": Attribute("ink", ink_mass, INK_LEVELS, "stroke thickness: ink mass, mean of (x + 1)/2"),
    "slant": Attribute("slant", slant, ("left", "right"), "slant: −μ₁₁/μ₀₂ of the ink (> 0 leans right)"),
}


def get_attribute(name: str) -> Attribute:
    """The attribute called ``name``. Raises ValueError for an unknown name (the valid ones are listed)."""
    if name not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {name!r}; expected one of {', '.join(ATTRIBUTES)}")
    return ATTRIBUTES[name]


def attribute_quantiles(attribute: str, x: Tensor, y: Tensor, num_classes: int,
                        qs: Sequence[float] = (0.25, 0.5, 0.75)) -> Tensor:
    """Per-class quantiles of an attribute's measure, shape ``(num_classes, len(qs))``, float64.

    Raises:
        ValueError: an unknown attribute, or a class with no image.
    """
    m = get_attribute(attribute).measure(x.double())
    out = []
    for c in range(num_classes):
        mc = m[y == c]
        if mc.numel() == 0:
            raise ValueError(f"class {c} has no image to compute its {attribute} quantiles from")
        out.append(torch.quantile(mc, torch.tensor(list(qs), dtype=torch.float64)))
    return torch.stack(out)


def attribute_bins(attribute: str, x: Tensor, y: Tensor, num_classes: int, medians: Tensor | None = None) -> Tensor:
    """Level per image: 1 if its measure is above its class median, else 0; ``(N,)`` int64.

    ``medians`` (``(num_classes,)``) default to the medians of ``x`` itself (the training split when building the
    labels of a joint-condition time predictor or of an attribute classifier).
    """
    if medians is None:
        medians = attribute_quantiles(attribute, x, y, num_classes, (0.5,))[:, 0]
    return (get_attribute(attribute).measure(x.double()) > medians.double()[y]).long()


def joint_condition(classes: Tensor | int, bins: Tensor | int) -> Tensor:
    """The joint condition index ``c = 2 · class + bin`` (0..2K−1) of a ``class_<attribute>`` time predictor."""
    return 2 * torch.as_tensor(classes).long() + torch.as_tensor(bins).long()


def parse_targets(targets: Sequence[str], num_classes: int, levels: tuple[str, str] = INK_LEVELS,
                  ) -> tuple[Tensor, Tensor]:
    """``("0:thick", "1:thin", ...)`` -> ``(classes, bins)``, both ``(P,)`` int64; ``("all",)`` = every class × both
    levels. ``levels`` are the attribute's level names (default: ink's).

    Raises:
        ValueError: a malformed pair, a class outside ``0..num_classes-1`` or a level not in ``levels``.
    """
    if tuple(targets) == ("all",):
        targets = tuple(f"{c}:{lvl}" for c in range(num_classes) for lvl in levels)
    if not targets:
        raise ValueError(f"no targets given; expected pairs like 0:{levels[1]},1:{levels[0]} or 'all'")
    classes, bins = [], []
    for spec in targets:
        cls, _, level = str(spec).partition(":")
        try:
            c = int(cls)
        except ValueError:
            raise ValueError(f"target {spec!r} is not CLASS:{levels[0]} or CLASS:{levels[1]}") from None
        if not 0 <= c < num_classes:
            raise ValueError(f"target class {c} (in {spec!r}) out of range; the classifiers have classes "
                             f"0..{num_classes - 1}")
        if level not in levels:
            raise ValueError(f"target {spec!r}: level must be {levels[0]!r} or {levels[1]!r}, got {level!r}")
        classes.append(c)
        bins.append(levels.index(level))
    return torch.tensor(classes), torch.tensor(bins)
