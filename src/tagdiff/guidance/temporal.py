r"""Temporal Alignment Guidance (TAG): the Time-Linked Score as a corrector (docs/notation.md §3).

``TLS(x, t) = ∇_x log p_φ(t | x)`` (Def. 3.1, Eq. 6). TAG moves the state along it with strength ω_t:
``x <- x + ω_t · TLS(x, t)`` (Alg. 1, line 3), with ``ω_t = ω_0 (1 - ᾱ_t)`` by default (§3.2).

Flow models (:func:`tagdiff.sample_flow`) need nothing else: TAG corrects the VP view ``x_σ / r`` at the σ bin t of
the state, with ᾱ_t = ᾱ(σ_t) of :attr:`FlowSchedule.vp_schedule`, so the default is the flow form
``ω_t = ω_0 σ_t² / ((1 - σ_t)² + σ_t²)``; the flow state moves by ``r · ω_t · TLS`` (docs/notation.md §1.6, §2.4).

Placement:

* ``"pre"`` (Alg. 1): correct x_t at the step's own timestep t, before the reverse step.
* ``"post"`` (Alg. 2 / App. E.2): correct x_{t_prev} after the step, targeting t_prev (the training timestep
  the step moved to, not the step index; docs/notation.md §1.3 [INFERRED]). Skipped after the final step (t_prev = -1).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._utils import check_finite
from ..models.load import load
from ..models.time_predictor import TimePredictor
from ..sampling.schedules import VPSchedule
from ..sampling.terms import Corrector, StepContext, Strength, check_context, is_clean

__all__ = ["ADAPTIVE_SIGNALS", "AdaptiveTemporalAlignment", "TemporalAlignment", "check_predictor_schedule",
           "check_time_predictor", "log_prob_from_logits", "tls"]


def _grad_log_prob_t(time_predictor: Callable[..., Tensor], x: Tensor, t: Tensor, c: Tensor | None,
                     shared: dict[str, Any] | None = None) -> Tensor:
    """``∇_x log p_φ(t | x, c)``; with ``shared`` also stores the predictor's logits at ``x`` there (key
    ``"time_logits"``: ``(x, t, c, logits, time_predictor)``), so a Time-Gap recorder of the same step and the same
    predictor need not repeat the forward."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        if shared is None or getattr(type(time_predictor), "log_prob", None) is not TimePredictor.log_prob:
            log_p = time_predictor.log_prob(x_in, t, c)  # a predictor's own log_prob rule: nothing to share
        else:
            logits = time_predictor(x_in, c)
            shared["time_logits"] = (x, t, c, logits.detach(), time_predictor)
            log_p = log_prob_from_logits(logits, t, x.dtype)
        (grad,) = torch.autograd.grad(log_p.sum(), x_in)
    return grad


