r"""diffusers' flow-matching schedulers (SD3, Flux, Wan, SANA ...) in :func:`run_loop`: :class:`FlowSchedulerDriver`.

Driven (``scheduler.step`` does every update; tagdiff adds score terms and correctors, as for VP schedulers):

* ``FlowMatchEulerDiscreteScheduler``: static ``shift``, dynamic shifting (``mu`` passed to ``set_timesteps``),
  ``shift_terminal``, Karras / exponential / beta σs, ``stochastic_sampling`` (its noise from ``generator``);
* ``FlowMatchHeunDiscreteScheduler`` (two model calls per step, as its repeated ``timesteps`` say; ``s_churn = 0``);
* ``DPMSolverMultistepScheduler`` and ``UniPCMultistepScheduler`` with ``use_flow_sigmas=True`` and
  ``prediction_type="flow_prediction"`` (their timesteps are the integers ⌊T σ⌋; UniPC keeps corrections only with
  its corrector disabled, as on VP grids).

Conventions (the σ-space pattern of :class:`~tagdiff.sampling.schedulers.SchedulerDriver`, the flow path of
:mod:`tagdiff.sampling.flow`): the state is diffusers' x_σ = (1 - σ) x_0 + σ ε at ``scheduler.sigmas[k]``; terms see
the VP view ``x_σ / r`` (r = sqrt((1 - σ)² + σ²)) with ᾱ(σ) = (1 - σ)² / r² and the class of the nearest σ bin
``σ_t = (t + 1) / T`` (:meth:`FlowSchedule.class_of`; the schedule is :attr:`FlowSchedule.vp_schedule`, which σ-bin
time predictors record); a corrector's Δ on the view moves x_σ by ``r · Δ``. The model ``model(x_σ, timestep)``
(velocity, diffusers' timestep ``scheduler.timesteps[k]``) is called with the state itself where no term moved
the view (so with no terms the run is the plain diffusers loop bit for bit) and with ``r · view`` otherwise; a
guided prediction reaches ``step`` as ``v̂ = ε̂ - x̂_0``.

Refused, each with its reason: ``FlowMatchLCMScheduler`` and flow σs on other schedulers (not checked), DEIS's
flow σs and ``final_sigmas_type="sigma_min"`` (the grid ends at a σ > 0, not at x_0),
``invert_sigmas`` (σ runs the other way: Mochi's convention), ``FlowMatchHeunDiscreteScheduler`` with ``s_churn``
(VE churn moves the state off the flow path), ``per_token_timesteps``, a ``prediction_type`` other than
``flow_prediction`` on flow σs, and step terms (TFG, DPS-normalized, Time-Shift: :func:`tagdiff.sample_flow` hosts
them).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .._utils import RandnLike
from .flow_path import FlowSchedule
from .loop import Callback, Stage, run_loop
from .predictions import FLOW_PREDICTION
from .terms import EpsModel, Prediction, Term, split_terms

__all__ = ["FLOW_MATCH_SCHEDULERS", "FLOW_SIGMA_SCHEDULERS", "FlowSchedulerDriver", "FlowSchedulerModel",
           "check_flow_scheduler", "flow_schedule_of", "flow_sigma_now", "is_flow_scheduler",
           "sample_flow_scheduler"]

FLOW_MATCH_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
FLOW_SIGMA_SCHEDULERS = ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler")


def is_flow_scheduler(scheduler: Any) -> bool:
    """Whether ``scheduler`` steps on a flow-matching path (a ``FlowMatch*`` class, or ``use_flow_sigmas``)."""
    return type(scheduler).__name__.startswith("FlowMatch") or bool(scheduler.config.get("use_flow_sigmas"))


def check_flow_scheduler(scheduler: Any, step_kwargs: Mapping[str, Any] | None = None) -> str:
    """Return the class name of a flow scheduler tagdiff drives (module docstring).

    Raises:
        ValueError: one line naming what is not supported and why.
    """
    name, config = type(scheduler).__name__, scheduler.config
    if name.startswith("FlowMatch") and name not in FLOW_MATCH_SCHEDULERS:
        raise ValueError(f"{name} is not supported: tagdiff drives the flow-matching schedulers "
                         f"{', '.join(FLOW_MATCH_SCHEDULERS)} (and {', '.join(FLOW_SIGMA_SCHEDULERS)} with "
                         "use_flow_sigmas)")
    if name == "DEISMultistepScheduler":
        raise ValueError("DEISMultistepScheduler with use_flow_sigmas is not supported: its flow grid ends at its "
                         "last σ > 0 (the final step stays there), not at x_0; use DPMSolverMultistepScheduler")
    if not name.startswith("FlowMatch") and name not in FLOW_SIGMA_SCHEDULERS:
        raise ValueError(f"{name} with use_flow_sigmas is not supported (not checked against tagdiff's flow path); "
                         f"use FlowMatchEulerDiscreteScheduler or one of {', '.join(FLOW_SIGMA_SCHEDULERS)}")
    if config.get("invert_sigmas"):
        raise ValueError(f"{name} with invert_sigmas is not supported: its σ runs from 0 to 1 (Mochi's convention), "
                         "not along diffusers' flow path x_σ = (1 - σ) x_0 + σ ε")
    if not name.startswith("FlowMatch") and config.get("prediction_type") != FLOW_PREDICTION:
        raise ValueError(f"{name} with use_flow_sigmas needs prediction_type='flow_prediction' (a velocity model), "
                         f"got {config.get('prediction_type')!r}")
    if not name.startswith("FlowMatch") and config.get("final_sigmas_type", "zero") != "zero":
        raise ValueError(f"{name} with use_flow_sigmas and final_sigmas_type={config.get('final_sigmas_type')!r} "
                         "is not supported: its grid ends at a σ > 0, not at x_0; use final_sigmas_type='zero'")
    kw = dict(step_kwargs or {})
    if kw.get("per_token_timesteps") is not None:
        raise ValueError(f"{name}.step with per_token_timesteps is not supported: each token would sit at its own σ, "
                         "and TAG's time predictor reads one σ per sample")
    if name == "FlowMatchHeunDiscreteScheduler" and kw.get("s_churn", 0.0):
        raise ValueError("FlowMatchHeunDiscreteScheduler with s_churn > 0 is not supported: its churn adds VE noise "
                         "(σ_hat² - σ²), which moves the state off the flow path")
    return name


def flow_schedule_of(scheduler: Any) -> FlowSchedule:
    """The :class:`FlowSchedule` whose σ bins (T = ``num_train_timesteps``, unshifted) classify a flow scheduler's
    states; its :attr:`FlowSchedule.vp_schedule` is the schedule of σ-bin time predictors and of TAG's ω_t."""
    return FlowSchedule(num_train_timesteps=int(scheduler.config.num_train_timesteps))


