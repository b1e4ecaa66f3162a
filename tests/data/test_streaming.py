"""Training from a map-style Dataset: the lazy image folder equals the tensor loader, and trains bit for bit alike."""

import numpy as np
import pytest
import torch

from image_helpers import write_class_folders
from tagdiff import SimpleCNNTimePredictor, VPSchedule
from tagdiff.data.folder import ImageFolderDataset, load_folder
from tagdiff.training.loop import TrainConfig, time_loss, train

SCHED = VPSchedule.linear(50, beta_start=2e-3, beta_end=0.4)


@pytest.fixture
def folder(tmp_path):
    return write_class_folders(tmp_path / "imgs", ("cat", "dog"), range(7), (8, 8, 3), seed=0)


def _cfg(**kw):
    return TrainConfig(**{"steps": 6, "batch_size": 8, "lr": 3e-3, "save_every": 4, "seed": 5, **kw})


def _params(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("split,size", [("train", None), ("all", 6), ("held_out", None)])
def test_lazy_items_equal_tensor_rows(folder, split, size):
    x, y = load_folder(folder, split, image_size=size)
    ds = ImageFolderDataset(folder, split, image_size=size, with_labels=True)
    assert len(ds) == x.shape[0] and ds.sample_shape == tuple(x.shape[1:]) and x.is_contiguous()
    for i in range(len(ds)):
        xi, yi = ds[i]
        assert torch.equal(xi, x[i]) and yi == int(y[i])
    assert torch.equal(ImageFolderDataset(folder, split, image_size=size)[0], x[0])


@pytest.mark.parametrize("labelled,workers", [(False, 0), (True, 0), (False, 2)])
def test_dataset_trains_like_tensor(folder, tmp_path, labelled, workers):
    x, y = load_folder(folder, "all")
    cfg = _cfg(cond_drop=0.3 if labelled else 0.0, ema_decay=0.9)
    k = 2 if labelled else None

    torch.manual_seed(0)
    ref = SimpleCNNTimePredictor(3, 8, 50, widths=(8, 16), num_classes=k)
    torch.manual_seed(0)
    lazy = SimpleCNNTimePredictor(3, 8, 50, widths=(8, 16), num_classes=k)
    r1 = train(ref, time_loss, x, SCHED, cfg, tmp_path / "a", labels=y if labelled else None, progress=False)
    ds = ImageFolderDataset(folder, "all", with_labels=labelled)
    r2 = train(lazy, time_loss, ds, SCHED, cfg, tmp_path / "b", progress=False, num_workers=workers)
    assert r1["history"] == r2["history"] and r1["final_loss"] == r2["final_loss"]
    a, b = _params(ref), _params(lazy)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_dataset_resume_equals_uninterrupted(folder, tmp_path):
    ds = ImageFolderDataset(folder, "all")
    torch.manual_seed(0)
    ref = SimpleCNNTimePredictor(3, 8, 50, widths=(8, 16))
    train(ref, time_loss, ds, SCHED, _cfg(), tmp_path / "a", progress=False)
    torch.manual_seed(0)
    part = SimpleCNNTimePredictor(3, 8, 50, widths=(8, 16))
    train(part, time_loss, ds, SCHED, _cfg(steps=4), tmp_path / "b", progress=False)
    torch.manual_seed(1)  # different init: the weights come from the saved state
    fresh = SimpleCNNTimePredictor(3, 8, 50, widths=(8, 16))
    train(fresh, time_loss, ds, SCHED, _cfg(), tmp_path / "b", progress=False)
    a, b = _params(ref), _params(fresh)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_dataset_refusals(folder, tmp_path):
    ds = ImageFolderDataset(folder, "all")
    m = SimpleCNNTimePredictor(3, 8, 50, widths=(8, 16))
    with pytest.raises(ValueError, match="labels= is for a tensor"):
        train(m, time_loss, ds, SCHED, _cfg(), tmp_path, labels=torch.zeros(len(ds), dtype=torch.int64))
    with pytest.raises(ValueError, match="empty Dataset"):
        train(m, time_loss, torch.utils.data.TensorDataset(torch.zeros(0, 3, 8, 8)), SCHED, _cfg(), tmp_path)
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="npz"):
        ImageFolderDataset(tmp_path / "a.npz")
