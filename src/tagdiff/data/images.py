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
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import urllib.error
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.request import urlopen as _urlopen

import numpy as np
import torch
from torch import Tensor

from .._utils import atomic_write_bytes

__all__ = [
    "DIGITS_SHAPE",
    "IMAGE_EXTENSIONS",
    "MNIST_FILES",
    "MNIST_MD5",
    "MNIST_MIRRORS",
    "MNIST_SHAPE",
    "SPLITS",
    "DownloadError",
    "FolderInfo",
    "default_data_dir",
    "download_mnist",
    "folder_info",
    "load_digits",
    "load_folder",
    "load_mnist",
    "read_idx",
    "train_held_out_split",
]

SPLITS = ("train", "held_out", "test", "all")
DIGITS_SHAPE = (1, 8, 8)
MNIST_SHAPE = (1, 28, 28)

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
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N")
_LUMA = (0.299, 0.587, 0.114)


class DownloadError(FileNotFoundError):
    """MNIST files are missing and could not be fetched from any mirror (a :class:`FileNotFoundError`: the files
    are still not there). The message lists each URL tried and why it failed, and suggests ``--data-dir``."""


# ---------------------------------------------------------------------------------------------------- shared helpers
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


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


def _check_image_size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    size = (image_size, image_size) if isinstance(image_size, (int, np.integer)) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0
                                 for s in size):
        raise ValueError(f"image_size must be a positive int or a (height, width) pair, got {image_size!r}")
    return int(size[0]), int(size[1])


def _check_channels(channels: int | None) -> int | None:
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise ValueError(f"channels must be 1 (grey-scale), 3 (RGB) or None (keep the data's), got {channels!r}")
    return channels


def _select(x: Tensor, labels: Tensor, split: str, held_out_fraction: float, split_seed: int,
            source: str) -> tuple[Tensor, Tensor]:
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


def _finish(x: Tensor, image_size: tuple[int, int] | None, channels: int | None) -> Tensor:
    return _resize(_set_channels(x, channels), image_size).float().contiguous()


# ---------------------------------------------------------------------------------------------------- digits
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
    from sklearn.datasets import load_digits as _sk_load_digits

    _check_split(split)
    size, channels = _check_image_size(image_size), _check_channels(channels)
    bunch = _sk_load_digits()
    x = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32)).reshape(-1, *DIGITS_SHAPE) / 8.0 - 1.0
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    x, labels = _select(x, labels, split, held_out_fraction, split_seed, "digits")
    return _finish(x, size, channels), labels