def flow_sigma_now(scheduler: Any) -> float | None:
    """σ of a flow scheduler's current state, ``scheduler.sigmas[scheduler.step_index]`` (after a ``step``, the σ
    the step moved to); ``None`` before the first step or past the grid."""
    sigmas, k = getattr(scheduler, "sigmas", None), getattr(scheduler, "step_index", None)
    if sigmas is None or k is None or k >= len(sigmas):
        return None
    return float(sigmas[k])


def _r(sigma: float) -> float:
    return math.sqrt((1 - sigma) ** 2 + sigma**2)


def _same(a: Tensor, b: Tensor) -> bool:
    """``a`` is ``b`` or a detached alias of it, unmodified (same memory, layout and version)."""
    if a is b:
        return True
    alias = a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
    return alias and (a.is_inference() or a._version == b._version)   # inference tensors keep no version


class FlowSchedulerModel:
    """A diffusers flow model ``model(x_σ, timestep, **cond) -> v`` in the loop's contract (VP view in, velocity
    out, ``prediction_type = "flow_prediction"``), for :class:`FlowSchedulerDriver`.

    The view the driver handed the loop is mapped back to the driver's own state object (bit for bit); any other
    input (a corrected view, a view that needs gradients) is scaled by r of the current stage's σ.
    """

    prediction_type = FLOW_PREDICTION

    def __init__(self, model: Any, driver: FlowSchedulerDriver):
        self.model, self.driver = model, driver
        self.num_train_timesteps = driver.schedule.num_train_timesteps
        shape = getattr(model, "sample_shape", None)
        if shape is not None:
            self.sample_shape = shape

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        return self.model(self.driver.flow_input(x), t, **cond)


