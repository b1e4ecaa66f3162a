r"""Flow matching (rectified flows, SD3, Flux) through the one loop: diffusers' σ grids, velocity conversions, and
the Euler / Heun flow samplers as a driver of :func:`~tagdiff.sampling.loop.run_loop` (docs/notation.md §1.6).

Path and model contract (diffusers' ``FlowMatchEulerDiscreteScheduler``: ``scale_noise``, ``step``): continuous
σ ∈ (0, 1], ``x_σ = (1 - σ) x_0 + σ ε``; the model ``model(x_σ, timestep, **cond) -> v`` predicts the velocity
``v = ε - x_0`` at the float timestep ``timestep = T σ`` (``T = num_train_timesteps``, 1000). Then (INTEGRATION.md)::

    eps_hat = x_σ + (1 - σ) v        x0_hat = x_σ - σ v        score = ∇ log p_σ(x_σ) = -(x_σ + (1 - σ) v) / σ

**The VP view.** With ``r = sqrt((1 - σ)² + σ²)``, ``x_σ / r = a x_0 + s ε`` with ``a = (1 - σ) / r`` and
``s = σ / r`` (``a² + s² = 1``): a VP state with ``ᾱ(σ) = (1 - σ)² / r²``. So the flow is a VP path up to a per-σ
scale, and flows enter the loop as σ-space schedulers do (STYLE.md: VP stays the internal language, other paths are
mapped exactly at the edge; this keeps one step of :func:`run_loop` unchanged and every term unaware of flows):

* :class:`FlowDriver` keeps the state x_σ; the loop hands every term the VP view ``x_σ / r`` with the exact ᾱ(σ)
  (``StepContext.alpha_bar``) and moves x_σ by ``r · Δx_VP`` when a corrector (TAG) moves the view;
* the model is called through :class:`FlowModel` (VP view in, ``r ·`` it to the network, velocity out, prediction
  type ``"flow_prediction"``), so ε̂ / x̂_0 / score terms work as for any VP model, and the guided ε̂ goes back to
  the step as ``v̂ = ε̂ - x̂_0``;
* integer training timesteps: class ``t ∈ {0..T-1}`` stands for ``σ_t = (t + 1) / T`` (diffusers' training grid:
  timestep ``T σ_t = t + 1``; unshifted, since a shift changes which σ a sampler visits, not the σ-marginals).
  :attr:`FlowSchedule.vp_schedule` is the :class:`VPSchedule` with ``ᾱ_t = ᾱ(σ_t)`` (``ᾱ_{T-1} = 0``); a state at
  σ carries the class of the nearest σ_t (:meth:`FlowSchedule.class_of`), ``-1`` at σ = 0. Time predictors over σ,
  TAG's target class and its ``ω_t = ω_0 (1 - ᾱ_t)`` (= ω_0 σ_t² / r_t²) all live on that schedule.
"""


from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .._utils import RandnLike, append_dims
from .flow_path import FlowSchedule, flux_mu
from .loop import Callback, Stage, run_loop
from .predictions import FLOW_PREDICTION
from .terms import EpsModel, Prediction, ScoreTerm, Term

__all__ = ["FlowDriver", "FlowModel", "FlowSchedule", "FLOW_METHODS", "flux_mu", "sample_flow"]

FLOW_METHODS = ("euler", "heun")


def _r(sigma: Tensor) -> Tensor:
    return ((1 - sigma) ** 2 + sigma**2).sqrt()


class FlowModel:
    """A flow model in the loop's contract: ``(x_VP, t, **cond) -> v`` with ``prediction_type = "flow_prediction"``.

    Wraps ``model(x_σ, timestep, **cond) -> v`` (diffusers' convention: ``timestep = T σ`` float): the VP view is
    scaled back, ``x_σ = r(σ) x_VP``, before the call. ``t`` is the loop's float timestep ``T σ``, or an integer
    class (σ = (t + 1) / T, the model then gets ``t + 1``): so the wrapper runs in any VP sampler on
    :attr:`FlowSchedule.vp_schedule` too. Differentiable in x (DPS through the model works).
    """

    prediction_type = FLOW_PREDICTION

    def __init__(self, model: Any, num_train_timesteps: int = 1000):
        self.model, self.num_train_timesteps = model, num_train_timesteps
        shape = getattr(model, "sample_shape", None)
        if shape is not None:
            self.sample_shape = shape

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        t = torch.as_tensor(t, device=x.device)
        if not t.is_floating_point():
            t = (t + 1).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        sigma = append_dims(t.to(torch.float64).reshape(-1) / self.num_train_timesteps, x.ndim)
        return self.model(x * _r(sigma).to(x.dtype), t, **cond)


