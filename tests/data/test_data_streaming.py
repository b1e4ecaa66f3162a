"""Lazy datasets (tagdiff.data.streaming): each item equals the whole-set loader's row bit for bit; HF datasets
read an image folder exactly as the folder loader does; bad columns are refused by name."""

import gzip
import hashlib
import struct

import numpy as np
import pytest
import torch

from image_helpers import write_class_folders
from tagdiff.data import load_dataset, mnist
from tagdiff.data.folder import ImageFolderDataset, load_folder
from tagdiff.data.streaming import HFImageDataset, MNISTDataset, NpzDataset, WithLabels, open_dataset

pytest.importorskip("datasets")


def _idx(arr):
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (9, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": rng.integers(0, 10, 9, dtype=np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, 4, dtype=np.uint8)}
    folder = tmp_path / "mnist"
    folder.mkdir()
    md5 = {}
    for name, arr in arrays.items():
        md5[name] = hashlib.md5(_idx(arr)).hexdigest()
        (folder / f"{name}.gz").write_bytes(gzip.compress(_idx(arr)))
    monkeypatch.setattr(mnist, "MNIST_MD5", md5)
    return folder


@pytest.fixture
def image_folder(tmp_path):
    # "10" sorts before "2": the order both readers must agree on
    return write_class_folders(tmp_path / "imgs", ("cat", "dog"), (0, 1, 2, 10, 11), (6, 6, 3), seed=1)


def _rows_equal(ds, x, y):
    assert len(ds) == x.shape[0] and ds.sample_shape == tuple(x.shape[1:])
    assert torch.equal(ds.labels, y)
    for i in range(len(ds)):
        assert torch.equal(ds[i], x[i]), i


@pytest.mark.parametrize("split,size,channels", [("train", None, None), ("all", 14, 3), ("test", None, None)])
def test_mnist_items_equal_load_mnist(fake_mnist, split, size, channels):
    x, y = mnist.load_mnist(split, data_dir=fake_mnist, image_size=size, channels=channels)
    _rows_equal(MNISTDataset(split, data_dir=fake_mnist, image_size=size, channels=channels), x, y)


@pytest.mark.parametrize("dtype,layout", [("uint8", "NHWC"), ("unit", "NCHW"), ("signed", "NHW")])
def test_npz_items_equal_load_folder(tmp_path, dtype, layout):
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, (7, 5, 5, 3), dtype=np.uint8)
    arr = {"uint8": raw, "unit": raw / 255.0, "signed": raw[..., 0] / 127.5 - 1}[dtype]
    if layout == "NCHW":
        arr = arr.transpose(0, 3, 1, 2)
    path = tmp_path / "d.npz"
    np.savez(path, x=arr, y=rng.integers(0, 3, 7))
    for split, size in (("train", None), ("all", 8), ("held_out", None)):
        x, y = load_folder(path, split, image_size=size)
        _rows_equal(NpzDataset(path, split, image_size=size), x, y)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=arr.astype(np.float64) * 3 + 2)
    with pytest.raises(ValueError, match="must lie in"):
        NpzDataset(bad)


@pytest.mark.parametrize("split", ["train", "held_out", "all"])
def test_hf_imagefolder_equals_folder(image_folder, tmp_path, split):
    ref = ImageFolderDataset(image_folder, split)
    ds = HFImageDataset(image_folder, split, cache_dir=str(tmp_path / "cache"))
    assert ds.class_names == ("cat", "dog") and ds.num_classes == 2
    x = torch.stack([ref[i] for i in range(len(ref))])
    _rows_equal(ds, x, ref.labels)


def test_hf_save_to_disk_columns_and_errors(image_folder, tmp_path):
    import datasets

    hf = datasets.load_dataset("imagefolder", data_dir=str(image_folder), cache_dir=str(tmp_path / "c"))["train"]
    hf = hf.rename_column("image", "pixels").rename_column("label", "kind").add_column("note", ["a"] * 10)
    hf.save_to_disk(str(tmp_path / "saved"))
    saved = tmp_path / "saved"
    ds = HFImageDataset(saved, "all")  # the first Image column; no "label" column: unlabelled
    assert ds.image_column == "pixels" and ds.label_column is None and int(ds.labels.sum()) == 0
    ref = ImageFolderDataset(image_folder, "all")
    assert torch.equal(ds[3], ref[3])
    assert torch.equal(HFImageDataset(saved, "all", label_column="kind").labels, ref.labels)
    with pytest.raises(ValueError, match=r"no column 'image' \(--image-column\); columns: pixels, kind, note"):
        HFImageDataset(saved, image_column="image")
    with pytest.raises(ValueError, match="column 'note' of .* is not an image column"):
        HFImageDataset(saved, image_column="note")
    with pytest.raises(ValueError, match="column 'note' of .* does not hold integer labels"):
        HFImageDataset(saved, label_column="note")
    with pytest.raises(ValueError, match="no column 'y' \\(--label-column\\)"):
        HFImageDataset(saved, label_column="y")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFImageDataset(tmp_path / "nowhere")


def test_hf_missing_datasets_package_names_pip(monkeypatch, image_folder):
    import sys

    from tagdiff.data.streaming import MissingDependencyError

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(MissingDependencyError, match="pip install datasets"):
        HFImageDataset(image_folder)


def test_open_dataset_and_with_labels(image_folder, tmp_path):
    ds = open_dataset("folder", "all", data_dir=image_folder)
    assert isinstance(ds, ImageFolderDataset)
    np.savez(tmp_path / "a.npz", x=np.zeros((3, 4, 4), np.uint8))
    assert isinstance(open_dataset("folder", "all", data_dir=tmp_path / "a.npz"), NpzDataset)
    pairs = WithLabels(ds, torch.arange(len(ds)) % 3)
    x, c = pairs[4]
    assert torch.equal(x, ds[4]) and c == 1
    with pytest.raises(ValueError, match="labels has 2 entries but the dataset has 10"):
        WithLabels(ds, torch.zeros(2))
    with pytest.raises(ValueError, match="needs data_dir"):
        open_dataset("hf")
    x_all, y_all = load_dataset("hf", "all", data_dir=image_folder)
    assert torch.equal(x_all[0], ds[0]) and torch.equal(y_all, ds.labels)
