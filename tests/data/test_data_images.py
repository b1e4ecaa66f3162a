"""Image datasets (tagdiff.data.images and load_dataset / dataset_info): digits, MNIST IDX files, folders and .npz.

MNIST is tested on small synthetic IDX files written here (with the md5 table monkeypatched to their checksums), on the
real files in ../shared/data/mnist when present, and the download path with a fake URL opener (no network).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tagdiff.data import DATASETS, dataset_info, load_dataset, mnist, toy_mixture, train_held_out_split

REAL_MNIST = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    def refuse(url, *args, **kwargs):
        raise AssertionError(f"test tried to open {url}")

    monkeypatch.setattr(mnist, "_urlopen", refuse)


# ---------------------------------------------------------------------------------------------------- splits
def test_train_held_out_split_partition_and_determinism():
    train, held = train_held_out_split(101, 0.2, seed=3)
    assert train.dtype == held.dtype == torch.int64
    assert len(held) == 20 and len(train) == 81
    assert set(train.tolist()).isdisjoint(held.tolist())
    assert sorted(train.tolist() + held.tolist()) == list(range(101))
    assert torch.equal(train, train.sort().values)
    again = train_held_out_split(101, 0.2, seed=3)
    assert torch.equal(again[0], train) and torch.equal(again[1], held)
    other = train_held_out_split(101, 0.2, seed=4)
    assert not torch.equal(other[1], held)
    # tiny n: at least one sample on each side
    assert [len(t) for t in train_held_out_split(2, 0.01)] == [1, 1]
    assert [len(t) for t in train_held_out_split(3, 0.99)] == [1, 2]


@pytest.mark.parametrize("n, frac", [(1, 0.2), (0, 0.2), (10, 0.0), (10, 1.0), (10, -0.1), (2.5, 0.2)])
def test_train_held_out_split_rejects_bad_arguments(n, frac):
    with pytest.raises(ValueError, match="n >= 2|held_out_fraction"):
        train_held_out_split(n, frac)


# ---------------------------------------------------------------------------------------------------- digits
def test_digits_shape_range_labels_and_split():
    from sklearn.datasets import load_digits as sk_digits

    x_all, y_all = load_dataset("digits", "all")
    assert x_all.shape == (1797, 1, 8, 8) and x_all.dtype == torch.float32 and y_all.dtype == torch.int64
    assert x_all.min() == -1.0 and x_all.max() == 1.0
    ref = sk_digits()
    assert torch.equal((x_all[:, 0] + 1) * 8, torch.from_numpy(ref.images).float())
    assert torch.equal(y_all, torch.from_numpy(ref.target).long())
    assert sorted(y_all.unique().tolist()) == list(range(10))

    x_tr, y_tr = load_dataset("digits", "train")
    x_ho, y_ho = load_dataset("digits", "held_out")
    assert (len(x_tr), len(x_ho)) == (1438, 359)
    train_idx, held_idx = train_held_out_split(1797, 0.2, 0)
    assert torch.equal(x_tr, x_all[train_idx]) and torch.equal(y_tr, y_all[train_idx])
    assert torch.equal(x_ho, x_all[held_idx]) and torch.equal(y_ho, y_all[held_idx])
    assert torch.equal(load_dataset("digits", "test")[0], x_ho)
    # the split does not move with `seed` (training and evaluation seeds differ), only with split_seed
    assert torch.equal(load_dataset("digits", "held_out", seed=12345)[0], x_ho)
    assert not torch.equal(load_dataset("digits", "held_out", split_seed=1)[0], x_ho)
    assert dataset_info("digits").sample_shape == (1, 8, 8) and dataset_info("digits").num_classes == 10


def test_digits_num_samples_resize_and_channels():
    x_ho, y_ho = load_dataset("digits", "held_out")
    x, y = load_dataset("digits", "held_out", num_samples=50, seed=7)
    assert x.shape == (50, 1, 8, 8)
    rows = {tuple(r.flatten().tolist()) for r in x_ho}
    assert all(tuple(r.flatten().tolist()) in rows for r in x)          # a subset of the split
    assert torch.equal(load_dataset("digits", "held_out", num_samples=50, seed=7)[0], x)
    assert not torch.equal(load_dataset("digits", "held_out", num_samples=50, seed=8)[0], x)
    assert load_dataset("digits", "held_out", num_samples=10_000)[0].shape[0] == 359

    x3, _ = load_dataset("digits", "train", image_size=16, channels=3)
    assert x3.shape == (1438, 3, 16, 16) and x3.dtype == torch.float32
    assert torch.equal(x3[:, 0], x3[:, 1]) and torch.equal(x3[:, 0], x3[:, 2])
    assert x3.min() >= -1 and x3.max() <= 1
    assert dataset_info("digits", image_size=(16, 12), channels=3).sample_shape == (3, 16, 12)


# ---------------------------------------------------------------------------------------------------- MNIST
def idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.dtype("u1"): 0x08, np.dtype(">i4"): 0x0C}[arr.dtype]
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_mnist(folder: Path, n_train: int = 12, n_test: int = 5, gz=("train",), seed: int = 0) -> dict:
    """Synthetic MNIST-shaped IDX files; ``gz`` names the parts written gzipped. Returns the arrays and md5s."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    md5 = {}
    for name, arr in arrays.items():
        data = idx_bytes(arr)
        md5[name] = hashlib.md5(data).hexdigest()
        if name.split("-")[0] in gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return {"arrays": arrays, "md5": md5}


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    made = write_mnist(tmp_path / "mnist", gz=("train",))          # train gzipped, t10k raw
    monkeypatch.setattr(mnist, "MNIST_MD5", made["md5"])
    return tmp_path / "mnist", made["arrays"]


