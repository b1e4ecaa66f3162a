"""MNIST from its four IDX files (raw or gzipped): reading, md5 checks and download from public mirrors.

The public names are also importable from :mod:`tagdiff.data.images`; see there for the value scaling, splits and
the ``image_size`` / ``channels`` options.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import urllib.error
import zlib
from collections.abc import Sequence
from pathlib import Path
from urllib.request import urlopen as _urlopen

import numpy as np
import torch
from torch import Tensor

from .._io import atomic_write_bytes
from .common import MNIST_SHAPE, check_channels, check_image_size, check_split, finish_images

__all__ = [
    "MNIST_FILES",
    "MNIST_MD5",
    "MNIST_MIRRORS",
    "DownloadError",
    "default_data_dir",
    "download_mnist",
    "load_mnist",
    "mnist_arrays",
    "read_idx",
]

#: md5 of the *uncompressed* bytes of the four MNIST IDX files (a re-gzipped file keeps these).
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MNIST_FILES = tuple(MNIST_MD5)
#: Public mirrors of the gzipped IDX files, tried in order; ``<mirror><name>.gz`` is the file's URL.
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
_MNIST_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class DownloadError(FileNotFoundError):
    """MNIST files are missing and could not be fetched from any mirror (a :class:`FileNotFoundError`: the files
    are still not there). The message lists each URL tried and why it failed, and suggests ``--data-dir``."""


def default_data_dir() -> Path:
    """Where downloaded data goes when no folder is named: ``$TAGDIFF_DATA_DIR`` or else ``~/.cache/tagdiff``."""
    env = os.environ.get("TAGDIFF_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tagdiff"


def _mnist_dir(data_dir: str | os.PathLike | None) -> Path:
    return Path(data_dir).expanduser() if data_dir is not None else default_data_dir() / "mnist"


def _find(folder: Path, name: str) -> Path | None:
    """``folder/name`` (preferred: no decompression) or ``folder/name.gz``, whichever exists."""
    for p in (folder / name, folder / f"{name}.gz"):
        if p.is_file():
            return p
    return None


def _read_bytes(path: Path) -> bytes:
    """The uncompressed bytes of ``path`` (gunzipped if its name ends in ``.gz``)."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        return gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path} is not a valid gzip file ({e})") from None


