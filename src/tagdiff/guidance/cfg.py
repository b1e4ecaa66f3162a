r"""Classifier-free guidance and its family as tagdiff terms, composable with TAG and with each other.

One conditional network gives ε(x, c) and ε(x, ∅) (trained with label dropout). The loop evaluates the model once
with ``ctx.cond`` (the conditional branch, ε_c); each term here evaluates the unconditional branch ε_u itself (one
extra model call with ``null_cond`` replacing keys of ``ctx.cond``; shared between the terms of one step) and
returns the score correction that turns ε_c into its guided ε̂::

    Δs = -(ε̂ - ε_c) / sqrt(1 - ᾱ_t)        (so that ε_c - sqrt(1 - ᾱ_t) Δs = ε̂; tagdiff.terms)

Scale convention: diffusers' (``ε̂ = ε_u + s (ε_c - ε_u)``): **s = 1 is the conditional model** and gives Δs = None,
i.e. the conditional sampler bit for bit; s = 0 is the unconditional model.

* :class:`ClassifierFreeGuidance` (Ho & Salimans 2022, arXiv 2207.12598), with optional rescaling
  (``rescale`` φ: Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", §3.4; equal to
  diffusers' ``rescale_noise_cfg``).
* :class:`CFGZeroStar` (Fan et al. 2025, "CFG-Zero*", arXiv 2503.18886): the optimised scale α* = <ε_c, ε_u> /
  ‖ε_u‖² on the unconditional branch (diffusers' ``ClassifierFreeZeroStarGuidance``), on the velocity of a flow
  model; its "zero-init" (a zero velocity for the first steps) for flow-matching models only.
* :class:`AdaptiveProjectedGuidance` (Sadat et al. 2024, "Eliminating Oversaturation and Artifacts of High
  Guidance Scales in Diffusion Models", arXiv 2410.02416): equal to diffusers' ``AdaptiveProjectedGuidance``
  guider on the same inputs (``space="eps"``); ``space="x0"`` applies it to the x̂_0 predictions as the paper does.
* Guidance interval (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample and
  Distribution Quality in Diffusion Models", arXiv 2404.07724): every term here takes ``window`` (inclusive
  training timesteps ``(t_min, t_max)``; :func:`interval_from_sigma` converts the paper's σ interval) and
  ``step_fractions`` (fractions ``(start, stop)`` of the step count, diffusers guiders' ``start`` / ``stop``: active
  at step ``i`` with ``int(start N) <= i < int(stop N)``). Outside, the term is off: the conditional model.
* :class:`CFGPlusPlus` (Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free Guidance for Diffusion
  Models", arXiv 2406.08070) changes the DDIM *renoising* direction (x̂_0 from the guided ε, renoised with ε_u),
  which no ε̂ alone expresses: it is a :class:`~tagdiff.terms.StepTerm` (see its docstring for where it runs).

Null condition: ``null_cond`` maps the model's conditioning keywords to their null value, e.g. ``{"y": 10}`` for a
class-conditional ``UNet2DModel`` with ``num_class_embeds = 11`` whose class 10 is the dropped label (an int is
expanded to a ``(B,)`` int64 tensor), or ``{"encoder_hidden_states": negative_prompt_embeds}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..sampling.predictions import FLOW_PREDICTION, eps_and_x0, model_prediction_type
from ..sampling.schedules import VPSchedule
from ..sampling.terms import ScoreTerm, StepContext, StepTerm, Strength

__all__ = ["APGMomentum", "AdaptiveProjectedGuidance", "CFGPlusPlus", "CFGZeroStar", "ClassifierFreeGuidance",
           "interval_from_sigma"]


def interval_from_sigma(schedule: VPSchedule, sigma_low: float, sigma_high: float) -> tuple[int, int]:
    """The inclusive training-timestep window ``(t_min, t_max)`` whose σ = sqrt((1 - ᾱ)/ᾱ) lies in
    ``(sigma_low, sigma_high]`` (Kynkäänniemi et al. 2024 state their interval in σ, e.g. (0.28, 5.42] for EDM2-S).

    Raises:
        ValueError: for ``sigma_low >= sigma_high``, a negative σ, or an interval containing no training timestep.
    """
    if not 0 <= sigma_low < sigma_high:
        raise ValueError(f"need 0 <= sigma_low < sigma_high, got ({sigma_low}, {sigma_high})")
    sig = schedule.sigma(torch.arange(schedule.num_train_timesteps))
    inside = ((sig > sigma_low) & (sig <= sigma_high)).nonzero().reshape(-1)
    if inside.numel() == 0:
        raise ValueError(f"no training timestep has sigma in ({sigma_low}, {sigma_high}] "
                         f"(range {float(sig.min()):.3g} .. {float(sig.max()):.3g})")
    return int(inside.min()), int(inside.max())


def _check_step_fractions(step_fractions: tuple[float, float] | None) -> tuple[float, float] | None:
    if step_fractions is None:
        return None
    start, stop = step_fractions
    if not (isinstance(start, int | float) and isinstance(stop, int | float) and 0 <= start <= stop <= 1):
        raise ValueError(f"step_fractions must be (start, stop) with 0 <= start <= stop <= 1, got {step_fractions!r}")
    return float(start), float(stop)


class _TwoBranch:
    """What the CFG family shares: guidance scale, null condition, interval, the unconditional branch."""

    def __init__(self, guidance_scale: float, null_cond: Mapping[str, Any], window: tuple[int, int] | None,
                 step_fractions: tuple[float, float] | None):
        if not isinstance(null_cond, Mapping) or not null_cond:
            raise ValueError(f"null_cond must be a non-empty dict of conditioning keywords, got {null_cond!r}")
        self.strength = Strength(float(guidance_scale), "constant", window)
        self.null_cond = dict(null_cond)
        self.step_fractions = _check_step_fractions(step_fractions)

    @property
    def guidance_scale(self) -> float:
        return self.strength.scale

    def is_active(self, t: Tensor, ctx: StepContext) -> bool:
        """False outside ``window`` (training timesteps) and ``steps`` (fractions of the step count).

        Raises:
            ValueError: ``step_fractions`` outside a sampler loop (``ctx.i`` unknown).
        """
        if self.strength.window is not None and not self.strength.active(t):
            return False
        if self.step_fractions is not None:
            if ctx.i is None or ctx.num_steps is None:
                raise ValueError("a guidance interval in step fractions (step_fractions=...) needs a sampler loop; "
                                 "use window=(t_min, t_max) in training timesteps outside one")
            start, stop = (int(f * ctx.num_steps) for f in self.step_fractions)
            return start <= ctx.i < stop
        return True

    def inside(self, t: Tensor, ctx: StepContext, x: Tensor) -> Tensor | None:
        """Per-sample mask ``(B, 1, ..)`` of samples inside ``window``, or ``None`` when all are."""
        if self.strength.window is None:
            return None
        return Strength(1.0, "constant", self.strength.window)(t, ctx.schedule, x) != 0

    def uncond(self, x: Tensor, t: Tensor, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """``(ε_u, x̂_0,u)`` of the unconditional branch at ``x`` (detached; one model call per step and null
        condition, shared through ``ctx.shared``)."""
        key = ("cfg_uncond", tuple(sorted(self.null_cond)))
        hit = ctx.shared.get(key)
        if hit is not None and hit[0] is x and hit[1] == repr(self.null_cond):
            return hit[2], hit[3]
        cond = dict(ctx.cond)
        for k, v in self.null_cond.items():
            if isinstance(v, int) and not isinstance(v, bool):
                v = torch.full((x.shape[0],), v, dtype=torch.long, device=x.device)
            cond[k] = v
        model_t = t if ctx.model_t is None else ctx.model_t
        with torch.no_grad():
            raw = ctx.eps_model(x.detach(), model_t, **cond)
            eps_u, x0_u = eps_and_x0(raw, x.detach(), ctx.ab_t(x), model_prediction_type(ctx.eps_model))
        ctx.shared[key] = (x, repr(self.null_cond), eps_u, x0_u)
        return eps_u, x0_u

    @staticmethod
    def cond_eps(x: Tensor, x0_hat: Tensor, ab: Tensor) -> Tensor:
        """ε_c from the loop's (unguided, conditional) x̂_0: ``(x - sqrt(ᾱ) x̂_0) / sqrt(1 - ᾱ)``, detached."""
        return ((x - ab.sqrt() * x0_hat) / (1 - ab).sqrt()).detach()