def test_mnist_synthetic_gz_and_raw(fake_mnist):
    folder, arrays = fake_mnist
    x, y = load_dataset("mnist", "train", data_dir=folder)
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte"]).float()[:, None] / 127.5 - 1
    assert torch.equal(x, expected)
    assert torch.equal(y, torch.from_numpy(arrays["train-labels-idx1-ubyte"]).long())
    x_te, y_te = load_dataset("mnist", "test", data_dir=folder)
    x_ho, y_ho = load_dataset("mnist", "held_out", data_dir=folder)
    assert x_te.shape == (5, 1, 28, 28) and torch.equal(x_te, x_ho) and torch.equal(y_te, y_ho)
    assert torch.equal(y_te, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())
    x_all, y_all = load_dataset("mnist", "all", data_dir=folder)
    assert torch.equal(x_all, torch.cat([x, x_te])) and torch.equal(y_all, torch.cat([y, y_te]))
    x32, _ = load_dataset("mnist", "test", data_dir=folder, image_size=32, channels=3)
    assert x32.shape == (5, 3, 32, 32)


def test_mnist_md5_mismatch_names_the_file(tmp_path):
    folder = tmp_path / "mnist"
    write_mnist(folder)                                            # the real md5 table: every file mismatches
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: md5 .* expected 6bbc9ace"):
        mnist.load_mnist("train", data_dir=folder)
    x, _ = mnist.load_mnist("train", data_dir=folder, verify=False)
    assert x.shape == (12, 1, 28, 28)


def test_mnist_missing_files_name_folder_and_files(tmp_path, fake_mnist):
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("mnist", data_dir=tmp_path / "nowhere")
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and all(name in msg for name in mnist.MNIST_FILES)
    assert "--data-dir" in msg
    folder, _ = fake_mnist
    (folder / "t10k-labels-idx1-ubyte").unlink()
    load_dataset("mnist", "train", data_dir=folder)                 # the train split does not need t10k files
    with pytest.raises(FileNotFoundError, match="lacks t10k-labels-idx1-ubyte"):
        load_dataset("mnist", "test", data_dir=folder)


def test_mnist_default_folder_from_env(tmp_path, monkeypatch):
    made = write_mnist(tmp_path / "mnist")
    monkeypatch.setattr(mnist, "MNIST_MD5", made["md5"])
    monkeypatch.setenv("TAGDIFF_DATA_DIR", str(tmp_path))
    assert mnist.default_data_dir() == tmp_path
    assert load_dataset("mnist", "test")[0].shape == (5, 1, 28, 28)


@pytest.mark.parametrize("corrupt, match", [
    (lambda b: b"\x00\x00\x08", "not an IDX file"),
    (lambda b: b"\x01" + b[1:], "not an IDX file"),
    (lambda b: b[:4] + b[4:6], "truncated IDX"),
    (lambda b: b[:-1], "malformed IDX file: header says shape"),
    (lambda b: b + b"\x00", "malformed IDX file"),
])
def test_malformed_idx_raises_value_error_naming_file(tmp_path, corrupt, match):
    folder = tmp_path / "mnist"
    write_mnist(folder, gz=())
    path = folder / "t10k-images-idx3-ubyte"
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(ValueError, match=match) as e:
        mnist.load_mnist("test", data_dir=folder, verify=False)
    assert str(path) in str(e.value)


