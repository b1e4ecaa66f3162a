r"""Variance-preserving (VP) noise schedules in discrete time.

Convention (docs/notation.md §1, STYLE.md §0): the forward process is
``x_t = sqrt(alpha_bar[t]) * x_0 + sqrt(1 - alpha_bar[t]) * eps`` with an **integer training timestep**
``t in {0, ..., T-1}``. ``t = -1`` denotes clean data (``alpha_bar = 1``): it is the "previous timestep"
of the last reverse step. All tables are float64; values are cast to the dtype of ``x`` on use.

Conversions (Ho et al. 2020; Tweedie, the paper's Eq. 4/26; score from ε, the paper's Eq. 25)::

    x0_hat = (x_t - sqrt(1 - alpha_bar) * eps_hat) / sqrt(alpha_bar)
    eps_hat = (x_t - sqrt(alpha_bar) * x0_hat) / sqrt(1 - alpha_bar)
    score   = -eps_hat / sqrt(1 - alpha_bar)          # ∇_x log p_t(x_t)
    sigma   = sqrt((1 - alpha_bar) / alpha_bar)        # sigma-space (k-diffusion/EDM) adapter only
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._utils import append_dims

__all__ = ["VPSchedule", "SCHEDULE_KINDS", "TIMESTEP_SPACINGS", "GRID_SPACINGS", "space_timesteps"]

SCHEDULE_KINDS = ("linear", "cosine", "scaled_linear", "sigmoid")
# diffusers scheduler-config fields that do not change alpha_bar (they shape the sampling grid or the step rule)
_GRID_OR_STEP_FIELDS = {"timestep_spacing", "steps_offset", "set_alpha_to_one", "final_alpha_cumprod", "clip_sample",
                        "clip_sample_range", "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
                        "variance_type", "prediction_type", "use_karras_sigmas", "use_exponential_sigmas",
                        "use_beta_sigmas", "timestep_type", "interpolation_type", "sigma_min", "sigma_max",
                        "final_sigmas_type", "solver_order", "algorithm_type", "solver_type", "lower_order_final",
                        "euler_at_final", "use_lu_lambdas", "lambda_min_clipped", "predict_x0",
                        "solver_p", "disable_corrector", "skip_prk_steps", "noise_sampler_seed", "use_dynamic_shifting",
                        "time_shift_type", "flow_shift", "use_flow_sigmas", "shift", "base_shift", "max_shift",
                        "base_image_seq_len", "max_image_seq_len", "invert_sigmas", "shift_terminal", "sigma_data",
                        "rho", "s_noise", "s_churn", "s_tmin", "s_tmax"}
TIMESTEP_SPACINGS = ("trailing", "leading", "linspace")  # diffusers' timestep_spacing
GRID_SPACINGS = (*TIMESTEP_SPACINGS, "space_timesteps")  # + the TFG benchmark's own grid


def space_timesteps(num_train_timesteps: int, num_steps: int) -> list[int]:
    """The TFG benchmark's grid: ``space_timesteps(T, N)`` of ``YWolfeee/Training-Free-Guidance``,
    ``diffusion/unet/openai.py`` (one section), decreasing. Stride ``(T-1)/(N-1)`` accumulated in floats and
    rounded with Python's ``round``; 1 step is ``[0]``. It equals ``"linspace"`` for every N in 1..20 and for the
    paper's step counts (1, 3, 5, 10, 50, 100), but not everywhere (e.g. T = 1000, N = 21: 499 against 500)."""
    stride = 1 if num_steps <= 1 else (num_train_timesteps - 1) / (num_steps - 1)
    cur, steps = 0.0, []
    for _ in range(num_steps):
        steps.append(round(cur))
        cur += stride
    return sorted(set(steps), reverse=True)


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> Tensor:
    # Nichol & Dhariwal (2021), Eq. 17: alpha_bar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2,
    # discretised as diffusers' ``betas_for_alpha_bar`` ("squaredcos_cap_v2") does.
    def f(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    betas = [min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale ``betas`` so that ᾱ_{T-1} = 0 exactly, keeping ᾱ_0 (Lin et al. 2024, Alg. 1; diffusers'
    ``rescale_zero_terminal_snr``, here in float64): sqrt(ᾱ) is shifted and scaled linearly."""
    ab_sqrt = torch.cumprod(1 - betas, 0).sqrt()
    a0, aT = ab_sqrt[0].clone(), ab_sqrt[-1].clone()
    ab_sqrt = (ab_sqrt - aT) * (a0 / (a0 - aT))
    ab = ab_sqrt**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


@dataclass(frozen=True, eq=False)
class VPSchedule:
    """A discrete VP schedule: ``betas`` and ``alpha_bar = cumprod(1 - betas)``, both shape ``(T,)`` float64.

    Build one with :meth:`linear`, :meth:`cosine`, :meth:`from_name`, :meth:`from_diffusers` or
    :meth:`from_dict`. Frozen: it holds no per-step state.

    Args:
        betas: shape ``(T,)``, values in (0, 1); the last may be exactly 1 (zero terminal SNR, ᾱ_{T-1} = 0).
        spec: JSON-able description used by :meth:`to_dict` (filled in by the constructors).

    Raises:
        ValueError: if ``betas`` is not 1-D or leaves (0, 1) (or (0, 1] at the last timestep).
    """

    betas: Tensor
    spec: Mapping[str, Any] = field(default_factory=dict)
    alpha_bar: Tensor = field(init=False, repr=False)
    _alpha_bar_ext: Tensor = field(init=False, repr=False)
    _tables: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        betas = torch.as_tensor(self.betas, dtype=torch.float64).detach().cpu()
        if betas.ndim != 1 or betas.numel() < 1:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        ok = (betas > 0) & (betas < 1)
        ok[-1] = (betas[-1] > 0) & (betas[-1] <= 1)
        if not ok.all():
            raise ValueError(f"betas must lie in (0, 1) (the last in (0, 1]); got min {betas.min().item()}, "
                             f"max {betas.max().item()}")
        alpha_bar = torch.cumprod(1.0 - betas, dim=0)
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alpha_bar", alpha_bar)
        # index -1 -> alpha_bar = 1 (clean data), so t_prev = -1 needs no special case
        object.__setattr__(self, "_alpha_bar_ext", torch.cat([alpha_bar, torch.ones(1, dtype=torch.float64)]))
        object.__setattr__(self, "_tables", {torch.device("cpu"): self._alpha_bar_ext})

    # ------------------------------------------------------------------ constructors
    @classmethod
    def linear(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> VPSchedule:
        """Linear β from ``beta_start`` to ``beta_end`` (Ho et al. 2020; diffusers ``"linear"``)."""
        _check_T(num_train_timesteps)
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        spec = {"kind": "linear", "num_train_timesteps": num_train_timesteps, "beta_start": beta_start,
                "beta_end": beta_end}
        return cls(betas, spec)

    @classmethod
    def scaled_linear(cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                      beta_end: float = 0.012) -> VPSchedule:
        """β linear in sqrt-space (Stable Diffusion; diffusers ``"scaled_linear"``)."""
        _check_T(num_train_timesteps)
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        spec = {"kind": "scaled_linear", "num_train_timesteps": num_train_timesteps, "beta_start": beta_start,
                "beta_end": beta_end}
        return cls(betas, spec)

    @classmethod
    def sigmoid(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> VPSchedule:
        """β = sigmoid(linspace(-6, 6, T)) (beta_end - beta_start) + beta_start (GeoDiff; diffusers ``"sigmoid"``)."""
        _check_T(num_train_timesteps)
        betas = torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps, dtype=torch.float64))
        betas = betas * (beta_end - beta_start) + beta_start
        spec = {"kind": "sigmoid", "num_train_timesteps": num_train_timesteps, "beta_start": beta_start,
                "beta_end": beta_end}
        return cls(betas, spec)

    @classmethod
    def cosine(cls, num_train_timesteps: int = 1000) -> VPSchedule:
        """Cosine schedule of Nichol & Dhariwal (2021) with β capped at 0.999 (diffusers ``"squaredcos_cap_v2"``)."""
        _check_T(num_train_timesteps)
        return cls(_cosine_betas(num_train_timesteps), {"kind": "cosine", "num_train_timesteps": num_train_timesteps})

    @classmethod
    def from_name(cls, name: str, num_train_timesteps: int = 1000, rescale_zero_snr: bool = False,
                  **kwargs: Any) -> VPSchedule:
        """Build a schedule by name: ``"linear"``, ``"cosine"`` (alias ``"squaredcos_cap_v2"``), ``"scaled_linear"`` or
        ``"sigmoid"``; ``rescale_zero_snr`` applies :func:`rescale_zero_terminal_snr` (ᾱ_{T-1} = 0).

        Raises:
            ValueError: for an unknown name (the message lists the known ones).
        """
        key = {"squaredcos_cap_v2": "cosine"}.get(name, name)
        if key == "cosine":
            out = cls.cosine(num_train_timesteps)
        elif key in ("linear", "scaled_linear", "sigmoid"):
            out = getattr(cls, key)(num_train_timesteps, **kwargs)
        else:
            raise ValueError(f"unknown schedule {name!r}; expected one of {', '.join(SCHEDULE_KINDS)}")
        if rescale_zero_snr:
            out = cls(rescale_zero_terminal_snr(out.betas), {**out.spec, "rescale_zero_snr": True})
        return out

    @classmethod
    def from_diffusers(cls, scheduler_or_config: Any) -> VPSchedule:
        """Build from a diffusers scheduler (``DDPMScheduler``, ``EulerDiscreteScheduler``, ...) or its config dict.

        Reads every field that changes ᾱ: ``num_train_timesteps``, ``beta_schedule`` (``linear``, ``scaled_linear``,
        ``squaredcos_cap_v2``, ``sigmoid``), ``beta_start``/``beta_end``, ``trained_betas`` and
        ``rescale_betas_zero_snr`` (ᾱ_{T-1} = 0 exactly). Grid and step fields (``timestep_spacing``,
        ``steps_offset``, ``prediction_type``, ``set_alpha_to_one``, Karras σs, ...) do not change ᾱ and are left to
        the scheduler (:func:`tagdiff.sample_scheduler` uses them as diffusers does). The prediction type belongs to
        the model (:mod:`tagdiff.predictions`), not to the schedule.

        Raises:
            ValueError: for an unknown ``beta_schedule`` or a field tagdiff does not know (named), since it might
                change ᾱ.
        """
        config = dict(getattr(scheduler_or_config, "config", scheduler_or_config))
        known = {"num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas",
                 "rescale_betas_zero_snr", "_class_name", "_diffusers_version", "_use_default_values"}
        unknown = sorted(k for k in config
                         if k not in known and k not in _GRID_OR_STEP_FIELDS and not k.startswith("_"))
        if unknown:
            raise ValueError(f"scheduler config field(s) {', '.join(unknown)} are not understood by tagdiff and might "
                             "change alpha_bar; remove them or build the VPSchedule from its betas")
        T = int(config.get("num_train_timesteps", 1000))
        rescale = bool(config.get("rescale_betas_zero_snr", False))
        if config.get("trained_betas") is not None:
            betas = torch.as_tensor(config["trained_betas"], dtype=torch.float64)
            if rescale:
                betas = rescale_zero_terminal_snr(betas)
            return cls(betas, {"kind": "trained", "num_train_timesteps": T, "betas": betas.tolist()})
        kind = config.get("beta_schedule", "linear")
        kwargs = {}
        if kind in ("linear", "scaled_linear", "sigmoid"):
            kwargs = {"beta_start": float(config.get("beta_start", 1e-4)),
                      "beta_end": float(config.get("beta_end", 0.02))}
        return cls.from_name(kind, T, rescale_zero_snr=rescale, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description; ``VPSchedule.from_dict(s.to_dict())`` rebuilds an equal schedule."""
        return dict(self.spec) if self.spec else {"kind": "trained", "num_train_timesteps": self.num_train_timesteps,
                                                  "betas": self.betas.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VPSchedule:
        d = dict(d)
        kind = d.pop("kind", None)
        if kind == "trained":
            return cls(torch.tensor(d["betas"], dtype=torch.float64), {"kind": "trained", **d})
        if kind is None:
            raise ValueError(f"schedule dict has no 'kind': {d}")
        T = int(d.pop("num_train_timesteps", 1000))
        return cls.from_name(kind, T, rescale_zero_snr=bool(d.pop("rescale_zero_snr", False)), **d)

    def to_diffusers_config(self, prediction_type: str = "epsilon") -> dict[str, Any]:
        """A diffusers scheduler config describing the same schedule (for ``DDPMScheduler.from_config``), for a
        model of ``prediction_type`` (``"epsilon"``, ``"v_prediction"`` or ``"sample"``)."""
        kind = self.spec.get("kind")
        cfg: dict[str, Any] = {"num_train_timesteps": self.num_train_timesteps, "prediction_type": prediction_type}
        if kind in ("linear", "scaled_linear", "sigmoid"):
            cfg.update(beta_schedule=kind, beta_start=self.spec["beta_start"], beta_end=self.spec["beta_end"])
        elif kind == "cosine":
            cfg.update(beta_schedule="squaredcos_cap_v2")
        else:
            cfg.update(trained_betas=self.betas.tolist())
        if self.spec.get("rescale_zero_snr") and kind != "trained":
            cfg.update(rescale_betas_zero_snr=True)
        return cfg

    # ------------------------------------------------------------------ basic queries
    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.numel())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VPSchedule) and torch.equal(self.betas, other.betas)

    def __hash__(self) -> int:
        return hash(tuple(self.betas[:: max(1, self.num_train_timesteps // 16)].tolist()))

    def alpha_bar_table(self, device: torch.device | str) -> Tensor:
        """``alpha_bar`` with the clean entry appended (index ``-1`` → 1), float64, on ``device`` (cached per device):
        index it with device-side timesteps without a host synchronisation."""
        device = torch.device(device)
        cache = self._tables  # a cache of a frozen object's own values, not state
        if device not in cache:
            cache[device] = self._alpha_bar_ext.to(device)
        return cache[device]

    def alpha_bar_host(self, t: int) -> float:
        """``alpha_bar[t]`` as a python float (``t = -1`` gives 1): for loops that plan on the host."""
        return 1.0 if t < 0 else float(self.alpha_bar[t])

    def describe(self) -> str:
        """A short human-readable description, e.g. ``linear(T=1000, beta 0.0001..0.02)`` (for error messages)."""
        spec = dict(self.spec)
        kind = spec.get("kind", "trained")
        extra = ", zero terminal SNR" if float(self.alpha_bar[-1]) == 0.0 else ""
        if "beta_start" in spec:
            return f"{kind}(T={self.num_train_timesteps}, beta {spec['beta_start']:g}..{spec['beta_end']:g}{extra})"
        return f"{kind}(T={self.num_train_timesteps}, alpha_bar[T-1]={float(self.alpha_bar[-1]):.3g}{extra})"

    def check_timesteps(self, t: Tensor, allow_clean: bool = False) -> Tensor:
        """Validate integer timesteps; return them as a long tensor.

        Raises:
            ValueError: if ``t`` is not integral or leaves ``[0, T-1]`` (``[-1, T-1]`` with ``allow_clean``).
        """
        t = torch.as_tensor(t)
        if t.is_floating_point():
            raise ValueError(f"timesteps must be integer training timesteps, got dtype {t.dtype}")
        lo = -1 if allow_clean else 0
        if t.numel() and (t.min() < lo or t.max() > self.num_train_timesteps - 1):
            raise ValueError(
                f"timestep out of range: got values in [{int(t.min())}, {int(t.max())}], "
                f"expected integers in [{lo}, {self.num_train_timesteps - 1}]"
            )
        return t.long()

    def alpha_bar_at(self, t: Tensor, like: Tensor) -> Tensor:
        """``alpha_bar[t]`` broadcast against ``like`` (shape ``(B, 1, ..., 1)``, dtype/device of ``like``).

        ``t`` has shape ``(B,)`` (or is a scalar); ``t = -1`` gives 1 (clean data).

        Raises:
            ValueError: if ``t`` is not integral or leaves ``[-1, T-1]`` (see :meth:`check_timesteps`).
        """
        t = torch.as_tensor(t)
        if t.device.type == "cpu":
            # validated: t = T would silently read the appended clean entry (alpha_bar = 1), t < -1 would wrap around
            ab = self._alpha_bar_ext[self.check_timesteps(t, allow_clean=True).reshape(-1)]
        else:  # on an accelerator: a device-side lookup, no range check (that would be a host synchronisation)
            if t.is_floating_point():
                raise ValueError(f"timesteps must be integer training timesteps, got dtype {t.dtype}")
            ab = self.alpha_bar_table(t.device)[t.long().reshape(-1)]
        if ab.numel() == 1 and like.ndim > 0:
            ab = ab.expand(like.shape[0])
        return append_dims(ab.to(device=like.device, dtype=like.dtype), like.ndim)

    # ------------------------------------------------------------------ forward process and conversions
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Draw ``x_t ~ q(x_t | x_0)``: ``sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise``. Shapes ``(B, *D)``."""
        ab = self.alpha_bar_at(t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def x0_from_eps(self, x: Tensor, t: Tensor, eps_hat: Tensor) -> Tensor:
        """Tweedie estimate ``x0_hat = (x_t - sqrt(1 - alpha_bar) eps_hat) / sqrt(alpha_bar)`` (the paper's Eq. 4)."""
        ab = self.alpha_bar_at(t, x)
        return (x - (1 - ab).sqrt() * eps_hat) / ab.sqrt()

    def eps_from_x0(self, x: Tensor, t: Tensor, x0_hat: Tensor) -> Tensor:
        """``eps_hat = (x_t - sqrt(alpha_bar) x0_hat) / sqrt(1 - alpha_bar)``; requires ``t >= 0``."""
        ab = self.alpha_bar_at(t, x)
        return (x - ab.sqrt() * x0_hat) / (1 - ab).sqrt()

    def score_from_eps(self, x: Tensor, t: Tensor, eps_hat: Tensor) -> Tensor:
        """``score = ∇_x log p_t(x) = -eps_hat / sqrt(1 - alpha_bar)`` (the paper's Eq. 25)."""
        return -eps_hat / (1 - self.alpha_bar_at(t, x)).sqrt()

    def eps_from_score(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        """``eps_hat = -sqrt(1 - alpha_bar) * score``."""
        return -(1 - self.alpha_bar_at(t, x)).sqrt() * score

    def sigma(self, t: Tensor) -> Tensor:
        """Sigma-space noise level ``sqrt((1 - alpha_bar) / alpha_bar)``, shape of ``t``, float64."""
        ab = self._alpha_bar_ext[self.check_timesteps(torch.as_tensor(t, device="cpu"), allow_clean=True)]
        return ((1 - ab) / ab).sqrt()

    def t_from_sigma(self, sigma: Tensor) -> Tensor:
        """Nearest training timestep (in log-sigma) for each sigma; inverse of :meth:`sigma` on the grid."""
        log_sig = self.sigma(torch.arange(self.num_train_timesteps)).log().clamp(max=torch.finfo(torch.float64).max)
        d = (torch.as_tensor(sigma, dtype=torch.float64).log().reshape(-1, 1) - log_sig).abs()
        return d.argmin(-1).reshape(torch.as_tensor(sigma).shape)

    # ------------------------------------------------------------------ sampling grids
    def timesteps(self, num_steps: int, spacing: str = "trailing", steps_offset: int = 0) -> Tensor:
        """A strictly decreasing grid of ``num_steps`` training timesteps, int64, shape ``(num_steps,)``.

        Spacings follow diffusers' ``timestep_spacing`` (Lin et al. 2024, Table 2):

        * ``"trailing"`` (default): ``round(arange(T, 0, -T/N)) - 1``; always starts at ``T-1``, so even one-step
          sampling starts from pure noise.
        * ``"leading"``: ``arange(N) * (T // N) + steps_offset`` reversed (diffusers' DDPM/DDIM default; starts below
          ``T-1``; one step is ``[steps_offset]``).
        * ``"linspace"``: ``round(linspace(0, T-1, N))`` reversed: 1 step is ``[0]``, 2 steps ``[T-1, 0]``, 3 steps
          ``[T-1, T//2, 0]``. So a one-step sampler on this grid calls ε_θ(x_T, t = 0), and TAG's Alg. 1 corrects
          x_T toward class 0.
        * ``"space_timesteps"``: the TFG benchmark's grid (:func:`space_timesteps`), which the TAG paper's
          experiments ran on. Equal to ``"linspace"`` for the paper's step counts; it differs by one timestep at
          ties for some N (278 of the 1000 values at T = 1000, none below 21).

        ``steps_offset`` is diffusers' ``steps_offset``: like diffusers' DDIM/DDPM schedulers it shifts the
        ``"leading"`` grid only (``"trailing"`` and ``"linspace"`` ignore it there, and must be given 0 here).

        Raises:
            ValueError: if ``num_steps`` is not in ``[1, T]``, ``spacing`` is unknown, ``steps_offset`` is negative,
                non-zero for a spacing other than ``"leading"``, or pushes the grid beyond ``T-1``.
        """
        T = self.num_train_timesteps
        if not isinstance(num_steps, int) or not 1 <= num_steps <= T:
            raise ValueError(f"num_steps must be an integer in [1, {T}], got {num_steps!r}")
        if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
            raise ValueError(f"steps_offset must be an integer >= 0, got {steps_offset!r}")
        if steps_offset and spacing != "leading":
            raise ValueError(f"steps_offset={steps_offset} only applies to the 'leading' spacing (as in diffusers' "
                             f"DDIM/DDPM schedulers), got spacing {spacing!r}")
        # Computed with numpy exactly as diffusers does: torch's float arange/linspace round differently at
        # half-integer ties (e.g. T=1000, N=48 "trailing" or N=27 "linspace" gave grids off by one).
        if spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64) - 1
        elif spacing == "leading":
            ts = (np.arange(num_steps) * (T // num_steps))[::-1] + steps_offset
            if ts[0] > T - 1:
                raise ValueError(f"steps_offset={steps_offset} pushes the 'leading' grid of {num_steps} steps to "
                                 f"t={int(ts[0])} > T-1={T - 1}")
        elif spacing == "linspace":
            ts = np.linspace(0, T - 1, num_steps).round()[::-1].astype(np.int64)
        elif spacing == "space_timesteps":
            ts = np.asarray(space_timesteps(T, num_steps), dtype=np.int64)
        else:
            raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {', '.join(GRID_SPACINGS)}")
        # diffusers' "trailing" arange can overshoot by one element (-1, e.g. T=1000, N=61): keep N
        return torch.from_numpy(ts[:num_steps].astype(np.int64, order="C", copy=True))


def _check_T(T: Any) -> None:
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"num_train_timesteps must be a positive integer, got {T!r}")
