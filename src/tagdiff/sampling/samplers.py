r"""DDPM and DDIM reverse steps over any strided grid of training timesteps, and their driver for the loop.

Samplers know nothing of guidance: :func:`tagdiff.loop.run_loop` applies the terms of :mod:`tagdiff.terms` around
the update that :class:`GridDriver` provides with tagdiff's own :func:`ddpm_step` / :func:`ddim_step`
(:func:`sample`); :func:`tagdiff.scheduler_loop.sample_scheduler` does the same with a diffusers scheduler.
Convention: VP space, integer training timesteps, ``t_prev = -1`` after the last step (``alpha_bar = 1``).

Notation (variable -> paper symbol)::

    ab_t, ab_prev -> ᾱ_t, ᾱ_{t_prev}          alpha = ab_t / ab_prev -> α_t (of the strided step)
    eps_hat       -> ε_θ(x_t, t)               x0_hat -> x̂_0 (Tweedie)
    std           -> σ_t (the step's noise std, not the corruption σ nor sigma-space σ)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor

from .._utils import RandnLike, append_dims
from .loop import Callback, Stage, StepInfo, full_timesteps, run_loop
from .schedules import VPSchedule
from .terms import EpsModel, Prediction, Term

__all__ = ["Stage", "StepInfo", "ddim_step", "ddpm_step", "run_loop", "sample", "sample_ddim", "sample_ddpm",
           "get_sampler", "SAMPLERS"]


def _clip(x0_hat: Tensor, clip_x0: float | None) -> Tensor:
    return x0_hat if clip_x0 is None else x0_hat.clamp(-clip_x0, clip_x0)


def ddpm_step(x: Tensor, eps_hat: Tensor, t: Tensor, t_prev: Tensor, schedule: VPSchedule,
              noise: Tensor | None = None, clip_x0: float | None = None,
              x0_hat: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""One ancestral DDPM step from ``t`` to ``t_prev`` (Ho et al. 2020, Eq. 6-7), for strided grids.

    With ``alpha = ab_t / ab_prev`` and ``beta = 1 - alpha``::

        mean = sqrt(ab_prev) * beta / (1 - ab_t) * x0_hat + sqrt(alpha) * (1 - ab_prev) / (1 - ab_t) * x_t
        var  = (1 - ab_prev) / (1 - ab_t) * beta          # "fixed_small", clamped at 1e-20
        x_prev = mean + sqrt(var) * noise                  # no noise when t_prev = -1

    Matches ``diffusers.DDPMScheduler.step`` (``variance_type="fixed_small"``) step for step.

    Args:
        x, eps_hat: shape ``(B, *D)``. t, t_prev: shape ``(B,)`` int64. noise: N(0, I) of x's shape.
        clip_x0: clamp x0_hat to ``[-clip_x0, clip_x0]`` (diffusers' ``clip_sample``); ``None`` disables.
        x0_hat: the model's x̂_0 where ε̂ cannot give it: at ᾱ_t = 0 (zero terminal SNR, a v-model's first step)
            x̂_0 = (x - √(1-ᾱ) ε̂) / √ᾱ divides by zero; the loops pass the v-model's x̂_0 = -v there.

    Returns:
        ``(x_prev, x0_hat)``.
    """
    ab_t = schedule.alpha_bar_at(t, x)
    ab_prev = schedule.alpha_bar_at(t_prev, x)
    alpha = ab_t / ab_prev
    beta = 1 - alpha
    x0_hat = _clip(schedule.x0_from_eps(x, t, eps_hat) if x0_hat is None else x0_hat, clip_x0)
    mean = (ab_prev.sqrt() * beta / (1 - ab_t)) * x0_hat + (alpha.sqrt() * (1 - ab_prev) / (1 - ab_t)) * x
    if noise is not None:
        var = ((1 - ab_prev) / (1 - ab_t) * beta).clamp(min=1e-20)
        mean = mean + var.sqrt() * noise * (t_prev >= 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return mean, x0_hat


def ddim_step(x: Tensor, eps_hat: Tensor, t: Tensor, t_prev: Tensor, schedule: VPSchedule,
              noise: Tensor | None = None, clip_x0: float | None = None, eta: float = 0.0,
              final_alpha_bar: float = 1.0, use_clipped_model_output: bool = True,
              x0_hat: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""One DDIM(η) step from ``t`` to ``t_prev`` (Song et al. 2021, Eq. 12 and 16).

    ::

        std    = eta * sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
        x_prev = sqrt(ab_prev) * x0_hat + sqrt(1 - ab_prev - std²) * eps_hat + std * noise

    ``eta = 0`` is deterministic (the PF-ODE discretisation); ``eta = 1`` has DDPM's variance. With
    ``clip_x0`` the ε used for the direction is re-derived from the clipped x0_hat, as guided-diffusion does
    (diffusers: ``use_clipped_model_output=True``); ``use_clipped_model_output=False`` keeps the model's ε
    (diffusers' default for ``clip_sample=True``). ``final_alpha_bar`` is ᾱ of the state after the last step
    (``t_prev = -1``): 1 (clean data; diffusers ``set_alpha_to_one=True``) or ``alpha_bar[0]``
    (``set_alpha_to_one=False``). With 1 the last step's ``std`` is 0 and it lands on x0_hat; with ``alpha_bar[0]``
    and ``eta > 0`` the last step has ``std > 0`` and adds ``std * noise`` like any other step, as diffusers does
    (:func:`sample` draws that noise for ``partial(ddim_step, eta > 0, final_alpha_bar < 1)``, see
    :func:`sample_ddim`). ``noise=None`` always skips the ``std * noise`` term (the direction still uses
    ``sqrt(1 - ab_prev - std²)``).

    Given the same x, ε̂ and noise, the result equals ``diffusers.DDIMScheduler.step(..., eta, variance_noise=noise,
    use_clipped_model_output)`` at every step, the last one included for either ``set_alpha_to_one`` (float64:
    to ~1e-12), when the grid's ``t_prev`` equals diffusers' ``t - T // N`` (the ``"leading"`` and ``"trailing"``
    spacings with T divisible by N). Diffusers' ``"linspace"`` DDIM steps to ``t - T // N`` even where the grid's
    next point is elsewhere: that (inconsistent) rule is not expressible here; run ``DDIMScheduler`` itself through
    :func:`tagdiff.scheduler_loop.sample_scheduler`.

    Returns:
        ``(x_prev, x0_hat)``.

    Raises:
        ValueError: if ``eta`` is negative or ``final_alpha_bar`` is outside (0, 1].
    """
    if not eta >= 0:
        raise ValueError(f"eta must be a number >= 0, got {eta}")
    if not 0 < final_alpha_bar <= 1:
        raise ValueError(f"final_alpha_bar must be in (0, 1], got {final_alpha_bar}")
    ab_t = schedule.alpha_bar_at(t, x)
    ab_prev = schedule.alpha_bar_at(t_prev, x)
    if final_alpha_bar != 1.0:
        ab_prev = torch.where(append_dims(t_prev < 0, x.ndim).to(x.device), torch.full_like(ab_prev, final_alpha_bar),
                              ab_prev)
    x0_hat = schedule.x0_from_eps(x, t, eps_hat) if x0_hat is None else x0_hat
    if clip_x0 is not None:
        x0_hat = _clip(x0_hat, clip_x0)
        if use_clipped_model_output:
            eps_hat = (x - ab_t.sqrt() * x0_hat) / (1 - ab_t).sqrt()
    std = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).sqrt()
    x_prev = ab_prev.sqrt() * x0_hat + (1 - ab_prev - std**2).clamp(min=0).sqrt() * eps_hat
    if eta > 0 and noise is not None:
        x_prev = x_prev + std * noise
    return x_prev, x0_hat


StepFn = Callable[..., tuple[Tensor, Tensor]]


def _check_grid(timesteps: Tensor, schedule: VPSchedule) -> list[int]:
    ts = schedule.check_timesteps(torch.as_tensor(timesteps).reshape(-1))
    if ts.numel() == 0:
        raise ValueError("timesteps is empty; expected at least one training timestep")
    if ts.numel() > 1 and not (ts[1:] < ts[:-1]).all():
        raise ValueError(f"timesteps must be strictly decreasing, got {ts.tolist()[:10]}...")
    return ts.tolist()


def _adds_final_noise(step_fn: StepFn) -> bool:
    """Whether ``step_fn`` adds noise on the last step (``t_prev = -1``): only DDIM(η > 0) ending at
    ``final_alpha_bar < 1`` (diffusers' ``set_alpha_to_one=False``) does; with ᾱ = 1 its std there is 0 and DDPM's
    last step is noiseless, so no noise is drawn for it (the generator is left where it was)."""
    if isinstance(step_fn, partial) and step_fn.func is ddim_step and not step_fn.args:
        kw = step_fn.keywords
        return kw.get("eta", 0.0) > 0 and kw.get("final_alpha_bar", 1.0) != 1.0
    return False


class GridDriver:
    """tagdiff's own update: ``step_fn`` (:func:`ddpm_step`, ``partial(ddim_step, eta=...)``) over a decreasing
    grid of integer training timesteps, in VP space; stateless (each step depends only on its inputs). Noise is
    drawn (``needs_noise``) for every step but the last, and for the last one too where ``step_fn`` adds noise
    there (DDIM(η > 0) with ``final_alpha_bar < 1``, see :func:`ddim_step`)."""

    stateful = False

    def __init__(self, step_fn: StepFn, timesteps: Tensor, schedule: VPSchedule, randn_like: RandnLike,
                 needs_noise: bool, clip_x0: float | None):
        self.step_fn, self.schedule, self.randn_like = step_fn, schedule, randn_like
        self.needs_noise, self.clip_x0 = needs_noise, clip_x0
        self.final_noise = needs_noise and _adds_final_noise(step_fn)
        self.ts = _check_grid(timesteps, schedule)

    def plan(self) -> list[Stage]:
        N = len(self.ts)
        return [Stage(i, t, self.ts[i + 1] if i + 1 < N else -1, t) for i, t in enumerate(self.ts)]

    def model_input(self, x: Tensor, stage: Stage, k: int) -> Tensor:
        return x

    def vp_scale(self, k: int, after: bool) -> float:
        return 1.0

    def update(self, x: Tensor, pred: Prediction, stage: Stage, k: int, t: Tensor | None = None,
               t_prev: Tensor | None = None) -> Tensor:
        """``step_fn`` from ``t`` to ``t_prev`` (the stage's, or a step term's retimed ones) with the guided ε̂."""
        t = full_timesteps(stage.t, x) if t is None else t
        t_prev = full_timesteps(stage.t_prev, x) if t_prev is None else t_prev
        final = stage.t_prev < 0
        noise = self.randn_like(x) if self.needs_noise and (self.final_noise or not final) else None
        # at zero terminal SNR (ᾱ_t = 0) ε̂ cannot give x̂_0; the prediction's own x̂_0 (a v-model's -v) is used there
        x0 = pred.x0_hat if self.schedule.alpha_bar_host(stage.t) == 0.0 else None
        return self.step_fn(x, pred.eps_hat, t, t_prev, self.schedule, noise=noise, clip_x0=self.clip_x0,
                            **({} if x0 is None else {"x0_hat": x0}))[0]


def sample(step_fn: StepFn, eps_model: EpsModel, x: Tensor, timesteps: Tensor, schedule: VPSchedule, *,
           terms: Sequence[Term] = (), cond: Mapping[str, Any] | None = None,
           randn_like: RandnLike = torch.randn_like, needs_noise: bool = True,
           callback: Callback | Sequence[Callback] | None = None, clip_x0: float | None = None,
           progress: bool = False) -> Tensor:
    """Run the reverse process from ``x`` (at ``timesteps[0]``) to clean data with a given step function.

    Args:
        step_fn: :func:`ddpm_step`, ``partial(ddim_step, eta=...)`` or any function of the same signature.
        eps_model: ``(x, t, **cond) -> output``; ``t`` is a ``(B,)`` int64 tensor of training timesteps. The output
            is ε unless the model has a ``prediction_type`` attribute (``"v_prediction"``, ``"sample"``).
        x: initial state, usually x_T ~ N(0, I), shape ``(B, *D)``.
        timesteps: strictly decreasing training timesteps, shape ``(N,)``; see ``VPSchedule.timesteps``.
        schedule: the VP schedule the model was trained with.
        terms: score terms, correctors and at most one step term (see :mod:`tagdiff.terms`); correctors run in
            list order. TFG's recurrence and the Time-Shift retiming live in those step terms.
        cond: keyword conditioning for the model.
        randn_like: noise source; pass ``StackedRandomGenerator(seeds).randn_like`` for per-sample seeds.
        needs_noise: whether ``step_fn`` consumes noise (False for deterministic DDIM). Noise is drawn before every
            step but the last; before the last one too for ``partial(ddim_step, eta > 0, final_alpha_bar < 1)``,
            whose last step is stochastic (as diffusers' ``DDIMScheduler(set_alpha_to_one=False)``).
        callback: called with a :class:`StepInfo` once per step (e.g. ``TimeGapRecorder``).
        clip_x0: clamp x0_hat inside the step (images: 1.0); ``None`` disables. Terms read it as ``ctx.clip_x0``
            (:class:`~tagdiff.guidance.TFGGuidance` clamps its loss's x̂_0 the same way by default).
        progress: show a tqdm progress bar.

    Returns:
        x_0, same shape/dtype/device as ``x`` (detached).

    Raises:
        ValueError: bad grid, wrong x shape, a term whose requirements do not match (e.g. predictor schedule), an
            ε-model on a zero-terminal-SNR step. TypeError: an object in ``terms`` that is not a tagdiff term.
        NonFiniteError: if the state or any guidance/TLS gradient becomes NaN/Inf.
    """
    driver = GridDriver(step_fn, timesteps, schedule, randn_like, needs_noise, clip_x0)
    return run_loop(driver, eps_model, x, terms=terms, cond=cond, randn_like=randn_like, callback=callback,
                    progress=progress)


def sample_ddpm(eps_model: EpsModel, x: Tensor, timesteps: Tensor, schedule: VPSchedule, **kwargs: Any) -> Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020) over ``timesteps``; keyword arguments as in :func:`sample`."""
    return sample(ddpm_step, eps_model, x, timesteps, schedule, needs_noise=True, **kwargs)


def sample_ddim(eps_model: EpsModel, x: Tensor, timesteps: Tensor, schedule: VPSchedule, *, eta: float = 0.0,
                final_alpha_bar: float = 1.0, use_clipped_model_output: bool = True, **kwargs: Any) -> Tensor:
    """DDIM(η) sampling (Song et al. 2021) over ``timesteps``; keyword arguments as in :func:`sample` and
    :func:`ddim_step` (``final_alpha_bar``, ``use_clipped_model_output``).

    With ``final_alpha_bar=schedule.alpha_bar[0]`` and ``eta > 0`` the last step adds noise (one more draw of
    ``randn_like``), so that the chain equals ``DDIMScheduler(set_alpha_to_one=False).step(eta=eta)`` drawing from
    the same generator; with the default ``final_alpha_bar=1`` the last step is noiseless and draws nothing."""
    if not eta >= 0:
        raise ValueError(f"eta must be a number >= 0, got {eta}")
    step = partial(ddim_step, eta=eta, final_alpha_bar=final_alpha_bar,
                   use_clipped_model_output=use_clipped_model_output)
    return sample(step, eps_model, x, timesteps, schedule, needs_noise=eta > 0, **kwargs)


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