def test_mnist_bad_gzip_wrong_shape_and_bad_labels(tmp_path):
    folder = tmp_path / "mnist"
    write_mnist(folder, gz=("t10k",))
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz is not a valid gzip file"):
        mnist.load_mnist("test", data_dir=folder, verify=False)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.full(5, 11, np.uint8))))
    with pytest.raises(ValueError, match="labels must be digits 0..9, found 11"):
        mnist.load_mnist("test", data_dir=folder, verify=False)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(4, np.uint8))))
    with pytest.raises(ValueError, match="expected 5 uint8 labels"):
        mnist.load_mnist("test", data_dir=folder, verify=False)
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((5, 27, 28), np.uint8))))
    with pytest.raises(ValueError, match=r"expected uint8 images of shape \(N, 28, 28\)"):
        mnist.load_mnist("test", data_dir=folder, verify=False)


def test_read_idx_other_dtypes(tmp_path):
    arr = np.arange(-6, 6, dtype=">i4").reshape(3, 4)
    (tmp_path / "a.idx").write_bytes(idx_bytes(arr))
    out = mnist.read_idx(tmp_path / "a.idx")
    assert out.shape == (3, 4) and out.dtype == np.int32 and (out == np.arange(-6, 6).reshape(3, 4)).all()
    with pytest.raises(FileNotFoundError, match="b.idx"):
        mnist.read_idx(tmp_path / "b.idx")


@pytest.mark.skipif(not REAL_MNIST.is_dir(), reason="no shared MNIST copy")
def test_real_mnist_files():
    x, y = load_dataset("mnist", "train", data_dir=REAL_MNIST)
    assert x.shape == (60_000, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() == 1.0
    assert torch.bincount(y, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    x_te, y_te = load_dataset("mnist", "held_out", data_dir=REAL_MNIST)
    assert x_te.shape == (10_000, 1, 28, 28) and y_te.shape == (10_000,)
    assert dataset_info("mnist").sample_shape == (1, 28, 28)


# ---------------------------------------------------------------------------------------------------- download
class FakeOpener:
    """Serves ``url -> bytes`` from a dict; other URLs fail like an unreachable host. Records every URL asked."""

    def __init__(self, served: dict[str, bytes]):
        self.served, self.calls = served, []

    def __call__(self, url, timeout=None):
        self.calls.append(url)
        if url not in self.served:
            raise urllib.error.URLError("Name or service not known")
        return io.BytesIO(self.served[url])


def test_download_falls_back_to_second_mirror_and_verifies(tmp_path, monkeypatch):
    source = write_mnist(tmp_path / "source", gz=("train", "t10k"))
    monkeypatch.setattr(mnist, "MNIST_MD5", source["md5"])
    mirrors = ("https://down.example/mnist/", "https://up.example/mnist/")
    served = {f"{mirrors[1]}{n}.gz": (tmp_path / "source" / f"{n}.gz").read_bytes() for n in mnist.MNIST_FILES}
    served[f"{mirrors[0]}train-images-idx3-ubyte.gz"] = gzip.compress(b"tampered")   # wrong md5: skipped
    opener = FakeOpener(served)
    monkeypatch.setattr(mnist, "_urlopen", opener)
    monkeypatch.setattr(mnist, "MNIST_MIRRORS", mirrors)
    target = tmp_path / "target"
    mnist.download_mnist(target, mirrors=mirrors)
    assert sorted(p.name for p in target.iterdir()) == sorted(f"{n}.gz" for n in mnist.MNIST_FILES)
    assert len(opener.calls) == 8
    x, y = load_dataset("mnist", "train", data_dir=target)
    assert torch.equal(y, torch.from_numpy(source["arrays"]["train-labels-idx1-ubyte"]).long())
    # present files are not fetched again
    opener.calls.clear()
    (target / "t10k-labels-idx1-ubyte.gz").unlink()
    x_te, _ = mnist.load_mnist("test", data_dir=target, download=True)
    assert x_te.shape == (5, 1, 28, 28)
    assert opener.calls == [f"{m}t10k-labels-idx1-ubyte.gz" for m in mnist.MNIST_MIRRORS]


def test_download_failure_is_clear_and_suggests_data_dir(tmp_path, monkeypatch):
    opener = FakeOpener({})
    monkeypatch.setattr(mnist, "_urlopen", opener)
    with pytest.raises(mnist.DownloadError) as e:
        load_dataset("mnist", data_dir=tmp_path / "m", download=True)
    assert isinstance(e.value, FileNotFoundError)
    msg = str(e.value)
    assert "--data-dir" in msg and "Name or service not known" in msg
    assert all(m in msg for m in mnist.MNIST_MIRRORS)
    assert not any((tmp_path / "m").glob("*.gz"))                   # nothing half-written


# ---------------------------------------------------------------------------------------------------- folder
def save(path: Path, arr: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kwargs)
    return path


def grey(value: int, h: int = 4, w: int = 5) -> np.ndarray:
    return np.full((h, w), value, np.uint8)


def test_flat_folder_values_labels_order(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (4, 5), dtype=np.uint8) for _ in range(6)]
    for i, a in enumerate(arrays):
        save(tmp_path / "imgs" / f"im{i}.png", a)
    (tmp_path / "imgs" / "notes.txt").write_text("ignored")
    save(tmp_path / "imgs" / ".hidden.png", grey(3))
    x, y = load_dataset("folder", "all", data_dir=tmp_path / "imgs")
    assert x.shape == (6, 1, 4, 5) and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(np.stack(arrays)).float()[:, None] / 127.5 - 1)
    assert y.tolist() == [0] * 6
    info = dataset_info("folder", data_dir=tmp_path / "imgs")
    assert info.sample_shape == (1, 4, 5) and info.num_classes == 1 and info.class_names is None


