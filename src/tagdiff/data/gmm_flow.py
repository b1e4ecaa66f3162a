r"""A Gaussian mixture under the flow-matching path: exact velocity, score and σ posterior (docs/notation.md §6.4).

For ``x_0 ~ Σ_k π_k N(μ_k, s_k² I)`` and ``x_σ = (1 - σ) x_0 + σ ε`` (:mod:`tagdiff.sampling.flow`) the marginal is
``p_σ(x) = Σ_k π_k N(x; (1 - σ) μ_k, V_k I)`` with ``V_k = (1 - σ)² s_k² + σ²``. With responsibilities
``ρ_k(x) ∝ π_k N(x; (1 - σ) μ_k, V_k I)``:

* ``x̂_0 = Σ_k ρ_k [μ_k + ((1 - σ) s_k² / V_k)(x - (1 - σ) μ_k)]``, ``ε̂ = (x - (1 - σ) x̂_0) / σ``;
* velocity ``v = E[ε - x_0 | x_σ] = ε̂ - x̂_0``; score ``∇ log p_σ(x) = Σ_k ρ_k (-(x - (1 - σ) μ_k) / V_k) = -ε̂ / σ``.

**The σ posterior** on the class grid ``σ_t = (t + 1) / T`` with a prior π(t) (equal masses, or the mass of a σ
density in each class's cell, :meth:`FlowSchedule.sigma_prior`: ``"uniform"``, ``"logit_normal"``):
``p(t | x) ∝ π(t) p_{σ_t}(x)``, and its Time-Linked Score in closed form (the paper's Thm 3.3 / Eq. 12)::

    ∇_x log p(t_i | x) = g_i(x) - Σ_k p(t_k | x) g_k(x),      g_k = ∇_x log p_{σ_k}(x)

In ``space="vp"`` (what the loop's terms see, :mod:`tagdiff.sampling.flow`) x is the VP view ``x_σ / r(σ)`` and
``p_{σ_t}`` is the VP marginal with ᾱ(σ_t): a VP time posterior on :attr:`FlowSchedule.vp_schedule` (plus the
prior); ``space="flow"`` reads x_σ itself. Both have the same form, a mixture with mean scale ``m_t`` and variances
``v_{tk}`` (flow: ``m = 1 - σ``, ``v = V_k``; VP: ``m = sqrt(ᾱ)``, ``v = ᾱ s_k² + 1 - ᾱ``). Float64 inside.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..models.time_predictor import TimePredictor
from ..sampling.flow_path import FlowSchedule

__all__ = ["ExactSigmaPosterior", "FlowGaussianMixture", "POSTERIOR_SPACES"]

POSTERIOR_SPACES = ("vp", "flow")


class FlowGaussianMixture:
    """The flow-path quantities of a :class:`GaussianMixture` (its means, stds and weights).

    Args:
        gmm: the clean mixture, a :class:`~tagdiff.data.gmm.GaussianMixture` (its ``means``, ``stds``, ``weights``;
            not imported here, which keeps the data layer's import chain short).
    """

    def __init__(self, gmm: Any):
        self.gmm = gmm

    @property
    def dim(self) -> int:
        return self.gmm.dim

    def _check(self, x: Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected (B, {self.dim}) for this {self.dim}-D mixture")

    def _sigma(self, sigma: Any, x: Tensor) -> Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).to(x.device)
        if s.numel() == 1:
            s = s.expand(x.shape[0])
        if s.numel() != x.shape[0] or (s <= 0).any() or (s > 1).any():
            raise ValueError(f"sigma must be a scalar or (B,) values in (0, 1], got shape {tuple(s.shape)}")
        return s

    def _resp(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Responsibilities (B, K), mean scale m = 1 - σ (B, 1, 1) and variances V (B, K, 1) at per-sample σ."""
        g = self.gmm
        m = (1 - sigma)[:, None]
        V = m**2 * g.stds.to(x.device) ** 2 + sigma[:, None] ** 2                        # (B, K)
        diff = x.to(torch.float64)[:, None, :] - m[..., None] * g.means.to(x.device)   # (B, K, D)
        logp = (g.weights.to(x.device).log() - 0.5 * (diff**2).sum(-1) / V
                - 0.5 * self.dim * torch.log(2 * math.pi * V))
        return torch.softmax(logp, -1), m[..., None], V[..., None]

    # ------------------------------------------------------------------ exact quantities at one σ per sample
    def log_prob(self, x: Tensor, sigma: Any) -> Tensor:
        """Exact ``log p_σ(x)`` of the flow marginal, shape ``(B,)`` float64."""
        self._check(x)
        s = self._sigma(sigma, x)
        return torch.logsumexp(_table(x, 1 - s[:, None], self._v(s[:, None]), self.gmm)[:, 0], -1)

    def _v(self, sigma: Tensor) -> Tensor:
        """V_k = (1 - σ)² s_k² + σ², shape ``(*sigma.shape, K)``."""
        return (1 - sigma[..., None]) ** 2 * self.gmm.stds.to(sigma.device) ** 2 + sigma[..., None] ** 2

    def x0_hat(self, x: Tensor, sigma: Any) -> Tensor:
        """Exact ``E[x_0 | x_σ]``, shape ``(B, D)``, x's dtype."""
        self._check(x)
        s = self._sigma(sigma, x)
        rho, m, V = self._resp(x, s)
        mu, s2 = self.gmm.means.to(x.device)[None], self.gmm.stds.to(x.device)[None, :, None] ** 2
        post = mu + (m * s2 / V) * (x.to(torch.float64)[:, None, :] - m * mu)
        return (rho[..., None] * post).sum(1).to(x.dtype)

    def eps_hat(self, x: Tensor, sigma: Any) -> Tensor:
        """Exact ``E[ε | x_σ] = (x - (1 - σ) x̂_0) / σ``, shape ``(B, D)``."""
        s = self._sigma(sigma, x)[:, None]
        return ((x.to(torch.float64) - (1 - s) * self.x0_hat(x, sigma).to(torch.float64)) / s).to(x.dtype)

    def velocity(self, x: Tensor, sigma: Any) -> Tensor:
        """Exact velocity ``E[ε - x_0 | x_σ]`` (the flow-matching target's regression), shape ``(B, D)``."""
        return (self.eps_hat(x, sigma).to(torch.float64) - self.x0_hat(x, sigma).to(torch.float64)).to(x.dtype)

    def score(self, x: Tensor, sigma: Any) -> Tensor:
        """Exact ``∇_x log p_σ(x)``, shape ``(B, D)``, from the mixture (not from the velocity)."""
        self._check(x)
        rho, m, V = self._resp(x, self._sigma(sigma, x))
        diff = x.to(torch.float64)[:, None, :] - m * self.gmm.means.to(x.device)[None]
        return (rho[..., None] * (-diff / V)).sum(1).to(x.dtype)

    # ------------------------------------------------------------------ the σ posterior on the class grid
    def _grid(self, flow: FlowSchedule, space: str, device: Any) -> tuple[Tensor, Tensor]:
        if space not in POSTERIOR_SPACES:
            raise ValueError(f"unknown posterior space {space!r}; expected one of {', '.join(POSTERIOR_SPACES)}")
        s = flow.train_sigmas.to(device)
        if space == "flow":
            return 1 - s, self._v(s)
        ab = flow.alpha_bar(s)
        return ab.sqrt(), ab[:, None] * self.gmm.stds.to(device) ** 2 + (1 - ab[:, None])

    def sigma_logits(self, x: Tensor, flow: FlowSchedule, prior: Any = None, space: str = "vp") -> Tensor:
        """``log π(t) + log p_{σ_t}(x)`` for every class, shape ``(B, T)``, float64, differentiable in x: the logits
        of the exact σ posterior. ``prior``: ``None`` (equal masses 1/T, as tagdiff's training loop draws classes),
        a density name (``"uniform"``, ``"logit_normal"``: :meth:`FlowSchedule.sigma_prior`) or ``(T,)`` masses.

        Raises:
            ValueError: a bad x shape, space or prior.
        """
        self._check(x)
        m, v = self._grid(flow, space, x.device)
        return torch.logsumexp(_table(x, m[None], v[None], self.gmm), -1) + _log_prior(flow, prior).to(x.device)

    def sigma_tls(self, x: Tensor, t: Tensor, flow: FlowSchedule, prior: Any = None, space: str = "vp") -> Tensor:
        """The closed-form TLS ``∇_x log p(t | x)`` (module docstring) at classes ``t`` (``(B,)`` int64), shape
        ``(B, D)`` float64."""
        self._check(x)
        m, v = self._grid(flow, space, x.device)                              # (T,), (T, K)
        comp = _table(x, m[None], v[None], self.gmm)                          # (B, T, K)
        logits = torch.logsumexp(comp, -1) + _log_prior(flow, prior).to(x.device)
        rho = torch.softmax(comp, -1)                                          # p(k | x, σ_t)
        xd, mu = x.to(torch.float64), self.gmm.means.to(x.device)
        g = -xd[:, None, :] * (rho / v).sum(-1, keepdim=True) + (rho * m[:, None] / v) @ mu   # (B, T, D)
        gamma = torch.softmax(logits, -1)
        t = torch.as_tensor(t, device=x.device).long().reshape(-1).expand(x.shape[0])
        return g[torch.arange(x.shape[0], device=x.device), t] - (gamma[..., None] * g).sum(1)

    # ------------------------------------------------------------------ adapters
    def velocity_model(self, flow: FlowSchedule | None = None) -> _ExactVelocity:
        """Exact flow model ``(x_σ, timestep) -> v`` with σ = timestep / T (diffusers' convention)."""
        return _ExactVelocity(self, (flow or FlowSchedule()).num_train_timesteps)

    def time_posterior(self, flow: FlowSchedule, prior: Any = None) -> ExactSigmaPosterior:
        """The exact σ posterior of the VP view as a :class:`TimePredictor` on ``flow.vp_schedule`` (for TAG)."""
        return ExactSigmaPosterior(self, flow, prior)


def _table(x: Tensor, m: Tensor, v: Tensor, gmm: Any) -> Tensor:
    """``log π_k + log N(x; m μ_k, v I)`` for scales ``m`` (B or 1, T) and variances ``v`` (B or 1, T, K):
    shape ``(B, T, K)``, float64. Linear in the features ``[‖x‖², x·μ_k, 1]``, so one broadcast per table."""
    xd = x.to(torch.float64)
    mu = gmm.means.to(x.device)
    xx = (xd * xd).sum(-1)[:, None, None]                                       # (B, 1, 1)
    xm = (xd @ mu.T)[:, None, :]                                                # (B, 1, K)
    mm = (mu * mu).sum(-1)                                                      # (K,)
    mk = m[..., None]
    sq = xx - 2 * mk * xm + mk**2 * mm
    return gmm.weights.to(x.device).log() - 0.5 * sq / v - 0.5 * gmm.dim * torch.log(2 * math.pi * v)


def _log_prior(flow: FlowSchedule, prior: Any) -> Tensor:
    T = flow.num_train_timesteps
    if prior is None:
        return torch.full((T,), -math.log(T), dtype=torch.float64)
    masses = flow.sigma_prior(prior) if isinstance(prior, str) else torch.as_tensor(prior, dtype=torch.float64)
    if masses.shape != (T,) or (masses < 0).any() or not abs(float(masses.sum()) - 1) <= 1e-9:
        raise ValueError(f"prior must be None, a density name or {T} non-negative masses summing to 1")
    return masses.log()


class _ExactVelocity:
    def __init__(self, fgmm: FlowGaussianMixture, num_train_timesteps: int):
        self.fgmm, self.num_train_timesteps = fgmm, num_train_timesteps
        self.sample_shape = (fgmm.dim,)

    def __call__(self, x: Tensor, timestep: Tensor, **cond: Any) -> Tensor:
        sigma = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1) / self.num_train_timesteps
        return self.fgmm.velocity(x, sigma)


class ExactSigmaPosterior(TimePredictor):
    """Exact ``p(t | x_VP) ∝ π(t) p_{σ_t}(x_VP)`` of a flow mixture over the classes ``σ_t = (t + 1) / T``: a
    :class:`TimePredictor` on ``flow.vp_schedule`` that reads the VP view (as TAG hands it). ``c`` is ignored."""

    def __init__(self, fgmm: FlowGaussianMixture, flow: FlowSchedule, prior: Any = None):
        super().__init__()
        self.fgmm, self.flow, self.prior = fgmm, flow, prior
        self.schedule = flow.vp_schedule
        self.num_train_timesteps = flow.num_train_timesteps
        self.sample_shape = (fgmm.dim,)
        _log_prior(flow, prior)  # validate now

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        self.check_input(x)
        return self.fgmm.sigma_logits(x, self.flow, self.prior, space="vp").to(torch.promote_types(x.dtype,
                                                                                                   torch.float32))
