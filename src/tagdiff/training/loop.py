"""Training loops for ε-models and time predictors: EMA (with warm-up), mixed precision, gradient accumulation, LR
schedules, streaming data and exact resume.

Both losses draw ``t ~ U{0..T-1}`` and ``x_t ~ q(x_t | x_0)`` (a loss with a ``draw_t(batch, T, generator)``
method draws its own times from the step's generator instead: the flow objectives of :mod:`tagdiff.training.flow`):

* :func:`eps_loss`: ``||ε_θ(x_t, t) - ε||²`` (Ho et al. 2020, "simple" loss);
* :func:`time_loss`: ``CE(f_φ(x_t), t)`` (the paper's Eq. 8: the time predictor is a classifier over timesteps).

Batch ``i`` depends only on ``(seed, i)``, so a run interrupted and resumed from its last checkpoint follows
the same trajectory as an uninterrupted one. The training state (weights, EMA, Adam moments, step) is one
safetensors file, ``train_state.safetensors``, replaced atomically every ``save_every`` steps and on Ctrl-C.

Data-parallel runs (``WORLD_SIZE > 1``: ``tagdiff train --num-processes N``, ``accelerate launch``, ``torchrun``) go
through ``accelerate``: every process draws the same global batch and trains on its :func:`~tagdiff.distributed.shard`,
gradients are all-reduced, and the main process alone writes the state and the model. The optimiser, LR schedule,
EMA, precision and resume plumbing lives in :mod:`tagdiff.train_state`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from .._io import DeferInterrupt, dir_lock
from ..models.checkpoints import CheckpointError, load_tensors, save_model, save_tensors
from ..sampling.schedules import VPSchedule
from .distributed import make_accelerator, shard
from .state import (
    Precision,
    check_precision,
    check_same_run,
    ema_decay_at,
    ema_update,
    load_optim,
    load_scheduler,
    make_lr_scheduler,
    optim_tensors,
    scheduler_state,
)
from .state import TrainConfig as TrainConfig

__all__ = ["TrainConfig", "TrainingInterrupted", "eps_loss", "time_loss", "train"]

LossFn = Callable[[nn.Module, Tensor, Tensor, Tensor, VPSchedule, "Tensor | None"], Tensor]


def eps_loss(model: nn.Module, x0: Tensor, t: Tensor, noise: Tensor, schedule: VPSchedule,
             c: Tensor | None = None) -> Tensor:
    """Mean squared ε-prediction error at ``x_t = q_sample(x0, t, noise)``; ``c`` is passed as ``y=`` if given."""
    xt = schedule.q_sample(x0, t, noise)
    eps_hat = model(xt, t) if c is None else model(xt, t, y=c)
    return F.mse_loss(eps_hat.float(), noise.float())


def time_loss(predictor: nn.Module, x0: Tensor, t: Tensor, noise: Tensor, schedule: VPSchedule,
              c: Tensor | None = None) -> Tensor:
    """Cross-entropy of the time predictor's logits against the true timestep (the paper's Eq. 8)."""
    xt = schedule.q_sample(x0, t, noise)
    return F.cross_entropy(predictor(xt, c).float(), t)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train`: ``step`` updates are done; ``saved`` says whether ``path`` holds them now.

    Attributes:
        step: number of completed optimiser updates (the weights, Adam moments and EMA all belong to this step).
        saved: True if the training state at ``step`` was written to ``path``.
        path: the training-state file.
    """

    def __init__(self, step: int, saved: bool, path: Path, finished: bool = False):
        super().__init__(f"interrupted at step {step}")
        self.step, self.saved, self.path, self.finished = step, saved, path, finished


