r"""Correction baselines that TAG is compared against (docs/notation.md §5), behind the same :class:`Term` interface.

Swap TAG for a baseline by replacing one entry of ``terms``::

    terms=[DPSGuidance(...), TemporalAlignment(tp)]      # TAG
    terms=[DPSGuidance(...), TimeCorrection(tp)]         # TCS / TACS      (docs/notation.md §5.1, post hook)
    terms=[DPSGuidance(...), EpsilonScaling(1.005)]      # ES              (docs/notation.md §5.2, delta_score)
    terms=[DPSGuidance(...), LangevinCorrector(0.16)]    # PC corrector    (docs/notation.md §5.3, pre hook)
    terms=[DPSGuidance(...), TimeShift(20, 300)]         # Time-Shift      (docs/notation.md §5.4, a step term)

Timestep Guidance and Self-Guidance (docs/notation.md §5.5) are not implemented. Notation: ``ab_t`` -> ᾱ_t,
``eps_hat`` -> ε_θ, ``x0_hat`` -> x̂_0 (Tweedie), ``score`` -> ∇_x log p_t = -ε_θ / sqrt(1 - ᾱ_t).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .._utils import append_dims, check_finite
from ..sampling.predictions import eps_and_x0, model_prediction_type
from ..sampling.schedules import VPSchedule
from ..sampling.terms import Corrector, Evaluate, ScoreTerm, StepContext, StepTerm, Update
from .temporal import check_time_predictor

__all__ = ["EpsilonScaling", "LangevinCorrector", "TimeCorrection", "TimeShift"]


def _check_window(window: tuple[int, int] | None) -> tuple[int, int] | None:
    if window is None:
        return None
    ok = isinstance(window, tuple | list) and len(window) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in window)
    if not ok or window[0] > window[1]:
        raise ValueError(f"window must be (t_min, t_max) integers with t_min <= t_max, got {window!r}")
    return int(window[0]), int(window[1])


def _inside(t: Tensor, window: tuple[int, int] | None) -> Tensor:
    """Per-sample mask ``t >= 0`` and ``t`` within the inclusive window, shape ``(B,)``."""
    ok = t >= 0
    return ok if window is None else ok & (t >= window[0]) & (t <= window[1])


def _per_sample_norm(v: Tensor) -> Tensor:
    return v.reshape(v.shape[0], -1).norm(dim=-1)


class TimeCorrection(Corrector):
    r"""Time Correction Sampler (TCS; Jung et al., NeurIPS 2024, arXiv 2411.00551), a ``post`` hook.

    Follows docs/notation.md §5.1's **[reconstructed]** update rule exactly (TACS has no public code; the rule is
    inferred
    from TAG's description, "a hard temporal reassignment"). After the ordinary step gives x'_{t_prev}::

        t_pred = argmax_s p_φ(s | x')                      # per sample
        x0_hat = (x' - sqrt(1 - ab[t_pred]) eps_θ(x', t_pred)) / sqrt(ab[t_pred])     # Tweedie at t_pred
        x_prev = sqrt(ab[t_prev]) x0_hat + sqrt(1 - ab[t_prev]) z,    z ~ N(0, I) fresh (ctx.randn_like)

    Skipped after the final step (``t_prev = -1``) and where ``t_prev`` is outside ``window``. TACS's "online
    guidance" is DPS on the clean estimate: use ``[DPSGuidance(...), TimeCorrection(tp)]``.

    Units/convention: the re-projection replaces x' by a draw from q(x_{t_prev} | x0_hat). Even with the exact
    predictor and model it is not marginal-preserving: it removes ᾱ_{t_prev} E[Var(x_0 | x')] of variance per
    dimension (small when the data is concentrated relative to the noise, or at low noise). The hard argmax
    saturates: a sample noisier than q_{T-1} gets t_pred = T - 1, where x0_hat is close to the data mean, so its
    content is discarded. One extra model call per corrected step.

    Args:
        time_predictor: a :class:`~tagdiff.time_predictor.TimePredictor` (``predict_t(x, c)`` or logits
            ``(B, T)`` from ``time_predictor(x, c)``), e.g. ``GaussianMixture.time_posterior(schedule)``.
        window: optional inclusive ``(t_min, t_max)`` range of ``t_prev`` where TCS acts.
        clip_x0: clamp x0_hat to ``[-clip_x0, clip_x0]`` (images: 1.0); ``None`` disables.
        condition: optional class condition for a conditional predictor p_φ(t | x, c).

    Raises:
        ValueError: malformed window or non-positive clip_x0; at sampling time a predictor whose T differs.
    """

    def __init__(self, time_predictor: Callable[..., Tensor], window: tuple[int, int] | None = None,
                 clip_x0: float | None = None, condition: Tensor | int | None = None):
        if clip_x0 is not None and not (isinstance(clip_x0, int | float) and clip_x0 > 0):
            raise ValueError(f"clip_x0 must be a positive number or None, got {clip_x0!r}")
        self.time_predictor = time_predictor
        self.window = _check_window(window)
        self.clip_x0 = clip_x0
        self.condition = condition

    def check(self, x: Tensor, schedule: VPSchedule) -> None:
        check_time_predictor(self.time_predictor, x, schedule)

    @torch.no_grad()
    def predict_t(self, x: Tensor) -> Tensor:
        """``t_pred = argmax_s p_φ(s | x)``, shape ``(B,)``, int64 on x's device."""
        c = None if self.condition is None else torch.as_tensor(self.condition, device=x.device)
        predict = getattr(self.time_predictor, "predict_t", None)
        t_pred = predict(x, c) if predict is not None else self.time_predictor(x, c).argmax(-1)
        return t_pred.long().reshape(-1).to(x.device)

    placement = "post"

    @torch.no_grad()
    def correct(self, x_prev: Tensor, t_prev: Tensor, ctx: StepContext) -> Tensor:
        on = _inside(t_prev, self.window)
        if not bool(on.any()):
            return x_prev
        t_pred = ctx.schedule.check_timesteps(self.predict_t(x_prev))
        out = check_finite(ctx.eps_model(x_prev, t_pred, **ctx.cond), "model output at t_pred (TCS)")
        x0_hat = eps_and_x0(out, x_prev, ctx.schedule.alpha_bar_at(t_pred, x_prev),
                            model_prediction_type(ctx.eps_model))[1]
        if self.clip_x0 is not None:
            x0_hat = x0_hat.clamp(-self.clip_x0, self.clip_x0)
        ab_prev = ctx.schedule.alpha_bar_at(t_prev, x_prev)
        x_new = ab_prev.sqrt() * x0_hat + (1 - ab_prev).sqrt() * ctx.randn_like(x_prev)
        return torch.where(append_dims(on, x_prev.ndim), x_new, x_prev)


class EpsilonScaling(ScoreTerm):
    r"""Epsilon Scaling (ES; Ning et al., ICLR 2024, arXiv 2308.15321; code ``forever208/ADM-ES``).

    ``eps_hat <- eps_θ(x_t, t) / λ_t`` with ``λ_t = lam + k (t - (T - 1) / 2)``: linear in the training timestep,
    mean over the T timesteps fixed at ``lam`` (ADM-ES's commented-out linear option); ``k = 0`` is the paper's
    recommended uniform λ. ADM-ES examples use lam ≈ 1.004-1.017 (100 steps); ComfyUI defaults to 1.005.

    Implemented as a score correction: with the unguided ε recovered from ``(x, x0_hat)``,
    ``Δs = (1 - 1/λ_t) eps / sqrt(1 - ᾱ_t)``, which the loop folds into ``eps - sqrt(1 - ᾱ_t) Δs = eps / λ_t``
    (equal to eps / λ_t up to float round-off). It scales the *model's* ε only, not other terms' Δs (their
    corrections are added unscaled). ``lam = 1, k = 0`` returns no correction, so sampling is bit-identical.

    Raises:
        ValueError: ``lam <= 0`` or non-finite ``lam``/``k``; at sampling time λ_t <= 0 somewhere on ``[0, T-1]``.
    """

    def __init__(self, lam: float = 1.005, k: float = 0.0):
        for name, v in (("lam", lam), ("k", k)):
            if not isinstance(v, int | float) or not math.isfinite(v):
                raise ValueError(f"epsilon scaling {name} must be a finite number, got {v!r}")
        if lam <= 0:
            raise ValueError(f"epsilon scaling lam must be > 0, got {lam!r}")
        self.lam, self.k = float(lam), float(k)

    def lam_t(self, t: Tensor, num_train_timesteps: int) -> Tensor:
        """λ_t per sample, shape of ``t``, float64.

        Raises:
            ValueError: if λ_t <= 0 anywhere on the grid ``[0, T-1]``.
        """
        lo = self.lam - abs(self.k) * (num_train_timesteps - 1) / 2
        if lo <= 0:
            raise ValueError(f"epsilon scaling lam={self.lam}, k={self.k} gives λ_t = {lo:.6g} <= 0 on the "
                             f"T={num_train_timesteps} grid; need lam > |k| (T - 1) / 2")
        return self.lam + self.k * (t.to(torch.float64) - (num_train_timesteps - 1) / 2)

    def check(self, x: Tensor, schedule: VPSchedule) -> None:
        self.lam_t(torch.zeros(1), schedule.num_train_timesteps)

    def delta_score(self, x: Tensor, t: Tensor, x0_hat: Tensor, ctx: StepContext) -> Tensor | None:
        if self.lam == 1.0 and self.k == 0.0:
            return None
        lam_t = append_dims(self.lam_t(t.reshape(-1).cpu(), ctx.schedule.num_train_timesteps), x.ndim)
        one_minus_ab = 1 - ctx.schedule.alpha_bar_at(t, x)
        eps_hat = ctx.schedule.eps_from_x0(x, t, x0_hat)
        return (1 - 1 / lam_t).to(device=x.device, dtype=x.dtype) * eps_hat / one_minus_ab.sqrt()


class LangevinCorrector(Corrector):
    r"""Langevin corrector of the predictor-corrector sampler (Song et al. 2021b; score_sde ``LangevinCorrector``).

    A ``pre`` hook at the step's own t: ``n_steps`` times, with z ~ N(0, I) from ``ctx.randn_like``::

        score = -eps_θ(x, t) / sqrt(1 - ᾱ_t)
        step  = 2 α_t (snr ‖z‖ / ‖score‖)²        # α_t = 1 - β_t of the training schedule (score_sde's VP alpha)
        x     = x + step · score + sqrt(2 step) · z

    Units/convention: with ``norms="sample"`` (default) the norms are per sample, so every sample depends only
    on its own state and noise, but the step then depends on x and z: for a D-dim Gaussian each step inflates
    E‖x‖² by ≈ 16 α_t snr² / (D - 2) (relative) and the stationary law is biased by O(1/D) — negligible for images,
    large in 2-D toys. ``norms="batch"`` is score_sde's exact rule (norms averaged over the batch): a common
    step, so q_t is invariant up to O(snr²), at the price of coupling the samples of a batch. One model call per
    Langevin step; the model is evaluated without guidance terms.

    Args:
        snr: signal-to-noise ratio r of the step-size rule (score_sde default 0.16; diffusers 0.15); > 0.
        n_steps: Langevin steps per reverse step, >= 1.
        window: optional inclusive ``(t_min, t_max)`` range of training timesteps where the corrector acts.
        norms: ``"sample"`` (per-sample ‖z‖, ‖score‖) or ``"batch"`` (their batch means, as score_sde).

    Raises:
        ValueError: ``snr <= 0`` or non-finite, ``n_steps < 1``, malformed window, unknown ``norms``.
    """

    def __init__(self, snr: float = 0.16, n_steps: int = 1, window: tuple[int, int] | None = None,
                 norms: str = "sample"):
        if norms not in ("sample", "batch"):
            raise ValueError(f"Langevin norms must be 'sample' or 'batch', got {norms!r}")
        if not isinstance(snr, int | float) or not math.isfinite(snr) or snr <= 0:
            raise ValueError(f"Langevin snr must be a finite number > 0, got {snr!r}")
        if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps < 1:
            raise ValueError(f"Langevin n_steps must be an integer >= 1, got {n_steps!r}")
        self.snr, self.n_steps, self.norms = float(snr), n_steps, norms
        self.window = _check_window(window)

    placement = "pre"

    @torch.no_grad()
    def correct(self, x: Tensor, t: Tensor, ctx: StepContext) -> Tensor:
        on = _inside(t, self.window)
        if not bool(on.any()):
            return x
        alpha = append_dims((1 - ctx.schedule.betas[t.reshape(-1).cpu()]).to(device=x.device, dtype=x.dtype), x.ndim)
        for _ in range(self.n_steps):
            out = check_finite(ctx.eps_model(x, t, **ctx.cond), f"model output at t={int(t[0])} (Langevin)")
            eps_hat = eps_and_x0(out, x, ctx.schedule.alpha_bar_at(t, x), model_prediction_type(ctx.eps_model))[0]
            score = ctx.schedule.score_from_eps(x, t, eps_hat)
            z = ctx.randn_like(x)
            z_norm, s_norm = _per_sample_norm(z), _per_sample_norm(score)
            if self.norms == "batch":
                z_norm, s_norm = z_norm.mean().expand_as(z_norm), s_norm.mean().expand_as(s_norm)
            ratio = z_norm / s_norm.clamp(min=torch.finfo(x.dtype).tiny)
            step = 2 * alpha * append_dims((self.snr * ratio) ** 2, x.ndim)
            step = torch.where(append_dims(on, x.ndim), step, torch.zeros_like(step))
            x = check_finite(x + step * score + (2 * step).sqrt() * z, f"Langevin state at t={int(t[0])}")
        return x


class TimeShift(StepTerm):
    r"""Time-Shift sampler (Li et al., ICLR 2024, "Alleviating exposure bias ... shifted time steps"), a step term:
    ``terms=[..., TimeShift(...)]`` in tagdiff's own loop (diffusers schedulers step on their own grid and refuse it).

    **[INFERRED]** (docs/notation.md §5.4; not checked against the paper's code). At steps with ``t <= cutoff`` (the
    paper
    shifts only in the later, low-noise part of sampling), replace the grid's t per sample by::

        s* = argmin_{s in W} | Var(x) - (ᾱ_s · data_var + 1 - ᾱ_s) |,
        W  = {t - width//2, ..., t + width//2} ∩ (t_prev, T - 1]

    where Var(x) is the per-sample unbiased variance over all non-batch dims (the sample's own mean removed).
    ``data_var = 0`` is the paper's rule (match 1 - ᾱ_s); set it to the clean data's expected per-sample variance
    (same estimator) so on-manifold samples keep s* ≈ t; with ``data_var = 0`` samples of data with non-zero
    variance are always shifted towards larger s. Ties go to the candidate nearest t. The chosen s
    is used for the model call, the score terms and the step; the next step starts from the grid again. Correctors
    of the step run at the grid's t (before the retiming) and t_prev.

    Args:
        width: total width of the search window in training timesteps (int >= 1).
        cutoff: shift only where ``t <= cutoff`` (int >= 0); other steps return t unchanged.
        data_var: per-pixel variance of the clean data (>= 0).

    Returns:
        ``(B,)`` int64 timesteps with ``t_prev < s <= T - 1``.

    Raises:
        ValueError: for a bad width, cutoff or data_var; samples with fewer than 2 values.
    """

    def __init__(self, width: int = 20, cutoff: int = 300, data_var: float = 0.0):
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise ValueError(f"TimeShift width must be an integer >= 1 (training timesteps), got {width!r}")
        if not isinstance(cutoff, int) or isinstance(cutoff, bool) or cutoff < 0:
            raise ValueError(f"TimeShift cutoff must be an integer >= 0, got {cutoff!r}")
        if not isinstance(data_var, int | float) or not math.isfinite(data_var) or data_var < 0:
            raise ValueError(f"TimeShift data_var must be a finite number >= 0, got {data_var!r}")
        self.width, self.cutoff, self.data_var = width, cutoff, float(data_var)

    def __repr__(self) -> str:
        return f"TimeShift(width={self.width}, cutoff={self.cutoff}, data_var={self.data_var})"

    def step(self, x: Tensor, t: Tensor, t_prev: Tensor, ctx: StepContext, evaluate: Evaluate,
             update: Update) -> Tensor:
        if ctx.stateful_update or ctx.alpha_bar is not None:
            raise ValueError("TimeShift retimes steps on tagdiff's integer grid; it cannot drive a diffusers "
                             "scheduler, which steps on its own grid")
        t_used = self.retime(x, t, t_prev, ctx.schedule)
        return update(x, evaluate(x, t_used).eps_hat, t_used, t_prev)

    @torch.no_grad()
    def retime(self, x: Tensor, t: Tensor, t_prev: Tensor, schedule: VPSchedule) -> Tensor:
        """The timestep s* per sample (see the class docstring), shape ``(B,)`` int64."""
        t = torch.as_tensor(t).long().reshape(-1).expand(x.shape[0])
        t_prev = torch.as_tensor(t_prev, device=t.device).long().reshape(-1).expand(x.shape[0])
        if not bool((t <= self.cutoff).any()):
            return t.clone()
        if x[0].numel() < 2:
            raise ValueError(f"TimeShift needs samples with >= 2 values to estimate Var(x), got shape {tuple(x.shape)}")
        T, half = schedule.num_train_timesteps, self.width // 2
        # candidates ordered 0, -1, +1, -2, +2, ...: argmin's first-index tie-break prefers s nearest t
        offsets = torch.tensor([0] + [o for d in range(1, half + 1) for o in (-d, d)], device=t.device)
        cand = t[:, None] + offsets[None]                                          # (B, C)
        valid = (cand > t_prev[:, None]) & (cand <= T - 1)
        ab = schedule.alpha_bar.to(t.device)[cand.clamp(0, T - 1)]
        var = x.detach().reshape(x.shape[0], -1).to(torch.float64).var(dim=1).to(t.device)
        cost = (var[:, None] - (ab * self.data_var + 1 - ab)).abs()
        cost = torch.where(valid, cost, torch.full_like(cost, math.inf))
        s = cand.gather(1, cost.argmin(dim=1, keepdim=True)).squeeze(1)
        return torch.where(t <= self.cutoff, s, t)
