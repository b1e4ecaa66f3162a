"""Map-style datasets that decode one image per item, for :func:`tagdiff.training.train`'s DataLoader path.

Each gives ``dataset[i]`` = image ``i`` as float32 ``(C, H, W)`` in ``[-1, 1]`` (the value scaling, ``image_size`` and
``channels`` of :mod:`tagdiff.data.images`), and holds ``labels`` (int64 ``(N,)``), ``sample_shape`` and
``num_classes``; none holds the decoded float set:

* :class:`MNISTDataset`: a view over the uint8 IDX arrays (47 MB for the training file, a quarter of float32);
  ``dataset[i]`` equals ``load_mnist(...)[0][i]`` bit for bit.
* :class:`NpzDataset`: an ``.npz`` archive's image array kept in its stored dtype, scaled per item by the rules of
  :func:`~tagdiff.data.folder.load_folder` (decided once from the whole array); equals ``load_folder`` bit for bit.
* :class:`HFImageDataset`: a Hugging Face ``datasets`` dataset on disk (``save_to_disk`` folder, an image folder
  read by the ``imagefolder`` builder, or any folder ``datasets.load_dataset`` reads); decoded through Pillow as
  :class:`~tagdiff.data.folder.ImageFolderDataset` decodes files, so an image folder read either way gives the same
  items.
* :class:`~tagdiff.data.folder.ImageFolderDataset` (in :mod:`tagdiff.data.folder`): a directory of image files.

:class:`WithLabels` pairs any of them with condition labels (``(x, c)`` items, what :func:`train` passes to the loss);
:func:`open_dataset` opens one by dataset name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .common import MNIST_SHAPE, check_channels, check_image_size, check_split, finish_images, train_held_out_split
from .folder import (
    IMAGE_EXTENSIONS,
    ImageFolderDataset,
    check_path,
    npz_apply,
    npz_arrays,
    npz_labels,
    npz_layout,
    npz_rule,
    npz_to_nchw,
    pil_array,
)
from .mnist import mnist_arrays

__all__ = ["HFImageDataset", "MNISTDataset", "MissingDependencyError", "NpzDataset", "WithLabels", "open_dataset"]

STREAMING_DATASETS = ("mnist", "folder", "hf")


class MissingDependencyError(ImportError):
    """An optional package is not installed; the message names the pip command."""


def _split_indices(n: int, split: str, held_out_fraction: float, split_seed: int, source: str) -> Tensor | None:
    """Indices of ``split`` of ``n`` samples by :func:`train_held_out_split` (``None`` for ``all``)."""
    if split == "all":
        return None
    if n < 2:
        raise ValueError(f"{source} has {n} sample(s); a train/held-out split needs at least 2 (use split='all')")
    train, held = train_held_out_split(n, held_out_fraction, split_seed)
    return train if split == "train" else held


class _ImageDataset(torch.utils.data.Dataset):
    """Common part: ``rows`` (indices into the source, or None for all), ``labels``, ``sample_shape``."""

    rows: Tensor | None
    labels: Tensor
    sample_shape: tuple[int, int, int]
    num_classes: int
    class_names: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def _row(self, i: int) -> int:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} is out of range for a dataset of {len(self)} images")
        i = i % len(self)
        return i if self.rows is None else int(self.rows[i])


class MNISTDataset(_ImageDataset):
    """MNIST decoded per item from its uint8 IDX arrays (:func:`~tagdiff.data.mnist.mnist_arrays`).

    Args: as :func:`~tagdiff.data.mnist.load_mnist` (``split``, ``data_dir``, ``download``, ``verify``,
    ``image_size``, ``channels``).

    Raises:
        The errors of :func:`~tagdiff.data.mnist.load_mnist`.
    """

    def __init__(self, split: str = "train", *, data_dir: str | os.PathLike | None = None, download: bool = False,
                 verify: bool = True, image_size: int | Sequence[int] | None = None, channels: int | None = None):
        self.size, self.channels = check_image_size(image_size), check_channels(channels)
        self.images, labels = mnist_arrays(split, data_dir=data_dir, download=download, verify=verify)
        self.rows, self.labels, self.num_classes = None, torch.from_numpy(labels), 10
        self.sample_shape = (self.channels or 1, *(self.size or MNIST_SHAPE[1:]))

    def __getitem__(self, i: int) -> Tensor:
        x = torch.from_numpy(self.images[self._row(i)]).float()[None, None] / 127.5 - 1.0
        return finish_images(x, self.size, self.channels)[0]


class NpzDataset(_ImageDataset):
    """An ``.npz`` archive (the rules of :func:`~tagdiff.data.folder.load_folder`) scaled and resized per item.

    The image array is held in its stored dtype (uint8: 1 byte per pixel); the value range rule for floats is decided
    once from the whole array. ``split`` / ``held_out_fraction`` / ``split_seed`` as for ``load_folder``.

    Raises:
        The errors of :func:`~tagdiff.data.folder.load_folder` for an ``.npz``.
    """

    def __init__(self, path: str | os.PathLike, split: str = "train", *,
                 image_size: int | Sequence[int] | None = None, channels: int | None = None,
                 held_out_fraction: float = 0.2, split_seed: int = 0):
        check_split(split)
        self.size, self.channels = check_image_size(image_size), check_channels(channels)
        self.path = check_path(path)
        raw, y = npz_arrays(self.path)
        self.layout = npz_layout(tuple(raw.shape), self.path)
        if raw.shape[0] == 0:
            raise ValueError(f"{self.path}: image array has no images (shape {raw.shape})")
        self.raw = raw
        self.rule = npz_rule(raw, self.path)  # integer range check; float [0, 1] or [-1, 1]: once, on the whole array
        labels = npz_labels(y, raw.shape[0], self.path)
        self.rows = _split_indices(raw.shape[0], split, held_out_fraction, split_seed, str(self.path))
        self.labels = labels if self.rows is None else labels[self.rows]
        self.num_classes = int(labels.max()) + 1 if labels.numel() else 1
        c = 1 if self.layout == "NHW" else raw.shape[3] if self.layout == "NHWC" else raw.shape[1]
        hw = raw.shape[1:3] if self.layout in ("NHW", "NHWC") else raw.shape[2:4]
        self.sample_shape = (self.channels or int(c), *(self.size or tuple(int(s) for s in hw)))

    def __getitem__(self, i: int) -> Tensor:
        arr = npz_apply(self.raw[self._row(i)][None], self.rule)
        x = npz_to_nchw(torch.from_numpy(np.ascontiguousarray(arr)), self.layout)
        return finish_images(x, self.size, self.channels)[0]


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError("--dataset hf needs Hugging Face datasets: pip install datasets (or pip install "
                                     "'tagdiff[hf]')") from None
    return datasets


def _hf_load(path: Path, cache_dir: str | None) -> Any:
    """The dataset at ``path``: ``load_from_disk`` for a ``save_to_disk`` folder, else ``load_dataset`` (the
    ``imagefolder`` builder for a folder of images only); a DatasetDict gives its ``train`` split (or its only one)."""
    datasets = _import_datasets()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; expected a Hugging Face dataset folder (save_to_disk, an "
                                "image folder, or a folder datasets.load_dataset reads)")
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # (stderr stays for tagdiff's own lines)
    try:
        if (path / "dataset_info.json").exists() and (path / "state.json").exists() \
                or (path / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(path))
        elif path.is_dir() and all(p.suffix.lower() in IMAGE_EXTENSIONS or p.is_dir() or p.name.startswith(".")
                                   or p.suffix.lower() in (".csv", ".jsonl") and p.stem == "metadata"
                                   for p in path.rglob("*")):
            ds = datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=cache_dir)
        else:
            ds = datasets.load_dataset(str(path), cache_dir=cache_dir)
    except Exception as e:  # the loaders' own errors (DatasetNotFoundError, DatasetGenerationError, ...)
        raise ValueError(f"cannot read {path} as a Hugging Face dataset: {(str(e).splitlines() or [''])[0]}") from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds and len(ds) != 1:
            raise ValueError(f"{path} has splits {', '.join(ds)} but no 'train' split; save the one to train on")
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    return ds


class HFImageDataset(_ImageDataset):
    """A Hugging Face ``datasets`` dataset on disk with an image column, decoded per item.

    The data is the dataset's ``train`` split (or its only split); ``split`` ``"train"`` / ``"held_out"`` /
    ``"all"`` are taken from it with :func:`~tagdiff.data.images.train_held_out_split`, as for a folder, so an image
    folder read with ``imagefolder`` (files in sorted path order, labels = sorted sub-folder names) gives the same
    splits, items and labels as :class:`~tagdiff.data.folder.ImageFolderDataset` on the same files.

    Args:
        path: a ``save_to_disk`` folder, an image folder (flat or class sub-folders), or a folder
            ``datasets.load_dataset`` reads.
        image_column: default: the first ``datasets.Image`` column, else ``"image"`` or ``"img"``.
        label_column: default ``"label"`` if present, else unlabelled (all 0); must hold non-negative integers.
        image_size, channels: as for a folder; ``None`` takes the first image's size and mode (grey-scale → 1,
            else 3); then every image must have that size.
        cache_dir: ``datasets``' cache for builders (default: its own, ``HF_DATASETS_CACHE``).

    Raises:
        MissingDependencyError: ``datasets`` is not installed (``pip install datasets``).
        ValueError: a missing column (listing the columns), a column that is not an image / integer label column,
            an unreadable dataset, or bad options.
        FileNotFoundError: ``path`` does not exist.
    """

    def __init__(self, path: str | os.PathLike, split: str = "train", *, image_column: str | None = None,
                 label_column: str | None = None, image_size: int | Sequence[int] | None = None,
                 channels: int | None = None, held_out_fraction: float = 0.2, split_seed: int = 0,
                 cache_dir: str | None = None):
        check_split(split)
        self.size, self.channels = check_image_size(image_size), check_channels(channels)
        self.path = Path(path).expanduser()
        datasets = _import_datasets()
        ds = _hf_load(self.path, cache_dir)
        features, cols = ds.features, list(ds.column_names)
        if image_column is None:
            found = [k for k, f in features.items() if isinstance(f, datasets.Image)]
            image_column = found[0] if found else next((k for k in ("image", "img") if k in cols), None)
            if image_column is None:
                raise ValueError(f"{self.path} has no image column (columns: {', '.join(cols)}); pass --image-column")
        if image_column not in cols:
            raise ValueError(f"{self.path} has no column {image_column!r} (--image-column); columns: {', '.join(cols)}")
        if not isinstance(features[image_column], datasets.Image):
            raise ValueError(f"column {image_column!r} of {self.path} is not an image column (its feature is "
                             f"{features[image_column]}); pass --image-column with an Image column")
        if label_column is not None and label_column not in cols:
            raise ValueError(f"{self.path} has no column {label_column!r} (--label-column); columns: {', '.join(cols)}")
        label_column = label_column or ("label" if "label" in cols else None)
        names = None
        if label_column is None:
            labels = torch.zeros(len(ds), dtype=torch.int64)
        else:
            feat = features[label_column]
            if isinstance(feat, datasets.ClassLabel):
                names = tuple(feat.names)
            elif not (isinstance(feat, datasets.Value) and ("int" in feat.dtype or feat.dtype == "bool")):
                raise ValueError(f"column {label_column!r} of {self.path} does not hold integer labels (its feature "
                                 f"is {feat}); pass --label-column with an integer or ClassLabel column")
            labels = torch.as_tensor(np.asarray(ds[label_column], dtype=np.int64))
            if labels.numel() and int(labels.min()) < 0:
                raise ValueError(f"column {label_column!r} of {self.path} has negative labels ({int(labels.min())});"
                                 " expected 0..K-1")
        self.ds, self.image_column, self.label_column = ds, image_column, label_column
        self.rows = _split_indices(len(ds), split, held_out_fraction, split_seed, str(self.path))
        self.labels = labels if self.rows is None else labels[self.rows]
        self.num_classes = len(names) if names else (int(labels.max()) + 1 if labels.numel() else 1)
        self.class_names = names
        if self.size is None or self.channels is None:
            first = self._image(0 if self.rows is None else int(self.rows[0]))
            if self.channels is None:
                self.channels = 1 if first.mode in ("1", "L", "LA", "I", "F") or first.mode.startswith("I;") else 3
            if self.size is None:
                self.size = (first.size[1], first.size[0])
        self.sample_shape = (self.channels, *self.size)
        self._fixed = image_size is None

    def _image(self, row: int) -> Any:
        from PIL import ImageOps

        img = self.ds[row][self.image_column]
        if img is None:
            raise ValueError(f"row {row} of {self.path} has no image in column {self.image_column!r}")
        return ImageOps.exif_transpose(img)

    def __getitem__(self, i: int) -> Tensor:
        row = self._row(i)
        img = self._image(row)
        if self._fixed and (img.size[1], img.size[0]) != self.size:
            raise ValueError(f"image {row} of {self.path} is {img.size[1]}x{img.size[0]} but the first is "
                             f"{self.size[0]}x{self.size[1]}; pass --image-size to resize them all")
        return torch.from_numpy(np.ascontiguousarray(pil_array(img, self.channels, self.size)))


class WithLabels(torch.utils.data.Dataset):
    """``(dataset[i], labels[i])`` items: a Dataset of images paired with condition labels ``(N,)`` int64 (class,
    joint condition, attribute level ...), the form :func:`~tagdiff.training.train` passes to the loss as ``c``.

    Raises:
        ValueError: ``labels`` whose length is not ``len(dataset)``.
    """

    def __init__(self, dataset: Any, labels: Tensor):
        if labels.shape[0] != len(dataset):
            raise ValueError(f"labels has {labels.shape[0]} entries but the dataset has {len(dataset)} items")
        self.dataset, self.labels = dataset, labels.long()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x = self.dataset[i]
        return (x[0] if isinstance(x, (tuple, list)) else x), int(self.labels[i])


def open_dataset(name: str, split: str = "train", *, data_dir: str | os.PathLike | None = None,
                 image_size: int | Sequence[int] | None = None, channels: int | None = None,
                 download: bool = False, held_out_fraction: float = 0.2, split_seed: int = 0,
                 image_column: str | None = None, label_column: str | None = None) -> Any:
    """The lazy Dataset of ``name`` in :data:`STREAMING_DATASETS` (``mnist``, ``folder`` (a directory or an
    ``.npz``), ``hf``), with the same items as :func:`tagdiff.data.load_dataset` (hf: :class:`HFImageDataset`).

    Raises:
        ValueError: an unknown name or a missing ``data_dir``; the errors of the dataset classes.
    """
    if name == "mnist":
        return MNISTDataset(split, data_dir=data_dir, download=download, image_size=image_size, channels=channels)
    if name not in ("folder", "hf"):
        raise ValueError(f"dataset {name!r} is not streamed; expected one of {', '.join(STREAMING_DATASETS)}")
    if data_dir is None:
        what = "a directory of images or an .npz file" if name == "folder" else "a Hugging Face dataset folder"
        raise ValueError(f"the {name} dataset needs data_dir (--data-dir): {what}")
    kw = {"image_size": image_size, "channels": channels, "held_out_fraction": held_out_fraction,
          "split_seed": split_seed}
    if name == "hf":
        return HFImageDataset(data_dir, split, image_column=image_column, label_column=label_column, **kw)
    if check_path(data_dir).is_file():
        return NpzDataset(data_dir, split, **kw)
    return ImageFolderDataset(data_dir, split, **kw)
