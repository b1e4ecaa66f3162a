r"""The core contracts of a guided reverse step: score terms, correctors and step terms (no guidance code here).

Every perturbation, guidance method and corrector is one of three kinds of :class:`Term`. For a reverse step from
timestep ``t`` to ``t_prev`` (the predictor/corrector split of Song et al. 2021, score_sde)::

    x      <- c.pre(x, t, ctx)          for every Corrector c      # state update at fixed t (TAG Alg. 1, Langevin)
    pred    = guided_prediction(x, t)                              # the model once, with every ScoreTerm's Δs:
              eps = eps_hat - sqrt(1 - alpha_bar_t) * Σ term.delta_score(x, t, x0_hat, ctx)
    x_prev  = update(x, eps, t, t_prev)                            # the sampler's step (DDPM, DDIM, a diffusers
                                                                   # scheduler): it knows nothing of guidance
              or, with a StepTerm s:  s.step(x, t, t_prev, ctx, evaluate, update)   (TFG, Time-Shift)
    x_prev <- c.post(x_prev, t_prev, ctx) for every Corrector c    # state update at fixed t_prev (TAG Alg. 2)

* :class:`ScoreTerm` changes ε̂ (classifier guidance, DPS, Epsilon Scaling, CFG): ``delta_score`` returns a
  correction Δs to ∇_x log p_t(x). Folding Δs into ε̂ through ``sqrt(1 - alpha_bar)`` is guided-diffusion's
  ``condition_score`` (docs/notation.md §4.1): ``score = -eps / sqrt(1 - alpha_bar)``.
* :class:`Corrector` changes the state x at a fixed timestep (TAG, Langevin, TCS, corruption, drift):
  ``correct(x, t, ctx)``, applied before the step at ``t`` (``placement="pre"``) or after it at ``t_prev``
  (``"post"``; ``t_prev = -1`` after the last step).
* :class:`StepTerm` replaces the update itself (TFG's x_prev shift and recurrence, the Time-Shift sampler's
  retiming). At most one per sampling run.

Terms are stateless: every per-step quantity arrives through the arguments and the frozen :class:`StepContext`
(``ctx.shared`` is a dict created afresh for each step, through which terms of one step may share results, e.g.
the time predictor's logits between TAG and the Time-Gap recorder). Correctors run in list order, so
``[Drift(...), TemporalAlignment(...)]`` corrects the drifted state while the reverse order drifts after it.

Conventions: VP space (the loops convert σ-space scheduler states before any term sees them), integer training
timesteps ``t`` of shape ``(B,)``, ε-parameterised predictions (models predicting v or x0 are converted by the
loop, see :mod:`tagdiff.predictions`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._utils import RandnLike, append_dims, check_finite
from .predictions import eps_and_x0, model_prediction_type
from .schedules import VPSchedule

__all__ = ["check_context", "Corrector", "is_clean", "Prediction", "ScoreTerm", "StepContext", "StepTerm", "Strength",
           "Term", "guided_eps",
           "guided_eps_and_x0", "guided_prediction", "split_terms", "STRENGTH_SCHEDULES"]

EpsModel = Callable[..., Tensor]
STRENGTH_SCHEDULES = ("constant", "one_minus_alpha_bar", "sqrt_one_minus_alpha_bar")


@dataclass(frozen=True)
class StepContext:
    """What a term may read about the step it acts in. Built fresh by the sampler for each step.

    Attributes:
        schedule: the VP schedule.
        eps_model: the *unguided* model ``(x, t, **cond) -> output`` (ε, or v / x0 where the model says so through
            a ``prediction_type`` attribute; use :func:`tagdiff.predictions.eps_and_x0` to convert).
        cond: keyword conditioning passed to the model.
        randn_like: noise source ``x -> N(0, I)`` of x's shape (per-sample generators keep batch independence).
        t: current training timestep, shape ``(B,)``, int64.
        t_prev: timestep the step moves to, shape ``(B,)``; ``-1`` at the final step (clean data).
        i: step index in ``[0, num_steps)``; ``None`` outside a sampler loop.
        num_steps: number of reverse steps; ``None`` outside a sampler loop.
        timesteps: the sampler's whole grid of training timesteps, shape ``(num_steps,)``, decreasing; ``None``
            outside a sampler loop (TFG normalises its ρ/μ schedules over it).
        model_t: the timestep handed to the model, shape ``(B,)``: equal to ``t`` in tagdiff's own loop, the
            scheduler's (possibly float) timestep in :func:`tagdiff.scheduler_loop.sample_scheduler`.
        alpha_bar: ᾱ of the state entering the step, shape ``(B, 1, ..., 1)`` is built on use; ``None`` means
            ``schedule.alpha_bar_at(t)``. σ-space schedulers with float timesteps set the exact value.
        stateful_update: True when ``update`` keeps history between calls (multistep solvers): step terms that
            would call it twice per step (recurrence) must refuse.
        retain_graph: whether a score term's ``autograd.grad`` must keep the model graph for a later user (set by
            :func:`guided_prediction`; a term never needs to decide this itself).
        shared: per-step scratch dict (see the module docstring).
        final: whether ``t_prev`` is -1 (the step ends at clean data), known to the loop without reading the device;
            ``None`` outside a loop.
        clip_x0: the ``clip_x0`` the sampling loop clamps x̂_0 with inside its update (``sample``/``sample_ddim``/
            ``sample_scheduler``'s argument; a diffusers scheduler's own ``clip_sample`` is not reflected); ``None``
            when it does not clamp, and outside a loop. :class:`~tagdiff.guidance.TFGGuidance` follows it by default.
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
    model_t: Tensor | None = None
    alpha_bar: Tensor | None = None
    stateful_update: bool = False
    retain_graph: bool = True
    shared: dict[str, Any] = field(default_factory=dict)
    final: bool | None = None
    clip_x0: float | None = None

    def ab_t(self, x: Tensor) -> Tensor:
        """ᾱ of the state entering this step, shape ``(B, 1, ..., 1)`` in x's dtype/device: the loop's exact
        ``alpha_bar`` where it set one (σ-space schedulers), else ``schedule.alpha_bar_at(t, x)``."""
        if self.alpha_bar is not None:
            ab = self.alpha_bar.to(device=x.device, dtype=x.dtype).reshape(-1)
            return append_dims(ab.expand(x.shape[0]) if ab.numel() == 1 else ab, x.ndim)
        return self.schedule.alpha_bar_at(self.t, x)


