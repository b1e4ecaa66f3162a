"""Checkpoints: round trips, atomic writes, and clear errors for missing/corrupt files."""

import json
import os

import pytest
import torch

from tagdiff import MLPEpsModel, MLPTimePredictor, SimpleCNNTimePredictor
from tagdiff._io import atomic_write_bytes
from tagdiff.models.checkpoints import CheckpointError, load_model, load_tensors, read_config, save_model, save_tensors


@pytest.mark.parametrize(
    "model, x",
    [
        (MLPEpsModel(2, 50, hidden=16, num_layers=2), torch.randn(4, 2)),
        (MLPTimePredictor(3, 50, hidden=16, num_layers=3, num_classes=4), torch.randn(4, 3)),
        (SimpleCNNTimePredictor(1, 8, 50, widths=(4, 4, 8, 8)), torch.randn(4, 1, 8, 8)),
    ],
)
def test_round_trip_reproduces_outputs(tmp_path, model, x):
    model.eval()
    save_model(model, tmp_path / "ckpt", command="tagdiff test")
    loaded = load_model(tmp_path / "ckpt")
    assert type(loaded) is type(model) and not loaded.training
    args = (x, torch.full((4,), 7)) if isinstance(model, MLPEpsModel) else (x,)
    assert torch.equal(model(*args), loaded(*args))
    assert read_config(tmp_path / "ckpt")["command"] == "tagdiff test"


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path / "empty")
    save_model(MLPEpsModel(2, 10, 8, 2), tmp_path / "c")
    os.remove(tmp_path / "c" / "model.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "c")


def test_corrupt_weights_and_config(tmp_path):
    d = save_model(MLPEpsModel(2, 10, 8, 2), tmp_path / "c")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(d)


def test_config_that_does_not_fit_weights(tmp_path):
    d = save_model(MLPEpsModel(2, 10, 8, 2), tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["config"]["hidden"] = 16
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not match"):
        load_model(d)
    cfg["class"] = "Evil"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown model class"):
        load_model(d)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temp file left behind


def test_tensors_with_metadata_round_trip(tmp_path):
    save_tensors(tmp_path / "s.safetensors", {"a": torch.arange(3.0)}, {"step": 5, "h": [[1, 0.5]]})
    tensors, meta = load_tensors(tmp_path / "s.safetensors")
    assert torch.equal(tensors["a"], torch.arange(3.0)) and meta == {"step": 5, "h": [[1, 0.5]]}
