"""Datasets: exact Gaussian mixtures (ground truth for tests and the toy benchmark) and image datasets.

One entry point, :func:`load_dataset`, and :func:`dataset_info` for the sample shape and class count of each name in
:data:`DATASETS`. The image loaders live in :mod:`tagdiff.data.images`; their lazy, one-image-per-item counterparts
for training (mnist, folder, hf) in :mod:`tagdiff.data.streaming`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from .common import DIGITS_SHAPE, MNIST_SHAPE, check_channels, check_image_size
from .common import SPLITS as SPLITS
from .common import train_held_out_split as train_held_out_split
from .folder import folder_info, load_folder
from .gmm import ExactTimePosterior as ExactTimePosterior
from .gmm import GaussianMixture as GaussianMixture
from .gmm import toy_mixture as toy_mixture
from .gmm_flow import ExactSigmaPosterior as ExactSigmaPosterior
from .gmm_flow import FlowGaussianMixture as FlowGaussianMixture
from .images import load_digits
from .mnist import load_mnist
from .streaming import open_dataset

__all__ = [
    "DATASETS",
    "SPLITS",
    "DatasetInfo",
    "ExactSigmaPosterior",
    "ExactTimePosterior",
    "FlowGaussianMixture",
    "GaussianMixture",
    "dataset_info",
    "load_dataset",
    "toy_mixture",
    "train_held_out_split",
]

DATASETS = ("toy", "digits", "mnist", "folder", "hf")
_TOY_NUM_SAMPLES = 40_000


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset: ``sample_shape`` (``(D,)`` for vectors, ``(C, H, W)`` for images) and
    ``num_classes`` (labels are ``0..num_classes-1``); ``class_names`` when the data names them (folder classes)."""

    name: str
    sample_shape: tuple[int, ...]
    num_classes: int
    class_names: tuple[str, ...] | None = None


def _unknown(name: object) -> ValueError:
    return ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")


def _image_shape(shape: tuple[int, int, int], image_size: int | Sequence[int] | None,
                 channels: int | None) -> tuple[int, int, int]:
    size, channels = check_image_size(image_size), check_channels(channels)
    return (channels or shape[0], *(size or shape[1:]))


def dataset_info(name: str, *, data_dir: str | os.PathLike | None = None,
                 image_size: int | Sequence[int] | None = None, channels: int | None = None,
                 image_column: str | None = None, label_column: str | None = None) -> DatasetInfo:
    """Sample shape and number of classes of what :func:`load_dataset` returns for the same arguments.

    ``toy``: ``(2,)``, 2 classes. ``digits``: ``(1, 8, 8)``, 10. ``mnist``: ``(1, 28, 28)``, 10 (no file access).
    ``folder``: read from ``data_dir`` (image headers only; an ``.npz`` is read whole). ``hf``: a Hugging Face
    dataset at ``data_dir`` (:class:`~tagdiff.data.streaming.HFImageDataset`, its first image decoded; ``image_column``
    / ``label_column``). ``image_size`` / ``channels``
    change the image shape as they would when loading (they are ignored for ``toy``).

    Raises:
        ValueError: for an unknown name or bad options; the errors of :func:`tagdiff.data.images.folder_info`.
    """
    if name == "toy":
        mix = toy_mixture()
        return DatasetInfo("toy", (mix.dim,), mix.num_components)
    if name == "digits":
        return DatasetInfo("digits", _image_shape(DIGITS_SHAPE, image_size, channels), 10)
    if name == "mnist":
        return DatasetInfo("mnist", _image_shape(MNIST_SHAPE, image_size, channels), 10)
    if name == "folder":
        if data_dir is None:
            raise ValueError("the folder dataset needs data_dir (--data-dir): a directory of images or an .npz file")
        info = folder_info(data_dir, image_size=image_size, channels=channels)
        return DatasetInfo("folder", info.sample_shape, info.num_classes, info.class_names)
    if name == "hf":
        ds = open_dataset("hf", "all", data_dir=data_dir, image_size=image_size, channels=channels,
                          image_column=image_column, label_column=label_column)
        return DatasetInfo("hf", ds.sample_shape, ds.num_classes, ds.class_names)
    raise _unknown(name)