def log_prob_from_logits(logits: Tensor, t: Tensor, dtype: torch.dtype) -> Tensor:
    """``log softmax(logits)[t]`` per sample, shape ``(B,)``, in ``dtype`` (the :class:`TimePredictor` rule:
    half-precision logits are upcast to float32 first)."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    t = torch.as_tensor(t, device=logits.device).long().reshape(-1).expand(logits.shape[0])
    return torch.log_softmax(logits, dim=-1).gather(1, t[:, None]).squeeze(1).to(dtype)


def tls(time_predictor: Callable[..., Tensor], x: Tensor, t: Tensor, c: Tensor | None = None) -> Tensor:
    """Time-Linked Score ``∇_x log p_φ(t | x[, c])`` per sample (the paper's Eq. 6), shape of ``x``.

    ``time_predictor`` follows :class:`~tagdiff.time_predictor.TimePredictor` (``log_prob(x, t, c) -> (B,)``).
    Equals ``-∇_x CE(f_φ(x), t)``. Per sample: log-probs are summed before the gradient, which leaves each
    sample's gradient independent of the others.

    Raises:
        NonFiniteError: if the gradient has NaN/Inf.
    """
    return check_finite(_grad_log_prob_t(time_predictor, x, t, c),
                        f"TLS at t={int(torch.as_tensor(t).reshape(-1)[0])}")


def check_predictor_schedule(time_predictor: Any, schedule: VPSchedule, what: str = "time predictor") -> None:
    """Raise ``ValueError`` (naming both schedules) if the predictor's T, or its recorded schedule's ᾱ (attribute
    ``schedule``, set by :func:`tagdiff.checkpoints.load_model` from the checkpoint's config), differ from
    ``schedule``'s."""
    T = getattr(time_predictor, "num_train_timesteps", None)
    if T is not None and T != schedule.num_train_timesteps:
        raise ValueError(f"{what} has T={T} timestep classes but the schedule has "
                         f"T={schedule.num_train_timesteps}; train the predictor on the model's schedule")
    own = getattr(time_predictor, "schedule", None)
    if isinstance(own, VPSchedule) and own != schedule:
        raise ValueError(f"{what} was trained on schedule {own.describe()} but the diffusion model uses "
                         f"{schedule.describe()}; train the predictor on the model's schedule "
                         "(tagdiff train time-predictor --checkpoint MODEL_DIR)")


def check_time_predictor(time_predictor: Any, x: Tensor, schedule: VPSchedule) -> None:
    """Raise ``ValueError`` if the predictor's schedule differs from ``schedule`` or it rejects x's shape.

    A predictor that records its schedule (attribute ``schedule``, a :class:`VPSchedule`, as every checkpoint
    trained by tagdiff does) must have the model's ᾱ, not only its T: a predictor trained on a cosine schedule
    classifies noise levels that a linear-schedule sampler never visits at the same t.
    """
    check_predictor_schedule(time_predictor, schedule)
    check_input = getattr(time_predictor, "check_input", None)
    if check_input is not None:
        check_input(x)


def _time_predictor(time_predictor: Any) -> Callable[..., Tensor]:
    """A time predictor given as a module, or as a folder / shipped name (loaded with :func:`tagdiff.load`)."""
    if isinstance(time_predictor, str | os.PathLike):
        model = load(time_predictor)
        if not isinstance(model, TimePredictor):
            raise TypeError(f"{time_predictor} holds a {type(model).__name__}, not a time predictor "
                            "(e.g. 'digits/time_predictor', or a folder written by tagdiff train time-predictor)")
        return model
    if not callable(time_predictor):
        raise TypeError(f"time_predictor must be a TimePredictor (or its folder or shipped name), got "
                        f"{type(time_predictor).__name__} {time_predictor!r:.60}")
    return time_predictor


class TemporalAlignment(Corrector):
    """The TAG corrector ``x <- x + ω_t · TLS(x, t)`` (the paper's Alg. 1 / Alg. 2).

    Works with every sampler (tagdiff's and diffusers' schedulers) and on top of any guidance term. ``omega = 0``
    (or a step outside ``window``) returns the state object unchanged, so the corrected sampler reproduces the
    uncorrected one bit for bit.

    Args:
        time_predictor: a :class:`~tagdiff.time_predictor.TimePredictor` (learned, or exact, e.g.
            ``GaussianMixture.time_posterior(schedule)``). Put networks in ``eval()`` mode.
        omega: ω_0, the TAG strength (the paper: ~0.15 for label guidance, ~1 under mild corruption, up to 10²
            under heavy corruption).
        omega_schedule: ``"one_minus_alpha_bar"`` (ω_t = ω_0 (1 - ᾱ_t), the paper's default), ``"constant"``
            or a callable ``(t, schedule) -> (B,)`` weights.
        placement: ``"pre"`` (Alg. 1, default) or ``"post"`` (Alg. 2 / App. E.2; skipped after the last step).
        window: optional inclusive ``(t_min, t_max)`` range of training timesteps where TAG acts.
        condition: optional class condition ``c`` for a conditional predictor p_φ(t | x, c).
        on_nonfinite: ``"raise"`` (default) raises :class:`~tagdiff.NonFiniteError`; ``"skip"`` leaves the
            affected samples uncorrected at that step (documented guard; never produces NaN).

    Raises:
        ValueError: for a bad placement/schedule, or (at sampling time) a predictor whose schedule or input shape
            differs from the model's / the samples'.
    """

    def __init__(self, time_predictor: Callable[..., Tensor], omega: float = 1.0,
                 omega_schedule: str | Callable[[Tensor, VPSchedule], Tensor] = "one_minus_alpha_bar",
                 placement: str = "pre", window: tuple[int, int] | None = None, condition: Tensor | int | None = None,
                 on_nonfinite: str = "raise"):
        if placement not in ("pre", "post"):
            raise ValueError(f"TAG placement must be 'pre' (Alg. 1) or 'post' (Alg. 2), got {placement!r}")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        if isinstance(omega, bool) or not isinstance(omega, int | float) or not math.isfinite(omega) or omega < 0:
            raise ValueError(f"TAG omega must be a finite number >= 0 (ω_0 = 0 turns TAG off), got {omega!r}")
        self.time_predictor = _time_predictor(time_predictor)
        self.strength = Strength(float(omega), omega_schedule, window)
        self.placement = placement
        self.condition = condition
        self.on_nonfinite = on_nonfinite

    @property
    def omega(self) -> float:
        return self.strength.scale

    @property
    def active(self) -> bool:
        return not self.strength.is_zero

    def check(self, x: Tensor, schedule: VPSchedule) -> None:
        check_time_predictor(self.time_predictor, x, schedule)

    def evaluation_point(self, x: Tensor, t: Tensor, ctx: StepContext | None) -> Tensor:
        """Where the TLS is evaluated: x itself (subclasses move it, e.g. :class:`MultiConditionTAG`)."""
        return x

    def tls_step(self, x: Tensor, t: Tensor, schedule: VPSchedule, ctx: StepContext | None = None) -> Tensor:
        """The displacement ``ω_t · TLS`` at timesteps ``t`` (shape ``(B,)``), shape of x; zeros where ω_t = 0.

        Non-finite TLS entries raise, or with ``on_nonfinite="skip"`` give zero for the affected samples.

        Raises:
            TypeError: if ``schedule`` is not a :class:`VPSchedule` or ``ctx`` not a :class:`StepContext` / None.
        """
        if not isinstance(schedule, VPSchedule):
            hint = " (pass ctx.schedule)" if isinstance(schedule, StepContext) else ""
            raise TypeError(f"{type(self).__name__}.tls_step: schedule must be a VPSchedule, got "
                            f"{type(schedule).__name__}{hint}")
        check_context(ctx, f"{type(self).__name__}.tls_step", optional=True)
        c = None if self.condition is None else torch.as_tensor(self.condition, device=x.device)
        point = self.evaluation_point(x, t, ctx)
        shared = ctx.shared if ctx is not None and point is x else None
        grad = _grad_log_prob_t(self.time_predictor, point, t, c, shared)
        ok = torch.isfinite(grad).reshape(x.shape[0], -1).all(-1)
        if self.on_nonfinite == "raise":
            check_finite(grad, lambda: f"{type(self).__name__} TLS at t={int(t.reshape(-1)[0])}")
        else:
            grad = torch.where(ok.reshape(-1, *([1] * (x.ndim - 1))), grad, torch.zeros_like(grad))
        return self.strength(t, schedule, x) * grad

    def correct(self, x: Tensor, t: Tensor, ctx: StepContext | None = None, *,
                schedule: VPSchedule | None = None) -> Tensor:
        """Apply ``x + ω_t · TLS(x, t)`` at timesteps ``t`` (shape ``(B,)``); identity where ω_t = 0 and after the
        last step (``t = -1``). Outside a sampler loop pass the schedule by keyword instead of ``ctx``:
        ``correct(x, t, schedule=schedule)``.

        Raises:
            TypeError: if ``ctx`` is not a :class:`StepContext` or None (e.g. a schedule passed positionally), or
                neither ``ctx`` nor ``schedule`` is given.
        """
        check_context(ctx, f"{type(self).__name__}.correct", optional=True)
        if ctx is None and schedule is None:
            raise TypeError(f"{type(self).__name__}.correct needs ctx (a StepContext) or schedule=... (a VPSchedule)")
        if not self.strength.active(t) or is_clean(t, ctx):
            return x
        schedule = ctx.schedule if schedule is None else schedule
        step = self.tls_step(x, t, schedule, ctx)
        if ctx is not None:
            ctx.shared.setdefault("tls_norm", []).append(step.reshape(x.shape[0], -1).norm(dim=-1).detach())
        return x + step


ADAPTIVE_SIGNALS = ("confidence", "gap")


class AdaptiveTemporalAlignment(TemporalAlignment):
    """TAG with ω set per step and per sample from the time predictor's own reading of x (the reviewers' question 6;
    not in the paper): ``x <- x + g(x, t) · ω_t · TLS(x, t)`` with the schedule ω_t of :class:`TemporalAlignment` and
    a gain g ∈ [0, 1] from the same logits the TLS is computed from (no extra network call inside a sampler loop,
    so the cost equals TAG's):

    * ``signal="confidence"``: ``g = 1 - p_φ(t | x) / max_t' p_φ(t' | x)``: 0 where the current t is the predictor's
      mode (x sits on its noise level's manifold: no pull), 1 where t is improbable under p_φ(· | x).
    * ``signal="gap"``: ``g = min(1, |argmax_t' p_φ(t' | x) - t| / gap_scale)``: the sample's Time Gap in units of
      ``gap_scale`` training timesteps (default T / 10), saturating at 1.

    Arguments as :class:`TemporalAlignment`, plus ``signal`` and ``gap_scale``. ω_0 is tuned as for TAG: the gain
    only lowers ω_t, so the adaptive rule's best ω_0 is at least the constant rule's.

    Raises:
        ValueError: an unknown signal, ``gap_scale`` not > 0, and as :class:`TemporalAlignment`.
    """

    def __init__(self, time_predictor: Callable[..., Tensor], omega: float = 1.0, *, signal: str = "confidence",
                 gap_scale: float | None = None, **kwargs: Any):
        super().__init__(time_predictor, omega, **kwargs)
        if signal not in ADAPTIVE_SIGNALS:
            raise ValueError(f"signal must be one of {', '.join(ADAPTIVE_SIGNALS)}, got {signal!r}")
        if gap_scale is not None and not (math.isfinite(gap_scale) and gap_scale > 0):
            raise ValueError(f"gap_scale must be > 0 training timesteps, got {gap_scale!r}")
        self.signal, self.gap_scale = signal, gap_scale

    def gain(self, logits: Tensor, t: Tensor) -> Tensor:
        """The per-sample gain ``(B,)`` in [0, 1] from the predictor's logits ``(B, T)`` at timesteps ``t``."""
        logits = logits.detach()
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        t = torch.as_tensor(t, device=logits.device).long().reshape(-1).expand(logits.shape[0])
        if self.signal == "confidence":
            log_p = torch.log_softmax(logits, dim=-1)
            return 1 - (log_p.gather(1, t[:, None]).squeeze(1) - log_p.max(dim=-1).values).exp()
        scale = self.gap_scale if self.gap_scale is not None else logits.shape[-1] / 10
        return ((logits.argmax(-1) - t).abs().to(logits.dtype) / scale).clamp(max=1.0)

    def tls_step(self, x: Tensor, t: Tensor, schedule: VPSchedule, ctx: StepContext | None = None) -> Tensor:
        step = super().tls_step(x, t, schedule, ctx)
        hit = None if ctx is None else ctx.shared.get("time_logits")
        if hit is not None and hit[0] is x and hit[4] is self.time_predictor:
            logits = hit[3]                                  # the TLS forward's logits: no extra call
        else:
            c = None if self.condition is None else torch.as_tensor(self.condition, device=x.device)
            with torch.no_grad():
                logits = self.time_predictor(self.evaluation_point(x, t, ctx), c)
        g = self.gain(logits, t).to(step.dtype)
        if ctx is not None:
            ctx.shared.setdefault("tag_gain", []).append(g)
        return step * g.reshape(-1, *([1] * (x.ndim - 1)))