@dataclass(frozen=True)
class Strength:
    """A strength schedule over training timesteps: ``scale * w(t)`` inside ``window``, 0 outside.

    Args:
        scale: base strength (ω_0 for TAG, the guidance scale otherwise).
        schedule: ``"constant"`` (w = 1), ``"one_minus_alpha_bar"`` (w = 1 - ᾱ_t; TAG's default,
            docs/notation.md §3.3), ``"sqrt_one_minus_alpha_bar"`` (w = sqrt(1 - ᾱ_t)), or a callable
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
        if isinstance(self.schedule, str):  # looked up on t's device: no host synchronisation
            ab = schedule.alpha_bar_table(t.device)[t]
            w = {"constant": torch.ones_like(ab), "one_minus_alpha_bar": 1 - ab,
                 "sqrt_one_minus_alpha_bar": (1 - ab).sqrt()}[self.schedule]
        else:
            w = torch.as_tensor(self.schedule(t, schedule), dtype=torch.float64).reshape(-1).to(t.device)
            if w.numel() == 1:
                w = w.expand(t.numel())
        w = self.scale * w
        if self.window is not None:
            inside = (t >= self.window[0]) & (t <= self.window[1])
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


def _describe(value: Any) -> str:
    if isinstance(value, VPSchedule):
        return f"VPSchedule {value.describe()}"
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def check_context(ctx: Any, where: str, *, optional: bool = False) -> None:
    """Raise a one-line ``TypeError`` naming ``ctx`` unless it is a :class:`StepContext` (or ``None`` where
    ``optional``): a schedule passed positionally where a term method takes ``ctx`` would otherwise fail later
    with an unrelated ``AttributeError``."""
    if isinstance(ctx, StepContext) or (optional and ctx is None):
        return
    hint = ""
    if isinstance(ctx, VPSchedule):
        hint = ("; pass the schedule by keyword (schedule=...)" if optional else
                "; wrap it: StepContext(schedule, eps_model, ...)")
    raise TypeError(f"{where}: ctx must be a StepContext{' or None' if optional else ''}, got {_describe(ctx)}{hint}")


def is_clean(t: Tensor, ctx: StepContext | None) -> bool:
    """Whether every entry of ``t`` is -1 (clean data). Where ``t`` is the loop's own ``ctx.t_prev`` the answer comes
    from the loop's plan (``ctx.final``: no device read, no GPU synchronisation), else from the tensor."""
    if ctx is not None and ctx.final is not None:
        if t is ctx.t_prev:
            return ctx.final
        if t is ctx.t:  # a step always starts at a noisy timestep
            return False
    return bool((t < 0).all())


class Term:
    """Base of the three kinds of term (:class:`ScoreTerm`, :class:`Corrector`, :class:`StepTerm`).

    ``check(x, schedule)`` validates shapes/timesteps once before sampling and raises ``ValueError`` if wrong.
    """

    def check(self, x: Tensor, schedule: VPSchedule) -> None:
        return None

    def __repr__(self) -> str:
        fields = {k: v for k, v in vars(self).items() if isinstance(v, int | float | str | tuple | Strength)}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


