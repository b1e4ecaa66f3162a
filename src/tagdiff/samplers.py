r"""DDPM and DDIM reverse steps over any strided grid of training timesteps, and one sampling loop.

Samplers know nothing of guidance: the loop calls the three hooks of every :class:`~tagdiff.guidance.Term`
(``pre``, ``delta_score``, ``post``) around a pure step function. Convention: VP space, integer training
timesteps, ``t_prev = -1`` after the last step (``alpha_bar = 1``).

Notation (variable -> paper symbol)::

    ab_t, ab_prev -> ᾱ_t, ᾱ_{t_prev}          alpha = ab_t / ab_prev -> α_t (of the strided step)
    eps_hat       -> ε_θ(x_t, t)               x0_hat -> x̂_0 (Tweedie)
    std           -> σ_t (the step's noise std, not the corruption σ nor sigma-space σ)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from ._utils import RandnLike, check_finite
from .guidance.base import EpsModel, StepContext, Term, guided_terms
from .schedules import VPSchedule

__all__ = ["StepInfo", "ddim_step", "ddpm_step", "sample", "sample_ddim", "sample_ddpm", "get_sampler", "SAMPLERS"]


def _clip(x0_hat: Tensor, clip_x0: float | None) -> Tensor:
    return x0_hat if clip_x0 is None else x0_hat.clamp(-clip_x0, clip_x0)


def ddpm_step(x: Tensor, eps_hat: Tensor, t: Tensor, t_prev: Tensor, schedule: VPSchedule,
              noise: Tensor | None = None, clip_x0: float | None = None) -> tuple[Tensor, Tensor]:
    r"""One ancestral DDPM step from ``t`` to ``t_prev`` (Ho et al. 2020, Eq. 6-7), for strided grids.

    With ``alpha = ab_t / ab_prev`` and ``beta = 1 - alpha``::

        mean = sqrt(ab_prev) * beta / (1 - ab_t) * x0_hat + sqrt(alpha) * (1 - ab_prev) / (1 - ab_t) * x_t
        var  = (1 - ab_prev) / (1 - ab_t) * beta          # "fixed_small", clamped at 1e-20
        x_prev = mean + sqrt(var) * noise                  # no noise when t_prev = -1

    Matches ``diffusers.DDPMScheduler.step`` (``variance_type="fixed_small"``) step for step.

    Args:
        x, eps_hat: shape ``(B, *D)``. t, t_prev: shape ``(B,)`` int64. noise: N(0, I) of x's shape.
        clip_x0: clamp x0_hat to ``[-clip_x0, clip_x0]`` (diffusers' ``clip_sample``); ``None`` disables.

    Returns:
        ``(x_prev, x0_hat)``.
    """
    ab_t = schedule.alpha_bar_at(t, x)
    ab_prev = schedule.alpha_bar_at(t_prev, x)
    alpha = ab_t / ab_prev
    beta = 1 - alpha
    x0_hat = _clip(schedule.x0_from_eps(x, t, eps_hat), clip_x0)
    mean = (ab_prev.sqrt() * beta / (1 - ab_t)) * x0_hat + (alpha.sqrt() * (1 - ab_prev) / (1 - ab_t)) * x
    if noise is not None:
        var = ((1 - ab_prev) / (1 - ab_t) * beta).clamp(min=1e-20)
        mean = mean + var.sqrt() * noise * (t_prev >= 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return mean, x0_hat


def ddim_step(x: Tensor, eps_hat: Tensor, t: Tensor, t_prev: Tensor, schedule: VPSchedule,
              noise: Tensor | None = None, clip_x0: float | None = None, eta: float = 0.0) -> tuple[Tensor, Tensor]:
    r"""One DDIM(η) step from ``t`` to ``t_prev`` (Song et al. 2021, Eq. 12 and 16).

    ::

        std    = eta * sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
        x_prev = sqrt(ab_prev) * x0_hat + sqrt(1 - ab_prev - std²) * eps_hat + std * noise

    ``eta = 0`` is deterministic (the PF-ODE discretisation); ``eta = 1`` has DDPM's variance. With
    ``clip_x0`` the ε used for the direction is re-derived from the clipped x0_hat, as guided-diffusion does
    (diffusers: ``use_clipped_model_output=True``).
    Matches ``diffusers.DDIMScheduler.step`` step for step when the grid's ``t_prev`` equals diffusers'
    ``t - T // N`` (the ``"leading"`` and ``"trailing"`` spacings with T divisible by N).

    Returns:
        ``(x_prev, x0_hat)``.

    Raises:
        ValueError: if ``eta`` is negative.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    ab_t = schedule.alpha_bar_at(t, x)
    ab_prev = schedule.alpha_bar_at(t_prev, x)
    x0_hat = schedule.x0_from_eps(x, t, eps_hat)
    if clip_x0 is not None:
        x0_hat = _clip(x0_hat, clip_x0)
        eps_hat = (x - ab_t.sqrt() * x0_hat) / (1 - ab_t).sqrt()
    std = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).sqrt()
    x_prev = ab_prev.sqrt() * x0_hat + (1 - ab_prev - std**2).clamp(min=0).sqrt() * eps_hat
    if eta > 0 and noise is not None:
        x_prev = x_prev + std * noise
    return x_prev, x0_hat