class ClassifierFreeGuidance(_TwoBranch, ScoreTerm):
    """Classifier-free guidance ``ε̂ = ε_u + s (ε_c - ε_u)`` (Ho & Salimans 2022) as a score term.

    Args:
        guidance_scale: s (1 = the conditional model, exactly; 0 = unconditional). Typical 1.5-8.
        null_cond: the null condition (module docstring), e.g. ``{"y": num_classes}``.
        window, step_fractions: the guidance interval (module docstring); outside it the conditional model.
        rescale: φ in [0, 1] of rescaled CFG (Lin et al. 2024 §3.4, diffusers' ``guidance_rescale``): the guided ε̂
            is rescaled to ε_c's per-sample std and mixed, ``φ ε̂ std(ε_c)/std(ε̂) + (1 - φ) ε̂``.

    Shapes: the model's ``(B, *D)``; the null branch is called with ``ctx.model_t`` and ``ctx.cond`` updated by
    ``null_cond``.

    Raises:
        ValueError: a non-finite scale, an empty null condition, a bad window / step_fractions / rescale.
    """

    def __init__(self, guidance_scale: float, null_cond: Mapping[str, Any], *, window: tuple[int, int] | None = None,
                 step_fractions: tuple[float, float] | None = None, rescale: float = 0.0):
        super().__init__(guidance_scale, null_cond, window, step_fractions)
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"rescale must be in [0, 1], got {rescale}")
        self.rescale = float(rescale)

    def combine(self, eps_c: Tensor, eps_u: Tensor) -> Tensor:
        """The guided ε̂ from the two branches (subclasses change this)."""
        return eps_u + self.guidance_scale * (eps_c - eps_u)

    def delta_score(self, x: Tensor, t: Tensor, x0_hat: Tensor, ctx: StepContext) -> Tensor | None:
        if self.guidance_scale == 1.0 or not self.is_active(t, ctx):
            return None
        ab = ctx.ab_t(x)
        eps_c = self.cond_eps(x, x0_hat, ab)
        eps_u, _ = self.uncond(x, t, ctx)
        eps = self.combine(eps_c, eps_u)
        if self.rescale > 0:
            dims = list(range(1, eps.ndim))
            eps_r = eps * (eps_c.std(dim=dims, keepdim=True) / eps.std(dim=dims, keepdim=True))
            eps = self.rescale * eps_r + (1 - self.rescale) * eps
        delta = -(eps - eps_c) / (1 - ab).sqrt()
        mask = self.inside(t, ctx, x)
        return delta if mask is None else torch.where(mask, delta, torch.zeros_like(delta))