class ScoreTerm(Term):
    """A term that changes ε̂: ``delta_score(x, t, x0_hat, ctx) -> Δs`` (same shape as x) or ``None``.

    ``x0_hat`` is the *unguided* Tweedie estimate. ``needs_model_grad = True`` means Δs differentiates through
    ``x0_hat(x)``, i.e. through the model (DPS): the loop then evaluates the model with autograd on ``x``. Such a
    term must call ``torch.autograd.grad(..., retain_graph=ctx.retain_graph)``.
    """

    needs_model_grad: bool = False

    def delta_score(self, x: Tensor, t: Tensor, x0_hat: Tensor, ctx: StepContext) -> Tensor | None:
        return None


class Corrector(Term):
    """A term that changes the state x at a fixed timestep: ``correct(x, t, ctx) -> x``.

    ``placement = "pre"`` corrects x_t before the step at the step's own ``t``; ``"post"`` corrects x_{t_prev}
    after it, at ``t_prev`` (``-1`` after the last step: each corrector says what it does there). ``pre`` and
    ``post`` are what the loops call; subclasses override ``correct`` (and set ``placement``). ``pre`` and
    ``post`` refuse a ``ctx`` that is not a :class:`StepContext` (e.g. a schedule) with a ``TypeError``.
    """

    placement: str = "pre"

    @property
    def active(self) -> bool:
        """False when the corrector provably never changes x (e.g. TAG with ω_0 = 0)."""
        return True

    def correct(self, x: Tensor, t: Tensor, ctx: StepContext) -> Tensor:
        return x

    def pre(self, x: Tensor, t: Tensor, ctx: StepContext) -> Tensor:
        check_context(ctx, f"{type(self).__name__}.pre")
        return self.correct(x, t, ctx) if self.placement == "pre" else x

    def post(self, x_prev: Tensor, t_prev: Tensor, ctx: StepContext) -> Tensor:
        check_context(ctx, f"{type(self).__name__}.post")
        return self.correct(x_prev, t_prev, ctx) if self.placement == "post" else x_prev


Evaluate = Callable[..., "Prediction"]
Update = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


class StepTerm(Term):
    """A term that replaces the reverse update: ``step(x, t, t_prev, ctx, evaluate, update) -> x_prev``.

    ``evaluate(x, t, keep_graph=False) -> Prediction`` runs the model with every score term (``keep_graph``
    keeps the unguided x̂_0 as a differentiable function of ``pred.x_in``); ``update(x, eps_hat, t, t_prev)`` is
    the sampler's own step. The default step is ``update(x, evaluate(x, t).eps_hat, t, t_prev)``.
    """

    def step(self, x: Tensor, t: Tensor, t_prev: Tensor, ctx: StepContext, evaluate: Evaluate,
             update: Update) -> Tensor:
        return update(x, evaluate(x, t).eps_hat, t, t_prev)


@dataclass(frozen=True)
class Prediction:
    """One model evaluation with the score terms folded in (see :func:`guided_prediction`).

    Attributes:
        eps_hat: guided ε̂ (every Δs folded in), detached, shape ``(B, *D)``.
        x0_hat: the x̂_0 of ``eps_hat``, detached.
        raw: the model's own output (its ``prediction_type``), detached: loops hand it unchanged to a scheduler
            when no term changed ε̂ (bit-identical to the plain scheduler loop).
        guided: False when no score term contributed (``eps_hat`` is the model's).
        x_in: with ``keep_graph``: the leaf the model was evaluated at (requires grad); else ``None``.
        x0_graph: with ``keep_graph``: the *unguided* x̂_0 as a function of ``x_in``; else ``None``.
    """

    eps_hat: Tensor
    x0_hat: Tensor
    raw: Tensor
    guided: bool = False
    x_in: Tensor | None = None
    x0_graph: Tensor | None = None


def split_terms(terms: Sequence[Term]) -> tuple[list[ScoreTerm], list[Corrector], StepTerm | None]:
    """Sort ``terms`` into ``(score_terms, correctors, step_term)``, keeping list order within each kind.

    Raises:
        TypeError: for an object that is not one of the three kinds.
        ValueError: for more than one :class:`StepTerm` (their updates cannot be composed).
    """
    scores, correctors, steps = [], [], []
    for term in terms:
        if isinstance(term, ScoreTerm):
            scores.append(term)
        elif isinstance(term, Corrector):
            correctors.append(term)
        elif isinstance(term, StepTerm):
            steps.append(term)
        else:
            raise TypeError(f"terms must be tagdiff ScoreTerm, Corrector or StepTerm objects, got "
                            f"{type(term).__name__}")
    if len(steps) > 1:
        raise ValueError(f"at most one step term per sampling run, got {', '.join(type(s).__name__ for s in steps)}")
    return scores, correctors, (steps[0] if steps else None)


