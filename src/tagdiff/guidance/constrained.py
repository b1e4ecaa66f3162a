r"""Gradient guidance applied *after* the sampler's step: DPS as its Algorithm 1, MPGD and DSG.

All three are step terms (:class:`~tagdiff.sampling.terms.StepTerm`) that take the sampler's unguided step from the
(clipped) x̂_0 and then move the result, so an x̂_0 clip never throws the guidance away. The score-space
:class:`~tagdiff.guidance.DPSGuidance` folds the guidance into ε̂ *before* the step clips x̂_0 to [-1, 1]; at high
noise the guided x̂_0 lies far outside that range and the clip removes most of the guidance.

Notation: ``loss_fn(A(x̂_0))`` is a per-sample loss ℓ, shape ``(B,)`` (``-log p(c | x̂_0)``, or ``‖y − A(x̂_0)‖²`` for
an inverse problem); α_t = ᾱ_t / ᾱ_{t_prev} and β_t = 1 − α_t of the (strided) step; ``t_prev = -1`` at the last step
(ᾱ = 1). VP space, integer training timesteps. docs/notation.md §4.2.

* :class:`DPSStep`: ``x_prev = step(x_t, ε̂) − ζ_t ∇_{x_t} ℓ`` (Chung et al. 2023, Alg. 1), with ζ_t either the
  score-equivalent ``s β_t / √α_t`` (what ``DPSGuidance``'s Δs adds to the DDPM mean) or the paper's constant
  normalised step (``ζ_t = s`` on ℓ = ‖y − A(x̂_0)‖, i.e. ζ′ / ‖y − A(x̂_0)‖ on the squared residual).
* :func:`mpgd`: MPGD (He et al. 2024, Alg. 1): a gradient step on x̂_0 itself, no gradient through the model,
  ``x_prev = step(x_t, ε̂) + √ᾱ_{t_prev} Δ_0`` with ``Δ_0 = −s ∇_{x̂_0} ℓ(x̂_0)``: TFG with μ only.
* :class:`DSG`: guidance with a spherical Gaussian constraint (Yang et al. 2024): DDIM(η)'s sample stays on the
  sphere of radius √n σ_t around its mean, its direction mixed toward the steepest descent.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .._utils import append_dims, check_finite
from ..sampling.terms import Evaluate, StepContext, StepTerm, Update
from .tfg import TFGGuidance

__all__ = ["DPSStep", "DSG", "DPS_STEP_SIZES", "mpgd"]

DPS_STEP_SIZES = ("score", "constant")
LossFn = Callable[[Tensor], Tensor]


def _finite_scale(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)


def _loss(loss_fn: LossFn, operator: LossFn | None, x0: Tensor, name: str) -> Tensor:
    loss = loss_fn(operator(x0) if operator is not None else x0)
    if loss.shape != (x0.shape[0],):
        raise ValueError(f"{name} loss must be per-sample with shape ({x0.shape[0]},), got {tuple(loss.shape)}")
    return loss


def _alphas(ctx: StepContext, t: Tensor, t_prev: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """ᾱ_t and ᾱ_{t_prev} (1 after the last step), shaped for broadcasting against ``x``."""
    return ctx.schedule.alpha_bar_at(t, x), ctx.schedule.alpha_bar_at(t_prev, x)


class DPSStep(StepTerm):
    r"""DPS as its Algorithm 1 (Chung et al. 2023): the unguided step, then the guidance step.

    ::

        x_prev = step(x_t, ε̂(x_t)) − ζ_t ∇_{x_t} ℓ(A(x̂_0(x_t)))          # the gradient through the ε-model

    ``step`` is the sampler's own update, with its ``clip_x0``: the guidance is applied after the clip, as the DPS
    code (``x_prev`` from the clipped x̂_0, then ``x_t -= norm_grad * scale``) and guided-diffusion's
    ``condition_mean`` do.

    ``step_size="score"`` (default): ζ_t = s β_t / √α_t, the displacement that :class:`DPSGuidance`'s
    Δs = −s ∇ℓ gives the DDPM posterior mean ((x + β_t s_θ) / √α_t): without clipping, DDPM + ``DPSStep(ℓ, s)``
    equals DDPM + ``DPSGuidance(ℓ, s)``, so a scale tuned for one carries over. ``step_size="constant"``: ζ_t = s
    at every step. With ℓ = ‖y − A(x̂_0)‖ (the residual's norm, the loss of :mod:`tagdiff.operators`) this is the
    DPS code's ``x_t -= scale * ∇‖y − A(x̂_0)‖`` and the paper's normalised step ζ_i = ζ′ / ‖y − A(x̂_0)‖ on
    ∇‖y − A(x̂_0)‖² (since ∇‖r‖ = ∇‖r‖² / (2‖r‖): ζ′ = 2 s), per sample.

    Args:
        loss_fn: ``A(x̂_0) -> (B,)`` per-sample loss ℓ.
        guidance_scale: s ≥ 0 (0 disables the term).
        operator: optional measurement operator A applied to x̂_0 before ``loss_fn``.
        step_size: ``"score"`` or ``"normalized"`` (:data:`DPS_STEP_SIZES`).

    Raises:
        ValueError: a negative or non-finite scale, an unknown step size; (when sampling) a loss not shaped
            ``(B,)``; NonFiniteError: a non-finite guidance step.
    """

    needs_model_grad = True

    def __init__(self, loss_fn: LossFn, guidance_scale: float = 1.0, operator: LossFn | None = None,
                 step_size: str = "score"):
        if step_size not in DPS_STEP_SIZES:
            raise ValueError(f"unknown DPS step size {step_size!r}; expected one of {', '.join(DPS_STEP_SIZES)}")
        self.loss_fn, self.operator, self.step_size = loss_fn, operator, step_size
        self.guidance_scale = _finite_scale(guidance_scale, "guidance_scale")

    def step(self, x: Tensor, t: Tensor, t_prev: Tensor, ctx: StepContext, evaluate: Evaluate,
             update: Update) -> Tensor:
        if self.guidance_scale == 0:
            return update(x, evaluate(x, t).eps_hat, t, t_prev)
        pred = evaluate(x, t, keep_graph=True)
        loss = _loss(self.loss_fn, self.operator, pred.x0_graph, "DPSStep")
        (grad,) = torch.autograd.grad(loss.sum(), pred.x_in)
        zeta: Tensor | float = self.guidance_scale
        if self.step_size == "score":
            ab_t, ab_prev = _alphas(ctx, t, t_prev, x)
            alpha = ab_t / ab_prev
            zeta = self.guidance_scale * (1 - alpha) / alpha.sqrt()
        shift = check_finite(-zeta * grad, lambda: f"DPSStep guidance at t={int(t.reshape(-1)[0])}")
        return update(x, pred.eps_hat, t, t_prev) + shift.to(x.dtype)

    def __repr__(self) -> str:
        return f"DPSStep(guidance_scale={self.guidance_scale}, step_size={self.step_size!r})"


def mpgd(loss_fn: LossFn, guidance_scale: float, operator: LossFn | None = None,
         clip_x0: float | str | None = "sampler") -> TFGGuidance:
    r"""MPGD (He et al. 2024, "Manifold Preserving Guided Diffusion", Alg. 1) as the TFG benchmark runs it
    (``methods/mpgd.py``): one gradient step on x̂_0 itself (no gradient through the model, so the sample stays on
    the model's data manifold), then the sampler's step from the moved x̂_0 with the model's ε̂::

        x̂_0' = x̂_0 − s ∇_{x̂_0} ℓ(A(x̂_0));   x_prev = step(x_t, ε̂) + √ᾱ_{t_prev} (x̂_0' − x̂_0)

    This is :class:`TFGGuidance` with μ only (ρ = γ = 0, one iteration, constant μ_t = s), TFG's own reading of
    MPGD. ``clip_x0``: as in :class:`TFGGuidance` (default: follow the sampler's).

    Raises:
        ValueError: a negative or non-finite scale.
    """
    scale = _finite_scale(guidance_scale, "guidance_scale")
    return TFGGuidance(loss_fn, rho=0.0, mu=scale, gamma=0.0, num_recur=1, num_iter=1, mu_schedule="constant",
                       operator=operator, clip_x0=clip_x0)


class DSG(StepTerm):
    r"""Guidance with a spherical Gaussian constraint (Yang et al. 2024, DSG; the authors' ``condition_methods.py``).

    The step draws x_prev = μ_t + σ_t z from the unguided DDIM(η) step (mean μ_t from the clipped x̂_0, standard
    deviation σ_t). In high dimension n, σ_t z lies near the sphere of radius r = √n σ_t around μ_t, so DSG keeps x_prev
    on that sphere and turns its direction toward the steepest descent of ℓ::

        g = ∇_{x_t} ℓ(A(x̂_0(x_t)));   d* = −r g / ‖g‖;   d = σ_t z + g_r (d* − σ_t z)
        x_prev = μ_t + r d / ‖d‖

    per sample (the authors take ∇ of the batch's residual norm; here each sample's own loss, so samples stay
    independent). ``guidance_rate`` g_r ∈ [0, 1]: 0 is the unguided step, 1 the pure descent direction; ``interval``:
    guide every k-th step only (the others are the unguided step). The step is DDIM(``eta``) computed here, with
    the sampler's ``clip_x0`` and noise source (one draw per step, as DDIM(η > 0)), so DSG runs with tagdiff's own
    samplers (``sample_ddim``/``sample_ddpm`` grids), not with diffusers schedulers. With η = 0 the sphere has
    radius 0 and DSG does nothing: use η > 0 (default 1, DDPM's variance). The last step (σ = 0) is unguided.

    Raises:
        ValueError: ``guidance_rate`` outside [0, 1], ``eta`` ≤ 0, ``interval`` < 1; (when sampling) a loss not
            shaped ``(B,)``, or a diffusers scheduler (a stateful update).
    """

    needs_model_grad = True

    def __init__(self, loss_fn: LossFn, guidance_rate: float = 0.1, operator: LossFn | None = None,
                 eta: float = 1.0, interval: int = 1):
        rate = _finite_scale(guidance_rate, "guidance_rate")
        if rate > 1:
            raise ValueError(f"guidance_rate must be in [0, 1], got {guidance_rate!r}")
        if not (isinstance(eta, int | float) and math.isfinite(eta) and eta > 0):
            raise ValueError(f"DSG needs eta > 0 (its sphere has radius √n σ_t, 0 at η = 0), got {eta!r}")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an integer >= 1, got {interval!r}")
        self.loss_fn, self.operator = loss_fn, operator
        self.guidance_rate, self.eta, self.interval = rate, float(eta), interval

    def step(self, x: Tensor, t: Tensor, t_prev: Tensor, ctx: StepContext, evaluate: Evaluate,
             update: Update) -> Tensor:
        if ctx.stateful_update:
            raise ValueError("DSG computes its own DDIM(η) step; run it with tagdiff's samplers, not a diffusers "
                             "scheduler")
        guide = self.guidance_rate > 0 and (ctx.i is None or ctx.i % self.interval == 0)
        pred = evaluate(x, t, keep_graph=guide)
        ab_t, ab_prev = _alphas(ctx, t, t_prev, x)
        x0 = pred.x0_hat if ctx.clip_x0 is None else pred.x0_hat.clamp(-ctx.clip_x0, ctx.clip_x0)
        eps = (x - ab_t.sqrt() * x0) / (1 - ab_t).sqrt()  # ε re-derived from the clipped x̂_0, as ddim_step
        std = self.eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).clamp(min=0).sqrt()
        mean = ab_prev.sqrt() * x0 + (1 - ab_prev - std**2).clamp(min=0).sqrt() * eps
        last = bool(ctx.final) if ctx.final is not None else bool((t_prev < 0).all())
        if last:
            return mean
        d_sample = std * ctx.randn_like(x)
        if not guide:
            return mean + d_sample
        loss = _loss(self.loss_fn, self.operator, pred.x0_graph, "DSG")
        (g,) = torch.autograd.grad(loss.sum(), pred.x_in)
        n = x[0].numel()
        r = math.sqrt(n) * std
        norm = lambda v: append_dims(v.reshape(v.shape[0], -1).norm(dim=1), v.ndim)  # noqa: E731
        d_star = -r * g / (norm(g) + 1e-8)
        mix = d_sample + self.guidance_rate * (d_star - d_sample)
        return mean + check_finite(r * mix / (norm(mix) + 1e-8), lambda: f"DSG step at t={int(t.reshape(-1)[0])}")

    def __repr__(self) -> str:
        return f"DSG(guidance_rate={self.guidance_rate}, eta={self.eta}, interval={self.interval})"