@dataclass(frozen=True)
class StepInfo:
    """Passed to sampling callbacks at the start of every step.

    Attributes:
        i: step index; num_steps: total steps.
        t, t_prev: training timesteps, shape ``(B,)``; ``t_prev = -1`` at the last step.
        x: the state x_t entering the step (before any ``pre`` hook), shape ``(B, *D)``.
    """

    i: int
    num_steps: int
    t: Tensor
    t_prev: Tensor
    x: Tensor


StepFn = Callable[..., tuple[Tensor, Tensor]]
Callback = Callable[[StepInfo], None]
Retime = Callable[[Tensor, Tensor, Tensor, VPSchedule], Tensor]


def _check_grid(timesteps: Tensor, schedule: VPSchedule) -> list[int]:
    ts = schedule.check_timesteps(torch.as_tensor(timesteps).reshape(-1))
    if ts.numel() == 0:
        raise ValueError("timesteps is empty; expected at least one training timestep")
    if ts.numel() > 1 and not (ts[1:] < ts[:-1]).all():
        raise ValueError(f"timesteps must be strictly decreasing, got {ts.tolist()[:10]}...")
    return ts.tolist()


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
        if not isinstance(term, Term):
            raise TypeError(f"terms must be tagdiff Term objects, got {type(term).__name__}")
        term.check(x, schedule)


def _checked_retime(t_used: Tensor, t_prev: Tensor, schedule: VPSchedule) -> Tensor:
    t_used = torch.as_tensor(t_used, device=t_prev.device).long().reshape(-1)
    if t_used.shape != t_prev.shape:
        raise ValueError(f"retime must return one timestep per sample, shape {tuple(t_prev.shape)}; "
                         f"got {tuple(t_used.shape)}")
    if (t_used <= t_prev).any() or (t_used >= schedule.num_train_timesteps).any():
        raise ValueError(f"retime returned timesteps {t_used.unique().tolist()[:8]}; expected t_prev < t < "
                         f"{schedule.num_train_timesteps}")
    return t_used