def test_class_subfolders_split_and_info(tmp_path):
    root = tmp_path / "data"
    for k, cls in enumerate(["zebra", "ant", "cat"]):             # sorted names: ant=0, cat=1, zebra=2
        for i in range(4):
            save(root / cls / ("nested" if i == 3 else "") / f"{i}.png", grey(10 * (4 * k + i)))
    x, y = load_dataset("folder", "all", data_dir=root)
    assert x.shape == (12, 1, 4, 5) and y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    info = dataset_info("folder", data_dir=root)
    assert info.num_classes == 3 and info.class_names == ("ant", "cat", "zebra")
    tr, y_tr = load_dataset("folder", "train", data_dir=root)
    ho, y_ho = load_dataset("folder", "held_out", data_dir=root)
    assert (len(tr), len(ho)) == (10, 2)
    values = lambda t: sorted(t[:, 0, 0, 0].tolist())             # noqa: E731 (each image is one distinct value)
    assert set(values(tr)).isdisjoint(values(ho)) and sorted(values(tr) + values(ho)) == values(x)
    assert torch.equal(load_dataset("folder", "held_out", data_dir=root)[0], ho)


def test_rgb_to_grey_channels_inference_and_resize(tmp_path):
    root = tmp_path / "mixed"
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    save(root / "a.png", rgb)
    save(root / "b.png", grey(60))
    x, _ = load_dataset("folder", "all", data_dir=root)           # one RGB image: everything becomes RGB
    assert x.shape == (2, 3, 4, 5)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([200, 100, 50]) / 127.5 - 1)
    assert torch.allclose(x[1], torch.full((3, 4, 5), 60 / 127.5 - 1))
    x1, _ = load_dataset("folder", "all", data_dir=root, channels=1)
    luma = 0.299 * 200 + 0.587 * 100 + 0.114 * 50
    assert x1.shape == (2, 1, 4, 5) and abs(float(x1[0, 0, 0, 0]) - (luma / 127.5 - 1)) <= 1 / 127.5
    xr, _ = load_dataset("folder", "all", data_dir=root, image_size=(8, 3))
    assert xr.shape == (2, 3, 8, 3)
    assert torch.allclose(xr[1], torch.full((3, 8, 3), 60 / 127.5 - 1))  # bilinear keeps a constant image
    assert dataset_info("folder", data_dir=root, image_size=(8, 3)).sample_shape == (3, 8, 3)