class CFGZeroStar(ClassifierFreeGuidance):
    """CFG-Zero* (Fan et al. 2025, arXiv 2503.18886, Alg. 1): ``pred = α* pred_u + s (pred_c - α* pred_u)`` with the
    per-sample optimised scale ``α* = <pred_c, pred_u> / (‖pred_u‖² + 1e-8)`` (diffusers' ``cfg_zero_star_scale``, in
    float32), on the model's own prediction: the velocity v of a flow-matching model (what the paper and diffusers'
    ``ClassifierFreeZeroStarGuidance`` use on SD3 / Flux), ε for a VP ε-model. s = 1 is the conditional model.

    Args:
        guidance_scale, null_cond, window, step_fractions, rescale: as :class:`ClassifierFreeGuidance`.
            (``rescale`` on VP models only.)
        zero_init_steps: flow models only: the guided velocity is zero for the first ``zero_init_steps`` sampler
            steps (the paper's "zero-init"; diffusers' guider defaults to 1), so the state stays where it started.

    Raises:
        ValueError: ``zero_init_steps`` < 0, or > 0 with a model that is not a flow model (at the first step: a zero
            ε has no meaning for a VP model); as :class:`ClassifierFreeGuidance` otherwise.
    """

    def __init__(self, guidance_scale: float, null_cond: Mapping[str, Any], *, window: tuple[int, int] | None = None,
                 step_fractions: tuple[float, float] | None = None, rescale: float = 0.0, zero_init_steps: int = 0):
        super().__init__(guidance_scale, null_cond, window=window, step_fractions=step_fractions, rescale=rescale)
        if isinstance(zero_init_steps, bool) or not isinstance(zero_init_steps, int) or zero_init_steps < 0:
            raise ValueError(f"zero_init_steps must be an integer >= 0, got {zero_init_steps!r}")
        self.zero_init_steps = zero_init_steps

    def combine(self, eps_c: Tensor, eps_u: Tensor) -> Tensor:
        c, u = eps_c.flatten(1).float(), eps_u.flatten(1).float()
        alpha = ((c * u).sum(1, keepdim=True) / ((u**2).sum(1, keepdim=True) + 1e-8)).to(eps_c.dtype)
        eps_u = eps_u * alpha.reshape(-1, *([1] * (eps_c.ndim - 1)))
        return eps_u + self.guidance_scale * (eps_c - eps_u)

    def delta_score(self, x: Tensor, t: Tensor, x0_hat: Tensor, ctx: StepContext) -> Tensor | None:
        flow = model_prediction_type(ctx.eps_model) == FLOW_PREDICTION
        if self.zero_init_steps and not flow:
            raise ValueError("CFGZeroStar(zero_init_steps=...) is for flow-matching models (a zero velocity); this "
                             "model predicts ε: use zero_init_steps=0")
        zero = ctx.i is not None and ctx.i < self.zero_init_steps
        if not flow:
            return super().delta_score(x, t, x0_hat, ctx)
        if self.rescale > 0:
            raise ValueError("CFGZeroStar(rescale=...) rescales ε; on a flow-matching model use rescale=0")
        if (self.guidance_scale == 1.0 and not zero) or not self.is_active(t, ctx):
            return None
        ab = ctx.ab_t(x)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        eps_c = self.cond_eps(x, x0_hat, ab)
        eps_u, x0_u = self.uncond(x, t, ctx)
        v = torch.zeros_like(eps_c) if zero else self.combine(eps_c - x0_hat.detach(), eps_u - x0_u)
        eps = (x.detach() + a * v) / (a + s)      # the VP view's ε of velocity v (sampling/predictions.eps_and_x0)
        delta = -(eps - eps_c) / s
        mask = self.inside(t, ctx, x)
        return delta if mask is None else torch.where(mask, delta, torch.zeros_like(delta))