def _parse_idx(data: bytes, source: str) -> np.ndarray:
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES or data[3] == 0:
        raise ValueError(f"{source} is not an IDX file: its header {data[:4].hex() or '(empty)'} should be "
                         f"00 00 <type code> <ndim>")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{source} is a truncated IDX file: {len(data)} bytes cannot hold {ndim} dimension sizes")
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = 4 + 4 * ndim + math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{source} is a malformed IDX file: header says shape {shape} ({expected} bytes in all) but "
                         f"the file has {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike, expected_md5: str | None = None) -> np.ndarray:
    """Read an IDX file (raw, or gzipped if the name ends in ``.gz``) into a NumPy array of its shape and type.

    Args:
        path: the file. expected_md5: if given, the md5 hex digest the *uncompressed* bytes must have.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: naming the file, for a bad gzip stream, an md5 mismatch, or a malformed IDX header / size.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {path} does not exist")
    data = _read_bytes(path)
    if expected_md5 is not None:
        got = hashlib.md5(data).hexdigest()
        if got != expected_md5:
            raise ValueError(f"{path}: md5 of the uncompressed bytes is {got}, expected {expected_md5} "
                             f"(corrupt or not the official file; delete it and download again)")
    return _parse_idx(data, str(path))


def download_mnist(data_dir: str | os.PathLike | None = None, *, mirrors: Sequence[str] | None = None,
                   timeout: float = 60.0) -> Path:
    """Fetch the MNIST IDX files missing from ``data_dir`` (``.gz`` from the first mirror that serves a file whose
    uncompressed md5 matches :data:`MNIST_MD5`) and write them there atomically. Files already present are kept.

    Args:
        data_dir: target folder (created if needed); default ``default_data_dir() / "mnist"``.
        mirrors: URL prefixes tried in order (default :data:`MNIST_MIRRORS`). timeout: seconds per request.

    Returns:
        The folder.

    Raises:
        DownloadError: (a :class:`FileNotFoundError`) if some file could not be fetched from any mirror; the message
            lists every URL tried with its error and suggests ``--data-dir``.
    """
    folder = _mnist_dir(data_dir)
    mirrors = MNIST_MIRRORS if mirrors is None else tuple(mirrors)
    for name in MNIST_FILES:
        if _find(folder, name) is not None:
            continue
        errors = []
        for mirror in mirrors:
            url = f"{mirror}{name}.gz"
            try:
                with _urlopen(url, timeout=timeout) as response:
                    payload = response.read()
            except (urllib.error.URLError, OSError, ValueError) as e:
                errors.append(f"{url}: {getattr(e, 'reason', None) or e}")
                continue
            try:
                got = hashlib.md5(gzip.decompress(payload)).hexdigest()
            except (OSError, EOFError, zlib.error) as e:
                errors.append(f"{url}: not a gzip file ({e})")
                continue
            if got != MNIST_MD5[name]:
                errors.append(f"{url}: md5 of the uncompressed bytes is {got}, expected {MNIST_MD5[name]}")
                continue
            atomic_write_bytes(folder / f"{name}.gz", payload)
            break
        else:
            raise DownloadError(
                f"could not download {name}.gz into {folder}:\n  " + "\n  ".join(errors or ["no mirrors given"])
                + f"\nDownload the four MNIST files ({', '.join(n + '.gz' for n in MNIST_FILES)}) yourself and pass "
                "their folder with --data-dir (data_dir=...)")
    return folder


def load_mnist(split: str = "train", *, data_dir: str | os.PathLike | None = None, download: bool = False,
               verify: bool = True, image_size: int | Sequence[int] | None = None,
               channels: int | None = None) -> tuple[Tensor, Tensor]:
    """MNIST from the four IDX files in ``data_dir`` (each raw or ``.gz``; a raw file is preferred if both exist).

    ``"train"``: the 60,000-image training file; ``"held_out"`` / ``"test"``: the 10,000-image t10k file; ``"all"``:
    both, in that order. Only the files of the requested split are read.

    Args:
        data_dir: folder holding the files; default ``default_data_dir() / "mnist"``.
        download: fetch missing files first (:func:`download_mnist`).
        verify: check each file's uncompressed md5 against :data:`MNIST_MD5`.
        image_size, channels: optional resize / channel conversion (see :mod:`tagdiff.data.images`).

    Returns:
        ``(x, labels)``: ``x`` float32 ``(N, 1, 28, 28)`` in ``[-1, 1]`` (by default), labels int64 ``(N,)`` in 0..9.

    Raises:
        FileNotFoundError: if files are missing (naming the folder and the expected file names); with
            ``download=True``, :class:`DownloadError` if fetching failed.
        ValueError: naming the file, for an md5 mismatch or a malformed IDX file / content; for a bad split,
            ``image_size`` or ``channels``.
    """
    check_split(split)
    size, channels = check_image_size(image_size), check_channels(channels)
    images, labels = mnist_arrays(split, data_dir=data_dir, download=download, verify=verify)
    x = torch.from_numpy(images).unsqueeze(1).float() / 127.5 - 1.0
    return finish_images(x, size, channels), torch.from_numpy(labels)


def mnist_arrays(split: str = "train", *, data_dir: str | os.PathLike | None = None, download: bool = False,
                 verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The raw MNIST arrays of ``split`` (as :func:`load_mnist`): uint8 images ``(N, 28, 28)`` (0..255, 784 bytes
    each) and int64 labels ``(N,)``; what :class:`~tagdiff.data.streaming.MNISTDataset` indexes lazily.

    Raises:
        The errors of :func:`load_mnist`.
    """
    check_split(split)
    folder = _mnist_dir(data_dir)
    if download:
        download_mnist(folder)
    parts = ["train", "test"] if split == "all" else ["train" if split == "train" else "test"]
    needed = [name for part in parts for name in _MNIST_SPLIT_FILES[part]]
    missing = [name for name in needed if _find(folder, name) is None]
    if missing:
        where = f"folder {folder} does not exist" if not folder.is_dir() else f"{folder} lacks {', '.join(missing)}"
        raise FileNotFoundError(
            f"MNIST not found: {where}. Expected the IDX files {', '.join(MNIST_FILES)} (each raw or .gz) in one "
            "folder; pass it with --data-dir (data_dir=...), or use --download (download=True) to fetch them")
    xs, ys = [], []
    for part in parts:
        img_name, lab_name = _MNIST_SPLIT_FILES[part]
        img_path, lab_path = _find(folder, img_name), _find(folder, lab_name)
        images = read_idx(img_path, MNIST_MD5[img_name] if verify else None)
        labels = read_idx(lab_path, MNIST_MD5[lab_name] if verify else None)
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != MNIST_SHAPE[1:]:
            raise ValueError(f"{img_path}: expected uint8 images of shape (N, 28, 28), got {images.dtype} "
                             f"{images.shape}")
        if labels.dtype != np.uint8 or labels.shape != images.shape[:1]:
            raise ValueError(f"{lab_path}: expected {images.shape[0]} uint8 labels (one per image in {img_path.name}), "
                             f"got {labels.dtype} {labels.shape}")
        if labels.size and labels.max() > 9:
            raise ValueError(f"{lab_path}: labels must be digits 0..9, found {int(labels.max())}")
        xs.append(images)
        ys.append(labels.astype(np.int64))
    if len(xs) == 1:
        return xs[0], ys[0]
    return np.concatenate(xs), np.concatenate(ys)