class FlowSchedulerDriver:
    """:func:`run_loop`'s driver for a diffusers flow scheduler (module docstring). The scheduler passed in is not
    mutated: the run uses a fresh copy with ``set_timesteps`` called again (with ``mu`` / ``sigmas`` where given).
    """

    def __init__(self, scheduler: Any, num_inference_steps: int | None, timesteps: Sequence[float] | None,
                 sigmas: Sequence[float] | None, mu: float | None, device: Any, step_kwargs: Mapping[str, Any]):
        self.name = check_flow_scheduler(scheduler, step_kwargs)
        self.flow = flow_schedule_of(scheduler)
        self.schedule = self.flow.vp_schedule
        self.clip_x0 = None
        self.stateful = True   # every one of them advances a step index in step
        sched = type(scheduler).from_config(scheduler.config)
        accepted = set(inspect.signature(sched.set_timesteps).parameters)
        kw = {k: v for k, v in (("timesteps", timesteps), ("sigmas", sigmas), ("mu", mu)) if v is not None}
        bad = sorted(set(kw) - accepted)
        if bad:
            raise ValueError(f"{self.name}.set_timesteps does not take {', '.join(bad)}")
        if "sigmas" in kw or "timesteps" in kw:
            kw = {k: list(v) if k != "mu" else v for k, v in kw.items()}
        sched.set_timesteps(num_inference_steps, device=device, **kw)
        self.scheduler = sched
        accepted = set(inspect.signature(sched.step).parameters)
        bad = [k for k in step_kwargs if k not in accepted]
        if bad:
            raise ValueError(f"{self.name}.step does not take {', '.join(bad)}")
        self.step_kwargs = dict(step_kwargs)
        integer = not sched.timesteps.is_floating_point()
        self.model_t_dtype = torch.int64 if integer else None
        self._stages, self._at, self._to = self._make_plan()
        self._k = 0
        self._view: tuple[Tensor, Tensor] | None = None

    def _make_plan(self) -> tuple[list[Stage], list[float], list[float]]:
        """Stages with the σ of the state each model call sees (``_at``) and the σ its update reaches (``_to``):
        ``sigmas[k]`` and ``sigmas[k + 1]`` for every scheduler here (Heun repeats its inner σs as its timesteps)."""
        ts = self.scheduler.timesteps
        sig = [float(s) for s in self.scheduler.sigmas]
        heun = self.name == "FlowMatchHeunDiscreteScheduler"
        stages, i = [], 0
        for k in range(len(ts)):
            model_t = ts[k].item()
            first = not heun or k % 2 == 0
            last = not heun or k % 2 == 1 or k == len(ts) - 1
            s, s_next = sig[k], sig[k + 1]
            t_prev = -1 if s_next <= 0 else self._cls(s_next)
            stages.append(Stage(i, self._cls(s), t_prev, model_t, float(FlowSchedule.alpha_bar(torch.tensor(s))),
                                first, last))
            i += int(last)
        return stages, sig[:-1], sig[1:]

    def _cls(self, sigma: float) -> int:
        return int(self.flow.class_of(torch.tensor(sigma, dtype=torch.float64)))

    def plan(self) -> list[Stage]:
        return self._stages

    def model_input(self, x: Tensor, stage: Stage, k: int) -> Tensor:
        """The VP view ``x_σ / r`` (remembered with its state, which the model then gets instead)."""
        self._k = k
        view = x / _r(self._at[k])
        self._view = (view, x)
        return view

    def flow_input(self, x: Tensor) -> Tensor:
        """What the flow model gets for the VP input ``x`` at the current stage (:class:`FlowSchedulerModel`)."""
        if self._view is not None and not x.requires_grad and _same(x, self._view[0]):
            return self._view[1]
        return x * _r(self._at[self._k])

    def vp_scale(self, k: int, after: bool) -> float:
        """r(σ) of stage ``k``'s state: before its update at ``sigmas[k]``, after it at ``sigmas[k + 1]``."""
        return _r(self._to[k] if after else self._at[k])

    def update(self, x: Tensor, pred: Prediction, stage: Stage, k: int, t: Tensor | None = None,
               t_prev: Tensor | None = None) -> Tensor:
        """``scheduler.step`` with the model's velocity, or ``v̂ = ε̂ - x̂_0`` where a score term changed it."""
        out = (pred.eps_hat - pred.x0_hat).to(pred.raw.dtype) if pred.guided else pred.raw
        self._view = None
        return self.scheduler.step(out, self.scheduler.timesteps[k], x, **self.step_kwargs).prev_sample


def sample_flow_scheduler(scheduler: Any, model: EpsModel, noise: Tensor, *, num_inference_steps: int | None = None,
                          timesteps: Sequence[float] | None = None, sigmas: Sequence[float] | None = None,
                          mu: float | None = None, terms: Sequence[Term] = (), cond: Mapping[str, Any] | None = None,
                          randn_like: RandnLike = torch.randn_like, generator: Any = None,
                          step_kwargs: Mapping[str, Any] | None = None,
                          callback: Callback | Sequence[Callback] | None = None, progress: bool = False) -> Tensor:
    """:func:`tagdiff.sample_scheduler` on a flow scheduler: ``model(x_σ, timestep, **cond) -> v`` as diffusers calls
    it, the run starting at ``noise`` (x at ``sigmas[0]``); returns the state at the grid's last σ (x_0 at σ = 0).

    Raises:
        ValueError: what :func:`check_flow_scheduler` refuses, a step term, score guidance on a grid starting at
            σ = 1 (ᾱ = 0), and everything :func:`run_loop` raises.
    """
    driver = FlowSchedulerDriver(scheduler, num_inference_steps, timesteps, sigmas, mu, noise.device,
                                 dict(step_kwargs or {}))
    if generator is not None and "generator" in inspect.signature(driver.scheduler.step).parameters:
        driver.step_kwargs["generator"] = generator
    scores, _, step_term = split_terms(terms)
    if step_term is not None:
        raise ValueError(f"step terms ({type(step_term).__name__}) are not supported on diffusers' flow schedulers "
                         "(their step cannot be retimed); use tagdiff.sample_flow")
    if scores and driver.plan()[0].alpha_bar == 0.0:
        raise ValueError("score guidance is undefined at sigma = 1 (alpha_bar = 0: x0 cannot be formed from a guided "
                         "eps); pass sigmas= starting below 1, or guide with correctors (TAG) only")
    out = run_loop(driver, FlowSchedulerModel(model, driver), noise, terms=terms, cond=cond, randn_like=randn_like,
                   callback=callback, progress=progress)
    scale = driver.vp_scale(len(driver.plan()) - 1, after=True)  # run_loop returns the VP view; 1 at σ = 0
    return out if scale == 1.0 else out * scale