def load_dataset(name: str, split: str = "train", *, data_dir: str | os.PathLike | None = None,
                 image_size: int | Sequence[int] | None = None, channels: int | None = None, seed: int = 0,
                 num_samples: int | None = None, download: bool = False, held_out_fraction: float = 0.2,
                 split_seed: int = 0, image_column: str | None = None, label_column: str | None = None):
    """Load a dataset by name. Returns ``(x0, labels)``: ``x0`` of shape ``(N, *D)`` float32, ``labels`` ``(N,)`` int64.

    * ``"toy"``: ``num_samples`` (default 40,000, as in the paper) draws of the paper's two-Gaussian mixture
      (docs/notation.md §6.1) with ``seed``; ``split`` and the image options are ignored.
    * ``"digits"``: scikit-learn's bundled 8×8 digits, ``(N, 1, 8, 8)`` in ``[-1, 1]``; the embedded default image
      dataset (no download).
    * ``"mnist"``: the MNIST IDX files in ``data_dir`` (default ``$TAGDIFF_DATA_DIR/mnist`` or
      ``~/.cache/tagdiff/mnist``), ``(N, 1, 28, 28)`` in ``[-1, 1]``; ``download=True`` fetches missing files.
    * ``"folder"``: the user's images, ``data_dir`` = a directory of PNG/JPEG files (flat or one sub-folder per class)
      or an ``.npz`` file (see :func:`tagdiff.data.images.load_folder` for the rules).
    * ``"hf"``: a Hugging Face ``datasets`` dataset at ``data_dir`` (``image_column`` / ``label_column``), decoded
      whole from :class:`~tagdiff.data.streaming.HFImageDataset` (training streams it instead:
      :func:`tagdiff.data.streaming.open_dataset`).

    Splits (image datasets): ``"train"``, ``"held_out"`` (= ``"test"``) and ``"all"``. ``digits`` and ``folder`` use
    :func:`train_held_out_split` with ``held_out_fraction`` and ``split_seed``, which is separate from ``seed`` so
    that training and evaluation runs with different seeds still see disjoint splits; ``mnist`` uses its official
    train / t10k files. For image datasets ``num_samples`` (default: all) keeps at most that many samples of the
    split, a random subset drawn with ``seed`` (in their original order).

    Raises:
        ValueError: for an unknown dataset name (listing the known ones), split or option, and for bad data
            (naming the file); see :mod:`tagdiff.data.images`.
        FileNotFoundError: for missing MNIST files or a missing ``data_dir`` (a failed download is a
            :class:`~tagdiff.data.images.DownloadError`, itself a FileNotFoundError).
    """
    import numpy as np
    import torch

    if name == "toy":
        n = _TOY_NUM_SAMPLES if num_samples is None else num_samples
        return toy_mixture().sample(n, torch.Generator().manual_seed(seed))
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 1):
        raise ValueError(f"num_samples must be a positive integer or None, got {num_samples!r}")

    if name == "digits":
        x, labels = load_digits(split, image_size=image_size, channels=channels,
                                       held_out_fraction=held_out_fraction, split_seed=split_seed)
    elif name == "mnist":
        x, labels = load_mnist(split, data_dir=data_dir, download=download, image_size=image_size,
                                      channels=channels)
    elif name == "folder":
        if data_dir is None:
            raise ValueError("the folder dataset needs data_dir (--data-dir): a directory of images or an .npz file")
        x, labels = load_folder(data_dir, split, image_size=image_size, channels=channels,
                                       held_out_fraction=held_out_fraction, split_seed=split_seed)
    elif name == "hf":
        ds = open_dataset("hf", split, data_dir=data_dir, image_size=image_size, channels=channels,
                          held_out_fraction=held_out_fraction, split_seed=split_seed, image_column=image_column,
                          label_column=label_column)
        x, labels = torch.stack([ds[i] for i in range(len(ds))]), ds.labels
    else:
        raise _unknown(name)
    if num_samples is not None and num_samples < x.shape[0]:
        keep = np.sort(np.random.default_rng(seed).choice(x.shape[0], num_samples, replace=False))
        idx = torch.from_numpy(keep).long()
        x, labels = x[idx], labels[idx]
    return x, labels
