r"""TFG (Ye et al., NeurIPS 2024, "TFG: Unified Training-Free Guidance") and the TFG benchmark's normalised DPS.

Both are step terms (:class:`~tagdiff.terms.StepTerm`): they displace x_prev after the sampler's own step, by an
amount computed at x_t through the model, as the TFG code (``YWolfeee/Training-Free-Guidance``, ``methods/tfg.py``
and ``methods/dps.py``) does; TFG also owns its recurrence. docs/notation.md §4.2–4.4.

DPS therefore appears three times in tagdiff:

* :class:`TFGGuidance` with ρ only (``dps_as_tfg``; TFG's unified view, TAG's Table 14 "DPS ρ̄" column);
* :class:`DPSNormalized`: the TFG benchmark's ``methods/dps.py``, a gradient step divided by ``|log p|``;
* :class:`~tagdiff.guidance.DPSGuidance`: the score-space form of the TAG paper (Eq. 9).

Notation (variable -> paper symbol)::

    ab_t, ab_prev -> ᾱ_t, ᾱ_{t_prev}      alpha -> α_t = ᾱ_t / ᾱ_{t_prev} (of the strided step)
    log_p         -> log p(c | x̂_0) = -loss(A(x̂_0))     mc_eps -> Monte-Carlo smoothing noise, std γ_t
    delta_t       -> Δ_t (x_t-space step)     delta_0 -> Δ_0 (x̂_0-space step)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from .._utils import append_dims, check_finite
from ..sampling.schedules import VPSchedule
from ..sampling.terms import Evaluate, StepContext, StepTerm, Update

__all__ = ["TFG_SCHEDULES", "DPSNormalized", "TFGGuidance", "dps_as_tfg", "tfg_schedule"]

TFG_SCHEDULES = ("increase", "decrease", "constant")
SAMPLER_CLIP = "sampler"  # TFGGuidance(clip_x0=...): clamp the loss's x̂_0 as the sampler clamps its step
LossFn = Callable[[Tensor], Tensor]


def _raw_schedule(name: str, ab_t: Tensor, ab_prev: Tensor) -> Tensor:
    alpha = ab_t / ab_prev
    return {"increase": alpha, "decrease": 1 - alpha, "constant": torch.ones_like(alpha)}[name]


def _grid_alpha_bars(timesteps: Tensor, schedule: VPSchedule) -> tuple[Tensor, Tensor]:
    ts = schedule.check_timesteps(torch.as_tensor(timesteps, device="cpu").reshape(-1))
    ts_prev = torch.cat([ts[1:], ts.new_full((1,), -1)])
    like = torch.empty(ts.numel(), dtype=torch.float64)
    return schedule.alpha_bar_at(ts, like), schedule.alpha_bar_at(ts_prev, like)


def tfg_schedule(name: str, timesteps: Tensor, schedule: VPSchedule) -> Tensor:
    """TFG's ρ/μ schedule over an inference grid, normalised to mean 1 (``methods/tfg.py::get_rho``).

    ``"increase"``: α_t = ᾱ_t / ᾱ_{t_prev}; ``"decrease"``: β_t = 1 - α_t; ``"constant"``: 1. ``t_prev`` of the last
    step is -1 (ᾱ = 1).

    Args:
        name: one of :data:`TFG_SCHEDULES`.
        timesteps: the sampler's decreasing grid of training timesteps, shape ``(N,)``.
        schedule: the VP schedule.

    Returns:
        Shape ``(N,)``, float64, mean 1; entry ``i`` is the weight of step ``i``.

    Raises:
        ValueError: for an unknown name or timesteps outside ``[0, T-1]``.
    """
    _check_schedule_name(name, "schedule")
    raw = _raw_schedule(name, *_grid_alpha_bars(timesteps, schedule))
    return raw / raw.mean()


def _check_schedule_name(name: object, what: str) -> None:
    if name not in TFG_SCHEDULES:
        raise ValueError(f"unknown TFG {what} {name!r}; expected one of {', '.join(TFG_SCHEDULES)}")


def _check_nonneg(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)


def _log_prob(loss_fn: LossFn, operator: LossFn | None, x0: Tensor, name: str) -> Tensor:
    loss = loss_fn(operator(x0) if operator is not None else x0)
    if loss.shape != (x0.shape[0],):
        raise ValueError(f"{name} loss must be per-sample with shape ({x0.shape[0]},), got {tuple(loss.shape)}")
    return -loss


def _check_clip(clip_x0: object) -> float | str | None:
    if clip_x0 is None or clip_x0 == SAMPLER_CLIP:
        return clip_x0  # type: ignore[return-value]
    if isinstance(clip_x0, str) or not _check_nonneg(clip_x0, "clip_x0") > 0:
        raise ValueError(f"clip_x0 must be {SAMPLER_CLIP!r}, None or a finite number > 0, got {clip_x0!r}")
    return float(clip_x0)  # type: ignore[arg-type]


def _require_grad(x: Tensor, name: str) -> None:
    if not x.requires_grad:
        raise RuntimeError(f"{name} needs x with requires_grad; run it through tagdiff's sampler loop")


class TFGGuidance(StepTerm):
    r"""Training-Free Guidance (Ye et al. 2024, Alg. 1; docs/notation.md §4.3), as a ``shift`` of x_prev.

    With log p(c | x̂_0) = -loss(A(x̂_0)) and one smoothing draw mc_eps ~ N(0, γ_t² I) per step::

        Δ_t    = ρ_t ∇_{x_t} log p(c | x̂_0(x_t) + mc_eps)          # through the ε-model
        x̂_0'   = x̂_0;  repeat num_iter times:  x̂_0' += μ_t ∇_{x̂_0'} log p(c | x̂_0' + mc_eps)
        Δ_0    = x̂_0' - x̂_0
        x_prev = step(x_t, ε̂) + Δ_t / sqrt(α_t) + sqrt(ᾱ_{t_prev}) Δ_0

    where ``step`` is the sampler's unguided step (the TFG code uses DDIM with η = 1) and
    ``ρ_t = ρ̄ w_ρ(t) / mean_grid(w_ρ)``, ``μ_t`` likewise (see :func:`tfg_schedule`; the weight is evaluated at the
    step's actual ``(t, t_prev)``, so it also follows a ``retime``), ``γ_t = γ̄ sqrt(1 - ᾱ_t)``.

    **Recurrence** (N_recur, "self-recurrence" of Bansal et al. 2023) is part of the step: it is repeated
    ``num_recur`` times, re-noising x_prev back to t in between with
    ``x_t = sqrt(ᾱ_t / ᾱ_prev) x_prev + sqrt(1 - ᾱ_t / ᾱ_prev) z``. Correctors of the step (TAG, ...) run once per
    step, around the whole recurrence. Recurrence needs tagdiff's own loop (a multistep scheduler's history, or a
    σ-space state, would be corrupted by repeated updates): ``num_recur > 1`` is refused with diffusers schedulers.

    Shapes: x, x̂_0 ``(B, *D)``; ``loss_fn(A(x̂_0))`` must return ``(B,)`` (per sample: no batch reductions).
    Conventions: VP space, integer training timesteps, ``t_prev = -1`` at the last step (ᾱ = 1).

    **Clipping.** With ``clip_x0 = c`` the loss sees ``clamp(x̂_0, -c, c)`` in both Δ_t (the gradient flows
    through the clamp, so clipped pixels get none) and Δ_0 (the iterations start from the clamped x̂_0), as the TFG
    benchmark does for images (``methods/base.py::_predict_x0`` with ``clip_x0``, used by ``methods/tfg.py``;
    ``clip_sample_range`` 1). The benchmark's DDIM step then starts from the same clamped x̂_0 and the ε re-derived
    from it (``_predict_x_prev_from_zero``): one flag clips both the loss's x̂_0 and the step's. The default
    ``clip_x0="sampler"`` follows that rule: the loss is clamped exactly where the sampling loop's own ``clip_x0``
    clamps its step (``ctx.clip_x0``), so the pair always matches one of the two conventions:

    * ``sample_ddim(..., eta=1.0, clip_x0=1.0, terms=[TFGGuidance(...)])`` is the benchmark's TFG for images
      (``tests/guidance/test_tfg.py`` checks 1-, 3- and 50-step loops against a transcription);
    * ``sample_ddim(..., terms=[TFGGuidance(...)])`` (no clipping anywhere) is TFG on unbounded data (latents,
      toy data), where a clamp at 1 would be wrong.

    A number ``c`` clamps the loss at ``c`` whatever the sampler does, ``None`` never clamps it (before this
    default existed ``None`` was the default: a clipping sampler with ``clip_x0=None`` here gives the mixed variant
    that matches neither convention; pass it explicitly to keep such results). A diffusers scheduler's own
    ``clip_sample`` is not followed: pass ``clip_x0`` to :func:`tagdiff.sample_scheduler` instead.
    Not implemented from the TFG code: ``rescale_grad`` (a no-op for images), ``eps_bsz > 1`` (the image configs
    draw one smoothing sample).

    Args:
        loss_fn: ``A(x̂_0) -> (B,)`` per-sample loss, e.g. a classifier's ``-log p(y | x̂_0)`` (:func:`label_loss`).
        rho: ρ̄ >= 0, x_t-space strength (0 disables Δ_t).
        mu: μ̄ >= 0, x̂_0-space step size (0 disables Δ_0).
        gamma: γ̄ >= 0, smoothing std in units of sqrt(1 - ᾱ_t); 0 draws no noise (the random stream is untouched).
        num_iter: N_iter >= 0, number of x̂_0-space iterations (TFG default 4).
        num_recur: N_recur >= 1, recurrence for the sampler (see above).
        rho_schedule, mu_schedule: ``"increase"`` (TFG image default for both), ``"decrease"`` (TFG's μ for
            molecules) or ``"constant"``.
        operator: optional measurement operator A applied to x̂_0 before ``loss_fn``.
        clip_x0: ``"sampler"`` (default): clamp x̂_0 before the loss exactly as the sampling loop's ``clip_x0``
            clamps its step (the benchmark's rule; no clamp when the sampler has none); a number ``c``: clamp to
            ``[-c, c]`` always; ``None``: never.

    Raises:
        ValueError: negative or non-finite ρ̄/μ̄/γ̄, num_iter < 0, num_recur < 1, an unknown schedule name, a
            ``clip_x0`` that is not ``"sampler"``, ``None`` or a finite number > 0;
            (when sampling) a loss not shaped ``(B,)`` or a context without the sampler grid.

    Reference: Ye et al. (2024), "TFG: Unified Training-Free Guidance for Diffusion Models", arXiv:2409.15761.
    """

    needs_model_grad = True

    def __init__(self, loss_fn: LossFn, rho: float = 0.0, mu: float = 0.0, gamma: float = 0.0, num_iter: int = 4,
                 num_recur: int = 1, rho_schedule: str = "increase", mu_schedule: str = "increase",
                 operator: LossFn | None = None, clip_x0: float | str | None = "sampler"):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.clip_x0 = _check_clip(clip_x0)
        self.rho, self.mu = _check_nonneg(rho, "rho"), _check_nonneg(mu, "mu")
        self.gamma = _check_nonneg(gamma, "gamma")
        if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 0:
            raise ValueError(f"num_iter must be an integer >= 0, got {num_iter!r}")
        if isinstance(num_recur, bool) or not isinstance(num_recur, int) or num_recur < 1:
            raise ValueError(f"num_recur must be an integer >= 1, got {num_recur!r}")
        _check_schedule_name(rho_schedule, "rho_schedule")
        _check_schedule_name(mu_schedule, "mu_schedule")
        self.loss_fn, self.operator = loss_fn, operator
        self.num_iter, self.num_recur = num_iter, num_recur
        self.rho_schedule, self.mu_schedule = rho_schedule, mu_schedule

    def _weight(self, name: str, t: Tensor, ctx: StepContext, like: Tensor) -> Tensor:
        """``w(t, t_prev) / mean_grid(w)``, shape ``(B, 1, ..., 1)``, dtype of ``like``."""
        if ctx.timesteps is None or ctx.t_prev is None:
            raise ValueError("TFGGuidance needs the sampler grid (ctx.timesteps, ctx.t_prev); run it through "
                             "tagdiff.samplers.sample")
        mean = _raw_schedule(name, *_grid_alpha_bars(ctx.timesteps, ctx.schedule)).mean()
        f64 = torch.empty(like.shape[0], dtype=torch.float64)
        w = _raw_schedule(name, ctx.schedule.alpha_bar_at(t, f64), ctx.schedule.alpha_bar_at(ctx.t_prev, f64)) / mean
        return append_dims(w.to(device=like.device, dtype=like.dtype), like.ndim)

    def step(self, x: Tensor, t: Tensor, t_prev: Tensor, ctx: StepContext, evaluate: Evaluate,
             update: Update) -> Tensor:
        if self.num_recur > 1 and (ctx.stateful_update or ctx.alpha_bar is not None):
            raise ValueError(f"TFG recurrence (num_recur={self.num_recur}) needs tagdiff's own sampler loop; a "
                             "diffusers scheduler's state would be corrupted by repeated updates")
        active = self.rho > 0 or (self.mu > 0 and self.num_iter > 0)
        x_prev = x
        for r in range(self.num_recur):
            if r > 0:
                alpha = ctx.schedule.alpha_bar_at(t, x) / ctx.schedule.alpha_bar_at(t_prev, x)
                x = alpha.sqrt() * x_prev + (1 - alpha).sqrt() * ctx.randn_like(x_prev)
            pred = evaluate(x, t, keep_graph=active)
            shift = self.shift(pred.x_in, t, pred.x0_graph, replace(ctx, retain_graph=False)) if active else None
            x_prev = update(x, pred.eps_hat, t, t_prev)
            if shift is not None:
                x_prev = x_prev + check_finite(shift.detach(), lambda: f"TFG shift at t={int(t.reshape(-1)[0])}")
        return x_prev

    def shift(self, x: Tensor, t: Tensor, x0_hat: Tensor, ctx: StepContext) -> Tensor | None:
        """``Δ_t / sqrt(α_t) + sqrt(ᾱ_prev) Δ_0`` computed at ``x`` (requires grad) from the unguided ``x0_hat``
        (a differentiable function of ``x``); ``None`` when ρ̄ = 0 and μ̄ = 0."""
        use_mu = self.mu > 0 and self.num_iter > 0
        if self.rho == 0 and not use_mu:
            return None
        _require_grad(x, "TFGGuidance")
        clip = ctx.clip_x0 if self.clip_x0 == SAMPLER_CLIP else self.clip_x0
        if clip is not None:
            x0_hat = x0_hat.clamp(-clip, clip)
        ab_t = ctx.schedule.alpha_bar_at(t, x)
        ab_prev = ctx.schedule.alpha_bar_at(ctx.t_prev, x)
        mc_eps = self.gamma * (1 - ab_t).sqrt() * ctx.randn_like(x) if self.gamma > 0 else 0.0
        out = None
        if self.rho > 0:
            log_p = _log_prob(self.loss_fn, self.operator, x0_hat + mc_eps, "TFG")
            (grad,) = torch.autograd.grad(log_p.sum(), x, retain_graph=ctx.retain_graph)
            out = self.rho * self._weight(self.rho_schedule, t, ctx, x) * grad / (ab_t / ab_prev).sqrt()
        if use_mu:
            mu_t = self.mu * self._weight(self.mu_schedule, t, ctx, x)
            x0 = x0_hat.detach()
            x0_new = x0
            with torch.enable_grad():
                for _ in range(self.num_iter):
                    x0_req = x0_new.detach().requires_grad_()
                    log_p = _log_prob(self.loss_fn, self.operator, x0_req + mc_eps, "TFG")
                    (g,) = torch.autograd.grad(log_p.sum(), x0_req)
                    x0_new = x0_new + mu_t * g
            delta_0 = ab_prev.sqrt() * (x0_new - x0)
            out = delta_0 if out is None else out + delta_0
        return out


def dps_as_tfg(loss_fn: LossFn, rho: float, rho_schedule: str = "increase",
               operator: LossFn | None = None, clip_x0: float | str | None = "sampler") -> TFGGuidance:
    """DPS in TFG's unified view: :class:`TFGGuidance` with ρ only (μ = γ = 0, no recurrence); ``clip_x0`` as
    there (default: follow the sampler's)."""
    return TFGGuidance(loss_fn, rho=rho, mu=0.0, gamma=0.0, num_recur=1, rho_schedule=rho_schedule,
                       operator=operator, clip_x0=clip_x0)


class DPSNormalized(StepTerm):
    r"""DPS as in the TFG benchmark (``methods/dps.py``; docs/notation.md §4.2), as a ``shift`` of x_prev::

        x_prev = step(x_t, ε̂) + s ∇_{x_t} log p(c | x̂_0(x_t)) / |log p(c | x̂_0(x_t))|

    per sample, with ``|log p|`` clamped below at 1e-8 (the normalisation follows the DPS paper's step size
    ζ / ||y - A(x̂_0)||). DPS appears twice more: as TFG with ρ only (:func:`dps_as_tfg`) and as the score-space
    :class:`~tagdiff.guidance.DPSGuidance` (TAG paper Eq. 9).

    Shapes: x ``(B, *D)``; ``loss_fn(A(x̂_0))`` must return ``(B,)``. Conventions as :class:`TFGGuidance`.

    **Matches the benchmark only without clipping.** The benchmark's DPS neither clamps x̂_0 in its loss nor in its
    step (``methods/dps.py`` calls ``_predict_x_prev_from_eps`` with the model's ε, whatever ``clip_x0`` says): run
    it with the sampler's ``clip_x0=None``. With ``clip_x0`` in the sampler the step clips x̂_0 while the loss here
    still sees the unclipped x̂_0, which is no longer the benchmark's rule.

    Args:
        loss_fn: ``A(x̂_0) -> (B,)`` per-sample loss = -log p(c | x̂_0).
        guidance_scale: s, any finite number (0 disables the term).
        operator: optional measurement operator A applied to x̂_0 before ``loss_fn``.

    Raises:
        ValueError: a non-finite scale; (when sampling) a loss not shaped ``(B,)``.
    """

    needs_model_grad = True

    def __init__(self, loss_fn: LossFn, guidance_scale: float = 1.0, operator: LossFn | None = None):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, int | float) \
                or not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        self.loss_fn, self.operator, self.guidance_scale = loss_fn, operator, float(guidance_scale)

    def step(self, x: Tensor, t: Tensor, t_prev: Tensor, ctx: StepContext, evaluate: Evaluate,
             update: Update) -> Tensor:
        if self.guidance_scale == 0:
            return update(x, evaluate(x, t).eps_hat, t, t_prev)
        pred = evaluate(x, t, keep_graph=True)
        shift = self.shift(pred.x_in, t, pred.x0_graph, replace(ctx, retain_graph=False))
        return update(x, pred.eps_hat, t, t_prev) + check_finite(shift.detach(), lambda: f"DPSNormalized shift at "
                                                                 f"t={int(t.reshape(-1)[0])}")

    def shift(self, x: Tensor, t: Tensor, x0_hat: Tensor, ctx: StepContext) -> Tensor | None:
        """``s ∇_x log p / |log p|`` at ``x`` (requires grad) from the unguided ``x0_hat(x)``; ``None`` at s = 0."""
        if self.guidance_scale == 0:
            return None
        _require_grad(x, "DPSNormalized")
        log_p = _log_prob(self.loss_fn, self.operator, x0_hat, "DPSNormalized")
        (grad,) = torch.autograd.grad(log_p.sum(), x, retain_graph=ctx.retain_graph)
        norm = append_dims(log_p.detach().abs().clamp(min=1e-8), x.ndim)
        return self.guidance_scale * grad / norm