# ---------------------------------------------------------------------------------------------------- MNIST
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
        image_size, channels: optional resize / channel conversion (see the module docstring).

    Returns:
        ``(x, labels)``: ``x`` float32 ``(N, 1, 28, 28)`` in ``[-1, 1]`` (by default), labels int64 ``(N,)`` in 0..9.

    Raises:
        FileNotFoundError: if files are missing (naming the folder and the expected file names); with
            ``download=True``, :class:`DownloadError` if fetching failed.
        ValueError: naming the file, for an md5 mismatch or a malformed IDX file / content; for a bad split,
            ``image_size`` or ``channels``.
    """
    _check_split(split)
    size, channels = _check_image_size(image_size), _check_channels(channels)
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
        xs.append(torch.from_numpy(images))
        ys.append(torch.from_numpy(labels.astype(np.int64)))
    x = torch.cat(xs).unsqueeze(1).float() / 127.5 - 1.0
    return _finish(x, size, channels), torch.cat(ys)


# ---------------------------------------------------------------------------------------------------- folder / npz
@dataclass(frozen=True)
class FolderInfo:
    """What :func:`load_folder` would return, without decoding the images.

    ``sample_shape`` ``(C, H, W)``; ``num_classes``; ``class_names`` (sub-folder names, or ``None`` for a flat folder /
    an ``.npz``); ``num_samples`` over all splits.
    """

    sample_shape: tuple[int, int, int]
    num_classes: int
    class_names: tuple[str, ...] | None
    num_samples: int


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _is_image(p: Path) -> bool:
    return p.is_file() and _visible(p) and p.suffix.lower() in IMAGE_EXTENSIONS


def _scan_images(root: Path) -> tuple[list[Path], list[int], tuple[str, ...] | None]:
    """Image files, labels and class names of a flat or class-per-sub-folder directory (sorted)."""
    entries = sorted(p for p in root.iterdir() if _visible(p))
    subdirs = [p for p in entries if p.is_dir()]
    loose = [p for p in entries if _is_image(p)]
    if not subdirs:
        if not loose:
            raise ValueError(f"image folder {root} has no {'/'.join(IMAGE_EXTENSIONS)} images (and no class "
                             "sub-folders)")
        return loose, [0] * len(loose), None
    if loose:
        raise ValueError(f"image folder {root} mixes class sub-folders ({', '.join(p.name for p in subdirs[:5])}) with "
                         f"loose images ({loose[0].name}, ...); put every image in a class sub-folder, or use a flat "
                         "folder")
    files, labels = [], []
    for k, d in enumerate(subdirs):
        found = sorted(p for p in d.rglob("*") if _is_image(p)
                       and not any(part.startswith(".") for part in p.relative_to(d).parts))
        if not found:
            raise ValueError(f"class sub-folder {d} has no {'/'.join(IMAGE_EXTENSIONS)} images")
        files += found
        labels += [k] * len(found)
    return files, labels, tuple(p.name for p in subdirs)


def _open_image(path: Path) -> Any:
    from PIL import Image, ImageOps

    try:
        img = Image.open(path)
        img.load()
        return ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"cannot read image {path}: {e}") from None


def _header(path: Path) -> tuple[str, tuple[int, int]]:
    """``(mode, (height, width))`` from the header only (EXIF rotations of 90° swap the sides)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            w, h = img.size
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                w, h = h, w
            return img.mode, (h, w)
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def _image_array(path: Path, channels: int, size: tuple[int, int]) -> np.ndarray:
    """Decode one image to float32 ``(channels, H, W)`` in ``[-1, 1]`` (bilinear resize to ``size``)."""
    from PIL import Image

    img = _open_image(path)
    if img.mode.startswith("I"):  # 16/32-bit grey-scale (16-bit PNG): keep the precision, full scale 65535
        img = Image.fromarray(np.asarray(img, dtype=np.float32) / np.float32(65535.0 / 255.0), mode="F")
    else:
        img = img.convert("L" if channels == 1 else "RGB")  # alpha is dropped, not composited
    if img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)
    arr = np.clip(arr, -1.0, 1.0)
    if arr.ndim == 2:
        arr = np.repeat(arr[None], channels, axis=0)
    else:
        arr = arr.transpose(2, 0, 1)
    return arr


def _plan_directory(root: Path, size: tuple[int, int] | None, channels: int | None):
    files, labels, names = _scan_images(root)
    headers = [_header(p) for p in files]
    if channels is None:
        channels = 1 if all(mode in _GREY_MODES for mode, _ in headers) else 3
    if size is None:
        sizes = {hw for _, hw in headers}
        if len(sizes) > 1:
            first = {hw: p for p, (_, hw) in zip(files, headers)}
            examples = ", ".join(f"{p.name}: {h}x{w}" for (h, w), p in list(first.items())[:3])
            raise ValueError(f"images in {root} have different sizes ({examples}); pass image_size (--image-size) "
                             "to resize them all")
        size = sizes.pop()
    return files, labels, names, channels, size


def _npz_arrays(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zlib.error) as e:
        raise ValueError(f"cannot read {path} as an .npz archive: {e}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds a single .npy array, not an .npz archive; save it with "
                         "numpy.savez(path, x=images, y=labels)")
    with archive:
        keys = set(archive.files)
        image_keys = [k for k in ("x", "images") if k in keys]
        label_keys = [k for k in ("y", "labels") if k in keys]
        if len(image_keys) != 1 or len(label_keys) > 1:
            raise ValueError(
                f"{path} has keys {sorted(keys) or '(none)'}; expected images under exactly one of 'x' / 'images' "
                "and optional labels under at most one of 'y' / 'labels'")
        try:
            x = archive[image_keys[0]]
            y = archive[label_keys[0]] if label_keys else None
        except (OSError, ValueError, EOFError, zlib.error) as e:
            raise ValueError(f"cannot read the arrays of {path}: {e}") from None
    return x, y


