"""The shipped checkpoints and the loader of a checkpoint folder (the five models every image experiment uses).

A checkpoint folder (the shipped ``assets/<dataset>/`` or one made with ``tagdiff train``) holds one sub-folder per
model, each a ``tagdiff`` checkpoint (``config.json`` + ``model.safetensors``; ``unet/`` may also be a diffusers
UNet folder with its scheduler config):

* ``unet/``: the ε-model and its VP schedule (``tagdiff train diffusion``);
* ``time_predictor/``: the unconditional time predictor over the T training timesteps (``train time-predictor``);
* ``clf_noisy/``: the noise-aware classifier of classifier guidance (``train classifier --kind noisy``);
* ``clf_clean/``: the clean classifier of the DPS / TFG label losses (``train classifier --kind clean``);
* ``clf_eval/``: the independent evaluation classifier, whose features FID uses (``train classifier --kind eval``).

Experiments that need more models (``bench multicond``: conditional time predictors, attribute classifiers) load
them from the same folder themselves.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .._utils import resolve_device
from .checkpoints import load_model
from .classifiers import CleanClassifier, EvalClassifier, NoisyClassifier
from .load import load_checkpoint
from .time_predictor import TimePredictor

__all__ = ["MODEL_FOLDERS", "assets_dir", "load_label_models"]

MODEL_FOLDERS = ("unet", "time_predictor", "clf_noisy", "clf_clean", "clf_eval")


def assets_dir(name: str) -> Path:
    """Folder of the shipped checkpoints ``assets/<name>`` of the package: ``digits`` and ``mnist`` hold the
    :data:`MODEL_FOLDERS`; ``toy`` holds ``score/`` and ``time_predictor/`` of the two-Gaussian toy.

    The folder is not checked to exist (the loader reports a missing one as a ``CheckpointError`` naming it)."""
    return Path(str(resources.files("tagdiff") / "assets" / name))


def load_label_models(checkpoints: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Load the five models of a checkpoint folder (see the module docstring) onto ``device``.

    Returns:
        ``{"eps_model", "schedule", "time_predictor", "clf_noisy", "clf_clean", "clf_eval"}``; the models are on
        ``device`` (the schedule's tables stay on the CPU, as the samplers expect).

    Raises:
        CheckpointError: a missing or corrupt model folder (the message names it).
        ValueError: a folder holding the wrong kind of model (e.g. a noisy classifier in ``clf_clean/``), a time
            predictor or noisy classifier trained with another number of timesteps T than the diffusion model, a
            model for another image shape, or an unavailable ``device``.
    """
    dev = resolve_device(device)
    root = Path(checkpoints)
    eps_model, schedule = load_checkpoint(root / "unet", dev)
    models: dict[str, Any] = {"eps_model": eps_model, "schedule": schedule}
    kinds = {"time_predictor": ((TimePredictor,), "a time predictor (train time-predictor)"),
             "clf_noisy": ((NoisyClassifier,), "a noisy classifier (train classifier --kind noisy)"),
             "clf_clean": ((CleanClassifier, EvalClassifier), "a clean classifier (train classifier --kind clean)"),
             "clf_eval": ((EvalClassifier,), "an evaluation classifier (train classifier --kind eval)")}
    for name, (classes, what) in kinds.items():
        models[name] = load_model(root / name, dev)
        if not isinstance(models[name], classes):
            raise ValueError(f"{root / name} holds {type(models[name]).__name__}; {name} must be {what}")
    T = schedule.num_train_timesteps
    for name in ("time_predictor", "clf_noisy"):
        if getattr(models[name], "num_train_timesteps", T) != T:
            raise ValueError(f"{root / name} was trained with T={models[name].num_train_timesteps} timesteps but the "
                             f"diffusion model has T={T}")
    for name in ("time_predictor", "clf_noisy", "clf_clean", "clf_eval"):
        shape = tuple(getattr(models[name], "sample_shape", eps_model.sample_shape))
        if shape != tuple(eps_model.sample_shape):
            raise ValueError(f"{root / name} expects images of shape {shape} but the diffusion model makes "
                             f"{tuple(eps_model.sample_shape)}")
    return models
