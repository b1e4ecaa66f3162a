"""What the image loaders share: the splits, the shapes, the option checks, resizing and channel conversion.

:mod:`tagdiff.data.images` (digits), :mod:`tagdiff.data.mnist`, :mod:`tagdiff.data.folder` and
:mod:`tagdiff.data.streaming` build on these; this module imports none of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["DIGITS_SHAPE", "MNIST_SHAPE", "SPLITS", "check_channels", "check_image_size", "check_split",
           "finish_images", "select_split", "train_held_out_split"]

SPLITS = ("train", "held_out", "test", "all")
DIGITS_SHAPE = (1, 8, 8)
MNIST_SHAPE = (1, 28, 28)
_LUMA = (0.299, 0.587, 0.114)


def train_held_out_split(n: int, held_out_fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Seeded random partition of ``range(n)`` into train and held-out indices.

    ``round(n · held_out_fraction)`` indices (at least 1 and at most ``n - 1``) are held out. The result depends only
    on ``(n, held_out_fraction, seed)`` (NumPy's PCG64 permutation); not stratified.

    Returns:
        ``(train_idx, held_idx)``: sorted int64 tensors, disjoint, together covering ``0..n-1``.

    Raises:
        ValueError: if ``n < 2`` or ``held_out_fraction`` is not strictly between 0 and 1.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"train_held_out_split needs an integer n >= 2 samples, got {n!r}")
    if not 0.0 < float(held_out_fraction) < 1.0:
        raise ValueError(f"held_out_fraction must be strictly between 0 and 1, got {held_out_fraction!r}")
    n_held = min(n - 1, max(1, math.floor(n * float(held_out_fraction) + 0.5)))
    perm = np.random.default_rng(seed).permutation(int(n))
    held = torch.from_numpy(np.sort(perm[:n_held])).long()
    train = torch.from_numpy(np.sort(perm[n_held:])).long()
    return train, held


def check_split(split: str) -> str:
    """``split`` itself if it is one of :data:`SPLITS`; raises ValueError otherwise (used by every loader)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


def check_image_size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``image_size`` (an int or a (height, width) pair) as ``(H, W)``, or None (keep the data's size).

    Raises:
        ValueError: anything but a positive int or a pair of positive ints.
    """
    if image_size is None:
        return None
    size = (image_size, image_size) if isinstance(image_size, (int, np.integer)) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0
                                 for s in size):
        raise ValueError(f"image_size must be a positive int or a (height, width) pair, got {image_size!r}")
    return int(size[0]), int(size[1])


def check_channels(channels: int | None) -> int | None:
    """``channels`` if it is 1, 3 or None (keep the data's); raises ValueError otherwise."""
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise ValueError(f"channels must be 1 (grey-scale), 3 (RGB) or None (keep the data's), got {channels!r}")
    return channels


def select_split(x: Tensor, labels: Tensor, split: str, held_out_fraction: float, split_seed: int,
                 source: str) -> tuple[Tensor, Tensor]:
    """The ``split`` (``train`` / ``held_out`` / ``test`` / ``all``) of ``x`` ``(N, ...)`` and ``labels`` ``(N,)``
    by :func:`train_held_out_split`.

    Raises:
        ValueError: fewer than 2 samples for a train/held-out split (``source`` names the data in the message).
    """
    if split == "all":
        return x, labels
    if x.shape[0] < 2:
        raise ValueError(f"{source} has {x.shape[0]} sample(s); a train/held-out split needs at least 2 "
                         f"(use split='all')")
    train, held = train_held_out_split(x.shape[0], held_out_fraction, split_seed)
    idx = train if split == "train" else held
    return x[idx], labels[idx]


def _set_channels(x: Tensor, channels: int | None) -> Tensor:
    """``(N, C, H, W)`` with C in {1, 3} -> ``channels`` channels (None: unchanged)."""
    if channels is None or x.shape[1] == channels:
        return x
    if channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    w = torch.tensor(_LUMA, dtype=x.dtype).reshape(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _resize(x: Tensor, size: tuple[int, int] | None) -> Tensor:
    """Bilinear (antialiased when shrinking) resize of ``(N, C, H, W)`` to ``size``; stays within the input range."""
    if size is None or tuple(x.shape[-2:]) == size:
        return x
    out = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return out.clamp_(-1.0, 1.0)


def finish_images(x: Tensor, image_size: tuple[int, int] | None, channels: int | None) -> Tensor:
    """``(N, C, H, W)`` in [-1, 1] with C in {1, 3} -> ``channels`` channels (luma for grey), resized to
    ``image_size`` (bilinear, antialiased), float32 and contiguous; None keeps the data's channels / size."""
    return _resize(_set_channels(x, channels), image_size).float().contiguous()


# ---------------------------------------------------------------------------------------------------- digits