def train(model: nn.Module, loss_fn: LossFn, data: Tensor | Dataset, schedule: VPSchedule, config: TrainConfig,
          out_dir: str | Path, *, labels: Tensor | None = None, resume: bool = True, progress: bool = True,
          export_extra: dict[str, Any] | None = None, device: str | torch.device = "cpu",
          export: Callable[..., Any] | None = None, num_workers: int = 0) -> dict[str, Any]:
    """Train ``model`` on clean ``data`` (shape ``(N, *D)``) with ``loss_fn``; export to ``out_dir``.

    ``data`` is a tensor, or a map-style :class:`~torch.utils.data.Dataset` (``len(data)`` and ``data[i]``, a
    ``(*D)`` float tensor in ``[-1, 1]`` or ``(x, label)``; e.g. :class:`~tagdiff.data.folder.ImageFolderDataset`)
    that is never held whole: each batch is gathered from the same seeded indices as for a tensor, through a
    :class:`~torch.utils.data.DataLoader` with ``num_workers`` workers, so a Dataset and the tensor of its items
    train bit for bit alike (and resume alike).

    Writes ``out_dir/train_state.safetensors`` (resumable state) periodically, and at the end the exported
    checkpoint ``out_dir/model.safetensors`` + ``config.json`` (EMA weights when ``ema_decay`` is set) with the
    schedule, the training config and ``export_extra``; plus ``out_dir/history.json`` (loss per logged step).

    Each step draws from its generator (seed, step): the batch indices, ``t``, the noise, the label drops
    (``cond_drop``) and, with ``hflip``, the flips; with ``grad_accum`` N the batch is then cut into N contiguous
    micro-batches (each process taking its shard of each), whose losses are weighted by their share of the batch so
    that the summed gradient is the whole batch's (for per-sample mean losses). The learning rate follows
    ``lr_scheduler`` (stepped once per update), the EMA ``ema_decay`` (or its warm-up), and ``mixed_precision``
    autocasts the forward pass (:class:`~tagdiff.train_state.Precision`).

    While it runs, ``out_dir/.lock`` (holding the pid) keeps a second training out of the folder. Ctrl-C stops at
    the next step boundary and saves a consistent state (the step counter matches weights, Adam moments and EMA),
    so the resumed run equals an uninterrupted one bit for bit; a second Ctrl-C stops at once.

    Args:
        labels: optional ``(N,)`` class labels, passed to the loss as ``c`` (conditional models); with a Dataset,
            the labels are the items' second element instead.
        num_workers: DataLoader worker processes decoding a Dataset's items (0: in this process; ignored for a
            tensor).
        resume: continue from ``train_state.safetensors`` if present (its model and train config must match, except
            ``save_every`` and ``steps``; ``steps`` only where the LR schedule's length is not ``steps``).
        device: where the model and batches live (batches are drawn on the CPU from ``(seed, step)`` and moved).
        export: ``(model, out_dir, **extra) -> ...`` writing the final model; default
            :func:`~tagdiff.checkpoints.save_model` (diffusers UNets use :func:`~tagdiff.interop.save_unet`).

    Returns:
        ``{"steps", "final_loss", "seconds", "history"}``.

    Raises:
        ValueError: empty data, label/data length mismatch, ``labels`` with a Dataset, a model whose T differs
            from the schedule's, fp16 off CUDA, ``hflip`` on non-image data, or a batch smaller than
            ``grad_accum`` × processes.
        LockError: another live process trains into ``out_dir``.
        CheckpointError: an existing training state that does not match this model or run, or is malformed.
        TrainingInterrupted: on Ctrl-C (a ``KeyboardInterrupt``), after saving the state.
    """
    if not isinstance(data, Tensor):
        if labels is not None:
            raise ValueError("labels= is for a tensor; a Dataset gives its labels as the items' second element")
        if len(data) == 0:
            raise ValueError("data is an empty Dataset")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    elif data.ndim < 2 or data.shape[0] == 0:
        raise ValueError(f"data must be a non-empty (N, *D) tensor, got shape {tuple(data.shape)}")
    if labels is not None and labels.shape[0] != data.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries but data has {data.shape[0]} samples")
    T_model = getattr(model, "num_train_timesteps", schedule.num_train_timesteps)
    if T_model != schedule.num_train_timesteps:
        raise ValueError(f"model has T={T_model} but the schedule has T={schedule.num_train_timesteps}")
    check_precision(config.mixed_precision, torch.device(device))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # None unless WORLD_SIZE > 1 (accelerate / torchrun / launch)
    acc = make_accelerator(torch.device(device).type, config.mixed_precision)
    world = 1 if acc is None else acc.num_processes
    if config.batch_size < config.grad_accum * world:
        raise ValueError(f"batch size {config.batch_size} cannot be cut into {config.grad_accum} micro-batch(es) for "
                         f"each of {world} process(es); use a batch size >= {config.grad_accum * world}")
    main = acc is None or acc.is_main_process
    with dir_lock(out_dir) if main else nullcontext(), DeferInterrupt() as intr:
        return _train_locked(model, loss_fn, data, schedule, config, out_dir, labels, resume, progress and main,
                             export_extra, torch.device(device) if acc is None else acc.device, export, intr, acc,
                             num_workers)


