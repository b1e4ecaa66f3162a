"""Image datasets: scikit-learn's digits, MNIST (IDX files) and the user's own images (a folder or an ``.npz``).

Every loader returns ``(x, labels)``: ``x`` float32 of shape ``(N, C, H, W)`` scaled to ``[-1, 1]`` (pixel value
``v`` in ``0..255`` maps to ``v / 127.5 - 1``), ``labels`` int64 of shape ``(N,)``.

Splits (``split=``):

* ``"train"`` / ``"held_out"``: for ``digits`` and ``folder``, a seeded random partition of the samples
  (:func:`train_held_out_split`, default held-out fraction 0.2, ``split_seed=0``); for ``mnist``, the official
  60,000-image training file and 10,000-image t10k file.
* ``"test"``: the same as ``"held_out"``.
* ``"all"``: every sample (``mnist``: the training file followed by the t10k file).

``image_size`` (an int ``S`` for ``S × S``, or ``(H, W)``) resizes bilinearly, and ``channels`` (1 or 3) converts
grey-scale to RGB (channel copies) or RGB to grey-scale (ITU-R 601-2 luma, ``0.299 R + 0.587 G + 0.114 B``, as
Pillow's ``convert("L")``).

This module holds the digits loader; MNIST lives in :mod:`tagdiff.data.mnist`, folders / ``.npz`` files in
:mod:`tagdiff.data.folder`, and what they share (splits, option checks, resizing / channel conversion) in
:mod:`tagdiff.data.common`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .._utils import require
from .common import DIGITS_SHAPE, check_channels, check_image_size, check_split, finish_images, select_split

__all__ = ["load_digits"]


def load_digits(split: str = "train", *, image_size: int | Sequence[int] | None = None, channels: int | None = None,
                held_out_fraction: float = 0.2, split_seed: int = 0) -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled 8×8 digits (1,797 images, values 0..16, 10 classes); no download.

    Pixel ``v`` maps to ``v / 8 - 1``. ``"train"`` / ``"held_out"`` (= ``"test"``) come from
    :func:`train_held_out_split` with ``held_out_fraction`` and ``split_seed`` (1,438 / 359 images by default).

    Returns:
        ``(x, labels)``: ``x`` float32 ``(N, C, H, W)`` in ``[-1, 1]`` (default ``(N, 1, 8, 8)``), labels int64 ``(N,)``
        in ``0..9``.

    Raises:
        ValueError: for an unknown split, a bad ``image_size`` / ``channels`` or ``held_out_fraction``.
    """
    _sk_load_digits = require("sklearn.datasets", "data", "the digits dataset (scikit-learn)").load_digits

    check_split(split)
    size, channels = check_image_size(image_size), check_channels(channels)
    bunch = _sk_load_digits()
    x = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32)).reshape(-1, *DIGITS_SHAPE) / 8.0 - 1.0
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    x, labels = select_split(x, labels, split, held_out_fraction, split_seed, "digits")
    return finish_images(x, size, channels), labels