class APGMomentum:
    """The running average of APG's momentum (Sadat et al. 2024 §4; diffusers' ``MomentumBuffer``):
    ``avg <- diff + momentum · avg`` once per model call. tagdiff terms are stateless, so the buffer is this explicit
    object, passed to :class:`AdaptiveProjectedGuidance`: it resets itself when a new sampling run starts (as the
    guider does at step 0), or call :meth:`reset`. Second-order schedulers update it at both model calls of a step,
    as diffusers does. Use one buffer per sampling run at a time (the paper uses
    momentum = -0.5)."""

    def __init__(self, momentum: float):
        if not math.isfinite(momentum):
            raise ValueError(f"momentum must be finite, got {momentum}")
        self.momentum = float(momentum)
        self.reset()

    def reset(self) -> None:
        self.running_average: Tensor | float = 0.0
        self.step: int | None = None
        self.run: Any = None

    def update(self, diff: Tensor, step: int | None, run: Any = None) -> Tensor:
        """Fold ``diff`` into the average and return it. A new run (``run``, the loop's grid tensor, is another
        object than last time) or a step index lower than the last one resets the buffer first."""
        if (run is not None and run is not self.run) or (step is not None and self.step is not None
                                                          and step < self.step):
            self.reset()
        self.step, self.run = step, run
        self.running_average = diff + self.momentum * self.running_average
        return self.running_average