class FlowDriver:
    """:func:`run_loop`'s driver for flow sampling over a σ grid: diffusers' ``FlowMatchEulerDiscreteScheduler.step``
    (``"euler"``; ``stochastic`` = its ``stochastic_sampling``) or ``FlowMatchHeunDiscreteScheduler.step``
    (``"heun"``, ``s_churn = 0``: two model calls per step, one Euler call on the step to σ = 0), in float64 where x is.

    State: x_σ; the VP view ``x_σ / r(σ)`` at each stage (``vp_scale = r``). The step takes the model's velocity
    as it is where no score term changed it, else ``v̂ = ε̂ - x̂_0`` of the guided prediction. A step term's
    retiming (Time-Shift) is not applied: the driver steps on its own σ grid.

    ``clip_x0`` (Euler only; not a diffusers option: its flow schedulers never clip): the step is written as
    ``x_next = (1 - σ_next) x̂_0 + σ_next ε̂`` (the Euler step, exactly), with x̂_0 = x - σ v clamped to
    ``[-clip_x0, clip_x0]`` and ε̂ = (x - (1 - σ) x̂_0) / σ re-derived from it: DDIM(η = 0)'s clip with
    ``use_clipped_model_output``, so flow Euler with a clip equals :func:`~tagdiff.sample_ddim` with ``clip_x0`` on
    the VP view. It keeps score guidance (DPS) in range as it does on VP models.
    """

    def __init__(self, flow: FlowSchedule, sigmas: Sequence[float] | Tensor, method: str = "euler",
                 stochastic: bool = False, randn_like: RandnLike = torch.randn_like, dtype: torch.dtype | None = None,
                 clip_x0: float | None = None):
        if method not in FLOW_METHODS:
            raise ValueError(f"unknown flow method {method!r}; expected one of {', '.join(FLOW_METHODS)}")
        if stochastic and method != "euler":
            raise ValueError("stochastic flow sampling (diffusers' stochastic_sampling) is an Euler rule; use "
                             "method='euler'")
        if clip_x0 is not None and (method != "euler" or not (math.isfinite(clip_x0) and clip_x0 > 0)):
            raise ValueError(f"clip_x0 must be a number > 0 with method='euler' (None disables), got {clip_x0!r} "
                             f"with method={method!r}")
        self.clip_x0 = None if clip_x0 is None else float(clip_x0)
        sig = [float(s) for s in torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)]
        if len(sig) < 2 or sig[-1] < 0 or sig[0] > 1 or any(b >= a for a, b in zip(sig, sig[1:], strict=False)):
            raise ValueError(f"sigmas must decrease strictly within [0, 1] and hold at least 2 values, got {sig[:8]}")
        self.flow, self.schedule, self.sigmas, self.method = flow, flow.vp_schedule, sig, method
        self.stochastic, self.randn_like = stochastic, randn_like
        self.stateful = method == "heun"
        self.model_t_dtype = torch.float64 if dtype == torch.float64 else None
        self._stages, self._at, self._to = self._make_plan()
        self._saved: tuple[Tensor, Tensor] | None = None

    def _cls(self, sigma: float) -> int:
        return int(self.flow.class_of(torch.tensor(sigma, dtype=torch.float64)))

    def _make_plan(self) -> tuple[list[Stage], list[float], list[float]]:
        """Stages with the σ each one's model call sees (``_at``) and the σ its state has after the update (``_to``)."""
        stages, at, to = [], [], []
        T = self.flow.num_train_timesteps

        def ab(s: float) -> float:
            return (1 - s) ** 2 / ((1 - s) ** 2 + s**2)

        for i, (s, s_next) in enumerate(zip(self.sigmas, self.sigmas[1:], strict=False)):
            two = self.method == "heun" and s_next > 0
            stages.append(Stage(i, self._cls(s), self._cls(s_next), T * s, ab(s), True, not two))
            at.append(s), to.append(s_next)
            if two:   # Heun's second call: the model at σ_next on the Euler prediction
                stages.append(Stage(i, self._cls(s_next), self._cls(s_next), T * s_next, ab(s_next), False, True))
                at.append(s_next), to.append(s_next)
        return stages, at, to

    def plan(self) -> list[Stage]:
        return self._stages

    def model_input(self, x: Tensor, stage: Stage, k: int) -> Tensor:
        return x / self.vp_scale(k, after=False)

    def vp_scale(self, k: int, after: bool) -> float:
        """``r(σ)`` of stage ``k``'s state: before its update at the σ the model sees, after it at the σ reached."""
        s = self._to[k] if after else self._at[k]
        return math.sqrt((1 - s) ** 2 + s**2)

    def update(self, x: Tensor, pred: Prediction, stage: Stage, k: int, t: Tensor | None = None,
               t_prev: Tensor | None = None) -> Tensor:
        """One Euler step x + (σ_next - σ) v, or Heun's half of one (module docstring)."""
        v = pred.eps_hat - pred.x0_hat if pred.guided else pred.raw
        v = v.to(x.dtype)
        if not stage.first:                               # Heun's corrector: the saved state, the mean velocity
            x0, v0 = self._saved
            self._saved = None
            return x0 + (self._to[k] - self._at[k - 1]) * (0.5 * (v0 + v))
        sigma, sigma_next = self._at[k], self._to[k]
        if self.clip_x0 is not None:                      # x̂_0 clamped, ε̂ re-derived (class docstring)
            x0 = (x - sigma * v).clamp(-self.clip_x0, self.clip_x0)
            if self.stochastic:
                return (1.0 - sigma_next) * x0 + sigma_next * self.randn_like(x)
            return (1.0 - sigma_next) * x0 + sigma_next * ((x - (1.0 - sigma) * x0) / sigma)
        if self.stochastic:                               # re-noise from x̂_0 = x - σ v
            noise = self.randn_like(x)
            return (1.0 - sigma_next) * (x - sigma * v) + sigma_next * noise
        if not stage.last:
            self._saved = (x, v)
        return x + (sigma_next - sigma) * v


