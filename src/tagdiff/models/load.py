"""The one loader: any checkpoint tagdiff accepts, as the model it holds, with the schedule it was trained on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..sampling.schedules import VPSchedule
from . import classifiers as _classifiers  # noqa: F401  (registers the classes a checkpoint may name)
from . import nets as _nets  # noqa: F401
from . import time_predictor as _time_predictor  # noqa: F401
from .checkpoints import CheckpointError, load_model, read_config, resolve_checkpoint
from .flow_checkpoint import is_flow_checkpoint, load_flow
from .pipeline import DiffusersFolder, is_diffusers_model_folder, read_diffusers_folder
from .unet import is_diffusers_folder, load_unet

__all__ = ["load", "load_checkpoint"]


def load(path: str | Path, device: Any = "cpu", *, allow_pickle: bool = False) -> nn.Module:
    """Load any checkpoint tagdiff accepts, in ``eval()`` mode on ``device``, with its schedule as ``.schedule``.

    ``path`` is one of:

    * a tagdiff folder (``config.json`` + ``model.safetensors``: an MLP ε-model, a time predictor, a classifier);
    * a diffusers ``UNet2DModel`` folder with its ``scheduler_config.json``, or a pipeline-style folder holding
      ``unet/`` and ``scheduler/``: an ε-, v- or x0-prediction model (``prediction_type`` of the scheduler config);
    * a text-conditional pipeline folder (``model_index.json`` with a ``UNet2DConditionModel``, Stable Diffusion
      style): the ``DiffusionPipeline`` itself, to sample with :class:`~tagdiff.integrations.diffusers.TAGCallback`
      (the layouts: :func:`tagdiff.models.pipeline.read_diffusers_folder`);
    * a shipped name (``"digits"``, ``"digits/time_predictor"``, ``"toy"``; ``tagdiff models`` lists them).

    * a flow-matching model (``tagdiff train diffusion --objective flow``, or a diffusers UNet folder with a
      ``FlowMatch*`` scheduler config): a :class:`~tagdiff.models.flow_checkpoint.LoadedFlow`, the velocity model
      ``(x_σ, T σ, **cond) -> v`` that :func:`~tagdiff.sampling.flow.sample_flow` samples (it wraps it in a
      :class:`~tagdiff.sampling.flow.FlowModel`), with its :class:`~tagdiff.sampling.flow_path.FlowSchedule` as
      ``schedule``.

    Returns:
        The model (an ``nn.Module``; ε-models take ``(x, t, **cond)``, time predictors ``(x, c=None)``; a flow model
        the :class:`~tagdiff.models.flow_checkpoint.LoadedFlow` wrapper). Its ``schedule`` attribute is the
        :class:`~tagdiff.VPSchedule` it was trained with (a flow's :class:`FlowSchedule`), or ``None`` where the
        checkpoint records none (a clean classifier needs none).

    Raises:
        CheckpointError: a missing or corrupt folder, an unknown model class, weights that do not fit the config,
            pickle-only diffusers weights without ``allow_pickle``, or a malformed schedule; the message names the
            file.
    """
    path = resolve_checkpoint(path)
    if is_diffusers_model_folder(path) and (folder := read_diffusers_folder(path)).is_text_conditional:
        return _load_pipeline(folder, device, allow_pickle)
    if is_flow_checkpoint(path):
        return load_flow(path, device, allow_pickle=allow_pickle)
    if is_diffusers_folder(path) or is_diffusers_folder(f"{path}/unet"):
        model, schedule = load_unet(path, device, allow_pickle=allow_pickle)
        model.schedule = schedule
        return model
    model = load_model(path, device)
    if getattr(model, "schedule", None) is None:
        config = read_config(path)
        model.schedule = _schedule(path, config["schedule"]) if "schedule" in config else None
    return model


def load_checkpoint(path: str | Path, device: Any = "cpu", *,
                    allow_pickle: bool = False) -> tuple[nn.Module, VPSchedule]:
    """:func:`load` for a model that must come with its schedule (a diffusion model, a time predictor):
    ``(model, schedule)``.

    Raises:
        CheckpointError: as :func:`load`, and when the checkpoint records no noise schedule.
    """
    model = load(path, device, allow_pickle=allow_pickle)
    if model.schedule is None:
        raise CheckpointError(f"{resolve_checkpoint(path)}/config.json records no noise schedule; retrain with "
                              "tagdiff or add one")
    return model, model.schedule


def _schedule(path: Path, entry: Any) -> VPSchedule:
    try:
        return VPSchedule.from_dict(entry)
    except Exception as e:  # e.g. "schedule": "linear" instead of an object
        raise CheckpointError(f"{path}/config.json: malformed 'schedule' entry {entry!r}; expected an "
                              "object like {\"kind\": \"linear\", \"num_train_timesteps\": 1000} "
                              f"({(str(e).splitlines() or [type(e).__name__])[0]})") from None


def read_config_file(path: Path) -> dict[str, Any]:
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"{path} is not a readable JSON file") from None
    return data if isinstance(data, dict) else {}


def _load_pipeline(folder: DiffusersFolder, device: Any, allow_pickle: bool) -> Any:
    from diffusers import DiffusionPipeline

    index = read_config_file(folder.root / "model_index.json") if (folder.root / "model_index.json").is_file() else {}
    absent = {k: None for k, v in index.items() if not k.startswith("_") and (v is None or v == [None, None])}
    try:  # components saved as absent (e.g. text encoders when prompt embeddings are given) load as None
        pipe = DiffusionPipeline.from_pretrained(folder.root, use_safetensors=not allow_pickle or None, **absent)
    except Exception as e:  # diffusers raises many types for a bad folder
        raise CheckpointError(f"could not load the pipeline in {folder.root}: "
                              f"{(str(e).splitlines() or [type(e).__name__])[0]}") from None
    pipe = pipe.to(device)
    pipe.schedule = folder.schedule
    return pipe