def test_mixed_sizes_need_image_size(tmp_path):
    save(tmp_path / "a.png", grey(0, 4, 5))
    save(tmp_path / "b.png", grey(255, 6, 6))
    with pytest.raises(ValueError, match="different sizes.*image_size"):
        load_dataset("folder", "all", data_dir=tmp_path)
    x, _ = load_dataset("folder", "all", data_dir=tmp_path, image_size=7)
    assert x.shape == (2, 1, 7, 7) and x[0].max() == -1 and x[1].min() == 1


def test_jpeg_and_16_bit_png(tmp_path):
    save(tmp_path / "a.jpg", grey(128, 8, 8), quality=95)
    save(tmp_path / "b.PNG", np.array([[0, 65535], [32768, 65535]], np.uint16).repeat(4, 0).repeat(4, 1))
    x, _ = load_dataset("folder", "all", data_dir=tmp_path)
    assert x.shape == (2, 1, 8, 8)
    assert (x[0] - (128 / 127.5 - 1)).abs().max() < 0.05
    assert x[1, 0, 0, 0] == -1 and x[1, 0, 0, 7] == 1 and abs(float(x[1, 0, 7, 0]) - 32768 / 65535 * 2 + 1) < 1e-4


def test_folder_bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty'} has no"):
        load_dataset("folder", data_dir=tmp_path / "empty")
    save(tmp_path / "cls" / "a" / "0.png", grey(1))
    (tmp_path / "cls" / "b").mkdir()
    with pytest.raises(ValueError, match=f"class sub-folder {tmp_path / 'cls' / 'b'} has no"):
        load_dataset("folder", data_dir=tmp_path / "cls")
    save(tmp_path / "mix" / "a" / "0.png", grey(1))
    save(tmp_path / "mix" / "loose.png", grey(1))
    with pytest.raises(ValueError, match="mixes class sub-folders"):
        load_dataset("folder", data_dir=tmp_path / "mix")
    save(tmp_path / "bad" / "ok.png", grey(1))
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=f"cannot read image {tmp_path / 'bad' / 'broken.png'}"):
        load_dataset("folder", "all", data_dir=tmp_path / "bad")
    one = save(tmp_path / "one" / "a.png", grey(1)).parent
    with pytest.raises(ValueError, match="at least 2"):
        load_dataset("folder", "train", data_dir=one)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_dataset("folder", data_dir=tmp_path / "missing")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ValueError, match="not an .npz"):
        load_dataset("folder", data_dir=tmp_path / "f.txt")
    with pytest.raises(ValueError, match="needs data_dir"):
        load_dataset("folder")
    with pytest.raises(ValueError, match="channels must be 1"):
        load_dataset("folder", data_dir=one, channels=2)


# ---------------------------------------------------------------------------------------------------- npz
def test_npz_layouts_ranges_and_labels(tmp_path):
    rng = np.random.default_rng(1)
    u8 = rng.integers(0, 256, (6, 4, 5), dtype=np.uint8)
    expected = torch.from_numpy(u8).float()[:, None] / 127.5 - 1
    np.savez(tmp_path / "nhw.npz", x=u8, y=np.arange(6) % 3)
    x, y = load_dataset("folder", "all", data_dir=tmp_path / "nhw.npz")
    assert torch.equal(x, expected) and y.tolist() == [0, 1, 2, 0, 1, 2] and y.dtype == torch.int64
    assert dataset_info("folder", data_dir=tmp_path / "nhw.npz").num_classes == 3

    np.savez(tmp_path / "f01.npz", images=u8[..., None].astype(np.float32) / 255)      # (N,H,W,1) in [0, 1]
    x, y = load_dataset("folder", "all", data_dir=tmp_path / "f01.npz")
    assert x.shape == (6, 1, 4, 5) and torch.allclose(x, expected, atol=1e-6) and y.tolist() == [0] * 6

    rgb = rng.uniform(-1, 1, (6, 3, 4, 5)).astype(np.float32)                          # (N,C,H,W) in [-1, 1]
    np.savez(tmp_path / "nchw.npz", x=rgb, labels=np.array([1, 1, 0, 0, 1, 0]))
    x, y = load_dataset("folder", "all", data_dir=tmp_path / "nchw.npz")
    assert torch.equal(x, torch.from_numpy(rgb)) and y.tolist() == [1, 1, 0, 0, 1, 0]
    g, _ = load_dataset("folder", "all", data_dir=tmp_path / "nchw.npz", channels=1)
    assert torch.allclose(g[:, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2], atol=1e-6)

    np.savez(tmp_path / "nhwc.npz", x=(rng.integers(0, 256, (6, 4, 5, 3))).astype(np.int64))
    x, _ = load_dataset("folder", "all", data_dir=tmp_path / "nhwc.npz", image_size=(8, 10))
    assert x.shape == (6, 3, 8, 10) and x.min() >= -1 and x.max() <= 1
    assert dataset_info("folder", data_dir=tmp_path / "nhwc.npz").sample_shape == (3, 4, 5)
    tr, _ = load_dataset("folder", "train", data_dir=tmp_path / "nhw.npz")
    ho, _ = load_dataset("folder", "held_out", data_dir=tmp_path / "nhw.npz")
    assert (len(tr), len(ho)) == (5, 1)


