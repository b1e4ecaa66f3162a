"""The user's own images: a directory of PNG/JPEG files (flat or one sub-folder per class) or an ``.npz`` archive.

:func:`load_folder` decodes everything into one tensor; :class:`ImageFolderDataset` is its lazy counterpart (one
image per item, same values) for sets that do not fit in memory. The public names are also importable from
:mod:`tagdiff.data.images`; see there for the value scaling, splits and the ``image_size`` / ``channels`` options.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .common import check_channels, check_image_size, check_split, finish_images, select_split, train_held_out_split

__all__ = [
    "IMAGE_EXTENSIONS",
    "FolderInfo",
    "ImageFolderDataset",
    "folder_info",
    "load_folder",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N")


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
    return pil_array(_open_image(path), channels, size)


def pil_array(img: Any, channels: int, size: tuple[int, int]) -> np.ndarray:
    """A decoded PIL image (EXIF orientation applied) as float32 ``(channels, H, W)`` in ``[-1, 1]``: grey-scale
    (``L``, luma) or ``RGB`` (alpha dropped), 16/32-bit grey at full precision, bilinear resize to ``size``."""
    from PIL import Image

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


def npz_arrays(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
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


def npz_layout(shape: tuple[int, ...], path: Path) -> str:
    if len(shape) == 3:
        return "NHW"
    if len(shape) == 4:
        if shape[3] in (1, 3):
            return "NHWC"
        if shape[1] in (1, 3):
            return "NCHW"
    raise ValueError(f"{path}: image array has shape {shape}; expected (N, H, W), (N, H, W, C) or (N, C, H, W) with "
                     "C = 1 or 3")


def npz_rule(x: np.ndarray, path: Path) -> str:
    """How :func:`load_folder` scales an image array: ``"int"`` (0..255), ``"unit"`` (float [0, 1]) or ``"signed"``
    (float [-1, 1]), decided from the whole array (without a float copy of it)."""
    if x.dtype == np.uint8:
        return "int"
    if x.size == 0:
        raise ValueError(f"{path}: image array is empty (shape {x.shape})")
    if np.issubdtype(x.dtype, np.integer):
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"{path}: integer images must lie in 0..255, found {lo}..{hi}")
        return "int"
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{path}: image array has dtype {x.dtype}; expected uint8 (0..255) or float ([0, 1] or "
                         "[-1, 1])")
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: image array has NaN or Inf values")
    lo, hi, tol = float(x.min()), float(x.max()), 1e-4
    if lo >= -tol and hi <= 1 + tol:
        return "unit"
    if lo >= -1 - tol and hi <= 1 + tol:
        return "signed"
    raise ValueError(f"{path}: float images must lie in [0, 1] or [-1, 1], found {lo:g}..{hi:g}")


def npz_apply(x: np.ndarray, rule: str) -> np.ndarray:
    """Pixel array (all of it or one item) -> float32 in [-1, 1] by a :func:`npz_rule`."""
    x = x.astype(np.float32)
    if rule == "int":
        return x / np.float32(127.5) - np.float32(1.0)
    return np.clip(2 * x - 1, -1, 1) if rule == "unit" else np.clip(x, -1, 1)


def npz_to_nchw(x: Tensor, layout: str) -> Tensor:
    """A ``(N, H, W)`` / ``(N, H, W, C)`` / ``(N, C, H, W)`` tensor (``layout`` of :func:`npz_layout`) as NCHW."""
    return {"NHW": lambda t: t.unsqueeze(1), "NHWC": lambda t: t.permute(0, 3, 1, 2), "NCHW": lambda t: t}[layout](x)


def npz_labels(y: np.ndarray | None, n: int, path: Path) -> Tensor:
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
    raw, y = npz_arrays(path)
    layout = npz_layout(tuple(raw.shape), path)
    if raw.shape[0] == 0:
        raise ValueError(f"{path}: image array has no images (shape {raw.shape})")
    x = npz_to_nchw(torch.from_numpy(np.ascontiguousarray(npz_apply(raw, npz_rule(raw, path)))), layout)
    return finish_images(x, size, channels), npz_labels(y, raw.shape[0], path)


def check_path(path: str | os.PathLike | None) -> Path:
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
    check_split(split)
    size, channels = check_image_size(image_size), check_channels(channels)
    root = check_path(path)
    if root.is_file():
        x, labels = _load_npz(root, size, channels)
        return select_split(x, labels, split, held_out_fraction, split_seed, str(root))
    files, labels, _, channels, size = _plan_split(root, split, size, channels, held_out_fraction, split_seed)
    x = torch.from_numpy(np.stack([np.ascontiguousarray(_image_array(p, channels, size)) for p in files]))
    return x, labels


def _plan_split(root: Path, split: str, size: tuple[int, int] | None, channels: int | None,
                held_out_fraction: float, split_seed: int):
    """Files and labels of ``split`` of a directory, with its class names, channels and size (no pixels decoded)."""
    files, all_labels, names, channels, size = _plan_directory(root, size, channels)
    labels = torch.tensor(all_labels, dtype=torch.int64)
    if split != "all":
        if len(files) < 2:
            raise ValueError(f"{root} has {len(files)} image(s); a train/held-out split needs at least 2 "
                             "(use split='all')")
        train, held = train_held_out_split(len(files), held_out_fraction, split_seed)
        idx = train if split == "train" else held
        files, labels = [files[i] for i in idx.tolist()], labels[idx]
    return files, labels, names, channels, size


class ImageFolderDataset(torch.utils.data.Dataset):
    """A directory of images, decoded one at a time: the lazy counterpart of :func:`load_folder`.

    Lists the files (and reads their headers) once; ``dataset[i]`` decodes image ``i`` with the same preprocessing
    as :func:`load_folder`, so ``dataset[i]`` equals ``load_folder(...)[0][i]`` bit for bit (same ``split``,
    ``image_size``, ``channels``, ``held_out_fraction``, ``split_seed``). Memory stays at one image per worker
    instead of the whole decoded set; pass it to :func:`~tagdiff.training.train` in place of the tensor.

    Args:
        with_labels: items are ``(x, label)`` (label an ``int``) instead of ``x`` alone; :func:`train` then passes
            the labels to the loss, as ``labels=`` does for a tensor.

    Attributes:
        sample_shape: ``(C, H, W)``; ``labels``: int64 ``(N,)``; ``class_names``: sub-folder names or ``None``.

    Raises:
        ValueError: for an ``.npz`` archive (it is read whole: use :func:`load_folder`), and the errors of
            :func:`load_folder` that do not need decoded pixels.
    """

    def __init__(self, path: str | os.PathLike, split: str = "train", *,
                 image_size: int | Sequence[int] | None = None, channels: int | None = None,
                 held_out_fraction: float = 0.2, split_seed: int = 0, with_labels: bool = False):
        check_split(split)
        size, channels = check_image_size(image_size), check_channels(channels)
        root = check_path(path)
        if root.is_file():
            raise ValueError(f"{root} is an .npz archive; ImageFolderDataset reads a directory of images (load an "
                             ".npz whole with load_folder)")
        self.files, self.labels, self.class_names, channels, size = _plan_split(
            root, split, size, channels, held_out_fraction, split_seed)
        self.channels, self.image_size, self.with_labels = channels, size, with_labels
        self.sample_shape = (channels, *size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tensor | tuple[Tensor, int]:
        x = torch.from_numpy(np.ascontiguousarray(_image_array(self.files[i], self.channels, self.image_size)))
        return (x, int(self.labels[i])) if self.with_labels else x


def folder_info(path: str | os.PathLike, *, image_size: int | Sequence[int] | None = None,
                channels: int | None = None) -> FolderInfo:
    """Shape and classes of :func:`load_folder`'s output, reading only image headers (an ``.npz`` is read whole).

    Raises:
        The errors of :func:`load_folder` that do not need decoded pixels.
    """
    size, channels = check_image_size(image_size), check_channels(channels)
    root = check_path(path)
    if root.is_file():
        raw, y = npz_arrays(root)
        layout = npz_layout(tuple(raw.shape), root)
        c = 1 if layout == "NHW" else raw.shape[3] if layout == "NHWC" else raw.shape[1]
        hw = raw.shape[1:3] if layout in ("NHW", "NHWC") else raw.shape[2:4]
        labels = npz_labels(y, raw.shape[0], root)
        k = int(labels.max()) + 1 if labels.numel() else 1
        return FolderInfo((channels or int(c), *(size or tuple(int(s) for s in hw))), k, None, int(raw.shape[0]))
    files, _, names, channels, size = _plan_directory(root, size, channels)
    return FolderInfo((channels, *size), len(names) if names else 1, names, len(files))