class AdaptiveProjectedGuidance(_TwoBranch, ScoreTerm):
    """Adaptive Projected Guidance (Sadat et al. 2024), equal to diffusers' ``AdaptiveProjectedGuidance`` guider
    (native formulation, default ``norm_dim``) on the same two predictions.

    With D = pred_c - pred_u (after momentum), rescaled to norm ≤ r per sample, split into the part parallel to
    pred_c and the orthogonal rest: ``pred = pred_u + s (D_⊥ + η D_∥)``. s = 1 is the conditional model (as the
    guider, which switches itself off at s = 1).

    Args:
        guidance_scale: s. null_cond, window, step_fractions: as :class:`ClassifierFreeGuidance`.
        parallel_weight: η of the APG paper and diffusers' ``eta``: the weight of the parallel component (diffusers'
            default 1; the paper's 0).
        norm_threshold: r (diffusers' ``adaptive_projected_guidance_rescale``, default 15); 0 disables.
        momentum: ``None`` or an :class:`APGMomentum` buffer (diffusers' ``adaptive_projected_guidance_momentum``).
        space: ``"eps"`` (what the model's ε-predictions are, as the guider in diffusers pipelines) or ``"x0"``
            (the x̂_0 predictions, as in the paper).

    Raises:
        ValueError: a bad space / threshold, and as :class:`ClassifierFreeGuidance`.
    """

    def __init__(self, guidance_scale: float, null_cond: Mapping[str, Any], *, parallel_weight: float = 1.0,
                 norm_threshold: float = 15.0,
                 momentum: APGMomentum | None = None, space: str = "eps", window: tuple[int, int] | None = None,
                 step_fractions: tuple[float, float] | None = None):
        super().__init__(guidance_scale, null_cond, window, step_fractions)
        if space not in ("eps", "x0"):
            raise ValueError(f"space must be 'eps' or 'x0', got {space!r}")
        if not norm_threshold >= 0:
            raise ValueError(f"norm_threshold must be >= 0, got {norm_threshold}")
        if momentum is not None and not isinstance(momentum, APGMomentum):
            raise ValueError(f"momentum must be None or an APGMomentum buffer, got {momentum!r}")
        self.parallel_weight, self.norm_threshold = float(parallel_weight), float(norm_threshold)
        self.momentum, self.space = momentum, space

    def project(self, pred_c: Tensor, pred_u: Tensor, ctx: StepContext | None = None) -> Tensor:
        """The guided prediction from the two branches (diffusers' ``normalized_guidance``)."""
        diff = pred_c - pred_u
        dims = list(range(1, diff.ndim))
        if self.momentum is not None:
            diff = self.momentum.update(diff, None if ctx is None else ctx.i, None if ctx is None else ctx.timesteps)
        if self.norm_threshold > 0:
            diff = diff * torch.minimum(torch.ones_like(diff), self.norm_threshold / diff.norm(p=2, dim=dims,
                                                                                              keepdim=True))
        v0, v1 = diff.double(), torch.nn.functional.normalize(pred_c.double(), dim=dims)
        parallel = (v0 * v1).sum(dim=dims, keepdim=True) * v1
        update = (v0 - parallel).to(diff.dtype) + self.parallel_weight * parallel.to(diff.dtype)
        return pred_u + self.guidance_scale * update

    def delta_score(self, x: Tensor, t: Tensor, x0_hat: Tensor, ctx: StepContext) -> Tensor | None:
        if math.isclose(self.guidance_scale, 1.0) or not self.is_active(t, ctx):
            return None
        ab = ctx.ab_t(x)
        eps_c = self.cond_eps(x, x0_hat, ab)
        eps_u, x0_u = self.uncond(x, t, ctx)
        if self.space == "eps":
            eps = self.project(eps_c, eps_u, ctx)
        else:
            eps = (x.detach() - ab.sqrt() * self.project(x0_hat.detach(), x0_u, ctx)) / (1 - ab).sqrt()
        delta = -(eps - eps_c) / (1 - ab).sqrt()
        mask = self.inside(t, ctx, x)
        return delta if mask is None else torch.where(mask, delta, torch.zeros_like(delta))


