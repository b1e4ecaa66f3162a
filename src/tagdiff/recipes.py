"""Which network and which defaults for which dataset: the one place the CLI's training recipes live.

* vectors (``toy``): :class:`~tagdiff.nets.MLPEpsModel` (3 layers) and :class:`~tagdiff.time_predictor.MLPTimePredictor`
  (5 layers), as in the paper's toy (TAG.md §9.1);
* images (``digits``, ``mnist``, ``folder``): a CPU-sized diffusers ``UNet2DModel`` (no attention) and the paper's
  SimpleCNN time predictor (TAG.md §5.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import nn

from .data import DatasetInfo
from .interop import UNetEpsModel, make_unet, save_unet
from .nets import MLPEpsModel
from .schedules import VPSchedule
from .time_predictor import MLPTimePredictor, SimpleCNNTimePredictor, TimePredictor

__all__ = ["RECIPES", "Recipe", "exporter", "load_checkpoint", "make_classifier", "make_eps_model",
           "make_time_predictor", "recipe_for"]


@dataclass(frozen=True)
class Recipe:
    """Default training hyper-parameters for one kind of model on one kind of data."""

    steps: int
    batch_size: int
    lr: float
    ema_decay: float | None = None


RECIPES: dict[tuple[str, str], Recipe] = {
    ("diffusion", "vector"): Recipe(20_000, 1024, 1e-3, 0.999),
    ("time-predictor", "vector"): Recipe(20_000, 1024, 1e-3),
    ("diffusion", "image"): Recipe(15_000, 128, 2e-4, 0.999),
    ("time-predictor", "image"): Recipe(20_000, 256, 1e-3),
    ("classifier-noisy", "image"): Recipe(10_000, 256, 1e-3),
    ("classifier-clean", "image"): Recipe(4_000, 256, 1e-3),
    ("classifier-eval", "image"): Recipe(4_000, 256, 1e-3),
}


def _kind(info: DatasetInfo) -> str:
    return "vector" if len(info.sample_shape) == 1 else "image"


def recipe_for(what: str, info: DatasetInfo) -> Recipe:
    """The default :class:`Recipe` for ``what`` (``"diffusion"``/``"time-predictor"``) on ``info``'s data."""
    return RECIPES[(what, _kind(info))]


def make_eps_model(info: DatasetInfo, num_train_timesteps: int, *, hidden: int = 256, layers: int = 3,
                   widths: tuple[int, ...] = (32, 64, 64)) -> nn.Module:
    """An ε-model for the dataset: an MLP for vectors, a small ``UNet2DModel`` for square images.

    Raises:
        ValueError: for non-square images.
    """
    if _kind(info) == "vector":
        return MLPEpsModel(info.sample_shape[0], num_train_timesteps, hidden, layers)
    c, h, w = info.sample_shape
    if h != w:
        raise ValueError(f"image models need square images, got {h}×{w}; pass --image-size")
    return UNetEpsModel(make_unet(h, c, widths=widths), num_train_timesteps)


def make_time_predictor(info: DatasetInfo, num_train_timesteps: int, *, hidden: int = 256, layers: int = 5,
                        num_classes: int | None = None) -> TimePredictor:
    """A time predictor for the dataset: an MLP for vectors, the SimpleCNN for images."""
    if _kind(info) == "vector":
        return MLPTimePredictor(info.sample_shape[0], num_train_timesteps, hidden, layers, num_classes=num_classes)
    c, h, w = info.sample_shape
    if h != w:
        raise ValueError(f"image models need square images, got {h}×{w}; pass --image-size")
    return SimpleCNNTimePredictor(c, h, num_train_timesteps, num_classes=num_classes)


def make_classifier(kind: str, info: DatasetInfo, num_train_timesteps: int) -> tuple[nn.Module, Any]:
    """``(classifier, loss_fn)`` for ``kind`` in ``noisy`` (p(y|x_t,t), classifier guidance), ``clean`` (p(y|x),
    DPS through x0_hat) or ``eval`` (independent evaluation classifier, FID/KID features).

    Raises:
        ValueError: for an unknown kind, vector data, or a dataset without classes.
    """
    from .classifiers import (
        CleanClassifier,
        EvalClassifier,
        NoisyClassifier,
        clean_classifier_loss,
        noisy_classifier_loss,
    )

    if _kind(info) != "image":
        raise ValueError(f"classifiers are for image datasets; {info.name!r} has samples of shape {info.sample_shape}")
    if not info.num_classes or info.num_classes < 2:
        raise ValueError(f"dataset {info.name!r} has no class labels to train a classifier on")
    c, h, _ = info.sample_shape
    if kind == "noisy":
        return NoisyClassifier(c, h, info.num_classes, num_train_timesteps), noisy_classifier_loss
    if kind == "clean":
        return CleanClassifier(c, h, info.num_classes), clean_classifier_loss
    if kind == "eval":
        return EvalClassifier(c, h, info.num_classes), clean_classifier_loss
    raise ValueError(f"unknown classifier kind {kind!r}; expected noisy, clean or eval")


def exporter(model: nn.Module, schedule: VPSchedule) -> Any:
    """The export function :func:`tagdiff.training.train` should use for ``model`` (diffusers folder for UNets)."""
    if isinstance(model, UNetEpsModel):
        return partial(_export_unet, vp_schedule=schedule)
    return None


def _export_unet(model: UNetEpsModel, out_dir: Any, *, vp_schedule: VPSchedule, **extra: Any) -> Any:
    extra.pop("schedule", None)  # recorded by save_unet itself (scheduler_config.json + tagdiff.json)
    return save_unet(model, vp_schedule, out_dir, **extra)


def load_checkpoint(path: Any, device: str = "cpu") -> tuple[nn.Module, VPSchedule]:
    """Load any tagdiff model folder, or a diffusers ``UNet2DModel`` folder, with the schedule it was trained on.

    Raises:
        CheckpointError: missing/corrupt checkpoint, or no schedule recorded with it.
    """
    from .checkpoints import CheckpointError, load_model, read_config
    from .interop import is_diffusers_folder, load_unet

    if is_diffusers_folder(path) or is_diffusers_folder(f"{path}/unet"):
        return load_unet(path, device)
    config = read_config(path)
    if "schedule" not in config:
        raise CheckpointError(f"{path}/config.json records no noise schedule; retrain with tagdiff or add one")
    return load_model(path, device), VPSchedule.from_dict(config["schedule"])
