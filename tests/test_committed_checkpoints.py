"""The committed MNIST checkpoints (``checkpoints/mnist``, docs/RESULTS.md §4): each folder loads as the model its
name says, for MNIST's 1×28×28 images and the UNet's schedule, holds only what the 5 MB rule allows, and records the
command its README gives (so the README's regeneration commands are the ones that made the files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tagdiff.checkpoints import load_model, read_config
from tagdiff.classifiers import CleanClassifier, EvalClassifier, NoisyClassifier
from tagdiff.recipes import load_checkpoint

ROOT = Path(__file__).resolve().parents[1] / "checkpoints" / "mnist"
CLASSIFIERS = {"clf_noisy": NoisyClassifier, "clf_clean": CleanClassifier, "clf_eval": EvalClassifier}

pytestmark = pytest.mark.skipif(not (ROOT / "unet").is_dir(), reason="checkpoints/mnist is not in this checkout")


def _recorded_command(folder: Path) -> str:
    meta = folder / "tagdiff.json"
    return (json.loads(meta.read_text()) if meta.exists() else read_config(folder))["command"]


def test_committed_mnist_models_load_for_mnist_images():
    eps_model, schedule = load_checkpoint(ROOT / "unet")
    assert tuple(eps_model.sample_shape) == (1, 28, 28)
    assert schedule.num_train_timesteps == 1000
    with torch.no_grad():
        eps = eps_model(torch.zeros(2, 1, 28, 28), torch.tensor([0, 999]))
    assert eps.shape == (2, 1, 28, 28) and torch.isfinite(eps).all()
    models = {name: load_model(ROOT / name) for name in CLASSIFIERS}
    for name, cls in CLASSIFIERS.items():
        assert type(models[name]) is cls, name
        assert tuple(models[name].sample_shape) == (1, 28, 28), name
    assert models["clf_noisy"].num_train_timesteps == schedule.num_train_timesteps


@pytest.mark.parametrize("name", ["unet", *CLASSIFIERS])
def test_committed_mnist_checkpoint_matches_its_readme_and_size_rule(name):
    folder = ROOT / name
    command = _recorded_command(folder)
    assert f"--out runs/mnist/{name} " in f"{command} "
    table = (ROOT / "README.md").read_text()
    assert f"`{command.removesuffix(' --quiet')}`" in table.replace("$D", "../shared/data/mnist"), command
    assert not (folder / "train_state.safetensors").exists()  # resume state stays in runs/, never committed
    for f in folder.iterdir():
        assert f.stat().st_size <= 5 * 2**20, f