def guided_prediction(x: Tensor, t: Tensor, ctx: StepContext, terms: Sequence[ScoreTerm], *,
                      keep_graph: bool = False) -> Prediction:
    """Evaluate the model once at ``(x, ctx.model_t or t)`` and fold every score term's Δs into ε̂.

    The model's output is converted to (ε̂, x̂_0) with its ``prediction_type`` (ε, v or x0; diffusers' formulas,
    :func:`tagdiff.predictions.eps_and_x0`) at ᾱ = ``ctx.ab_t(x)``. Autograd runs only when a term needs the
    model's graph or ``keep_graph`` is set, and each term's ``retain_graph`` is True only if a later user needs it.

    Returns:
        A :class:`Prediction`.

    Raises:
        NonFiniteError: if the model output or any term's Δs has NaN/Inf.
        ValueError: where ε̂ cannot be formed (an ε-model at ᾱ = 0, see :mod:`tagdiff.predictions`).
    """
    graph_users = [i for i, term in enumerate(terms) if term.needs_model_grad]
    needs_grad = keep_graph or bool(graph_users)
    def where() -> str:
        return f"t={int(t.reshape(-1)[0])}"

    model_t = t if ctx.model_t is None else ctx.model_t
    kind = model_prediction_type(ctx.eps_model)
    with torch.enable_grad() if needs_grad else torch.no_grad():
        x_in = x.detach().requires_grad_(needs_grad)
        raw = ctx.eps_model(x_in, model_t, **ctx.cond)
        check_finite(raw.detach(), lambda: f"model output at {where()}")
        ab = ctx.ab_t(x)
        eps_g, x0_g = eps_and_x0(raw, x_in, ab, kind)
        delta = None
        last_user = graph_users[-1] if graph_users else -1
        for i, term in enumerate(terms):
            retain = keep_graph or i < last_user
            term_ctx = ctx if ctx.retain_graph == retain else dataclasses.replace(ctx, retain_graph=retain)
            d = term.delta_score(x_in, t, x0_g, term_ctx)
            if d is not None:
                d = check_finite(d.detach(), lambda term=term: f"{type(term).__name__} Δs at {where()}")
                delta = d if delta is None else delta + d
    eps_hat, x0_hat = eps_g.detach(), x0_g.detach()
    if delta is not None:
        eps_hat = eps_hat - (1 - ab).sqrt() * delta
        x0_hat = (x - (1 - ab).sqrt() * eps_hat) / ab.sqrt()
    return Prediction(eps_hat, x0_hat, raw.detach(), delta is not None,
                      x_in if keep_graph else None, x0_g if keep_graph else None)


def guided_eps_and_x0(x: Tensor, t: Tensor, ctx: StepContext, terms: Sequence[ScoreTerm]) -> tuple[Tensor, Tensor]:
    """``(eps_hat, x0_hat)`` of :func:`guided_prediction`: the guided ε̂ and its x̂_0, detached."""
    pred = guided_prediction(x, t, ctx, terms)
    return pred.eps_hat, pred.x0_hat


def guided_eps(eps_model: EpsModel, schedule: VPSchedule, terms: Sequence[ScoreTerm]) -> EpsModel:
    """Wrap ``eps_model`` into a guided ε-model ``(x, t, **cond) -> eps_hat`` with every score term's Δs folded in.

    For plugging tagdiff's score terms into a foreign loop that calls an ε-model with integer training timesteps
    (the output is always ε, whatever the model's ``prediction_type``). Correctors (TAG, Langevin, ...) move the
    state and step terms replace the update: both need a loop (:func:`tagdiff.sample` or
    :func:`tagdiff.sample_scheduler`, or :class:`tagdiff.diffusers.TAGCallback` inside a pipeline), so they are
    refused here rather than silently dropped.

    Raises:
        TypeError: for a corrector or step term (named in the message), or a non-term.
    """
    for term in terms:
        if not isinstance(term, ScoreTerm):
            kind = "a corrector" if isinstance(term, Corrector) else "a step term" if isinstance(term, StepTerm) \
                else "not a tagdiff term"
            raise TypeError(f"guided_eps accepts score terms only; {type(term).__name__} is {kind} and needs a "
                            "sampling loop (tagdiff.sample or tagdiff.sample_scheduler)")

    def eps_fn(x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        t = schedule.check_timesteps(torch.as_tensor(t).reshape(-1).expand(x.shape[0]))
        ctx = StepContext(schedule=schedule, eps_model=eps_model, cond=cond, t=t)
        return guided_prediction(x, t, ctx, terms).eps_hat

    return eps_fn
