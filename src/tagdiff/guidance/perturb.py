"""External perturbations of the reverse process: a drift v(x, t) and per-step Gaussian corruption.

These are the off-manifold stressors of the paper: the toy experiment's external drift (docs/notation.md §6.1,
App. E.1) and the corrupted reverse process (docs/notation.md §3.5, Alg. 2, App. E.2).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ..sampling.terms import Corrector, StepContext, Strength, is_clean

__all__ = ["Corruption", "Drift", "LinearDrift"]


def _check_placement(placement: str) -> str:
    if placement not in ("pre", "post"):
        raise ValueError(f"placement must be 'pre' or 'post', got {placement!r}")
    return placement


class Drift(Corrector):
    """Add an external drift to the state at every step: ``x <- x + scale_t * v(x, t)``.

    The toy experiment (docs/notation.md §6.1) adds ``v(x, t) = -0.01 x`` "at every step". We read this as a
    displacement of the state per reverse step (not as a term added to the score, which the DDPM step
    would multiply by β_t and make ~100x weaker); with this reading the exact-score W1 under drift is of
    the paper's size (see docs/RESULTS.md).

    Args:
        v: ``(x, t) -> Tensor`` of x's shape; ``t`` is ``(B,)`` int64.
        scale: multiplies v; a :class:`Strength` gives a schedule over t.
        placement: ``"pre"`` (default; applied to x_t before the reverse step from t, so the final output
            has passed through the last reverse step) or ``"post"`` (applied to x_{t_prev} after it, including
            the final output).
    """

    def __init__(self, v: Callable[[Tensor, Tensor], Tensor], scale: float | Strength = 1.0, placement: str = "pre"):
        self.v = v
        self.strength = scale if isinstance(scale, Strength) else Strength(float(scale))
        self.placement = _check_placement(placement)

    def correct(self, x: Tensor, t: Tensor, ctx: StepContext) -> Tensor:
        if not self.strength.active(t):
            return x
        dx = self.v(x, t)
        if dx.shape != x.shape:
            raise ValueError(f"drift v(x, t) returned shape {tuple(dx.shape)}, expected {tuple(x.shape)}")
        return x + self.strength(t, ctx.schedule, x) * dx



class LinearDrift(Drift):
    """``v(x, t) = coef * x``; the toy experiment uses ``coef = -0.01`` (docs/notation.md §6.1)."""

    def __init__(self, coef: float = -0.01, placement: str = "pre"):
        self.coef = float(coef)
        super().__init__(lambda x, t: self.coef * x, 1.0, placement)


class Corruption(Corrector):
    """Corrupt the state with fresh Gaussian noise at every step: ``x_t <- x_t + std * z``, ``z ~ N(0, I)``.

    This is line 3 of the paper's Alg. 2 (the corrupted reverse process, App. E.2), applied before each reverse
    step (``placement="pre"``). ``std`` is the paper's corruption σ (0.05 ... 0.3), unrelated to the step's
    noise std and to sigma-space σ. Noise comes from ``ctx.randn_like``, so per-sample seeds keep samples
    independent of the batch.

    Raises:
        ValueError: if ``std`` is negative or not finite.
    """

    def __init__(self, std: float, placement: str = "pre"):
        if not (isinstance(std, int | float) and 0 <= std < float("inf")):
            raise ValueError(f"corruption std must be a finite number >= 0, got {std!r}")
        self.std = float(std)
        self.placement = _check_placement(placement)

    def correct(self, x: Tensor, t: Tensor, ctx: StepContext) -> Tensor:
        if self.std == 0.0 or is_clean(t, ctx):
            return x
        return x + self.std * ctx.randn_like(x)



