"""Flow-matching checkpoints: which folders hold a velocity model, and loading one as a :class:`LoadedFlow` (what
:func:`~tagdiff.sampling.flow.sample_flow` samples) with its :class:`~tagdiff.sampling.flow_path.FlowSchedule`.

A flow checkpoint is

* a diffusers ``UNet2DModel`` folder (or pipeline layout) whose ``scheduler_config.json`` is a ``FlowMatch*``
  scheduler's (what ``tagdiff train diffusion --objective flow`` writes for images, with ``tagdiff.json`` recording
  ``objective: flow`` and the σ density it was trained with), or
* a tagdiff MLP folder whose ``config.json`` records ``"objective": "flow"`` and the ``flow`` fields (toy).

The model is called as diffusers calls flow models, ``net(x_σ, T σ, **cond) -> v``; :class:`LoadedFlow` holds it
with its schedule, ready for :func:`~tagdiff.sampling.flow.sample_flow` (this module imports no sampler loop).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..sampling.flow_path import SIGMA_DENSITIES, FlowSchedule
from .checkpoints import CheckpointError, load_model, read_config
from .pipeline import is_diffusers_model_folder, read_diffusers_folder
from .unet import UNetEpsModel, read_unet2d, unet_meta

__all__ = ["LoadedFlow", "flow_metadata", "is_flow_checkpoint", "load_flow"]


class LoadedFlow:
    """A loaded flow checkpoint: the velocity network in diffusers' convention, ``flow(x_σ, T σ, **cond) -> v``,
    with ``schedule`` (its :class:`FlowSchedule`), ``sigma_density`` (its training density, ``None`` if
    unrecorded), ``null_class`` (class-conditional UNets trained with label dropout), ``sample_shape`` and the
    network as ``model``. Sample it with ``sample_flow(flow, noise, flow.schedule, num_steps, terms=...)``, which
    wraps it in a :class:`~tagdiff.sampling.flow.FlowModel` (the loop's VP-view contract); ``FlowModel(flow)`` runs it
    in any VP sampler on ``flow.schedule.vp_schedule``. ``eval()``, ``to(device)`` and ``parameters()`` act on the
    network."""

    def __init__(self, net: Any, flow: FlowSchedule, sigma_density: str | None, meta: dict[str, Any]):
        self.model, self.schedule, self.sigma_density, self.meta = net, flow, sigma_density, meta
        self.null_class = getattr(net, "null_class", None)
        self.num_train_timesteps = flow.num_train_timesteps
        self.sample_shape = tuple(net.sample_shape)

    def __call__(self, x: Any, timestep: Any, **cond: Any) -> Any:
        return self.model(x, timestep, **cond)

    def eval(self) -> LoadedFlow:
        self.model.eval()
        return self

    def to(self, device: Any) -> LoadedFlow:
        self.model.to(device)
        return self

    def parameters(self) -> Any:
        return self.model.parameters()


def _tagdiff_config(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / "config.json").read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None


def is_flow_checkpoint(path: str | Path) -> bool:
    """True for a flow checkpoint folder (module docstring); reads configs only."""
    path = Path(path)
    if is_diffusers_model_folder(path):
        try:
            return read_diffusers_folder(path).is_flow
        except CheckpointError:
            return False
    config = _tagdiff_config(path)
    return isinstance(config, dict) and config.get("objective") == "flow"


def _density(value: Any, where: Path) -> str | None:
    if value is not None and value not in SIGMA_DENSITIES:
        raise CheckpointError(f"{where}: sigma_density {value!r} is not one of {', '.join(SIGMA_DENSITIES)}")
    return value


def flow_metadata(path: str | Path) -> tuple[FlowSchedule, str | None, dict[str, Any]]:
    """``(flow schedule, σ density or None, recorded metadata)`` of a flow checkpoint folder.

    Raises:
        CheckpointError: not a flow checkpoint, or a malformed flow record.
    """
    path = Path(path)
    if is_diffusers_model_folder(path):
        folder = read_diffusers_folder(path)
        if not folder.is_flow:
            raise CheckpointError(f"{path} is not a flow-matching model (its scheduler is a VP one)")
        meta = unet_meta(folder.unet_dir)
        return folder.schedule, _density(meta.get("sigma_density"), folder.unet_dir / "tagdiff.json"), meta
    config = read_config(path)
    if config.get("objective") != "flow":
        raise CheckpointError(f"{path}/config.json records no 'objective': 'flow'")
    try:
        flow = FlowSchedule.from_diffusers(config.get("flow") or {})
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}/config.json: malformed 'flow' entry ({e})") from None
    return flow, _density(config.get("sigma_density"), path / "config.json"), config


def load_flow(path: str | Path, device: Any = "cpu", *, allow_pickle: bool = False) -> LoadedFlow:
    """Load a flow checkpoint folder as a :class:`LoadedFlow` on ``device``, in eval mode.

    Raises:
        CheckpointError: a missing or malformed folder (the message names the file).
    """
    path = Path(path)
    flow, density, meta = flow_metadata(path)
    if is_diffusers_model_folder(path):
        unet, unet_dir, _ = read_unet2d(path, allow_pickle=allow_pickle)
        try:
            net = UNetEpsModel(unet, flow.num_train_timesteps, null_class=meta.get("null_class"))
        except ValueError as e:
            raise CheckpointError(f"{unet_dir / 'config.json'}: {e}") from None
        net.prediction_type = "flow_velocity"  # x_σ in, ε - x_0 out: a VP sampler refuses it unwrapped
    else:
        net = load_model(path, device)
    return LoadedFlow(net.to(device).eval(), flow, density, meta)