@pytest.mark.parametrize("arrays, match", [
    ({"data": np.zeros((2, 3, 3), np.uint8)}, r"has keys \['data'\]; expected images under exactly one of"),
    ({"x": np.zeros((2, 3, 3), np.uint8), "images": np.zeros((2, 3, 3), np.uint8)}, "exactly one of"),
    ({"x": np.zeros((2, 3, 3), np.uint8), "y": [0, 1], "labels": [0, 1]}, "at most one of"),
    ({"x": np.zeros((2, 3), np.uint8)}, r"shape \(2, 3\); expected \(N, H, W\)"),
    ({"x": np.zeros((2, 5, 4, 4), np.uint8)}, "C = 1 or 3"),
    ({"x": np.full((2, 3, 3), 1.5, np.float32)}, r"must lie in \[0, 1\] or \[-1, 1\], found 1.5"),
    ({"x": np.full((2, 3, 3), np.nan, np.float32)}, "NaN"),
    ({"x": np.full((2, 3, 3), 300, np.int32)}, "0..255"),
    ({"x": np.zeros((2, 3, 3), bool)}, "dtype bool"),
    ({"x": np.zeros((2, 3, 3), np.uint8), "y": [0, 1, 2]}, r"labels must have shape \(2,\)"),
    ({"x": np.zeros((2, 3, 3), np.uint8), "y": [0.5, 1]}, "non-negative integers"),
    ({"x": np.zeros((2, 3, 3), np.uint8), "y": [-1, 1]}, "non-negative integers"),
    ({"x": np.zeros((0, 3, 3), np.uint8)}, "no images"),
    ({"x": np.array([[[None]]], dtype=object)}, "cannot read the arrays"),
])
def test_npz_bad_inputs_name_the_file(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=match) as e:
        load_dataset("folder", "all", data_dir=path)
    assert str(path) in str(e.value)


def test_npz_not_an_archive(tmp_path):
    np.save(tmp_path / "plain.npy", np.zeros((2, 3, 3)))
    (tmp_path / "plain.npy").rename(tmp_path / "plain.npz")
    with pytest.raises(ValueError, match="single .npy array"):
        load_dataset("folder", data_dir=tmp_path / "plain.npz")
    (tmp_path / "junk.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read .*junk.npz as an .npz archive"):
        load_dataset("folder", data_dir=tmp_path / "junk.npz")


# ---------------------------------------------------------------------------------------------------- load_dataset
def test_load_dataset_names_and_options():
    assert DATASETS == ("toy", "digits", "mnist", "folder", "hf")
    with pytest.raises(ValueError, match="unknown dataset 'cifar'; expected one of toy, digits, mnist, folder, hf"):
        load_dataset("cifar")
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        dataset_info("cifar")
    with pytest.raises(ValueError, match="unknown split 'val'"):
        load_dataset("digits", "val")
    with pytest.raises(ValueError, match="num_samples"):
        load_dataset("digits", num_samples=0)
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("digits", image_size=(0, 8))


def test_toy_unchanged():
    x, y = load_dataset("toy", num_samples=100, seed=3)
    ref_x, ref_y = toy_mixture().sample(100, torch.Generator().manual_seed(3))
    assert torch.equal(x, ref_x) and torch.equal(y, ref_y)
    assert load_dataset("toy")[0].shape == (40_000, 2)
    assert torch.equal(load_dataset("toy", "held_out", num_samples=100, seed=3)[0], ref_x)   # split ignored
    info = dataset_info("toy")
    assert info.sample_shape == (2,) and info.num_classes == 2
