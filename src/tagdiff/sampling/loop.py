r"""The one sampling loop: :func:`run_loop` drives any update rule (a *driver*) with tagdiff's terms.

Drivers: :class:`tagdiff.samplers.GridDriver` (tagdiff's own DDPM/DDIM steps over an integer grid) and
:class:`tagdiff.scheduler_loop.SchedulerDriver` (any diffusers scheduler). The loop applies the terms of
:mod:`tagdiff.terms` (correctors before and after the step, score terms folded into ε̂, at most one step term) and
knows nothing of guidance. On accelerators it reads nothing back from the device until the end of the run
(finiteness checks are deferred, :func:`tagdiff._utils.deferred_finite_checks`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol

import torch
from torch import Tensor

from .._utils import RandnLike, check_finite, deferred_finite_checks
from .predictions import check_grid_prediction, model_prediction_type
from .schedules import VPSchedule
from .terms import EpsModel, Prediction, StepContext, Term, guided_prediction, split_terms

__all__ = ["Callback", "Driver", "Stage", "StepInfo", "full_timesteps", "run_loop"]


@dataclass(frozen=True)
class StepInfo:
    """Passed to sampling callbacks once per reverse step (after the step's ``pre`` correctors ran).

    Attributes:
        i: step index; num_steps: total steps.
        t, t_prev: training timesteps, shape ``(B,)``; ``t_prev = -1`` at the last step.
        x: the state x_t entering the step (VP space, before any ``pre`` corrector), shape ``(B, *D)``.
        shared: the step's scratch dict (see :mod:`tagdiff.terms`):
            ``"time_logits"`` = ``(x, t, c, logits, time_predictor)`` when a TAG corrector already evaluated
            that time predictor at this ``x``; ``"tls_norm"`` = list of per-sample ``‖ω_t TLS‖`` of the TAG
            corrections of this step (filled in as the step runs).
        timestep: ``t`` as a python int (read without touching the device).
    """

    i: int
    num_steps: int
    t: Tensor
    t_prev: Tensor
    x: Tensor
    shared: dict[str, Any] = field(default_factory=dict)
    timestep: int | None = None


Callback = Callable[[StepInfo], None]


@dataclass(frozen=True)
class Stage:
    """One model call of a driver's plan (see :class:`Driver`).

    Attributes:
        i: index of the reverse step it belongs to; t, t_prev: its integer training timesteps (python ints;
            ``t_prev = -1`` after the last step). model_t: what the model is called with (int or float).
        alpha_bar: ᾱ of the state the model sees, or ``None`` for ``schedule.alpha_bar[t]`` (exact on integer
            grids). first / last: whether the stage opens / closes its reverse step (a second-order scheduler
            makes two stages per step; correctors run at step boundaries only).
    """

    i: int
    t: int
    t_prev: int
    model_t: Any
    alpha_bar: float | None = None
    first: bool = True
    last: bool = True


class Driver(Protocol):
    """What :func:`run_loop` needs from an update rule. Implementations: :class:`GridDriver` (tagdiff's steps)
    and :class:`tagdiff.scheduler_loop.SchedulerDriver` (diffusers schedulers).

    The driver's state ``x`` may live in its own space (σ-space: x_σ = x_VP · sqrt(1 + σ²); a flow path:
    x_σ = x_VP · sqrt((1 - σ)² + σ²)); every term sees VP x. A driver may set ``model_t_dtype`` (the dtype of the
    float model timesteps, default torch's float32; the flow driver keeps float64 in float64 runs).
    """

    schedule: VPSchedule
    stateful: bool

    def plan(self) -> list[Stage]: ...

    def model_input(self, x: Tensor, stage: Stage, k: int) -> Tensor:
        """VP-space x of stage ``k`` (the model's input), from the driver's state."""

    def vp_scale(self, k: int, after: bool) -> float:
        """x_driver / x_VP at stage ``k`` (``after``: once its update ran), 1.0 in VP space."""

    def update(self, x: Tensor, pred: Prediction, stage: Stage, k: int, t: Tensor | None = None,
               t_prev: Tensor | None = None) -> Tensor:
        """The step from the driver's state ``x`` with the (guided) prediction; returns the driver's state.
        ``t`` / ``t_prev``: a step term's retimed timesteps (Time-Shift), shape ``(B,)``; default the stage's. A
        diffusers scheduler cannot be retimed and steps at its own timestep."""


def _check_x(x: Tensor, eps_model: Any, terms: Sequence[Term], schedule: VPSchedule) -> None:
    if not isinstance(x, Tensor) or x.ndim < 2:
        raise ValueError(f"x must be a tensor of shape (B, *D) with a batch dimension, got {getattr(x, 'shape', x)!r}")
    expected = getattr(eps_model, "sample_shape", None)
    if expected is not None and tuple(x.shape[1:]) != tuple(expected):
        raise ValueError(f"x has shape {tuple(x.shape)}, but the model expects (B, {', '.join(map(str, expected))})")
    model_T = getattr(eps_model, "num_train_timesteps", None)
    if model_T is not None and model_T != schedule.num_train_timesteps:
        raise ValueError(f"the model was trained with T={model_T} timesteps but the schedule has "
                         f"T={schedule.num_train_timesteps}")
    for term in terms:
        term.check(x, schedule)


def _moved(x: Tensor, x_vp: Tensor, x_vp_before: Tensor, scale: float) -> Tensor:
    """The driver's state after a VP-space correction ``x_vp_before -> x_vp``: Δx_σ = sqrt(1 + σ²) Δx_VP."""
    return x_vp if scale == 1.0 else x + scale * (x_vp - x_vp_before)


def full_timesteps(t: int, x: Tensor) -> Tensor:
    """``t`` repeated for every sample of ``x``: shape ``(B,)`` int64 on x's device."""
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


def run_loop(driver: Driver, eps_model: EpsModel, x: Tensor, *, terms: Sequence[Term] = (),
             cond: Mapping[str, Any] | None = None, randn_like: RandnLike = torch.randn_like,
             callback: Callback | Sequence[Callback] | None = None, progress: bool = False) -> Tensor:
    """The sampling loop shared by every driver: correctors, score terms, one step term, callbacks.

    Per reverse step ``i`` (one or more driver stages)::

        x_vp <- c.pre(x_vp, t)  for every corrector          # at the step's first stage
        callbacks(StepInfo(i, ..., x entering))
        pred  = guided_prediction(x_vp, t)                   # every stage: model + score terms
        x     = driver.update(x, pred)                       # or step_term.step(...) in VP space
        x_vp <- c.post(x_vp, t_prev) for every corrector     # at the step's last stage

    Returns the final state x_0 in VP space (detached). Raises as :func:`sample`.
    """
    scores, correctors, step_term = split_terms(terms)
    _check_x(x, eps_model, terms, driver.schedule)
    plan = driver.plan()
    if step_term is not None and not all(s.first and s.last for s in plan):
        raise ValueError(f"step terms (TFG, DPSNormalized, TimeShift) need one model call per step; "
                         f"{getattr(driver, 'name', type(driver).__name__)} makes two")
    kind = model_prediction_type(eps_model)
    check_grid_prediction([driver.schedule.alpha_bar_host(s.t) if s.alpha_bar is None else s.alpha_bar
                           for s in plan], kind, bool(scores) or step_term is not None)
    callbacks = [] if callback is None else [callback] if callable(callback) else list(callback)
    cond = dict(cond or {})
    grid = torch.tensor([s.t for s in plan if s.first], dtype=torch.long)
    N = int(grid.numel())
    x = x.detach()
    stages = enumerate(plan)
    if progress:
        from tqdm.auto import tqdm

        stages = tqdm(stages, total=len(plan), desc="sampling", leave=False)
    with deferred_finite_checks(enabled=x.device.type != "cpu"):  # on accelerators: one host read per run
        x = _run_stages(driver, eps_model, x, stages, scores, correctors, step_term, callbacks, cond, randn_like,
                        grid, N)
    scale = driver.vp_scale(len(plan) - 1, after=True)
    return x / scale if scale != 1.0 else x


def _run_stages(driver: Driver, eps_model: EpsModel, x: Tensor, stages: Any, scores: list, correctors: list,
                step_term: Any, callbacks: list, cond: dict, randn_like: RandnLike, grid: Tensor, N: int) -> Tensor:
    """One pass over the driver's plan. Per step: ``pre`` correctors (TAG Alg. 1), the guided prediction (ε̂ with
    every score term folded in), the driver's update (or the step term's), ``post`` correctors (TAG Alg. 2)."""
    ctx: StepContext | None = None
    for k, stage in stages:
        t, t_prev = full_timesteps(stage.t, x), full_timesteps(stage.t_prev, x)
        ctx = _context(driver, stage, t, t_prev, eps_model, cond, randn_like, grid, N,
                       shared={} if stage.first else ctx.shared)
        x_vp = driver.model_input(x, stage, k)
        if stage.first:                                        # correctors before the step (TAG Alg. 1)
            x_in = x_vp
            for c in correctors:
                x_vp = c.pre(x_vp, t, ctx)
            for cb in callbacks:
                cb(StepInfo(stage.i, N, t, t_prev, x_in, ctx.shared, stage.t))
            if x_vp is not x_in:
                x = _moved(x, x_vp, x_in, driver.vp_scale(k, after=False))
        evaluate = partial(_evaluate, ctx=ctx, scores=scores)
        if step_term is None:                                  # ε̂ + Σ Δs, then the sampler's step
            x = driver.update(x, evaluate(x_vp, t), stage, k)
        else:                                                  # TFG / DPSNormalized / Time-Shift own the step
            update = partial(_vp_update, driver=driver, stage=stage, k=k, ctx=ctx)
            x = step_term.step(x_vp, t, t_prev, ctx, evaluate, update) * driver.vp_scale(k, after=True)
        if stage.last and correctors:                          # correctors after the step (TAG Alg. 2)
            scale = driver.vp_scale(k, after=True)
            x_vp = x / scale if scale != 1.0 else x
            x_in = x_vp
            for c in correctors:
                x_vp = c.post(x_vp, t_prev, ctx)
            if x_vp is not x_in:
                x = _moved(x, x_vp, x_in, scale)
        x = check_finite(x.detach(), f"sample after step {stage.i} (t={stage.t})")
    return x


def _context(driver: Driver, stage: Stage, t: Tensor, t_prev: Tensor, eps_model: EpsModel, cond: dict,
             randn_like: RandnLike, grid: Tensor, N: int, shared: dict[str, Any]) -> StepContext:
    """The :class:`StepContext` of one stage."""
    same_t = isinstance(stage.model_t, int) and stage.model_t == stage.t
    return StepContext(
        schedule=driver.schedule, eps_model=eps_model, cond=cond, randn_like=randn_like, t=t, t_prev=t_prev,
        i=stage.i, num_steps=N, timesteps=grid,
        model_t=t if same_t else torch.full((t.shape[0],), float(stage.model_t), device=t.device,
                                            dtype=getattr(driver, "model_t_dtype", None)),
        alpha_bar=None if stage.alpha_bar is None else torch.tensor(stage.alpha_bar, dtype=torch.float64),
        stateful_update=driver.stateful, shared=shared, final=stage.t_prev < 0,
        clip_x0=getattr(driver, "clip_x0", None))


def _evaluate(z: Tensor, t_eval: Tensor, keep_graph: bool = False, *, ctx: StepContext, scores: list) -> Prediction:
    """The guided prediction at ``z``; a retimed step (Time-Shift) gives the model and the terms ``t_eval``."""
    if t_eval is not ctx.t:
        ctx = replace(ctx, t=t_eval, model_t=t_eval, alpha_bar=None)
    return guided_prediction(z, t_eval, ctx, scores, keep_graph=keep_graph)


def _vp_update(z: Tensor, eps_hat: Tensor, t: Tensor, t_prev: Tensor, *, driver: Driver, stage: Stage, k: int,
               ctx: StepContext) -> Tensor:
    """A step term's update: VP state and ε̂ in, VP state out, through the driver's one ``update``."""
    ab = ctx.ab_t(z)
    x0_hat = (z - (1 - ab).sqrt() * eps_hat) / ab.sqrt()
    x = z * driver.vp_scale(k, after=False)
    x_prev = driver.update(x, Prediction(eps_hat, x0_hat, eps_hat, guided=True), stage, k, t=t, t_prev=t_prev)
    return x_prev / driver.vp_scale(k, after=True)
