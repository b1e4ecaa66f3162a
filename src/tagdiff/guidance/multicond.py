r"""TAG for several conditions: the multi-condition reparameterisation (docs/notation.md §3.7; the paper's Table 5).

For conditions c_1, …, c_k the guided density factorises as p_t(x | c) ∝ p_t(x) Π_j p(c_j | …) p(t | x, c)
(Eq. 14/36). The time likelihood p(t | x, c) can come from three kinds of predictor (``variant``):

* ``"joint"`` (option a, Eq. 37): a predictor conditioned on every condition, p_φ(t | x, c) with one joint
  condition index (e.g. a combined class id). This is :class:`TemporalAlignment` with ``condition``.
* ``"single"`` (option b, Prop. B.1, Eq. 15/40): a single-condition predictor p_φ(t | x′, c_k), evaluated at
  x′ = x − η_t² ∇_x ℓ_1(A_1(x̂_0(x))), the point that already "reflects" the other condition(s).
* ``"unconditional"`` (option c, Prop. B.2, Eq. 43-44): an unconditional predictor p_φ(t | x″), with x″ reached by
  reparameterising for *every* guided loss in turn (App. B, Alg. 2): x′ = x − η_t² ∇ℓ_1(x̂_0(x)),
  x″ = x′ − η̃_t² ∇_{x′} ℓ_2(x̂_0(x′)), … . With η̃ = η this is Eq. 43-44 with each gradient taken at the
  point it is evaluated at (not chained back to x_t).

Choices where the paper is silent (§12.1 item 2):

* **η_t.** Default ``η_t² = η_0² (1 − ᾱ_t)`` (``reparam_schedule="one_minus_alpha_bar"``): the prior
  p(x_t | x′_t) = N(x′_t, η_t² I) of Prop. B.1 then has a width that is the fraction η_0 of the forward-process
  noise std sqrt(1 − ᾱ_t). It vanishes as t → 0, where x̂_0 ≈ x_t and a fixed step would be a large jump, and it
  mirrors TAG's own ω_t = ω_0 (1 − ᾱ_t) (§3.2). ``"constant"`` (η_t = η_0) and callables are available.
  η̃_t (``reparam_scale_tilde``) defaults to η_t.
* **Gradient through x′.** The TLS is evaluated at the reparameterised point and applied to the state:
  ``x <- x + ω_t ∇_{x′} log p_φ(t | x′, c)|_{x′ = x′(x)}``, with x′ detached. This is the paper's "in practice,
  one updates x_t → x′_t before applying ℓ_t" and the [INFERRED] reading of docs/notation.md §3.7. It avoids a
  second-order
  backward pass through the ε-model and differs from the chained gradient by (I − η_t² ∇²ℓ) only. The state
  itself is not moved to x′: App. B Alg. 1 takes the reverse step from x_t, and the condition guidance proper is
  the job of the DPS/TFG term next to this one (moving x would count it twice).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .._utils import check_finite
from ..sampling.predictions import eps_and_x0, model_prediction_type
from ..sampling.schedules import VPSchedule
from ..sampling.terms import StepContext, Strength
from .temporal import TemporalAlignment, check_time_predictor

__all__ = ["REPARAM_SCHEDULES", "MULTICOND_VARIANTS", "MultiConditionTAG", "combined_loss", "reparameterize"]

LossFn = Callable[[Tensor], Tensor]
REPARAM_SCHEDULES = ("constant", "one_minus_alpha_bar")
MULTICOND_VARIANTS = ("joint", "single", "unconditional")


def _reparam_sq(reparam_scale: float, reparam_schedule: str | Callable[[Tensor, VPSchedule], Tensor]) -> Strength:
    reparam_scale = float(reparam_scale)
    if not math.isfinite(reparam_scale) or reparam_scale < 0:
        raise ValueError(f"reparam_scale must be a finite number >= 0, got {reparam_scale!r}")
    if isinstance(reparam_schedule, str) and reparam_schedule not in REPARAM_SCHEDULES:
        raise ValueError(f"unknown reparam_schedule {reparam_schedule!r}; expected one of "
                         f"{', '.join(REPARAM_SCHEDULES)} "
                         "or a callable (t, schedule) -> weights w(t) with η_t² = η_0² w(t)")
    return Strength(reparam_scale * reparam_scale, reparam_schedule)


def reparameterize(x: Tensor, t: Tensor, loss_fn: LossFn, reparam_scale: float, schedule: VPSchedule,
                   reparam_schedule: str | Callable[[Tensor, VPSchedule], Tensor] = "one_minus_alpha_bar",
                   ctx: StepContext | None = None) -> Tensor:
    """The condition-reflecting point ``x′_t = x_t − η_t² ∇_{x_t} ℓ(·)`` of Prop. B.1 (the paper's Eq. 15/40).

    With ``ctx`` (the paper's practical form) the loss is taken on the Tweedie estimate
    ``x0_hat = x0_from_eps(x, t, ctx.eps_model(x, t, **ctx.cond))`` and the gradient flows through the model, as
    in DPS. Without ``ctx`` the loss is taken on ``x_t`` itself (Prop. B.1's A_1(x_t), e.g. a noise-aware loss).
    Per sample: per-sample losses are summed before ``autograd.grad``.

    Args:
        x: state x_t, shape ``(B, *D)``. t: training timesteps, shape ``(B,)`` int64.
        loss_fn: per-sample loss ``(B, *D) -> (B,)`` (e.g. ``label_loss``; see :func:`combined_loss`).
        reparam_scale: η_0 >= 0. ``reparam_scale = 0`` returns ``x`` itself (bit for bit, no model call).
        schedule: the VP schedule.
        reparam_schedule: ``"one_minus_alpha_bar"`` (η_t² = η_0² (1 − ᾱ_t), default; see the module docstring),
            ``"constant"`` (η_t = η_0), or a callable ``(t, schedule) -> (B,)`` weights w(t), η_t² = η_0² w(t).
        ctx: step context whose ``eps_model``/``cond`` define x0_hat; ``None`` puts the loss on x_t.

    Returns:
        x′_t, shape/dtype of ``x``, detached.

    Raises:
        ValueError: for η < 0 or non-finite, an unknown ``reparam_schedule``, or a loss not shaped ``(B,)``.
        NonFiniteError: if the loss gradient has NaN/Inf.
    """
    reparam_sq = _reparam_sq(reparam_scale, reparam_schedule)
    if reparam_sq.is_zero:
        return x
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        y = x_in if ctx is None else eps_and_x0(ctx.eps_model(x_in, t, **ctx.cond), x_in,
                                                schedule.alpha_bar_at(t, x_in), model_prediction_type(ctx.eps_model))[1]
        loss = loss_fn(y)
        if loss.shape != (x.shape[0],):
            raise ValueError(f"reparameterisation loss must be per-sample with shape ({x.shape[0]},), "
                             f"got {tuple(loss.shape)}")
        (grad,) = torch.autograd.grad(loss.sum(), x_in)
    grad = check_finite(grad, f"reparameterisation gradient at t={int(t.reshape(-1)[0])}")
    return x.detach() - reparam_sq(t, schedule, x) * grad


def combined_loss(*loss_fns: LossFn, weights: Sequence[float] | None = None) -> LossFn:
    """Per-sample ``ℓ(y) = Σ_j w_j ℓ_j(y)``, shape ``(B,)``: TFG's combined guidance sums log-probabilities.

    Raises:
        ValueError: with no loss, a ``weights`` length mismatch, non-finite weights, or (when called) a loss
            not shaped ``(B,)``.
    """
    if not loss_fns:
        raise ValueError("combined_loss needs at least one loss function")
    w = [1.0] * len(loss_fns) if weights is None else [float(v) for v in weights]
    if len(w) != len(loss_fns) or not all(math.isfinite(v) for v in w):
        raise ValueError(f"weights must be {len(loss_fns)} finite numbers, got {weights!r}")

    def loss(y: Tensor) -> Tensor:
        total = None
        for j, (fn, wj) in enumerate(zip(loss_fns, w, strict=True)):
            lj = fn(y)
            if lj.shape != (y.shape[0],):
                raise ValueError(f"loss {j} must be per-sample with shape ({y.shape[0]},), got {tuple(lj.shape)}")
            total = wj * lj if total is None else total + wj * lj
        return total

    return loss


class MultiConditionTAG(TemporalAlignment):
    """TAG corrector for multi-condition guidance: ``x <- x + ω_t ∇_{x′} log p_φ(t | x′, c)``.

    A :class:`TemporalAlignment` whose TLS is evaluated at x′ (:meth:`evaluation_point`); placement, windows and
    ``on_nonfinite`` behave as there.

    x′ is x (``"joint"``), the Prop. B.1 point (``"single"``) or the Prop. B.2 point (``"unconditional"``); see the
    module docstring for the forms, the default η_t and why the TLS is taken w.r.t. x′ and applied to x. Use it
    next to the (summed) DPS/TFG guidance terms of the conditions, e.g. ``[MultiConditionTAG(...),
    DPSGuidance(combined_loss(l1, l2))]``.

    Args:
        time_predictor: ``log_prob(x, t, c) -> (B,)``; conditional ones expose ``num_classes``.
        omega: ω_0. ω_0 = 0 (or a step outside ``window``) returns the state object unchanged.
        variant: ``"joint"``, ``"single"`` or ``"unconditional"``.
        condition: class index (int or ``(B,)`` tensor) fed to the predictor: the joint index (``"joint"``) or the
            last condition c_k (``"single"``); ``-1`` selects the predictor's null embedding. Must be ``None`` for
            ``"unconditional"`` (the predictor is called with ``c=None``).
        losses: per-sample losses ``x0_hat -> (B,)`` of the conditions *not* given to the predictor, reflected in
            order (``"single"``: ℓ_1, …, ℓ_{k−1}; ``"unconditional"``: ℓ_1, …, ℓ_k). Must be empty for ``"joint"``.
        reparam_scale, reparam_scale_tilde: η_0 for the first reparameterisation and η̃_0 for the following ones
            (default η_0).
        reparam_schedule: as in :func:`reparameterize`; shared by η and η̃.
        omega_schedule: ``"one_minus_alpha_bar"`` (ω_t = ω_0 (1 − ᾱ_t), default), ``"constant"`` or a callable.
        window: optional inclusive ``(t_min, t_max)`` range of training timesteps where the term acts.
        through_model: take the losses on x0_hat through the ε-model (default, Eq. 40); False puts them on x_t.
        placement, on_nonfinite: as in :class:`TemporalAlignment` (``"post"`` evaluates x′ at t_prev).

    Raises:
        ValueError: an unknown variant, losses/condition inconsistent with it, η < 0, or a condition outside the
            predictor's classes ``-1..num_classes-1``; at sampling time a predictor whose T or input shape does not
            match, or a ``(B,)`` condition of the wrong batch size.
    """

    def __init__(self, time_predictor: Callable[..., Tensor], omega: float = 1.0, variant: str = "single",
                 condition: Tensor | int | None = None, losses: Sequence[LossFn] = (), reparam_scale: float = 1.0,
                 reparam_scale_tilde: float | None = None,
                 reparam_schedule: str | Callable[[Tensor, VPSchedule], Tensor] = "one_minus_alpha_bar",
                 omega_schedule: str | Callable[[Tensor, VPSchedule], Tensor] = "one_minus_alpha_bar",
                 window: tuple[int, int] | None = None, through_model: bool = True, placement: str = "pre",
                 on_nonfinite: str = "raise"):
        if variant not in MULTICOND_VARIANTS:
            raise ValueError(f"unknown multi-condition variant {variant!r}; expected one of "
                             f"{', '.join(MULTICOND_VARIANTS)}")
        losses = tuple(losses)
        if variant == "joint" and losses:
            raise ValueError(f"variant 'joint' evaluates the predictor at x and takes no losses, got {len(losses)}")
        if variant != "joint" and not losses:
            raise ValueError(f"variant {variant!r} needs at least one loss to reparameterise with (Prop. B.1/B.2)")
        if variant == "unconditional" and condition is not None:
            raise ValueError(f"variant 'unconditional' calls the predictor without a condition, got "
                             f"condition={condition!r}")
        if variant != "unconditional" and condition is None:
            raise ValueError(f"variant {variant!r} needs a condition for the predictor (-1 = null embedding)")
        _check_condition(condition, time_predictor)
        _reparam_sq(reparam_scale, reparam_schedule)
        _reparam_sq(reparam_scale if reparam_scale_tilde is None else reparam_scale_tilde, reparam_schedule)
        super().__init__(time_predictor, omega, omega_schedule, placement, window, condition, on_nonfinite)
        self.variant = variant
        self.losses = losses
        self.reparam_scale = float(reparam_scale)
        self.reparam_scale_tilde = self.reparam_scale if reparam_scale_tilde is None else float(reparam_scale_tilde)
        self.reparam_schedule = reparam_schedule
        self.through_model = through_model

    def check(self, x: Tensor, schedule: VPSchedule) -> None:
        check_time_predictor(self.time_predictor, x, schedule)
        if self.condition is not None and torch.as_tensor(self.condition).numel() not in (1, x.shape[0]):
            raise ValueError(f"condition has {torch.as_tensor(self.condition).numel()} entries; expected 1 or the "
                             f"batch size {x.shape[0]}")

    def reparameterized(self, x: Tensor, t: Tensor, ctx: StepContext) -> Tensor:
        """The point x′ (``"joint"``: x itself) at which the time predictor is evaluated; detached."""
        for j, loss_fn in enumerate(self.losses):
            x = reparameterize(x, t, loss_fn, self.reparam_scale if j == 0 else self.reparam_scale_tilde, ctx.schedule,
                               self.reparam_schedule, ctx if self.through_model else None)
        return x

    def evaluation_point(self, x: Tensor, t: Tensor, ctx: StepContext | None) -> Tensor:
        if not self.losses:
            return x
        if ctx is None:
            raise ValueError(f"MultiConditionTAG variant {self.variant!r} needs the step context (the ε-model)")
        return self.reparameterized(x, t, ctx)


def _check_condition(condition: Tensor | int | None, time_predictor: object) -> None:
    if condition is None:
        return
    c = torch.as_tensor(condition)
    if c.is_floating_point() or c.is_complex() or c.dtype == torch.bool:
        raise ValueError(f"condition must be integer class indices, got dtype {c.dtype}")
    n = getattr(time_predictor, "num_classes", None)
    if not n:
        raise ValueError(f"condition {c.unique().tolist()} given, but the time predictor has no condition classes "
                         f"(num_classes={n!r}); use variant='unconditional'")
    bad = (c < -1) | (c >= n)
    if bad.any():
        raise ValueError(f"condition {c[bad].unique().tolist()} outside the predictor's condition classes "
                         f"0..{n - 1} (-1 = null embedding)")