def sample_flow(model: EpsModel, noise: Tensor, flow: FlowSchedule | None = None, num_steps: int | None = None, *,
                sigmas: Sequence[float] | Tensor | None = None, mu: float | None = None, method: str = "euler",
                stochastic: bool = False, terms: Sequence[Term] = (), cond: Mapping[str, Any] | None = None,
                randn_like: RandnLike = torch.randn_like, callback: Callback | Sequence[Callback] | None = None,
                progress: bool = False, clip_x0: float | None = None) -> Tensor:
    """Sample a flow-matching model with tagdiff's terms (TAG, guidance, correctors) through :func:`run_loop`.

    Args:
        model: ``model(x_σ, timestep, **cond) -> v`` (diffusers' convention, ``timestep = T σ`` float, shape
            ``(B,)``), or a :class:`FlowModel` already.
        noise: the state at ``sigmas[0]`` (pure noise ε ~ N(0, I) when it is 1), shape ``(B, *D)``.
        flow: the :class:`FlowSchedule` (default ``FlowSchedule()``: T = 1000, no shift).
        num_steps / sigmas: the grid: ``flow.sigmas(num_steps, mu)``, or explicit decreasing σs ending with 0.
        mu: the dynamic shift (Flux) when ``flow.use_dynamic_shifting``.
        method: ``"euler"`` (``FlowMatchEulerDiscreteScheduler``) or ``"heun"`` (``FlowMatchHeunDiscreteScheduler``).
        stochastic: diffusers' ``stochastic_sampling``: each step re-noises x̂_0 to σ_next with ``randn_like``.
        clip_x0: Euler only: clamp x̂_0 to ``[-clip_x0, clip_x0]`` inside each step (:class:`FlowDriver`; diffusers'
            flow schedulers do not clip, so the default ``None`` is their step).
        terms, cond, randn_like, callback, progress: as in :func:`tagdiff.sample`. Terms see the VP view
            ``x_σ / r`` with ᾱ(σ) and the class of σ (module docstring).

    Returns:
        the state x_σ at the grid's last σ (x_0 at σ = 0), shape/dtype of ``noise``, detached.

    Raises:
        ValueError: a bad grid, method or ``mu`` (:meth:`FlowSchedule.sigmas`), score guidance on a step at σ = 1
            (ᾱ = 0: x̂_0 cannot be formed from a guided ε̂; TAG and other correctors are fine there), and everything
            :func:`run_loop` raises.
    """
    flow = FlowSchedule() if flow is None else flow
    if (num_steps is None) == (sigmas is None):
        raise ValueError("give num_steps or sigmas (one of them)")
    grid = flow.sigmas(num_steps, mu) if sigmas is None else sigmas
    wrapped = model if isinstance(model, FlowModel) else FlowModel(model, flow.num_train_timesteps)
    driver = FlowDriver(flow, grid, method, stochastic, randn_like, noise.dtype, clip_x0)
    if driver.sigmas[0] == 1.0 and any(isinstance(term, ScoreTerm) for term in terms):
        raise ValueError("score guidance is undefined at sigma = 1 (alpha_bar = 0: x0 cannot be formed from a guided "
                         "eps); start the grid below 1 (sigmas=...) or guide with correctors (TAG) only")
    out = run_loop(driver, wrapped, noise, terms=terms, cond=cond, randn_like=randn_like, callback=callback,
                   progress=progress)
    scale = driver.vp_scale(len(driver.plan()) - 1, after=True)  # run_loop returns the VP view; 1 at σ = 0
    return out if scale == 1.0 else out * scale