class CFGPlusPlus(_TwoBranch, StepTerm):
    r"""CFG++ (Chung et al. 2024, Eq. 9): the DDIM step with x̂_0 from the guided ε and the *unconditional* ε as the
    renoising direction::

        ε^λ    = ε_u + λ (ε_c - ε_u)
        x_prev = sqrt(ᾱ_prev) (x - sqrt(1 - ᾱ_t) ε^λ) / sqrt(ᾱ_t) + sqrt(1 - ᾱ_prev) ε_u

    ε_c is the loop's guided ε̂ (the conditional model with every score term folded in), so CFG++ composes with
    score terms and with TAG. Runs on a deterministic first-order DDIM update (η = 0, no x̂_0 clipping): tagdiff's
    ``sample_ddim(eta=0)`` and ``DDIMScheduler`` (``eta=0``) through :func:`tagdiff.sample_scheduler`. That update is
    affine in ε, ``x_prev = A x + B ε`` with ``B = sqrt(1 - ᾱ_prev) - A sqrt(1 - ᾱ_t)``: CFG++ hands it the ε_eff with
    ``B ε_eff = x_prev^{CFG++} - A x``, where A (hence ᾱ_prev = A² ᾱ_t, DDIM's ``set_alpha_to_one`` included) is
    read from the update itself with ε = 0. Any other update is refused, not approximated.

    Args:
        guidance_scale: λ (the paper uses λ in [0, 1], e.g. 0.6; λ = 0 is the unconditional DDIM). Must be >= 0.
        null_cond, window, step_fractions: as :class:`ClassifierFreeGuidance`; outside the interval the plain step runs.
        clip_x0: clamp x̂_0^λ to ``[-clip_x0, clip_x0]`` before renoising (the sampler itself must not clip; images
            often need it, see INTEGRATION.md); ``None`` (default) is the paper's update.

    Raises:
        ValueError: a negative λ; at sampling time, a σ-space or multistep scheduler, or an update that is not a
            deterministic DDIM step (DDPM, DDIM with η > 0, x̂_0 clipping).
    """

    def __init__(self, guidance_scale: float, null_cond: Mapping[str, Any], *, window: tuple[int, int] | None = None,
                 step_fractions: tuple[float, float] | None = None, clip_x0: float | None = None):
        if not guidance_scale >= 0:
            raise ValueError(f"CFG++ scale lambda must be >= 0, got {guidance_scale}")
        if clip_x0 is not None and not clip_x0 > 0:
            raise ValueError(f"clip_x0 must be None or > 0, got {clip_x0}")
        super().__init__(guidance_scale, null_cond, window, step_fractions)
        self.clip_x0 = clip_x0

    def step(self, x: Tensor, t: Tensor, t_prev: Tensor, ctx: StepContext, evaluate: Any, update: Any) -> Tensor:
        pred = evaluate(x, t)
        if not self.is_active(t, ctx):
            return update(x, pred.eps_hat, t, t_prev)
        if ctx.stateful_update or ctx.alpha_bar is not None:
            raise ValueError("CFG++ needs a deterministic DDIM update; this scheduler is a multistep or sigma-space "
                             "one (use DDIMScheduler or tagdiff's sample_ddim with eta=0)")
        ab = ctx.ab_t(x)
        zero = update(x, torch.zeros_like(x), t, t_prev)
        flat_x, flat_z = x.flatten(1), zero.flatten(1)
        A = (flat_x * flat_z).sum(1) / (flat_x * flat_x).sum(1)
        resid = (flat_z - A[:, None] * flat_x).norm(dim=1) / flat_z.norm(dim=1).clamp_min(1e-30)
        if bool((resid > 1e-4).any()):
            raise ValueError("CFG++ needs a deterministic DDIM update (eta=0, no x0 clipping); this update is not "
                             f"x_prev = A x + B eps (relative residual {float(resid.max()):.2g})")
        A = A.reshape(-1, *([1] * (x.ndim - 1)))
        ab_prev = (A**2 * ab).clamp(max=1.0)
        eps_u, _ = self.uncond(x, t, ctx)
        eps_lam = eps_u + self.guidance_scale * (pred.eps_hat - eps_u)
        x0_lam = (x - (1 - ab).sqrt() * eps_lam) / ab.sqrt()
        if self.clip_x0 is not None:
            x0_lam = x0_lam.clamp(-self.clip_x0, self.clip_x0)
        target = ab_prev.sqrt() * x0_lam + (1 - ab_prev).sqrt() * eps_u  # the CFG++ x_prev
        eps_eff = (target - A * x) / ((1 - ab_prev).sqrt() - A * (1 - ab).sqrt())
        return update(x, eps_eff, t, t_prev)
