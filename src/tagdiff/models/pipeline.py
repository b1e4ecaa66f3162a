"""What a diffusers model folder holds, read from its configs alone (no weights loaded).

A **pipeline folder** is a first-class input of ``tagdiff train time-predictor --checkpoint``, ``tagdiff sample
--checkpoint`` and :func:`tagdiff.load`. :func:`read_diffusers_folder` accepts the layouts users have:

* a pipeline folder (``save_pretrained`` of a ``DiffusionPipeline``: ``model_index.json``, ``unet/``,
  ``scheduler/``, optionally ``vae/``, ``text_encoder/``, ``tokenizer/``);
* a folder with ``unet/`` and ``scheduler/`` but no ``model_index.json``;
* a bare ``unet/`` sub-folder of such a folder (its ``scheduler/`` and ``vae/`` are read from the parent);
* a UNet folder with its ``scheduler_config.json`` beside (what ``tagdiff train diffusion`` writes).

It returns the noise schedule (:class:`~tagdiff.VPSchedule` of the scheduler config: betas, zero terminal SNR; a
:class:`~tagdiff.sampling.flow_path.FlowSchedule` for a ``FlowMatch*`` scheduler config), the prediction type
(``epsilon`` / ``v_prediction`` / ``sample``, ``flow_prediction`` for flows), the UNet's class and sample shape,
and the VAE (its folder and the image shape it decodes to) for a latent pipeline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..sampling.flow_path import FlowSchedule
from ..sampling.predictions import FLOW_PREDICTION
from ..sampling.schedules import VPSchedule
from .checkpoints import CheckpointError

__all__ = ["DiffusersFolder", "is_diffusers_model_folder", "read_diffusers_folder"]

UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
TRANSFORMER_CLASSES = ("SD3Transformer2DModel",)  # text-conditional latent denoisers read like a text UNet


@dataclass(frozen=True)
class DiffusersFolder:
    """A diffusers model folder as :func:`read_diffusers_folder` found it.

    Attributes:
        root: the folder given (the pipeline folder for a bare ``unet/`` sub-folder's parent layout).
        unet_dir / scheduler_dir: the UNet's folder and the folder of ``scheduler_config.json``.
        vae_dir: the ``AutoencoderKL`` folder of a latent pipeline (``vae/``), else ``None``.
        pipeline_class: ``model_index.json``'s ``_class_name`` (e.g. ``"StableDiffusionPipeline"``), else ``None``.
        unet_class: ``"UNet2DModel"`` or ``"UNet2DConditionModel"`` (text-conditional: needs prompt embeddings).
        sample_shape: ``(C, H, W)`` of the UNet's input (latents for a latent pipeline).
        image_shape: ``(C, H, W)`` of the images: the VAE's (``in_channels``, ``H · f``, ``W · f``) with
            ``f = 2^(len(block_out_channels) - 1)``, or ``sample_shape`` for a pixel model.
        schedule: the VP schedule of the scheduler config, or for a flow-matching model (a ``FlowMatch*`` scheduler
            config) its :class:`~tagdiff.sampling.flow_path.FlowSchedule`; prediction_type: the scheduler config's
            (``"flow_prediction"`` for flow models).
        scheduler_config: the scheduler config as read (for building the pipeline's scheduler).
    """

    root: Path
    unet_dir: Path
    scheduler_dir: Path
    vae_dir: Path | None
    pipeline_class: str | None
    unet_class: str
    sample_shape: tuple[int, int, int]
    image_shape: tuple[int, int, int]
    schedule: VPSchedule | FlowSchedule
    prediction_type: str
    scheduler_config: dict[str, Any]

    @property
    def is_latent(self) -> bool:
        return self.vae_dir is not None

    @property
    def is_flow(self) -> bool:
        """A flow-matching model (a ``FlowMatch*`` scheduler config): ``schedule`` is a :class:`FlowSchedule`."""
        return self.prediction_type == FLOW_PREDICTION

    @property
    def is_text_conditional(self) -> bool:
        return self.unet_class in ("UNet2DConditionModel", *TRANSFORMER_CLASSES)


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable JSON file ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def _class_name(folder: Path) -> str | None:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_bytes().decode("utf-8")).get("_class_name")
    except (ValueError, AttributeError, OSError):
        return None


def is_diffusers_model_folder(path: str | Path) -> bool:
    """True if ``path`` is one of the layouts :func:`read_diffusers_folder` reads (no weights are checked)."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return True
    if _class_name(path / "unet") in UNET_CLASSES or _class_name(path / "transformer") in TRANSFORMER_CLASSES:
        return True
    return _class_name(path) in UNET_CLASSES


def _size(value: Any, path: Path) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value, value
    if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    raise CheckpointError(f"{path}: sample_size {value!r} is not a positive integer or a pair of them")


def read_diffusers_folder(path: str | Path) -> DiffusersFolder:
    """Read a diffusers model folder's configs (see the module docstring for the layouts).

    Raises:
        CheckpointError: not such a folder, no UNet (or one of another class than ``UNet2DModel`` /
            ``UNet2DConditionModel``), no ``scheduler_config.json``, a scheduler config that is neither a VP one nor
            a flow-matching one tagdiff reads (:meth:`FlowSchedule.from_diffusers`), or unreadable configs; the
            message names the file.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model folder not found: {path}")
    index = _json(path / "model_index.json") if (path / "model_index.json").is_file() else None
    if (path / "unet").is_dir():
        root, unet_dir = path, path / "unet"
    elif _class_name(path / "transformer") in TRANSFORMER_CLASSES:  # SD3-style: a latent transformer, not a UNet
        root, unet_dir = path, path / "transformer"
    elif path.name in ("unet", "transformer") and (path.parent / "scheduler").is_dir():
        root, unet_dir = path.parent, path
    else:
        root, unet_dir = path, path
    unet_class = _class_name(unet_dir)
    if unet_class not in (*UNET_CLASSES, *TRANSFORMER_CLASSES):
        raise CheckpointError(f"{path} holds no diffusers UNet (expected {unet_dir / 'config.json'} with _class_name "
                              f"{' or '.join(UNET_CLASSES)}; found {unet_class!r})")
    sched_dir = next((d for d in (unet_dir, root / "scheduler", root) if (d / "scheduler_config.json").is_file()), None)
    if sched_dir is None:
        raise CheckpointError(f"no scheduler_config.json in {root / 'scheduler'} or next to {unet_dir}; tagdiff needs "
                              "the noise schedule the model was trained with")
    sched_cfg = _json(sched_dir / "scheduler_config.json")
    T = sched_cfg.get("num_train_timesteps", 1000)
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise CheckpointError(f"{sched_dir / 'scheduler_config.json'}: num_train_timesteps must be a positive "
                              f"integer, got {T!r}")
    name = str(sched_cfg.get("_class_name", ""))
    if sched_cfg.get("use_flow_sigmas"):
        raise CheckpointError(f"{sched_dir / 'scheduler_config.json'}: use_flow_sigmas (flow σs in a VP-family "
                              "scheduler) is not supported; use a FlowMatchEulerDiscreteScheduler config")
    flow = name.startswith("FlowMatch")
    try:
        schedule = FlowSchedule.from_diffusers(sched_cfg) if flow else VPSchedule.from_diffusers(
            _ddpm_config(sched_cfg))
    except Exception as e:
        raise CheckpointError(f"could not read the noise schedule of {sched_dir / 'scheduler_config.json'}: "
                              f"{(str(e).splitlines() or [type(e).__name__])[0]}") from None
    unet_cfg = _json(unet_dir / "config.json")
    c = unet_cfg.get("in_channels", 4)
    if not isinstance(c, int) or isinstance(c, bool) or c < 1:
        raise CheckpointError(f"{unet_dir / 'config.json'}: in_channels {c!r} is not a positive integer")
    h, w = _size(unet_cfg.get("sample_size", 64), unet_dir / "config.json")
    vae_dir = root / "vae" if _class_name(root / "vae") == "AutoencoderKL" else None
    image_shape = (c, h, w)
    if vae_dir is not None:
        vae_cfg = _json(vae_dir / "config.json")
        f = 2 ** (len(vae_cfg.get("block_out_channels", (64,))) - 1)
        image_shape = (int(vae_cfg.get("in_channels", 3)), h * f, w * f)
    return DiffusersFolder(root=root, unet_dir=unet_dir, scheduler_dir=sched_dir, vae_dir=vae_dir,
                           pipeline_class=None if index is None else index.get("_class_name"),
                           unet_class=unet_class, sample_shape=(c, h, w), image_shape=image_shape,
                           schedule=schedule, prediction_type=FLOW_PREDICTION if flow else
                           str(sched_cfg.get("prediction_type", "epsilon")),
                           scheduler_config=sched_cfg)


def _ddpm_config(config: dict[str, Any]) -> Any:
    """A ``DDPMScheduler`` built from any VP scheduler's config (PNDM, DDIM, Euler, ...): it holds the betas."""
    from diffusers import DDPMScheduler

    keep = {k: v for k, v in config.items() if not k.startswith("_")}
    return DDPMScheduler.from_config(keep)
