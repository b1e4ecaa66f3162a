"""The parts of :func:`tagdiff.training.train` around the step: optimiser state, LR schedule, EMA, precision, resume.

* **LR schedule**: :func:`make_lr_scheduler` is ``diffusers.optimization.get_scheduler`` (``constant`` by default,
  which multiplies the learning rate by exactly 1, so it changes nothing); its state is saved and restored.
* **EMA**: :func:`ema_decay_at` is the decay of diffusers' ``EMAModel.get_decay`` (``update_after_step=0``,
  ``min_decay=0``): with warm-up, ``min(ema_decay, 1 - (1 + k / inv_gamma) ** -power)`` at update ``k - 1`` (0 at
  the first update); without, the constant ``ema_decay`` (tagdiff's behaviour before warm-up existed). The EMA itself
  is a dict of tensors updated by ``lerp_`` (our code; diffusers' ``EMAModel`` applies the same formula).
* **Precision** (:class:`Precision`): ``mixed_precision`` ``"no"`` / ``"bf16"`` / ``"fp16"``. With several processes
  the :class:`accelerate.Accelerator` is built with ``mixed_precision=`` and its ``backward`` / ``clip_grad_norm_`` /
  prepared optimiser (with its fp16 ``GradScaler``) are used; alone, tagdiff does what accelerate does:
  ``torch.autocast`` (bf16 on CPU or GPU; fp16 on CUDA only) plus a ``torch.amp.GradScaler`` for fp16.
* **Config**: :class:`TrainConfig` (also importable from :mod:`tagdiff.training`).
* **Resume**: the optimiser tensors go into the safetensors state, its param groups, the scheduler and scaler state
  into the metadata; :func:`check_same_run` refuses a state written with other options.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..models.checkpoints import CheckpointError

__all__ = ["LR_SCHEDULERS", "MIXED_PRECISIONS", "Precision", "TrainConfig", "check_same_run", "ema_decay_at",
           "ema_update", "load_optim", "load_scheduler", "make_lr_scheduler", "optim_tensors", "scheduler_state"]

MIXED_PRECISIONS = ("no", "bf16", "fp16")
#: ``diffusers.optimization.SchedulerType`` names usable from a name alone (``piecewise_constant`` needs rules).
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
#: schedules whose values do not depend on the number of training steps (so ``steps`` may grow on resume)
_HORIZON_FREE = ("constant", "constant_with_warmup")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`train` (recorded in the training state and the exported ``config.json``).

    Attributes:
        steps: optimisation steps (optimiser updates). batch_size: samples per optimiser update, over all processes
            and micro-batches: the effective batch. (diffusers' train scripts count ``train_batch_size`` per
            process per micro-batch; their effective batch ``train_batch_size × grad_accum × processes`` is our
            ``batch_size``.) lr: Adam learning rate (paper: 1e-4), the peak of the LR schedule.
        seed: seeds batches, timesteps, noise, label drops and flips. save_every: steps between resumable checkpoints.
        ema_decay: EMA of the weights (``None`` disables; the exported model is the EMA when enabled).
        ema_warmup: EMA decay ``min(ema_decay, 1 - (1 + k/ema_inv_gamma)^-ema_power)`` at update ``k + 1``
            (diffusers ``EMAModel(use_ema_warmup=True)``; :func:`~tagdiff.train_state.ema_decay_at`).
        ema_inv_gamma, ema_power: the warm-up's ``inv_gamma`` (> 0) and ``power`` (> 0); diffusers' defaults 1, 2/3.
        mixed_precision: ``"no"``, ``"bf16"`` (CPU or GPU; ≈1.8× faster on CPU) or ``"fp16"`` (CUDA only, with a
            GradScaler); see :class:`~tagdiff.train_state.Precision`. Keep ``"no"`` for exact tests.
        bf16: alias of ``mixed_precision="bf16"`` (kept equal to ``mixed_precision == "bf16"``).
        grad_accum: micro-batches per update: each step's seeded batch is cut into ``grad_accum`` contiguous parts
            (:func:`~tagdiff.distributed.shard`), each part's loss weighted by its share, and their gradients summed,
            so the update is that of the whole batch up to float rounding, with ``1/grad_accum`` of the memory.
        lr_scheduler, lr_warmup_steps: ``diffusers.optimization.get_scheduler`` name (:data:`LR_SCHEDULERS`;
            ``constant``: today's fixed learning rate) and its warm-up updates.
        lr_decay_steps: the schedule's length (``num_training_steps``); ``None``: ``steps``. Set it to stop a
            cosine / linear run early and extend it later on the same curve.
        hflip: random horizontal flip of each image with p = 0.5, drawn from the step's generator (deterministic,
            the same for any number of workers or processes, and resume-exact); images only.
        grad_clip: max global gradient norm (``None`` disables).
        cond_drop: probability of replacing the class condition by "null" (trains p(t|x) and p(t|x,c) together).
    """

    steps: int = 10_000
    batch_size: int = 256
    lr: float = 1e-4
    seed: int = 0
    save_every: int = 1000
    ema_decay: float | None = None
    bf16: bool = False
    grad_clip: float | None = 1.0
    cond_drop: float = 0.0
    mixed_precision: str = "no"
    grad_accum: int = 1
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_decay_steps: int | None = None
    ema_warmup: bool = False
    ema_inv_gamma: float = 1.0
    ema_power: float = 2 / 3
    hflip: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "save_every", "grad_accum"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(self.lr_warmup_steps, bool) or not isinstance(self.lr_warmup_steps, int) \
                or self.lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps must be an integer >= 0, got {self.lr_warmup_steps!r}")
        if self.lr_decay_steps is not None and (not isinstance(self.lr_decay_steps, int) or self.lr_decay_steps < 1):
            raise ValueError(f"lr_decay_steps must be a positive integer or None, got {self.lr_decay_steps!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay!r}")
        for name in ("ema_inv_gamma", "ema_power"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if not 0 <= self.cond_drop <= 1:
            raise ValueError(f"cond_drop must be in [0, 1], got {self.cond_drop!r}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}, got "
                             f"{self.mixed_precision!r}")
        if self.bf16 and self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"bf16=True (--bf16) contradicts mixed_precision={self.mixed_precision!r}")
        if self.bf16:
            object.__setattr__(self, "mixed_precision", "bf16")
        object.__setattr__(self, "bf16", self.mixed_precision == "bf16")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"unknown lr_scheduler {self.lr_scheduler!r}; expected one of {', '.join(LR_SCHEDULERS)}")
        if self.lr_warmup_steps and self.lr_scheduler == "constant":
            raise ValueError("lr_warmup_steps needs a scheduler with a warm-up (constant_with_warmup, linear, cosine, "
                             "...); the constant schedule has none")


