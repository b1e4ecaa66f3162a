r"""Time-input contrastive guidance: Timestep Guidance (Sadat et al. 2024) and Self-Guidance (Li et al. 2024b).

docs/notation.md §5.5: both perturb the score model's time input (τ ± δτ) and use the difference of the outputs as a
contrastive guidance direction, CFG-style::

    ε̂ = ε_θ(x_t, t) + w · (ε_θ(x_t, t) - ε_θ(x_t, t̃))

so that the sample moves away from what the model predicts at the "wrong" time. The two differ in t̃:

* :class:`TimestepGuidance` (Sadat et al. 2024, "No Training, No Problem: Rethinking Classifier-Free Guidance for
  Diffusion Models", arXiv:2407.02687, §5 "time-step guidance", TSG) perturbs the time input with Gaussian noise.
  The paper adds the noise to the time *embedding*; tagdiff's models take an integer training timestep, so here
  ``t̃ = clamp(round(t + δ·n), 0, T-1)`` with n ~ N(0, 1) per sample, drawn from the term's own generator (the
  sampler's noise stream, shared across the methods of a comparison, is untouched).
* :class:`SelfGuidance` (Li et al. 2024b, "Self-Guidance: Boosting Flow and Diffusion Generation on Their Own",
  arXiv:2412.05827) contrasts with a deterministically *noisier* time input, ``t̃ = min(t + δ, T-1)``: the model's
  prediction at a higher noise level is the "bad" branch.

Both are score terms: the loop folds ``Δs = -Δε / sqrt(1 - ᾱ_t)`` into ε̂ (``Δε = w (ε - ε̃)``); the unguided ε is
recovered from ``(x, x̂_0)``, so each costs one extra model call per step (without autograd). the paper does not report
the scales the paper used (§7); the label suite's defaults are stated there as not tuned.

Notation: ``eps`` -> ε_θ(x_t, t), ``eps_tilde`` -> ε_θ(x_t, t̃), ``w`` -> guidance scale, ``delta`` -> δ (timesteps).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..sampling.predictions import eps_and_x0, model_prediction_type
from ..sampling.terms import ScoreTerm, StepContext

__all__ = ["SelfGuidance", "TimestepGuidance"]


def _check(scale: object, delta: object) -> tuple[float, float]:
    for name, v in (("scale", scale), ("delta", delta)):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if delta < 0:
        raise ValueError(f"delta must be >= 0 (timesteps), got {delta!r}")
    return float(scale), float(delta)


class _TimeContrast(ScoreTerm):
    """``Δs = -w (ε(x, t) - ε(x, t̃)) / sqrt(1 - ᾱ_t)`` for a perturbed time input ``t̃`` (:meth:`perturbed_t`)."""

    def __init__(self, scale: float, delta: float):
        self.scale, self.delta = _check(scale, delta)

    def perturbed_t(self, t: Tensor, num_train_timesteps: int) -> Tensor:
        raise NotImplementedError

    def delta_score(self, x: Tensor, t: Tensor, x0_hat: Tensor, ctx: StepContext) -> Tensor | None:
        if self.scale == 0 or self.delta == 0:
            return None
        T = ctx.schedule.num_train_timesteps
        t_tilde = self.perturbed_t(t.reshape(-1), T).to(t.device)
        ab = ctx.schedule.alpha_bar_at(t, x)
        with torch.no_grad():
            z = x.detach()
            eps = ctx.schedule.eps_from_x0(z, t, x0_hat.detach())
            raw = ctx.eps_model(z, t_tilde, **ctx.cond)
            eps_tilde, _ = eps_and_x0(raw, z, ab, model_prediction_type(ctx.eps_model))
            return -self.scale * (eps - eps_tilde) / (1 - ab).sqrt()


class TimestepGuidance(_TimeContrast):
    r"""Timestep Guidance, TSG (Sadat et al. 2024, arXiv:2407.02687, §5), as a score term.

    ``ε̂ = ε(x, t) + w (ε(x, t) - ε(x, t̃))`` with ``t̃ = clamp(round(t + δ n), 0, T-1)``, n ~ N(0, 1) per sample
    (the paper perturbs the time embedding; see the module docstring). The draws come from the term's own
    generator seeded with ``seed`` (reset by :meth:`reset`), so the sampler's noise stream is not consumed.

    Args:
        scale: w (0 disables the term). delta: δ, the perturbation std in training timesteps (>= 0).
        seed: seed of the term's generator.

    Raises:
        ValueError: non-finite ``scale``/``delta`` or ``delta < 0``.
    """

    def __init__(self, scale: float = 1.0, delta: float = 50.0, seed: int = 0):
        super().__init__(scale, delta)
        self.seed = int(seed)
        self.reset()

    def reset(self) -> None:
        """Restart the perturbation generator (same t̃ draws for the next run)."""
        self._gen = torch.Generator().manual_seed(self.seed)

    def perturbed_t(self, t: Tensor, num_train_timesteps: int) -> Tensor:
        n = torch.randn(t.shape, generator=self._gen, dtype=torch.float64)
        return (t.cpu().double() + self.delta * n).round().clamp(0, num_train_timesteps - 1).long()


class SelfGuidance(_TimeContrast):
    r"""Self-Guidance (Li et al. 2024b, arXiv:2412.05827), as a score term.

    ``ε̂ = ε(x, t) + w (ε(x, t) - ε(x, t̃))`` with the noisier time input ``t̃ = min(t + δ, T-1)`` (rounded):
    the model's prediction at a higher noise level is the contrast branch.

    Args:
        scale: w (0 disables the term). delta: δ in training timesteps (>= 0; rounded to an integer).

    Raises:
        ValueError: non-finite ``scale``/``delta`` or ``delta < 0``.
    """

    def __init__(self, scale: float = 1.0, delta: float = 20.0):
        super().__init__(scale, delta)

    def perturbed_t(self, t: Tensor, num_train_timesteps: int) -> Tensor:
        return (t.cpu() + round(self.delta)).clamp(max=num_train_timesteps - 1).long()
