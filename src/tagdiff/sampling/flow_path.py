r"""The flow-matching path and diffusers' flow σ grids: :class:`FlowSchedule` (docs/notation.md §1.6).

``x_σ = (1 - σ) x_0 + σ ε`` for continuous σ ∈ (0, 1]; VP view ``x_σ / r`` with ``r = sqrt((1 - σ)² + σ²)`` and
``ᾱ(σ) = (1 - σ)² / r²``; classes ``t`` ↔ ``σ_t = (t + 1) / T``. The samplers that use it, and the conventions in
full, are in :mod:`tagdiff.sampling.flow`; this module holds the schedule alone (what time predictors need) so that
it imports no loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._utils import append_dims
from .schedules import VPSchedule

__all__ = ["FlowSchedule", "SIGMA_DENSITIES", "flux_mu"]

SIGMA_DENSITIES = ("uniform", "logit_normal")
_CONFIG_FIELDS = {"num_train_timesteps", "shift", "use_dynamic_shifting", "time_shift_type", "shift_terminal"}
_IGNORED_FIELDS = {"base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "stochastic_sampling",
                   "_class_name", "_diffusers_version", "_use_default_values"}
_REFUSED_FIELDS = ("invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """The dynamic-shift ``mu`` Flux pipelines pass to ``set_timesteps`` (diffusers' ``calculate_shift``, linear in
    the number of image tokens between ``(base_seq_len, base_shift)`` and ``(max_seq_len, max_shift)``)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def _r(sigma: Tensor) -> Tensor:
    return ((1 - sigma) ** 2 + sigma**2).sqrt()