def _batch_indices(config: TrainConfig, n: int, step: int) -> tuple[torch.Generator, Tensor]:
    """Step ``step``'s generator and its sample indices (the generator goes on to draw ``t``, noise, drops, flips)."""
    g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    return g, torch.randint(0, n, (config.batch_size,), generator=g)


def _micro_slice(batch_size: int, j: int, accum: int, rank: int, world: int) -> slice:
    """Positions in the step's batch of micro-batch ``j`` of ``accum``, process ``rank``'s part of it."""
    part = shard(batch_size, j, accum)
    own = shard(part.stop - part.start, rank, world)
    return slice(part.start + own.start, part.start + own.stop)


class _StepSampler(torch.utils.data.Sampler):
    """``batch_sampler`` yielding, for steps ``start..steps-1`` and each micro-batch, this process's part of the
    step's seeded indices."""

    def __init__(self, config: TrainConfig, n: int, start: int, rank: int, world: int):
        self.config, self.n, self.start, self.rank, self.world = config, n, start, rank, world

    def __len__(self) -> int:
        return max(0, self.config.steps - self.start) * self.config.grad_accum

    def __iter__(self):
        B, accum = self.config.batch_size, self.config.grad_accum
        for step in range(self.start, self.config.steps):
            idx = _batch_indices(self.config, self.n, step)[1]
            for j in range(accum):
                yield idx[_micro_slice(B, j, accum, self.rank, self.world)].tolist()


