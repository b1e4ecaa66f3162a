"""Hugging Face diffusers interoperability: ``UNet2DModel`` as a tagdiff ε-model, saving and loading.

A checkpoint of an image ε-model is a diffusers model folder: ``config.json`` +
``diffusion_pytorch_model.safetensors`` (``UNet2DModel.save_pretrained``) plus ``scheduler_config.json``
(``DDPMScheduler.save_pretrained``), so ``UNet2DModel.from_pretrained(path)`` and
``DDPMPipeline(unet, DDPMScheduler.from_pretrained(path))`` load it as is. Any such folder (ε-prediction) can be
used by tagdiff's samplers via :func:`load_unet`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..sampling.predictions import check_prediction_type
from ..sampling.schedules import VPSchedule
from .checkpoints import CheckpointError

__all__ = ["UNetEpsModel", "is_diffusers_folder", "load_unet", "make_unet", "read_unet2d", "save_folder_atomically",
           "save_unet", "unet_meta"]


def make_unet(sample_size: int, in_channels: int = 1, *, widths: tuple[int, ...] = (32, 64, 64),
              layers_per_block: int = 1, num_classes: int | None = None, attention: bool = False) -> Any:
    """A small CPU-sized diffusers ``UNet2DModel`` (ε-prediction), optionally class-conditional.

    ``len(widths)`` resolution levels (the last without downsampling): 8×8 → 4 → 2, 28×28 → 14 → 7. With
    ``attention`` the lowest level uses a single-head attention block; default none (CPU budget).
    """
    from diffusers import UNet2DModel

    n = len(widths)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
                       block_out_channels=tuple(widths), down_block_types=tuple(down), up_block_types=tuple(up),
                       layers_per_block=layers_per_block, norm_num_groups=min(8, min(widths)),
                       attention_head_dim=widths[-1] if attention else None, num_class_embeds=num_classes)


class UNetEpsModel(nn.Module):
    """tagdiff's model contract around a diffusers ``UNet2DModel``: ``model(x, t, y=None) -> eps_hat``.

    Args:
        unet: a ``UNet2DModel``.
        num_train_timesteps: T of the schedule the UNet was trained on.
        prediction_type: what the UNet predicts (``"epsilon"``, ``"v_prediction"``, ``"sample"``; from its scheduler
            config); tagdiff's loops convert (:mod:`tagdiff.predictions`).

        null_class: for a class-conditional UNet trained with label dropout, the class index of "no label" (the
            extra embedding, e.g. 10 for ``num_class_embeds = 11`` on ten digits); ``y = -1`` selects it, as
            :func:`tagdiff.training.train`'s ``cond_drop`` writes dropped labels. Recorded in ``tagdiff.json`` and
            read back by :func:`load_unet`.

    Shapes: x ``(B, C, H, W)`` in VP space, t ``(B,)`` int64 training timesteps, y ``(B,)`` class labels (only for
    class-conditional UNets). Raises ``ValueError`` for an x of the wrong shape, or a label -1 on a UNet without
    ``null_class``.
    """

    def __init__(self, unet: Any, num_train_timesteps: int = 1000, prediction_type: str = "epsilon",
                 null_class: int | None = None):
        super().__init__()
        self.unet = unet
        self.prediction_type = check_prediction_type(prediction_type)
        n = unet.config.get("num_class_embeds")
        if null_class is not None and (n is None or not 0 <= int(null_class) < n):
            raise ValueError(f"null_class={null_class} is not a class embedding of this UNet (num_class_embeds={n})")
        self.null_class = None if null_class is None else int(null_class)
        cfg = unet.config
        size = cfg.sample_size
        if isinstance(size, list | tuple):
            if len(size) != 2 or size[0] != size[1]:
                raise ValueError(f"sample_size must be one integer (square images), got {list(size)}")
            size = size[0]
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"sample_size must be a positive integer, got {size!r}")
        if not isinstance(cfg.in_channels, int) or cfg.in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {cfg.in_channels!r}")
        if int(num_train_timesteps) < 1:
            raise ValueError(f"num_train_timesteps must be a positive integer, got {num_train_timesteps!r}")
        self.sample_shape = (int(cfg.in_channels), size, size)
        self.num_train_timesteps = int(num_train_timesteps)
        # diffusers' private keys (e.g. ``_use_default_values``, built from a set) vary between identical models
        self.config: dict[str, Any] = {k: v for k, v in json.loads(json.dumps(dict(cfg), default=str)).items()
                                       if not k.startswith("_")}

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, **cond: Any) -> Tensor:
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"x has shape {tuple(x.shape)}, but the UNet expects (B, "
                             f"{', '.join(map(str, self.sample_shape))})")
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        if isinstance(y, Tensor) and bool((y < 0).any()):
            if self.null_class is None:
                raise ValueError("class label -1 (no label) needs a UNet trained with label dropout and its "
                                 "null_class; this one has none")
            y = torch.where(y < 0, torch.full_like(y, self.null_class), y)
        return self.unet(x, t, class_labels=y).sample


def is_diffusers_folder(path: str | Path) -> bool:
    """True if ``path`` looks like a diffusers ``UNet2DModel`` folder (``config.json`` with ``_class_name``)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_bytes().decode("utf-8")).get("_class_name") == "UNet2DModel"
    except (ValueError, AttributeError):  # not UTF-8, not JSON, or not an object
        return False


