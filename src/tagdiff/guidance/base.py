r"""One interface for everything that perturbs, guides or corrects a reverse step.

A :class:`Term` may act in three places of a reverse step from timestep ``t`` to ``t_prev``
(the predictor/corrector split of Song et al. 2021, score_sde)::

    x   <- term.pre(x, t, ctx)                   # state update at fixed t  (TAG Alg. 1, corruption, drift)
    eps <- eps_hat - sqrt(1 - alpha_bar_t) * Σ term.delta_score(x, t, x0_hat, ctx)
                                                 # score-space guidance (classifier guidance, DPS)
    x_prev <- sampler_step(x, eps, t, t_prev)    # DDPM / DDIM: knows nothing of guidance
    x_prev <- x_prev + Σ term.shift(x, t, x0_hat, ctx)
                                                 # x_prev-space guidance computed at x_t (TFG's Δ_t, Δ_0)
    x_prev <- term.post(x_prev, t_prev, ctx)     # state update at fixed t_prev (TAG Alg. 2 / App. E.2)

Folding a score correction Δs into ε̂ through ``sqrt(1 - alpha_bar)`` is guided-diffusion's
``condition_score`` (Song et al. 2021; TAG.md §6.5): since ``score = -eps / sqrt(1 - alpha_bar)``,
``score + Δs`` corresponds to ``eps - sqrt(1 - alpha_bar) Δs``.

Terms are stateless: every per-step quantity arrives through the arguments and the frozen
:class:`StepContext`. Hooks run in list order, so ``[Drift(...), TemporalAlignment(...)]`` corrects the
drifted state while ``[TemporalAlignment(...), Drift(...)]`` drifts after the correction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._utils import RandnLike, append_dims, check_finite
from ..schedules import VPSchedule

__all__ = ["StepContext", "Strength", "Term", "guided_eps", "guided_eps_and_x0", "guided_terms",
           "STRENGTH_SCHEDULES"]

EpsModel = Callable[..., Tensor]
STRENGTH_SCHEDULES = ("constant", "one_minus_alpha_bar", "sqrt_one_minus_alpha_bar")


@dataclass(frozen=True)
class StepContext:
    """What a term may read about the step it acts in. Built fresh by the sampler for each step.

    Attributes:
        schedule: the VP schedule.
        eps_model: the *unguided* ε-model ``(x, t, **cond) -> eps_hat``.
        cond: keyword conditioning passed to the model.
        randn_like: noise source ``x -> N(0, I)`` of x's shape (per-sample generators keep batch independence).
        t: current training timestep, shape ``(B,)``, int64.
        t_prev: timestep the step moves to, shape ``(B,)``; ``-1`` at the final step (clean data).
        i: step index in ``[0, num_steps)``; ``None`` outside a sampler loop.
        num_steps: number of reverse steps; ``None`` outside a sampler loop.
        timesteps: the sampler's whole grid of training timesteps, shape ``(num_steps,)``, decreasing; ``None``
            outside a sampler loop (TFG normalises its ρ/μ schedules over it).
    """

    schedule: VPSchedule
    eps_model: EpsModel
    cond: Mapping[str, Any] = field(default_factory=dict)
    randn_like: RandnLike = torch.randn_like
    t: Tensor | None = None
    t_prev: Tensor | None = None
    i: int | None = None
    num_steps: int | None = None
    timesteps: Tensor | None = None


@dataclass(frozen=True)
class Strength:
    """A strength schedule over training timesteps: ``scale * w(t)`` inside ``window``, 0 outside.

    Args:
        scale: base strength (ω_0 for TAG, the guidance scale otherwise).
        schedule: ``"constant"`` (w = 1), ``"one_minus_alpha_bar"`` (w = 1 - ᾱ_t; TAG's default,
            TAG.md §3.2), ``"sqrt_one_minus_alpha_bar"`` (w = sqrt(1 - ᾱ_t)), or a callable
            ``(t, vp_schedule) -> Tensor (B,)`` returning w(t).
        window: optional inclusive ``(t_min, t_max)`` range of training timesteps where the term acts.

    Raises:
        ValueError: for an unknown schedule name, a non-finite scale, or a malformed window.
    """

    scale: float
    schedule: str | Callable[[Tensor, VPSchedule], Tensor] = "constant"
    window: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.scale, int | float) or not torch.isfinite(torch.tensor(float(self.scale))):
            raise ValueError(f"strength scale must be a finite number, got {self.scale!r}")
        if isinstance(self.schedule, str) and self.schedule not in STRENGTH_SCHEDULES:
            raise ValueError(
                f"unknown strength schedule {self.schedule!r}; expected one of {', '.join(STRENGTH_SCHEDULES)} "
                "or a callable (t, schedule) -> weights"
            )
        if self.window is not None:
            lo, hi = self.window
            if not (isinstance(lo, int) and isinstance(hi, int) and lo <= hi):
                raise ValueError(f"window must be (t_min, t_max) integers with t_min <= t_max, got {self.window!r}")

    @property
    def is_zero(self) -> bool:
        return float(self.scale) == 0.0

    def __call__(self, t: Tensor, schedule: VPSchedule, like: Tensor) -> Tensor:
        """Per-sample strength broadcast against ``like``: shape ``(B, 1, ..., 1)``, dtype of ``like``."""
        t = torch.as_tensor(t).long().reshape(-1)
        if isinstance(self.schedule, str):
            ab = schedule._alpha_bar_ext[t.cpu()]
            w = {"constant": torch.ones_like(ab), "one_minus_alpha_bar": 1 - ab,
                 "sqrt_one_minus_alpha_bar": (1 - ab).sqrt()}[self.schedule]
        else:
            w = torch.as_tensor(self.schedule(t, schedule), dtype=torch.float64).reshape(-1).cpu()
            if w.numel() == 1:
                w = w.expand(t.numel())
        w = self.scale * w
        if self.window is not None:
            inside = (t.cpu() >= self.window[0]) & (t.cpu() <= self.window[1])
            w = torch.where(inside, w, torch.zeros_like(w))
        if w.numel() == 1 and like.shape[0] != 1:
            w = w.expand(like.shape[0])
        return append_dims(w.to(device=like.device, dtype=like.dtype), like.ndim)

    def active(self, t: Tensor) -> bool:
        """False when the strength is zero or every ``t`` lies outside the window (the term can be skipped)."""
        if self.is_zero:
            return False
        if self.window is None:
            return True
        t = torch.as_tensor(t)
        return bool(((t >= self.window[0]) & (t <= self.window[1])).any())


class Term:
    """Base class of every perturbation, guidance term and corrector. Subclasses override one or more hooks.

    Hooks (all default to "do nothing"):
        pre(x, t, ctx) -> x: state update at timestep ``t`` before the reverse step.
        delta_score(x, t, x0_hat, ctx) -> Tensor | None: a correction Δs to ∇_x log p_t(x), same shape as x.
        shift(x, t, x0_hat, ctx) -> Tensor | None: a displacement added to x_prev after the sampler step,
            computed from the pre-step state (the TFG code's ``x_prev += Δ_t / sqrt(α_t) + sqrt(ᾱ_prev) Δ_0``).
            It sees the *unguided* x0_hat, like ``delta_score``; ``needs_model_grad`` applies to it too.
        post(x_prev, t_prev, ctx) -> x_prev: state update after the step (``t_prev = -1`` at the end).
        check(x, schedule): validate shapes/timesteps once before sampling; raise ``ValueError`` if wrong.

    Class attributes:
        needs_model_grad: True if ``delta_score`` differentiates through ``x0_hat(x)``, i.e. through the model
            (DPS/TFG). The sampler then evaluates the model with autograd enabled on ``x``.
    """

    needs_model_grad: bool = False

    def pre(self, x: Tensor, t: Tensor, ctx: StepContext) -> Tensor:
        return x

    def delta_score(self, x: Tensor, t: Tensor, x0_hat: Tensor, ctx: StepContext) -> Tensor | None:
        return None

    def shift(self, x: Tensor, t: Tensor, x0_hat: Tensor, ctx: StepContext) -> Tensor | None:
        return None

    def post(self, x_prev: Tensor, t_prev: Tensor, ctx: StepContext) -> Tensor:
        return x_prev

    def check(self, x: Tensor, schedule: VPSchedule) -> None:
        return None

    @property
    def has_score(self) -> bool:
        return type(self).delta_score is not Term.delta_score

    @property
    def has_shift(self) -> bool:
        return type(self).shift is not Term.shift

    def __repr__(self) -> str:
        fields = {k: v for k, v in vars(self).items() if isinstance(v, int | float | str | tuple | Strength)}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


def guided_terms(x: Tensor, t: Tensor, ctx: StepContext,
                 terms: Sequence[Term]) -> tuple[Tensor, Tensor, Tensor | None]:
    """Evaluate the model once and every term's ``delta_score`` and ``shift`` at ``(x, t)``.

    Returns:
        ``(eps_hat, x0_hat, shift)``: the guided ε̂ (every Δs folded in through ``sqrt(1 - alpha_bar_t)``),
        the x0_hat recomputed from it, and the summed x_prev displacement (``None`` when no term shifts).
        All detached.

    Raises:
        NonFiniteError: if the model output or any term's Δs or shift has NaN/Inf.
    """
    active = [term for term in terms if term.has_score or term.has_shift]
    needs_grad = any(term.needs_model_grad for term in active)
    where = f"t={int(t.reshape(-1)[0])}"
    if not active:
        with torch.no_grad():
            eps_hat = ctx.eps_model(x, t, **ctx.cond)
        check_finite(eps_hat, f"model output at {where}")
        return eps_hat, ctx.schedule.x0_from_eps(x, t, eps_hat), None
    delta = shift = None
    with torch.enable_grad() if needs_grad else torch.no_grad():
        x_in = x.detach().requires_grad_(needs_grad)
        eps_hat = ctx.eps_model(x_in, t, **ctx.cond)
        check_finite(eps_hat.detach(), f"model output at {where}")
        x0_hat = ctx.schedule.x0_from_eps(x_in, t, eps_hat)
        for term in active:
            d = term.delta_score(x_in, t, x0_hat, ctx) if term.has_score else None
            if d is not None:
                d = check_finite(d.detach(), f"{type(term).__name__} Δs at {where}")
                delta = d if delta is None else delta + d
            m = term.shift(x_in, t, x0_hat, ctx) if term.has_shift else None
            if m is not None:
                m = check_finite(m.detach(), f"{type(term).__name__} shift at {where}")
                shift = m if shift is None else shift + m
    eps_hat = eps_hat.detach()
    if delta is not None:
        eps_hat = eps_hat - (1 - ctx.schedule.alpha_bar_at(t, x)).sqrt() * delta
    return eps_hat, ctx.schedule.x0_from_eps(x, t, eps_hat), shift


def guided_eps_and_x0(x: Tensor, t: Tensor, ctx: StepContext, terms: Sequence[Term]) -> tuple[Tensor, Tensor]:
    """:func:`guided_terms` without the shift: ``(eps_hat, x0_hat)`` with every term's Δs folded into ε̂."""
    return guided_terms(x, t, ctx, terms)[:2]


def guided_eps(eps_model: EpsModel, schedule: VPSchedule, terms: Sequence[Term]) -> EpsModel:
    """Wrap ``eps_model`` into a guided ε-model ``(x, t, **cond) -> eps_hat`` with every term's Δs folded in.

    Only the score-space part (``delta_score``) of the terms is used: ``pre``/``shift``/``post`` hooks move
    the state and need a sampler loop. Useful for plugging tagdiff guidance into a foreign loop (e.g. a diffusers
    pipeline).
    """

    def eps_fn(x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        t = schedule.check_timesteps(torch.as_tensor(t).reshape(-1).expand(x.shape[0]))
        ctx = StepContext(schedule=schedule, eps_model=eps_model, cond=cond, t=t)
        return guided_eps_and_x0(x, t, ctx, terms)[0]

    return eps_fn