@dataclass(frozen=True)
class FlowSchedule:
    """A flow-matching schedule: diffusers' ``FlowMatchEulerDiscreteScheduler`` configuration (the fields that shape
    σ grids) and the path's VP view. Frozen; all tables float64.

    Args:
        num_train_timesteps: T (training timesteps ``T σ``, σ classes ``σ_t = (t + 1) / T``).
        shift: the static shift σ' = shift σ / (1 + (shift - 1) σ) (SD3: 3.0); ignored with dynamic shifting.
        use_dynamic_shifting: Flux's resolution-dependent shift; grids then need ``mu`` (:func:`flux_mu`).
        time_shift_type: ``"exponential"`` (σ' = e^mu / (e^mu + 1/σ - 1)) or ``"linear"`` (mu / (mu + 1/σ - 1)).
        shift_terminal: stretch the grid so that its last nonzero σ equals this value (LTX-Video), or ``None``.

    Raises:
        ValueError: T < 2, a non-positive shift, an unknown time_shift_type, shift_terminal outside (0, 1).
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"
    shift_terminal: float | None = None
    vp_schedule: VPSchedule = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        T = self.num_train_timesteps
        if isinstance(T, bool) or not isinstance(T, int) or T < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {T!r}")
        if not (isinstance(self.shift, int | float) and math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"shift must be a finite number > 0, got {self.shift!r}")
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {self.time_shift_type!r}")
        if self.shift_terminal is not None and not 0 < self.shift_terminal < 1:
            raise ValueError(f"shift_terminal must lie in (0, 1) or be None, got {self.shift_terminal!r}")
        ab = self.alpha_bar(self.train_sigmas)
        betas = 1 - ab / torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])  # the last is 1: ᾱ_{T-1} = 0
        object.__setattr__(self, "vp_schedule", VPSchedule(betas))

    @classmethod
    def from_diffusers(cls, scheduler_or_config: Any) -> FlowSchedule:
        """From a ``FlowMatchEulerDiscreteScheduler`` / ``FlowMatchHeunDiscreteScheduler`` or its config dict.

        ``base_shift``/``max_shift``/``*_image_seq_len`` (inputs of a pipeline's ``mu``, :func:`flux_mu`) and
        ``stochastic_sampling`` (a step rule: :func:`sample_flow`'s ``stochastic``) do not shape the grid.

        Raises:
            ValueError: for Karras / exponential / beta σs or ``invert_sigmas`` (not supported), or an unknown field.
        """
        config = dict(getattr(scheduler_or_config, "config", scheduler_or_config))
        refused = [k for k in _REFUSED_FIELDS if config.get(k)]
        if refused:
            raise ValueError(f"flow schedules with {', '.join(refused)} are not supported; use the default σ grid")
        unknown = sorted(k for k in config if k not in _CONFIG_FIELDS | _IGNORED_FIELDS | set(_REFUSED_FIELDS))
        if unknown:
            raise ValueError(f"flow scheduler config field(s) {', '.join(unknown)} are not understood by tagdiff")
        kw = {k: config[k] for k in _CONFIG_FIELDS if k in config}
        if kw.get("shift_terminal") in (0, 0.0):
            kw["shift_terminal"] = None
        return cls(**kw)

    # ------------------------------------------------------------------ the path
    @property
    def train_sigmas(self) -> Tensor:
        """``σ_t = (t + 1) / T`` for the classes t = 0..T-1, shape ``(T,)`` float64 (increasing)."""
        T = self.num_train_timesteps
        return torch.arange(1, T + 1, dtype=torch.float64) / T

    @staticmethod
    def r(sigma: Tensor) -> Tensor:
        """The VP scale ``r(σ) = sqrt((1 - σ)² + σ²)``: ``x_VP = x_σ / r``. Shape and dtype of ``sigma``."""
        return _r(torch.as_tensor(sigma, dtype=torch.float64))

    @staticmethod
    def alpha_bar(sigma: Tensor) -> Tensor:
        """``ᾱ(σ) = (1 - σ)² / ((1 - σ)² + σ²)`` of the VP view, shape of ``sigma``, float64 (1 at σ = 0, 0 at 1)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return (1 - sigma) ** 2 / ((1 - sigma) ** 2 + sigma**2)

    def class_of(self, sigma: Tensor) -> Tensor:
        """The training class of σ: the nearest ``σ_t = (t + 1) / T``; ``-1`` (clean) at σ = 0. int64, shape of σ.

        Raises:
            ValueError: for σ outside [0, 1].
        """
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if sigma.numel() and (sigma.min() < 0 or sigma.max() > 1):
            raise ValueError(f"flow sigmas lie in [0, 1], got {sigma.min().item()}..{sigma.max().item()}")
        T = self.num_train_timesteps
        t = (sigma * T).round().long().clamp(1, T) - 1
        return torch.where(sigma > 0, t, torch.full_like(t, -1))

    def q_sample(self, x0: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
        """``x_σ = (1 - σ) x0 + σ noise`` (diffusers' ``scale_noise``); ``sigma`` scalar or ``(B,)``."""
        s = append_dims(torch.as_tensor(sigma, dtype=torch.float64).reshape(-1), x0.ndim).to(x0.device, x0.dtype)
        return (1 - s) * x0 + s * noise

    # ------------------------------------------------------------------ σ densities (training a σ predictor)
    def sigma_prior(self, density: str = "uniform", loc: float = 0.0, scale: float = 1.0) -> Tensor:
        """Mass of ``density`` in each class's cell (the σ nearer to σ_t than to its neighbours), shape ``(T,)``,
        float64, summing to 1: the prior over classes of a predictor trained on σ ~ density with nearest-class targets.
        ``"uniform"`` on (0, 1]; ``"logit_normal"``: logit σ ~ N(loc, scale²) (SD3's training density).

        Raises:
            ValueError: an unknown density or a non-positive scale.
        """
        T = self.num_train_timesteps
        edges = torch.cat([torch.zeros(1, dtype=torch.float64), (torch.arange(1, T, dtype=torch.float64) + 0.5) / T,
                           torch.ones(1, dtype=torch.float64)])
        if density == "uniform":
            cdf = edges
        elif density == "logit_normal":
            _check_scale(scale)
            inner = edges[1:-1]
            z = ((inner / (1 - inner)).log() - loc) / scale
            cdf = torch.cat([edges[:1], 0.5 * (1 + torch.erf(z / math.sqrt(2))), edges[-1:]])
        else:
            raise ValueError(f"unknown sigma density {density!r}; expected one of {', '.join(SIGMA_DENSITIES)}")
        return cdf.diff()

    def sample_sigma(self, n: int, density: str = "uniform", generator: torch.Generator | None = None,
                     loc: float = 0.0, scale: float = 1.0) -> Tensor:
        """``n`` draws of σ ∈ (0, 1] from ``density`` (as :meth:`sigma_prior`), shape ``(n,)`` float64 on the CPU."""
        if density == "uniform":
            return 1 - torch.rand(n, generator=generator, dtype=torch.float64)
        if density == "logit_normal":
            _check_scale(scale)
            return torch.sigmoid(loc + scale * torch.randn(n, generator=generator, dtype=torch.float64))
        raise ValueError(f"unknown sigma density {density!r}; expected one of {', '.join(SIGMA_DENSITIES)}")

    # ------------------------------------------------------------------ sampling grids
    def _train_limits(self) -> tuple[float, float]:
        """diffusers' ``sigma_min`` / ``sigma_max``: set in ``__init__`` from the float32 training grid, shifted
        there when the shift is static (so ``set_timesteps`` shifts the grid's lower end twice, as diffusers does)."""
        T = self.num_train_timesteps
        s = torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)[::-1].copy()) / T
        if not self.use_dynamic_shifting:
            s = self.shift * s / (1 + (self.shift - 1) * s)
        return s[-1].item(), s[0].item()

    def sigmas(self, num_steps: int, mu: float | None = None) -> Tensor:
        """The σ grid of ``num_steps`` steps with the final 0 appended, shape ``(num_steps + 1,)``, float64,
        decreasing: ``FlowMatchEulerDiscreteScheduler.set_timesteps(num_steps, mu=mu).sigmas`` computed in float64
        (diffusers rounds the same float64 values to float32). ``FlowMatchHeunDiscreteScheduler`` visits the same σs.

        Raises:
            ValueError: ``num_steps < 1``; ``mu`` missing with dynamic shifting or given without it; ``shift_terminal``
                on a grid that ends at σ = 1 (one step).
        """
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
        if self.use_dynamic_shifting and mu is None:
            raise ValueError("this flow schedule uses dynamic shifting: give mu (e.g. flux_mu(image_seq_len))")
        if not self.use_dynamic_shifting and mu is not None:
            raise ValueError("mu applies with use_dynamic_shifting=True only; this schedule shifts by 'shift'")
        T = self.num_train_timesteps
        lo, hi = self._train_limits()
        s = np.linspace(hi * T, lo * T, num_steps) / T
        if self.use_dynamic_shifting:
            num = math.exp(mu) if self.time_shift_type == "exponential" else mu
            s = num / (num + (1 / s - 1) ** 1.0)
        else:
            s = self.shift * s / (1 + (self.shift - 1) * s)
        if self.shift_terminal:
            if s[-1] == 1.0:
                raise ValueError(f"shift_terminal cannot stretch a grid that ends at sigma = 1 ({num_steps} step(s); "
                                 "diffusers gives NaN there)")
            one_minus = 1 - s
            s = 1 - one_minus / (one_minus[-1] / (1 - self.shift_terminal))
        return torch.from_numpy(np.append(s, 0.0).astype(np.float64))

    def timesteps(self, num_steps: int, mu: float | None = None) -> Tensor:
        """The model timesteps ``T σ`` of :meth:`sigmas` (without the final 0), shape ``(num_steps,)`` float64."""
        return self.sigmas(num_steps, mu)[:-1] * self.num_train_timesteps


def _check_scale(scale: float) -> None:
    if not scale > 0:
        raise ValueError(f"the logit-normal scale must be > 0, got {scale!r}")