def save_unet(model: UNetEpsModel, schedule: VPSchedule, directory: str | Path, *, flow_schedule: Any = None,
              **extra: Any) -> Path:
    """Save the UNet (``save_pretrained``) and its schedule (``scheduler_config.json``) into ``directory``.

    Written into a temporary folder inside ``directory`` first and moved into place file by file, ``config.json``
    last, so an interrupted save never leaves a loadable half-written model, and other files of ``directory``
    (a training state) are never moved. ``extra`` (JSON-able) goes to ``tagdiff.json`` (e.g. the command that
    trained it).

    ``flow_schedule``: a :class:`~tagdiff.sampling.flow_path.FlowSchedule` for a velocity model (``--objective
    flow``): the scheduler config is then a ``FlowMatchEulerDiscreteScheduler``'s (T and the shift) and
    ``tagdiff.json`` records ``objective: flow`` and the ``flow`` fields instead of the VP ``schedule``.
    """
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    directory = Path(directory)

    def write(tmp: Path) -> None:
        model.unet.save_pretrained(tmp, safe_serialization=True)
        if flow_schedule is not None:
            T, shift = flow_schedule.num_train_timesteps, flow_schedule.shift
            FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift).save_pretrained(tmp)
            meta = {"objective": "flow", "flow": {"num_train_timesteps": T, "shift": shift}, **extra}
        else:
            DDPMScheduler(**{**schedule.to_diffusers_config(),
                             "prediction_type": getattr(model, "prediction_type", "epsilon")}).save_pretrained(tmp)
            meta = {"schedule": schedule.to_dict(), **extra}
        (tmp / "tagdiff.json").write_text(json.dumps(meta, indent=2) + "\n")

    save_folder_atomically(directory, write, prefix=".unet.")
    return directory


def load_unet(path: str | Path, device: str | torch.device = "cpu", *,
              allow_pickle: bool = False) -> tuple[UNetEpsModel, VPSchedule]:
    """Load a diffusers ``UNet2DModel`` folder and its scheduler config as ``(eps_model, schedule)``.

    The scheduler config is read from ``path/scheduler_config.json`` or ``path/scheduler/`` (pipeline layout
    ``path/unet`` + ``path/scheduler`` is accepted too).

    Weights must be ``diffusion_pytorch_model.safetensors``; a folder with only a pickle ``.bin`` is refused unless
    ``allow_pickle`` (unpickling can run arbitrary code).

    Raises:
        CheckpointError: missing folder/files, pickle-only weights without ``allow_pickle``, a corrupt model or
            config (the message names the file), or an unsupported prediction type.
    """
    from diffusers import DDPMScheduler

    unet, unet_dir, sched_dir = read_unet2d(path, allow_pickle=allow_pickle)
    sched_file = sched_dir / "scheduler_config.json"
    try:
        T = json.loads(sched_file.read_bytes().decode("utf-8")).get("num_train_timesteps", 1000)
    except (ValueError, AttributeError):
        raise CheckpointError(f"{sched_file} is not a JSON object (not UTF-8 JSON, or malformed)") from None
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise CheckpointError(f"{sched_file}: num_train_timesteps must be a positive integer, got {T!r}")
    try:
        scheduler = DDPMScheduler.from_pretrained(sched_dir)
        schedule = VPSchedule.from_diffusers(scheduler)
        kind = check_prediction_type(scheduler.config.get("prediction_type", "epsilon"))
    except Exception as e:
        raise CheckpointError(f"could not load {sched_dir / 'scheduler_config.json'}: {_first_line(e)}") from None
    null_class = unet_meta(unet_dir).get("null_class")
    try:
        eps_model = UNetEpsModel(unet, schedule.num_train_timesteps, kind, null_class)
    except ValueError as e:
        raise CheckpointError(f"{unet_dir / 'config.json'}: {e}") from None
    return eps_model.to(device).eval(), schedule


