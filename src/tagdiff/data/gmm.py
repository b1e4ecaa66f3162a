r"""Isotropic Gaussian mixtures with exact noisy marginals, scores, class and time posteriors.

For ``x_0 ~ Σ_k π_k N(μ_k, s_k² I)`` and ``x_t = a x_0 + sqrt(1 - ᾱ_t) ε`` with ``a = sqrt(ᾱ_t)``, the noisy marginal
is again a mixture: ``p_t(x) = Σ_k π_k N(x; a μ_k, v_k I)`` with ``v_k = ᾱ_t s_k² + 1 - ᾱ_t`` (STYLE.md §2.6). Hence:

* responsibilities / exact classifier: ``r_k(x) = p(y = k | x_t) ∝ π_k N(x; a μ_k, v_k I)``;
* exact score: ``∇ log p_t(x) = Σ_k r_k · (-(x - a μ_k) / v_k)``; exact ε: ``-sqrt(1 - ᾱ_t) · score``;
* exact Tweedie: ``x0_hat = Σ_k r_k [μ_k + (a s_k² / v_k)(x - a μ_k)]``;
* exact time posterior over the T training timesteps, uniform prior: ``p(t | x) ∝ p_t(x)``, so the exact TLS is
  ``∇_x log p(t | x)`` by autograd (the paper's Thm 3.3 is this identity in closed form).

The adapters :meth:`GaussianMixture.eps_model`, :meth:`GaussianMixture.time_posterior` and
:meth:`GaussianMixture.classifier` stand in for the ε-model, the time predictor and the noisy classifier.
Computations run in float64 and return x's dtype.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from ..models.time_predictor import TimePredictor
from ..sampling.schedules import VPSchedule

__all__ = ["ExactTimePosterior", "GaussianMixture", "toy_mixture"]


class GaussianMixture:
    """Mixture ``Σ_k weights[k] N(means[k], stds[k]² I)`` in ``D`` dimensions.

    Args:
        means: shape ``(K, D)``. stds: shape ``(K,)`` (or scalar), > 0. weights: shape ``(K,)``, defaults to uniform.

    Raises:
        ValueError: on inconsistent shapes, non-finite means, non-positive or non-finite stds, or weights that are
            non-finite, negative or do not sum to 1.
    """

    def __init__(self, means: Any, stds: Any = 1.0, weights: Any = None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim != 2:
            raise ValueError(f"means must have shape (K, D), got {tuple(self.means.shape)}")
        if not torch.isfinite(self.means).all():
            raise ValueError(f"means must be finite, got {self.means.tolist()}")
        K = self.means.shape[0]
        stds_ = torch.as_tensor(stds, dtype=torch.float64).reshape(-1)
        if stds_.numel() not in (1, K):
            raise ValueError(f"stds must be a scalar or have shape ({K},), got {stds_.numel()} values")
        self.stds = stds_.expand(K).clone()
        if not ((self.stds > 0) & torch.isfinite(self.stds)).all():
            raise ValueError(f"stds must be finite and > 0, got {self.stds.tolist()}")
        w = (torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None
             else torch.as_tensor(weights, dtype=torch.float64))
        if (w.shape != (K,) or not torch.isfinite(w).all() or (w < 0).any()
                or not abs(float(w.sum()) - 1) <= 1e-9):
            raise ValueError(f"weights must be {K} non-negative numbers summing to 1, got {w.tolist()}")
        self.weights = w

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def num_components(self) -> int:
        return int(self.means.shape[0])

    def to_dict(self) -> dict[str, Any]:
        return {"means": self.means.tolist(), "stds": self.stds.tolist(), "weights": self.weights.tolist()}

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``n`` clean samples. Returns ``(x0 (n, D) float32, labels (n,) int64)``."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k, None] * z).float(), k

    # ------------------------------------------------------------------ exact noisy quantities
    def _check(self, x: Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected (B, {self.dim}) for this {self.dim}-D mixture")

    def _ab(self, t: Tensor, schedule: VPSchedule, B: int) -> Tensor:
        """ᾱ at training timesteps ``t``; a float ``t`` (diffusers' σ-space schedulers) gets the ᾱ of the σ that
        diffusers assigns to it: σ linearly interpolated in t between training timesteps (``np.interp`` in
        ``EulerDiscreteScheduler.set_timesteps``), ᾱ = 1 / (1 + σ²)."""
        t = torch.as_tensor(t).reshape(-1)
        if t.is_floating_point():
            tt = t.detach().cpu().to(torch.float64).clamp(0, schedule.num_train_timesteps - 1)
            table = schedule.sigma(torch.arange(schedule.num_train_timesteps))
            lo = tt.floor().long().clamp(max=schedule.num_train_timesteps - 2)
            sigma = table[lo] + (tt - lo) * (table[lo + 1] - table[lo])
            return (1 / (1 + sigma**2)).expand(B)
        t = schedule.check_timesteps(t, allow_clean=True).expand(B)
        return schedule._alpha_bar_ext[t.cpu()].to(torch.float64)

    def component_log_probs(self, x: Tensor, ab: Tensor) -> Tensor:
        """``log π_k + log N(x; sqrt(ab) μ_k, v_k I)`` for ᾱ values ``ab`` broadcastable to ``(B, …)``.

        ``x``: ``(B, D)``; ``ab``: ``(B,)`` or ``(B, T)``. Returns ``(B, K)`` or ``(B, T, K)``, float64.
        """
        x = x.to(torch.float64)
        ab = ab.to(x.device)
        a = ab.sqrt()[..., None]                                          # (B, [T,] 1)
        v = ab[..., None] * self.stds.to(x.device) ** 2 + (1 - ab[..., None])   # (B, [T,] K)
        mu = self.means.to(x.device)
        xx = (x * x).sum(-1)                                              # (B,)
        xm = x @ mu.T                                                     # (B, K)
        mm = (mu * mu).sum(-1)                                            # (K,)
        if ab.ndim == 2:
            xx, xm = xx[:, None, None], xm[:, None, :]
        else:
            xx = xx[:, None]
        sq = xx - 2 * a * xm + a * a * mm                                # ||x - a μ_k||²
        return self.weights.to(x.device).log() - 0.5 * sq / v - 0.5 * self.dim * torch.log(2 * math.pi * v)

    def log_prob(self, x: Tensor, t: Tensor, schedule: VPSchedule) -> Tensor:
        """Exact ``log p_t(x)``, shape ``(B,)`` float64; ``t = -1`` gives the clean density."""
        self._check(x)
        return torch.logsumexp(self.component_log_probs(x, self._ab(t, schedule, x.shape[0])), -1)

    def class_logits(self, x: Tensor, t: Tensor, schedule: VPSchedule) -> Tensor:
        """Exact ``log p(y = k | x_t)`` (normalised responsibilities), shape ``(B, K)``, x's dtype."""
        self._check(x)
        lp = self.component_log_probs(x, self._ab(t, schedule, x.shape[0]))
        return torch.log_softmax(lp, -1).to(x.dtype)

    def score(self, x: Tensor, t: Tensor, schedule: VPSchedule) -> Tensor:
        """Exact ``∇_x log p_t(x)``, shape ``(B, D)``, x's dtype."""
        self._check(x)
        ab = self._ab(t, schedule, x.shape[0]).to(x.device)
        r = torch.softmax(self.component_log_probs(x, ab), -1)                       # (B, K)
        a = ab.sqrt()[:, None, None]
        v = (ab[:, None] * self.stds.to(x.device) ** 2 + 1 - ab[:, None])[..., None]  # (B, K, 1)
        diff = x.to(torch.float64)[:, None, :] - a * self.means.to(x.device)[None]    # (B, K, D)
        return (r[..., None] * (-diff / v)).sum(1).to(x.dtype)

    def eps(self, x: Tensor, t: Tensor, schedule: VPSchedule) -> Tensor:
        """Exact ``ε = -sqrt(1 - ᾱ_t) · score``, shape ``(B, D)``; requires ``t >= 0``. Float ``t`` as in ``_ab``."""
        if torch.as_tensor(t).is_floating_point():
            ab = self._ab(t, schedule, x.shape[0]).to(device=x.device, dtype=x.dtype)[:, None]
            return -(1 - ab).sqrt() * self.score(x, t, schedule)
        return schedule.eps_from_score(x, torch.as_tensor(t).reshape(-1).expand(x.shape[0]), self.score(x, t, schedule))

    def x0_hat(self, x: Tensor, t: Tensor, schedule: VPSchedule) -> Tensor:
        """Exact Tweedie estimate ``E[x_0 | x_t]``, shape ``(B, D)``."""
        self._check(x)
        ab = self._ab(t, schedule, x.shape[0]).to(x.device)
        r = torch.softmax(self.component_log_probs(x, ab), -1)
        a = ab.sqrt()[:, None, None]
        s2 = self.stds.to(x.device)[None, :, None] ** 2
        v = ab[:, None, None] * s2 + 1 - ab[:, None, None]
        mu = self.means.to(x.device)[None]
        post = mu + (a * s2 / v) * (x.to(torch.float64)[:, None, :] - a * mu)
        return (r[..., None] * post).sum(1).to(x.dtype)

    def time_logits(self, x: Tensor, schedule: VPSchedule) -> Tensor:
        """``log p_t(x)`` for every training timestep, shape ``(B, T)``: logits of the exact time posterior
        under a uniform prior over ``{0, …, T-1}``. Differentiable in x; computed in x's dtype (at least
        float32: the (B, T) table dominates the toy benchmark's cost; pass float64 x for float64 accuracy).

        Each component's log-density is linear in the features ``[||x||², x·μ_k, 1]`` with coefficients that
        depend only on (t, k), so the (B, T) table is one matmul per component.
        """
        self._check(x)
        dtype = torch.promote_types(x.dtype, torch.float32)
        xd = x.to(dtype)
        ab = schedule.alpha_bar.to(x.device)                                       # (T,) float64
        mu = self.means.to(x.device)
        v = ab[:, None] * self.stds.to(x.device) ** 2 + (1 - ab[:, None])          # (T, K)
        a = ab.sqrt()[:, None]                                                     # (T, 1)
        coef_xx = (-0.5 / v).to(dtype)                                             # (T, K)
        coef_xm = (a / v).to(dtype)
        const = (self.weights.to(x.device).log() - 0.5 * a * a * (mu * mu).sum(-1) / v
                 - 0.5 * self.dim * torch.log(2 * math.pi * v)).to(dtype)
        mu = mu.to(dtype)
        xx = (xd * xd).sum(-1, keepdim=True)                                       # (B, 1)
        xm = xd @ mu.T                                                             # (B, K)
        per_k = [xx @ coef_xx[:, k][None] + xm[:, k:k + 1] @ coef_xm[:, k][None] + const[:, k][None]
                 for k in range(self.num_components)]                             # K × (B, T)
        return functools.reduce(torch.logaddexp, per_k)  # logsumexp over k; far faster than a size-K last dim

    # ------------------------------------------------------------------ adapters to tagdiff contracts
    def eps_model(self, schedule: VPSchedule) -> _ExactEpsModel:
        """Exact ε-model ``(x, t, **cond) -> eps`` on ``schedule``."""
        return _ExactEpsModel(self, schedule)

    def time_posterior(self, schedule: VPSchedule) -> ExactTimePosterior:
        """Exact time posterior p(t | x) as a :class:`~tagdiff.time_predictor.TimePredictor`."""
        return ExactTimePosterior(self, schedule)

    def classifier(self, schedule: VPSchedule) -> _ExactClassifier:
        """Exact noisy classifier ``(x, t) -> log p(y | x_t)`` of shape ``(B, K)`` (component = class)."""
        return _ExactClassifier(self, schedule)


class _ExactEpsModel:
    def __init__(self, gmm: GaussianMixture, schedule: VPSchedule):
        self.gmm, self.schedule = gmm, schedule
        self.sample_shape = (gmm.dim,)
        self.num_train_timesteps = schedule.num_train_timesteps

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        return self.gmm.eps(x, t, self.schedule)


class _ExactClassifier:
    def __init__(self, gmm: GaussianMixture, schedule: VPSchedule):
        self.gmm, self.schedule = gmm, schedule

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        return self.gmm.class_logits(x, t, self.schedule)


class ExactTimePosterior(TimePredictor):
    """Exact ``p(t | x) ∝ p_t(x)`` (uniform prior over the schedule's T timesteps) of a Gaussian mixture.

    Follows the :class:`~tagdiff.time_predictor.TimePredictor` contract; the condition ``c`` is ignored.
    """

    def __init__(self, gmm: GaussianMixture, schedule: VPSchedule):
        super().__init__()
        self.gmm, self.schedule = gmm, schedule
        self.num_train_timesteps = schedule.num_train_timesteps
        self.sample_shape = (gmm.dim,)

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        self.check_input(x)
        return self.gmm.time_logits(x, self.schedule)


def toy_mixture() -> GaussianMixture:
    """The paper's toy data, ``½ N((10, 10), I) + ½ N((-10, -10), I)`` (docs/notation.md §6.1)."""
    return GaussianMixture([[10.0, 10.0], [-10.0, -10.0]], stds=1.0)