def _train_locked(model: nn.Module, loss_fn: LossFn, data: Tensor, schedule: VPSchedule, config: TrainConfig,
                  out_dir: Path, labels: Tensor | None, resume: bool, progress: bool,
                  export_extra: dict[str, Any] | None, device: torch.device, export: Callable[..., Any] | None,
                  intr: DeferInterrupt, acc: Any = None, num_workers: int = 0) -> dict[str, Any]:
    world, rank = (1, 0) if acc is None else (acc.num_processes, acc.process_index)
    main = rank == 0
    state_path = out_dir / "train_state.safetensors"
    lazy = not isinstance(data, Tensor)
    if lazy:
        first = data[0]
        labelled = isinstance(first, (tuple, list))
        sample_shape = tuple((first[0] if labelled else first).shape)
        data_shape = [len(data), *sample_shape]
    else:
        sample_shape, data_shape = tuple(data.shape[1:]), list(data.shape)
    if config.hflip and len(sample_shape) != 3:
        raise ValueError(f"hflip (--hflip) flips images (C, H, W); the data has samples of shape {sample_shape}")
    model = model.to(device).train()
    raw = model  # the module itself (``model`` becomes its DistributedDataParallel wrapper when world > 1)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    sched = make_lr_scheduler(opt, config.lr_scheduler, config.lr_warmup_steps, config.lr_decay_steps or config.steps)
    prec = Precision(config.mixed_precision, device, acc)
    ema = {k: v.detach().clone() for k, v in raw.state_dict().items()} if config.ema_decay else None
    start, history, loss_avg = 0, [], None
    model_config = json.loads(json.dumps(getattr(model, "config", {})))
    if resume and state_path.exists():
        tensors, meta = load_tensors(state_path)
        saved_config = {k: v for k, v in (meta.get("model_config") or {}).items() if not str(k).startswith("_")}
        if meta.get("model_class") != type(model).__name__ or saved_config != model_config:
            raise CheckpointError(f"{state_path} was written for a different model ({meta.get('model_class')} "
                                  f"{meta.get('model_config')}); use another output folder or --no-resume")
        check_same_run(state_path, meta, config, data_shape)
        if not isinstance(meta.get("param_groups"), list) or not isinstance(meta.get("step"), int):
            raise CheckpointError(f"{state_path} is malformed (no 'param_groups' or 'step' in its metadata); "
                                  "delete it or use --no-resume")
        try:
            model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            if ema is not None:
                ema = {k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("ema.")} or ema
            load_optim(opt, tensors, meta["param_groups"])
            load_scheduler(sched, meta.get("lr_scheduler"), int(meta["step"]))
            prec.load_state(meta.get("grad_scaler"))
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{state_path} does not fit this model or optimiser "
                                  f"({(str(e).splitlines() or [type(e).__name__])[0]})") from None
        start, history, loss_avg = int(meta["step"]), list(meta.get("history", [])), meta.get("loss_avg")
        if loss_avg is None and history:  # a state written before loss_avg was recorded
            loss_avg = history[-1][1]

    if acc is not None:
        acc.wait_for_everyone()  # every process has read the state before the main one may replace it
        model, opt = acc.prepare(model, opt)

    def agree(flag: bool) -> bool:  # True on every process if it is True on any (all stop at the same step)
        if acc is None:
            return flag
        return bool(acc.reduce(torch.tensor([float(flag)], device=device), "sum").item() > 0)

    def save_state(step: int) -> None:
        if not main:
            acc.wait_for_everyone()
            return
        tensors = {f"model.{k}": v for k, v in raw.state_dict().items()}
        if ema is not None:
            tensors.update({f"ema.{k}": v for k, v in ema.items()})
        opt_tensors, groups = optim_tensors(opt)
        tensors.update(opt_tensors)
        save_tensors(state_path, tensors, {"step": step, "param_groups": groups, "history": history,
                                           "loss_avg": loss_avg, "model_class": type(raw).__name__,
                                           "model_config": model_config, "train_config": asdict(config),
                                           "data_shape": data_shape, "lr_scheduler": scheduler_state(sched),
                                           **({"grad_scaler": prec.state()} if prec.scaler is not None else {}),
                                           **({"num_processes": world} if acc else {})})
        if acc is not None:
            acc.wait_for_everyone()  # the others wait until the state is written

    batches = None
    if lazy:
        batches = iter(torch.utils.data.DataLoader(data, batch_sampler=_StepSampler(config, data_shape[0], start, rank,
                                                                                  world), num_workers=num_workers))
    else:
        data = data.to(device)
        labels = None if labels is None else labels.to(device)
    T, N, B, accum = schedule.num_train_timesteps, data_shape[0], config.batch_size, config.grad_accum
    conditional = labels is not None or (lazy and labelled)
    draw_t = getattr(loss_fn, "draw_t", None)  # a flow objective draws continuous σ (tagdiff.training.flow)
    weighted = world > 1 or accum > 1  # micro-batch losses weighted so that the summed gradient is the batch's
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, desc=f"train {type(model).__name__}", dynamic_ncols=True)
    t0, done, in_update = time.time(), start, False
    last_saved = start if state_path.exists() and resume else 0
    try:
        for step in range(start, config.steps):
            if agree(intr.pending):
                raise KeyboardInterrupt
            g, idx = _batch_indices(config, N, step)
            t = (torch.randint(0, T, (B,), generator=g) if draw_t is None else draw_t(B, T, g)).to(device)
            noise = torch.randn((B, *sample_shape), generator=g).to(device)
            drop = None
            if conditional and config.cond_drop > 0:
                drop = torch.rand(B, generator=g).to(device) < config.cond_drop
            flip = (torch.rand(B, generator=g) < 0.5).to(device) if config.hflip else None
            opt.zero_grad(set_to_none=True)
            lv = 0.0
            for j in range(accum):
                sl = _micro_slice(B, j, accum, rank, world)
                if batches is not None:
                    batch = next(batches)  # the rows of this micro-batch's indices (this process's part of them)
                    x0, c = (batch[0], batch[1].to(device)) if labelled else (batch, None)
                    x0 = x0.to(device).contiguous()  # (stacked strided items can come out channels-last)
                else:
                    part = idx[sl].to(device)
                    x0, c = data[part], None if labels is None else labels[part]
                if drop is not None:
                    c = torch.where(drop[sl], torch.full_like(c, -1), c)  # -1: "no condition" (null embedding)
                if flip is not None:
                    x0 = torch.where(flip[sl].view(-1, 1, 1, 1), x0.flip(-1), x0)
                sync = acc.no_sync(model) if acc is not None and j < accum - 1 else nullcontext()
                with sync:
                    with prec.autocast():
                        loss = loss_fn(model, x0, t[sl], noise[sl], schedule, c)
                    if weighted:
                        loss = loss * ((sl.stop - sl.start) * world / B)
                    prec.backward(loss)
                part_lv = loss.item() if acc is None else acc.reduce(loss.detach().float(), "sum").item() / world
                lv = part_lv if j == 0 else lv + part_lv
            if not math.isfinite(lv):
                raise FloatingPointError(f"training loss became {lv} at step {step}; lower the learning rate")
            prec.clip(opt, raw.parameters(), config.grad_clip)
            in_update = True  # from here to `done = step + 1` the state is between two steps
            prec.step(opt)
            sched.step()
            if ema is not None:
                ema_update(ema, raw, ema_decay_at(step + 1, config.ema_decay, config.ema_warmup,
                                                  config.ema_inv_gamma, config.ema_power))
            loss_avg = lv if loss_avg is None else 0.98 * loss_avg + 0.02 * lv
            if (step + 1) % max(1, config.steps // 100) == 0:
                history.append([step + 1, loss_avg])
            done, in_update = step + 1, False
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_avg:.4f}")
            if done % config.save_every == 0:
                save_state(done)
                last_saved = done
        if agree(intr.pending):
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        if in_update or done == last_saved:  # mid-update (a second Ctrl-C) or nothing new: keep the saved state
            raise TrainingInterrupted(last_saved, False, state_path) from None
        save_state(done)
        raise TrainingInterrupted(done, True, state_path) from None
    finally:
        if bar is not None:
            bar.close()
    save_state(config.steps)
    model = raw
    if ema is not None:
        model.load_state_dict(ema)
    extra = {"schedule": schedule.to_dict(), "train": asdict(config), **(export_extra or {})}
    try:
        if main:
            (export or save_model)(model.eval(), out_dir, **extra)
            (out_dir / "history.json").write_text(json.dumps(history))
        if acc is not None:
            acc.wait_for_everyone()
    except KeyboardInterrupt:  # a second Ctrl-C: the state is saved; rerunning the command redoes the export
        raise TrainingInterrupted(config.steps, True, state_path) from None
    if intr.pending:
        raise TrainingInterrupted(config.steps, True, state_path, finished=True)
    return {"steps": config.steps, "final_loss": loss_avg, "seconds": time.time() - t0, "history": history}