# ---------------------------------------------------------------------------------------------------- optimiser
def optim_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """The optimiser's state tensors keyed ``optim.<param id>.<name>``, and its param groups (JSON-able)."""
    sd = opt.state_dict()
    tensors = {f"optim.{pid}.{k}": v for pid, st in sd["state"].items() for k, v in st.items()}
    return tensors, sd["param_groups"]


def load_optim(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], groups: list[dict[str, Any]]) -> None:
    """Inverse of :func:`optim_tensors` (other keys of ``tensors`` are ignored)."""
    state: dict[int, dict[str, Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


# ---------------------------------------------------------------------------------------------------- LR schedule
def make_lr_scheduler(opt: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int) -> Any:
    """``diffusers.optimization.get_scheduler(name, opt, num_warmup_steps=warmup_steps,
    num_training_steps=total_steps)``: a ``LambdaLR`` stepped once per optimiser update, so that update ``k``
    (0-based) uses ``lr · λ(k)``. ``constant`` is built directly as diffusers builds it (``LambdaLR(opt, lambda _:
    1)``), which spares the default path the import of ``diffusers.optimization``.

    Raises:
        ValueError: an unknown ``name`` (the valid ones are :data:`LR_SCHEDULERS`).
    """
    if name not in LR_SCHEDULERS:
        raise ValueError(f"unknown LR scheduler {name!r}; expected one of {', '.join(LR_SCHEDULERS)}")
    if name == "constant":  # = diffusers' get_constant_schedule, without its 3 s import (the default path)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1)
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, opt, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def scheduler_state(sched: Any) -> dict[str, Any]:
    """The JSON-able part of a ``LambdaLR``'s state (step counter and learning rates)."""
    sd = sched.state_dict()
    return {k: sd[k] for k in ("last_epoch", "_step_count", "base_lrs", "_last_lr") if k in sd}


def load_scheduler(sched: Any, state: dict[str, Any] | None, step: int) -> None:
    """Restore :func:`scheduler_state`; a state without one (written before schedules existed, constant LR) is
    fast-forwarded to ``step``."""
    sd = sched.state_dict()
    if state is None:
        state = {"last_epoch": step, "_step_count": step + 1}
    sd.update(state)
    sched.load_state_dict(sd)
    for group, lr in zip(sched.optimizer.param_groups, sched.get_last_lr()):
        group["lr"] = lr


# ---------------------------------------------------------------------------------------------------- EMA
def ema_decay_at(k: int, ema_decay: float, warmup: bool, inv_gamma: float = 1.0, power: float = 2 / 3) -> float:
    """EMA decay at the ``k``-th update (``k = 1, 2, ...``): diffusers ``EMAModel.get_decay(k)`` with
    ``update_after_step=0``, ``min_decay=0``, ``use_ema_warmup=warmup`` and our constant decay without warm-up.

    With warm-up, ``s = k - 1`` and decay ``= 0`` if ``s <= 0`` else ``min(ema_decay, 1 - (1 + s / inv_gamma) **
    -power)`` (Karras-style warm-up; ``power = 2/3`` suits long runs, ``3/4`` short ones, as diffusers says).
    """
    if not warmup:
        return ema_decay
    s = k - 1
    if s <= 0:
        return 0.0
    return min(ema_decay, 1 - (1 + s / inv_gamma) ** -power)


@torch.no_grad()
def ema_update(ema: dict[str, Tensor], model: nn.Module, decay: float) -> None:
    """``ema ← decay · ema + (1 - decay) · θ`` for floating tensors (buffers that are not: copied)."""
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            ema[k].lerp_(v, 1 - decay)
        else:
            ema[k].copy_(v)


# ---------------------------------------------------------------------------------------------------- precision
class Precision:
    """Autocast, backward, gradient clipping and the optimiser step for one ``mixed_precision`` mode.

    ``acc`` (an ``accelerate.Accelerator`` built with the same ``mixed_precision``) is used when given; alone, bf16
    is ``torch.autocast(device, torch.bfloat16)`` and fp16 ``torch.autocast(cuda, torch.float16)`` with a
    ``torch.amp.GradScaler`` (accelerate's own recipe). ``"no"`` is plain fp32.

    Raises:
        ValueError: an unknown mode, or fp16 on a device other than CUDA (naming the device).
    """

    def __init__(self, mode: str, device: torch.device, acc: Any = None):
        check_precision(mode, device)
        self.mode, self.device, self.acc = mode, device, acc
        self.scaler = None
        if mode == "fp16":
            self.scaler = acc.scaler if acc is not None else torch.amp.GradScaler(device.type)

    def autocast(self) -> Any:
        if self.mode == "no":
            return nullcontext()
        dtype = torch.bfloat16 if self.mode == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def backward(self, loss: Tensor) -> None:
        if self.acc is not None and self.mode == "fp16":
            self.acc.backward(loss)
        elif self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def clip(self, opt: torch.optim.Optimizer, params: Any, max_norm: float | None) -> None:
        """Unscale fp16 gradients, then clip their global norm to ``max_norm`` (``None``: unscale only)."""
        if self.acc is not None and self.mode == "fp16":
            if max_norm is not None:
                self.acc.clip_grad_norm_(params, max_norm)
            return
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        if max_norm is not None:
            nn.utils.clip_grad_norm_(params, max_norm)

    def step(self, opt: torch.optim.Optimizer) -> None:
        if self.scaler is not None and self.acc is None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()  # (accelerate's prepared optimiser steps its scaler itself)

    def state(self) -> dict[str, Any] | None:
        if self.scaler is None:
            return None
        return {k: (float(v) if isinstance(v, (Tensor, float)) else v) for k, v in self.scaler.state_dict().items()}

    def load_state(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def check_precision(mode: str, device: torch.device) -> None:
    """Raise ValueError for an unknown ``mode`` or fp16 off CUDA (fp16 needs a ``GradScaler`` and CUDA kernels)."""
    if mode not in MIXED_PRECISIONS:
        raise ValueError(f"unknown mixed precision {mode!r}; expected one of {', '.join(MIXED_PRECISIONS)}")
    if mode == "fp16" and device.type != "cuda":
        raise ValueError(f"--mixed-precision fp16 needs a CUDA device, but this run is on {device.type}; use bf16 "
                         "or no")


# ---------------------------------------------------------------------------------------------------- resume check
def check_same_run(state_path: Path, meta: dict[str, Any], config: Any, data_shape: list[int]) -> None:
    """Refuse a training state written with other options than ``config`` (a :class:`TrainConfig`).

    ``steps`` and ``save_every`` may change (more steps extend the run), except ``steps`` when the LR schedule's
    horizon is the step count (cosine, linear, ...: set ``lr_decay_steps`` to extend such a run). Options the state
    does not record (written by an older tagdiff) count as their defaults.

    Raises:
        CheckpointError: naming each differing option, old and new.
    """
    saved = meta.get("train_config")
    if not isinstance(saved, dict):
        return  # a state written before train_config was recorded
    defaults = {f.name: f.default for f in fields(config) if f.default is not MISSING}
    saved = {**defaults, **saved}
    if "mixed_precision" not in meta["train_config"] and saved.get("bf16"):
        saved["mixed_precision"] = "bf16"
    now = asdict(config)
    free = ["save_every"]
    if config.lr_scheduler in _HORIZON_FREE or config.lr_decay_steps is not None:
        free.append("steps")
    diff = [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in now if k not in free and saved.get(k) != now[k]]
    if meta.get("data_shape") not in (None, data_shape):
        diff.append(f"data shape {meta['data_shape']} -> {data_shape}")
    if diff:
        hint = ("; with --lr-scheduler " + config.lr_scheduler + " the step count is the schedule's length: pass "
                "--lr-decay-steps to extend a run") if "steps" not in free and any(d.startswith("steps ")
                                                                                   for d in diff) else ""
        raise CheckpointError(f"{state_path.parent} holds a training state of another run ({'; '.join(diff)}); "
                              f"rerun with the same options to resume it, or use another --out, or --no-resume{hint}")