def sample(step_fn: StepFn, eps_model: EpsModel, x: Tensor, timesteps: Tensor, schedule: VPSchedule, *,
           terms: Sequence[Term] = (), cond: Mapping[str, Any] | None = None,
           randn_like: RandnLike = torch.randn_like, needs_noise: bool = True,
           callback: Callback | Sequence[Callback] | None = None, clip_x0: float | None = None,
           num_recur: int = 1, retime: Retime | None = None, progress: bool = False) -> Tensor:
    """Run the reverse process from ``x`` (at ``timesteps[0]``) to clean data with a given step function.

    Args:
        step_fn: :func:`ddpm_step`, ``partial(ddim_step, eta=...)`` or any function of the same signature.
        eps_model: ``(x, t, **cond) -> eps_hat``; ``t`` is a ``(B,)`` int64 tensor of training timesteps.
        x: initial state, usually x_T ~ N(0, I), shape ``(B, *D)``.
        timesteps: strictly decreasing training timesteps, shape ``(N,)``; see ``VPSchedule.timesteps``.
        schedule: the VP schedule the model was trained with.
        terms: perturbations, guidance terms and correctors (see :mod:`tagdiff.guidance`), applied in order.
        cond: keyword conditioning for the model.
        randn_like: noise source; pass ``StackedRandomGenerator(seeds).randn_like`` for per-sample seeds.
        needs_noise: whether ``step_fn`` consumes noise (False for deterministic DDIM).
        callback: called with a :class:`StepInfo` at the start of every step (e.g. ``TimeGapRecorder``).
        clip_x0: clamp x0_hat inside the step (images: 1.0); ``None`` disables.
        num_recur: recurrence ("self-recurrence", Bansal et al. 2023; TFG's N_recur): repeat each step this
            many times, re-noising the result back to ``t`` in between with
            ``x_t = sqrt(ab_t / ab_prev) x_prev + sqrt(1 - ab_t / ab_prev) z``. 1 = the plain sampler.
        retime: optional ``(x, t, t_prev, schedule) -> t_used`` (shape ``(B,)``, ``t_prev < t_used < T``) that
            replaces the grid's ``t`` for the model call and the step, per sample (the Time-Shift sampler).
        progress: show a tqdm progress bar.

    Returns:
        x_0, same shape/dtype/device as ``x`` (detached).

    Raises:
        ValueError: bad grid, wrong x shape, or a term whose requirements do not match (e.g. predictor T).
        NonFiniteError: if the state or any guidance/TLS gradient becomes NaN/Inf.
    """
    ts = _check_grid(timesteps, schedule)
    _check_x(x, eps_model, terms, schedule)
    if not isinstance(num_recur, int) or num_recur < 1:
        raise ValueError(f"num_recur must be an integer >= 1, got {num_recur!r}")
    callbacks = [] if callback is None else [callback] if callable(callback) else list(callback)
    cond = dict(cond or {})
    B, N = x.shape[0], len(ts)
    grid = torch.tensor(ts, dtype=torch.long)
    x = x.detach()
    it = range(N)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="sampling", leave=False)
    for i in it:
        t = torch.full((B,), ts[i], dtype=torch.long, device=x.device)
        t_prev = torch.full((B,), ts[i + 1] if i + 1 < N else -1, dtype=torch.long, device=x.device)
        for cb in callbacks:
            cb(StepInfo(i, N, t, t_prev, x))
        if retime is not None:
            t = _checked_retime(retime(x, t, t_prev, schedule), t_prev, schedule)
        ctx = StepContext(schedule, eps_model, cond, randn_like, t, t_prev, i, N, grid)
        for r in range(num_recur):
            if r > 0:
                alpha = schedule.alpha_bar_at(t, x) / schedule.alpha_bar_at(t_prev, x)
                x = alpha.sqrt() * x + (1 - alpha).sqrt() * randn_like(x)
            for term in terms:
                x = term.pre(x, t, ctx)
            eps_hat, _, shift = guided_terms(x, t, ctx, terms)
            noise = randn_like(x) if needs_noise and t_prev[0] >= 0 else None
            x, _ = step_fn(x, eps_hat, t, t_prev, schedule, noise=noise, clip_x0=clip_x0)
            if shift is not None:
                x = x + shift
            for term in terms:
                x = term.post(x, t_prev, ctx)
            x = check_finite(x.detach(), f"sample after step {i} (t={ts[i]})")
    return x


def sample_ddpm(eps_model: EpsModel, x: Tensor, timesteps: Tensor, schedule: VPSchedule, **kwargs: Any) -> Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020) over ``timesteps``; keyword arguments as in :func:`sample`."""
    return sample(ddpm_step, eps_model, x, timesteps, schedule, needs_noise=True, **kwargs)


def sample_ddim(eps_model: EpsModel, x: Tensor, timesteps: Tensor, schedule: VPSchedule, *, eta: float = 0.0,
                **kwargs: Any) -> Tensor:
    """DDIM(η) sampling (Song et al. 2021) over ``timesteps``; keyword arguments as in :func:`sample`."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    return sample(partial(ddim_step, eta=eta), eps_model, x, timesteps, schedule, needs_noise=eta > 0, **kwargs)


SAMPLERS: dict[str, Callable[..., Tensor]] = {"ddpm": sample_ddpm, "ddim": sample_ddim}


def get_sampler(name: str) -> Callable[..., Tensor]:
    """Look up a sampler by name (``"ddpm"`` or ``"ddim"``).

    Raises:
        ValueError: for an unknown name.
    """
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}") from None