def _npz_layout(shape: tuple[int, ...], path: Path) -> str:
    if len(shape) == 3:
        return "NHW"
    if len(shape) == 4:
        if shape[3] in (1, 3):
            return "NHWC"
        if shape[1] in (1, 3):
            return "NCHW"
    raise ValueError(f"{path}: image array has shape {shape}; expected (N, H, W), (N, H, W, C) or (N, C, H, W) with "
                     "C = 1 or 3")


def _npz_scale(x: np.ndarray, path: Path) -> np.ndarray:
    """Pixel array -> float32 in [-1, 1] by the rules of :func:`load_folder`."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    if x.size == 0:
        raise ValueError(f"{path}: image array is empty (shape {x.shape})")
    if np.issubdtype(x.dtype, np.integer):
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"{path}: integer images must lie in 0..255, found {lo}..{hi}")
        return x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{path}: image array has dtype {x.dtype}; expected uint8 (0..255) or float ([0, 1] or "
                         "[-1, 1])")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: image array has NaN or Inf values")
    lo, hi, tol = float(x.min()), float(x.max()), 1e-4
    if lo >= -tol and hi <= 1 + tol:
        return np.clip(2 * x - 1, -1, 1)
    if lo >= -1 - tol and hi <= 1 + tol:
        return np.clip(x, -1, 1)
    raise ValueError(f"{path}: float images must lie in [0, 1] or [-1, 1], found {lo:g}..{hi:g}")


def _npz_labels(y: np.ndarray | None, n: int, path: Path) -> Tensor:
    if y is None:
        return torch.zeros(n, dtype=torch.int64)
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{path}: labels must have shape ({n},) (one per image), got {y.shape}")
    if y.dtype == np.bool_ or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise ValueError(f"{path}: labels must be integers, got dtype {y.dtype}")
    if n and (not np.isfinite(y).all() or (y != np.round(y)).any() or y.min() < 0):
        raise ValueError(f"{path}: labels must be non-negative integers 0..K-1")
    return torch.from_numpy(y.astype(np.int64))


def _load_npz(path: Path, size: tuple[int, int] | None, channels: int | None) -> tuple[Tensor, Tensor]:
    raw, y = _npz_arrays(path)
    layout = _npz_layout(tuple(raw.shape), path)
    if raw.shape[0] == 0:
        raise ValueError(f"{path}: image array has no images (shape {raw.shape})")
    x = torch.from_numpy(np.ascontiguousarray(_npz_scale(raw, path)))
    x = {"NHW": lambda t: t.unsqueeze(1), "NHWC": lambda t: t.permute(0, 3, 1, 2), "NCHW": lambda t: t}[layout](x)
    return _finish(x, size, channels), _npz_labels(y, raw.shape[0], path)


def _check_path(path: str | os.PathLike | None) -> Path:
    if path is None:
        raise ValueError("the folder dataset needs a path: a directory of images or an .npz file (--data-dir)")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist; expected a directory of images or an .npz file")
    if p.is_file() and p.suffix.lower() != ".npz":
        raise ValueError(f"{p} is a file but not an .npz; expected a directory of images or an .npz file")
    return p


def load_folder(path: str | os.PathLike, split: str = "train", *, image_size: int | Sequence[int] | None = None,
                channels: int | None = None, held_out_fraction: float = 0.2,
                split_seed: int = 0) -> tuple[Tensor, Tensor]:
    """The user's own images: a directory of PNG/JPEG files, or an ``.npz`` archive.

    **Directory.** Either flat (every image gets label 0) or one sub-folder per class (labels ``0..K-1`` in sorted
    sub-folder-name order; images found recursively inside each; loose images next to class sub-folders are an
    error). Files are taken in sorted order; names starting with ``.`` and files whose extension is not .png / .jpg /
    .jpeg (any case) are skipped. EXIF orientation is applied; alpha is dropped (not composited). ``channels=None``
    gives 1 if every image is grey-scale (palette images count as colour), else 3; 16-bit grey-scale PNGs keep their
    precision. Without
    ``image_size`` all images must have one size; with it, each is resized bilinearly (Pillow).

    **.npz.** Images under key ``x`` or ``images`` (exactly one of them), optional labels under ``y`` or ``labels``
    (1-D, non-negative integers; default all 0); other keys are ignored. Layout: ``(N, H, W)`` is grey-scale;
    a 4-D array is ``(N, H, W, C)`` if its last axis is 1 or 3, else ``(N, C, H, W)`` if its second axis is 1 or 3
    (so an ambiguous ``(N, 3, W, 3)`` is read channels-last). Values: ``uint8`` (or any integer type within
    0..255) is ``0..255``; a float array whose values all lie in ``[0, 1]`` is read as ``[0, 1]`` (``x ↦ 2x - 1``);
    otherwise a float array within ``[-1, 1]`` is used as is; anything else is an error. Resizing is bilinear
    (``torch.nn.functional.interpolate``, antialiased).

    Splits: ``"train"`` / ``"held_out"`` (= ``"test"``) from :func:`train_held_out_split` (``held_out_fraction``,
    ``split_seed``), ``"all"`` for every image.

    Returns:
        ``(x, labels)``: ``x`` float32 ``(N, C, H, W)`` in ``[-1, 1]``, labels int64 ``(N,)``.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: naming the path, for an empty folder or class sub-folder, an unreadable image, mixed sizes
            without ``image_size``, an ``.npz`` with unknown keys / bad shape / dtype / range / labels, a file that
            is not an ``.npz``, fewer than 2 images for a train/held-out split, or a bad split / option.
    """
    _check_split(split)
    size, channels = _check_image_size(image_size), _check_channels(channels)
    root = _check_path(path)
    if root.is_file():
        x, labels = _load_npz(root, size, channels)
        return _select(x, labels, split, held_out_fraction, split_seed, str(root))
    files, all_labels, _, channels, size = _plan_directory(root, size, channels)
    labels = torch.tensor(all_labels, dtype=torch.int64)
    if split != "all":
        if len(files) < 2:
            raise ValueError(f"{root} has {len(files)} image(s); a train/held-out split needs at least 2 "
                             "(use split='all')")
        train, held = train_held_out_split(len(files), held_out_fraction, split_seed)
        idx = train if split == "train" else held
        files, labels = [files[i] for i in idx.tolist()], labels[idx]
    x = torch.from_numpy(np.stack([_image_array(p, channels, size) for p in files]))
    return x, labels


def folder_info(path: str | os.PathLike, *, image_size: int | Sequence[int] | None = None,
                channels: int | None = None) -> FolderInfo:
    """Shape and classes of :func:`load_folder`'s output, reading only image headers (an ``.npz`` is read whole).

    Raises:
        The errors of :func:`load_folder` that do not need decoded pixels.
    """
    size, channels = _check_image_size(image_size), _check_channels(channels)
    root = _check_path(path)
    if root.is_file():
        raw, y = _npz_arrays(root)
        layout = _npz_layout(tuple(raw.shape), root)
        c = 1 if layout == "NHW" else raw.shape[3] if layout == "NHWC" else raw.shape[1]
        hw = raw.shape[1:3] if layout in ("NHW", "NHWC") else raw.shape[2:4]
        labels = _npz_labels(y, raw.shape[0], root)
        k = int(labels.max()) + 1 if labels.numel() else 1
        return FolderInfo((channels or int(c), *(size or tuple(int(s) for s in hw))), k, None, int(raw.shape[0]))
    files, _, names, channels, size = _plan_directory(root, size, channels)
    return FolderInfo((channels, *size), len(names) if names else 1, names, len(files))
