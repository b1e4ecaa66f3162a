"""The shipped checkpoints and the checkpoint-folder loader (:mod:`tagdiff.assets`), and the device helper."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tagdiff._utils import resolve_device
from tagdiff.models.assets import MODEL_FOLDERS, assets_dir, load_label_models
from tagdiff.models.checkpoints import CheckpointError

pytest.importorskip("diffusers")


def test_shipped_folders_hold_every_model():
    for name in MODEL_FOLDERS:
        assert (assets_dir("digits") / name / "config.json").is_file(), name
    assert (assets_dir("toy") / "score").is_dir() and (assets_dir("toy") / "time_predictor").is_dir()


def test_load_label_models_on_the_cpu():
    models = load_label_models(assets_dir("digits"), "cpu")
    assert set(models) == {"eps_model", "schedule", "time_predictor", "clf_noisy", "clf_clean", "clf_eval"}
    for name in ("eps_model", "time_predictor", "clf_noisy", "clf_clean", "clf_eval"):
        assert all(p.device.type == "cpu" for p in models[name].parameters()), name
    assert models["schedule"].num_train_timesteps == 1000


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="unet"):
        load_label_models(tmp_path / "nothing")


def test_unavailable_device_is_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="'cuda' is not available"):
        load_label_models(tmp_path / "nothing", "cuda")  # the device check comes first: no CheckpointError


def test_assets_imports_alone_without_the_experiments():
    """``tagdiff.models.assets`` is library code: importing it loads nothing of the experiments (``tagdiff_bench``),
    which then import in the same fresh interpreter (no import circle through a lazy import)."""
    code = ("import sys, tagdiff.models.assets; assert not any(m.startswith('tagdiff_bench') for m in sys.modules), "
            "sorted(m for m in sys.modules if m.startswith('tagdiff_bench')); import tagdiff_bench.common; "
            "import tagdiff_bench.label; print('ok')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ---------------------------------------------------------------------------------------------------- devices
def test_resolve_device_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu") == resolve_device(torch.device("cpu"))
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto").type in ("cuda", "mps", "cpu")


def test_resolve_device_auto_falls_back_to_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    mps = getattr(torch.backends, "mps", None)
    if mps is not None:
        monkeypatch.setattr(mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "mps"])
def test_unavailable_device_raises_naming_it(name, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    mps = getattr(torch.backends, "mps", None)
    if mps is not None:
        monkeypatch.setattr(mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match=f"device '{name}' is not available on this machine"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["tpu", "gpu", "cpu:1", "cuda:x", ""])
def test_unknown_device_raises_listing_the_choices(name):
    with pytest.raises(ValueError, match="expected one of auto, cpu, cuda"):
        resolve_device(name)