def unet_meta(unet_dir: Path) -> dict[str, Any]:
    """``tagdiff.json`` beside a UNet (what tagdiff recorded: command, null class, objective), or ``{}``.

    Raises:
        CheckpointError: a ``tagdiff.json`` that is not a JSON object.
    """
    meta = Path(unet_dir) / "tagdiff.json"
    if not meta.is_file():
        return {}
    try:
        data = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{meta} is not valid JSON") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{meta} is not valid JSON (not an object)")
    return data


def read_unet2d(path: str | Path, *, allow_pickle: bool = False) -> tuple[Any, Path, Path]:
    """The ``UNet2DModel`` of a diffusers folder (layouts of :func:`load_unet`), its folder and the folder of its
    ``scheduler_config.json``.

    Raises:
        CheckpointError: as :func:`load_unet` for the UNet and the presence of the scheduler config.
    """
    from diffusers import UNet2DModel

    path = Path(path)
    unet_dir = path / "unet" if (path / "unet").is_dir() and not is_diffusers_folder(path) else path
    if not is_diffusers_folder(unet_dir):
        raise CheckpointError(f"{path} is not a diffusers UNet2DModel folder (expected config.json with "
                              "_class_name UNet2DModel and diffusion_pytorch_model.safetensors)")
    sched_dir = next((d for d in (unet_dir, path / "scheduler", path) if (d / "scheduler_config.json").is_file()), None)
    if sched_dir is None:
        raise CheckpointError(f"no scheduler_config.json next to {unet_dir}; tagdiff needs the noise schedule")
    if not (unet_dir / "diffusion_pytorch_model.safetensors").is_file():
        pickles = sorted(p.name for p in unet_dir.glob("*.bin"))
        if not pickles:
            raise CheckpointError(f"no diffusion_pytorch_model.safetensors in {unet_dir}")
        if not allow_pickle:
            raise CheckpointError(f"{unet_dir} holds only pickle weights ({', '.join(pickles)}), which can run "
                                  "arbitrary code when loaded; convert them to safetensors, or pass --allow-pickle "
                                  "if you trust the file")
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, low_cpu_mem_usage=False, use_safetensors=not allow_pickle or None)
    except Exception as e:  # diffusers raises many types (OSError, ValueError, TypeError, ...) for a bad folder
        raise CheckpointError(f"could not load the UNet in {unet_dir}: {_first_line(e)}") from None
    return unet, unet_dir, sched_dir


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def save_folder_atomically(directory: str | Path, write: Callable[[Path], None], prefix: str = ".save.") -> Path:
    """Call ``write(tmp)`` on a temporary folder inside ``directory``, then move its files into ``directory`` one by
    one (each ``os.replace`` is atomic), ``config.json`` removed first and moved last: an interruption leaves either
    the old or the new model loadable, or none (never a mix), and never touches the other files of ``directory``
    (``train_state.safetensors``, ``history.json``). Returns ``directory``.

    Raises:
        whatever ``write`` raises (the temporary folder is removed and ``directory``'s files are left as they were),
        and ``OSError`` if ``directory`` cannot be created or written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=prefix))
    try:
        write(tmp)
        (directory / "config.json").unlink(missing_ok=True)
        files = sorted((p for p in tmp.iterdir() if p.name != "config.json"), key=lambda p: p.name)
        for p in [*files, tmp / "config.json"]:
            os.replace(p, directory / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
