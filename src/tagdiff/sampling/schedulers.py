r"""Guidance and TAG with any diffusers scheduler: :func:`sample_scheduler` and its driver for :func:`run_loop`.

``scheduler.step`` does the update; tagdiff adds score terms to the model output and correctors to the state, and
nothing else changes: with no term the loop is the plain diffusers loop bit for bit::

    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(out, t, latents, **step_kwargs).prev_sample

What the schedulers differ in, and how each is handled:

* **σ-space states** (Euler, Euler-Ancestral, Heun, KDPM2, LMS): diffusers keeps x_σ = x_VP · sqrt(1 + σ²). Terms
  always see VP-space x: the model input ``scale_model_input(x_σ, t)`` *is* x_VP, and a corrector's change maps back
  as Δx_σ = sqrt(1 + σ²) Δx_VP (INTEGRATION.md). ᾱ of such a state is 1 / (1 + σ²), exactly.
* **Float timesteps** (σ-space schedulers interpolate t in log σ): the model gets the scheduler's float t, as in
  diffusers; terms and the time predictor get the **nearest training timestep in log σ** (``t_from_sigma``), i.e.
  the class whose noise level is closest to the state's. VP schedulers' integer timesteps are used as they are.
* **Multistep solvers** (DPM-Solver++, UniPC, DEIS, PNDM, LMS) keep a history of the model's x̂_0 (or ε)
  predictions. A corrector moves x between steps; the history then holds predictions made at the uncorrected
  states. They remain predictions of the same clean image (TAG moves x by O(ω) along the TLS), so the solver's
  extrapolation stays consistent to first order; what is lost is exactly the higher-order accuracy across the
  jump. Nothing in the scheduler's bookkeeping (step index, buffers) is touched, so nothing breaks (tested).
  Step terms that update twice per step (TFG recurrence) are refused on every diffusers scheduler but DDIM and
  DDPM (the others advance a step index in ``step``). **PNDM**'s Runge-Kutta warm-up repeats timesteps and
  restarts from saved states, so correctors are refused there. **UniPC** is another exception: its corrector (UniC)
  recomputes the current state from the *previous* one inside ``step``, so any
  change made to x between steps (TAG, drift, corruption) is discarded and only moves the point where the model was
  evaluated (on the toy mixture a drift then barely acts and TAG makes W1 worse, not better). Correctors with
  UniPC are therefore refused unless its corrector is disabled (``disable_corrector=list(range(N))``: UniP, a
  plain multistep predictor), which restores the expected behaviour. **DPM-Solver single-step** of order k > 1
  likewise computes every step of an order-k group from the sample saved at the group's start: refused unless
  ``solver_order=1``.
* **Second-order schedulers** (Heun, KDPM2) call the model twice per step (their ``timesteps`` repeat): score
  terms act at every model call, correctors once per step (before its first and after its last call), and the
  Time-Gap callback once per step. Step terms are refused there.
* **Prediction types**: the model's output (its ``prediction_type``, ε, v or x0) is converted to ε̂ for the terms
  and back to the scheduler's ``prediction_type`` for ``step`` (:mod:`tagdiff.predictions`); unguided outputs go to
  ``step`` unchanged.

* **Flow-matching schedulers** (``FlowMatchEulerDiscreteScheduler`` with shift / dynamic shifting (``mu``) /
  ``stochastic_sampling``, ``FlowMatchHeunDiscreteScheduler``, DPM-Solver++ and UniPC with ``use_flow_sigmas``) are
  driven by :class:`~tagdiff.sampling.flow_schedulers.FlowSchedulerDriver` in the same σ-space pattern: the state is
  x_σ = (1 - σ) x_0 + σ ε, terms see x_σ / r (r = sqrt((1 - σ)² + σ²)) with ᾱ(σ) = (1 - σ)² / r² and the nearest
  σ bin, a corrector's Δ maps back as r Δ, and the velocity model ``model(x_σ, timestep)`` is called as diffusers
  calls it (bit for bit without terms). What is refused there, and why: that module's docstring.

Refused by name: ``EDMEulerScheduler`` and ``EDMDPMSolverMultistepScheduler`` (EDM preconditioning, not a VP ε/v
model contract) and any scheduler class this module does not know.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .._utils import RandnLike
from .flow_schedulers import check_flow_scheduler, flow_sigma_now, is_flow_scheduler, sample_flow_scheduler
from .loop import Callback, Stage, run_loop
from .predictions import check_grid_prediction, check_prediction_type, from_eps, model_prediction_type
from .schedules import VPSchedule
from .terms import Corrector, EpsModel, Prediction, Term

__all__ = ["ALIAS_CONFIG", "SCHEDULER_ALIASES", "SIGMA_SPACE_SCHEDULERS", "SUPPORTED_SCHEDULERS", "SchedulerDriver",
           "check_keeps_corrections", "check_scheduler",
           "make_scheduler", "sample_scheduler", "state_alpha_bar", "vp_scale"]

SIGMA_SPACE_SCHEDULERS = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                          "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "LMSDiscreteScheduler",
                          "DPMSolverSDEScheduler")
VP_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
                 "DPMSolverSinglestepScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler")
SUPPORTED_SCHEDULERS = VP_SCHEDULERS + SIGMA_SPACE_SCHEDULERS
_SECOND_ORDER = ("HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
                 "DPMSolverSDEScheduler")


SCHEDULER_ALIASES = {"dpmpp2m": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler",
                     "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
                     "heun": "HeunDiscreteScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler",
                     "deis": "DEISMultistepScheduler", "ddim_diffusers": "DDIMScheduler",
                     "ddpm_diffusers": "DDPMScheduler", "unipc_p": "UniPCMultistepScheduler"}
# Aliases that also set scheduler config: unipc_p is UniPC with its corrector off (UniP), which keeps TAG's
# corrections (check_keeps_corrections); disable_corrector lists every step index a run can have.
ALIAS_CONFIG: dict[str, dict[str, Any]] = {"unipc_p": {"disable_corrector": list(range(10_000))}}


def make_scheduler(name: str, schedule_config: dict[str, Any], **kwargs: Any) -> Any:
    """A diffusers scheduler by alias (:data:`SCHEDULER_ALIASES`, e.g. ``"dpmpp2m"``) or class name, on a tagdiff
    schedule's diffusers config (``VPSchedule.to_diffusers_config()``), with extra config ``kwargs``.

    Raises:
        ValueError: an unknown or unsupported name (listing the aliases and supported classes).
    """
    import diffusers

    cls_name = SCHEDULER_ALIASES.get(name, name)
    kwargs = {**ALIAS_CONFIG.get(name, {}), **kwargs}
    cls = getattr(diffusers, cls_name, None) if cls_name.endswith("Scheduler") else None
    if cls is None:
        raise ValueError(f"unknown scheduler {name!r}; expected ddim, ddpm (tagdiff's own steps), one of "
                         f"{', '.join(SCHEDULER_ALIASES)}, or a diffusers class name "
                         f"({', '.join(SUPPORTED_SCHEDULERS)})")
    _check_name(cls_name)
    try:
        scheduler = cls(**schedule_config, **kwargs)
    except ImportError as e:  # e.g. DPMSolverSDEScheduler without torchsde
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{cls_name} needs a package that is not installed: {reason}") from None
    check_scheduler(scheduler)
    return scheduler


def check_scheduler(scheduler: Any) -> str:
    """Return the scheduler's class name if tagdiff can drive it (:data:`SUPPORTED_SCHEDULERS`, or a flow scheduler
    of :mod:`tagdiff.sampling.flow_schedulers`).

    Raises:
        ValueError: naming the scheduler (EDM schedulers with the reason) and listing the supported ones.
    """
    if is_flow_scheduler(scheduler):
        return check_flow_scheduler(scheduler)
    name = _check_name(type(scheduler).__name__)
    check_prediction_type(scheduler.config.get("prediction_type", "epsilon"))
    return name


def _check_name(name: str) -> str:
    if name.startswith("EDM"):
        raise ValueError(f"{name} is not supported: EDM schedulers precondition the model input (c_in, c_skip) "
                         "instead of the VP contract tagdiff's terms use; use EulerDiscreteScheduler")
    if name not in SUPPORTED_SCHEDULERS:
        raise ValueError(f"scheduler {name} is not supported; expected one of {', '.join(SUPPORTED_SCHEDULERS)}")
    return name


def _sigma_now(scheduler: Any) -> float | None:
    sigmas, k = getattr(scheduler, "sigmas", None), getattr(scheduler, "step_index", None)
    if sigmas is None or k is None or k >= len(sigmas):
        return None
    return float(sigmas[k])


def vp_scale(scheduler: Any) -> float:
    """x_scheduler / x_VP of the scheduler's *current* state (at its ``step_index``): sqrt(1 + σ²) for σ-space
    schedulers, r = sqrt((1 - σ)² + σ²) for flow ones, 1 for VP ones (and before the first step, where no σ is
    current yet)."""
    if is_flow_scheduler(scheduler):
        sigma = flow_sigma_now(scheduler)
        return 1.0 if sigma is None else ((1 - sigma) ** 2 + sigma**2) ** 0.5
    if type(scheduler).__name__ not in SIGMA_SPACE_SCHEDULERS:
        return 1.0
    sigma = _sigma_now(scheduler)
    return 1.0 if sigma is None else (sigma**2 + 1) ** 0.5


def state_alpha_bar(scheduler: Any) -> float | None:
    """ᾱ = 1 / (1 + σ²) of a σ-space scheduler's current state, (1 - σ)² / r² of a flow one's; ``None`` for VP
    schedulers (use ᾱ[t])."""
    if is_flow_scheduler(scheduler):
        sigma = flow_sigma_now(scheduler)
        return None if sigma is None else (1 - sigma) ** 2 / ((1 - sigma) ** 2 + sigma**2)
    if type(scheduler).__name__ not in SIGMA_SPACE_SCHEDULERS:
        return None
    sigma = _sigma_now(scheduler)
    return None if sigma is None else 1.0 / (1.0 + sigma**2)


def _fresh(scheduler: Any, num_inference_steps: int | None, timesteps: Sequence[int] | None, device: Any) -> Any:
    sched = type(scheduler).from_config(scheduler.config)
    if timesteps is not None:
        sched.set_timesteps(timesteps=list(timesteps), device=device)
    else:
        sched.set_timesteps(num_inference_steps, device=device)
    return sched


class SchedulerDriver:
    """:func:`run_loop`'s driver for a diffusers scheduler (see the module docstring for the conventions).

    The scheduler object passed in is never mutated: the run uses a fresh copy with ``set_timesteps`` called again.
    :meth:`plan` reads each model call's timestep and σ from it; for second-order schedulers it dry-runs another
    copy (zero model outputs on a 1-element sample) to learn where their steps begin and end.
    """

    def __init__(self, scheduler: Any, schedule: VPSchedule, num_inference_steps: int | None,
                 timesteps: Sequence[int] | None, device: Any, step_kwargs: Mapping[str, Any],
                 clip_x0: float | None, model_kind: str):
        self.name = check_scheduler(scheduler)
        self.schedule, self.clip_x0, self.model_kind = schedule, clip_x0, model_kind
        self.kind = scheduler.config.get("prediction_type", "epsilon")
        # DDIM and DDPM step on timestep values alone; every other scheduler advances a step index (and some keep
        # histories) in step, so a second update in the same step would corrupt it
        self.stateful = self.name not in ("DDIMScheduler", "DDPMScheduler")
        self._args = (scheduler, num_inference_steps, timesteps, device)
        self.scheduler = _fresh(*self._args)
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        bad = [k for k in step_kwargs if k not in accepted]
        if bad:
            raise ValueError(f"{self.name}.step does not take {', '.join(bad)}; it takes "
                             f"{', '.join(sorted(accepted - {'self', 'model_output', 'timestep', 'sample'}))}")
        self.step_kwargs = dict(step_kwargs)
        self._plan: list[Stage] | None = None

    def plan(self) -> list[Stage]:
        if self._plan is None:
            self._plan = self._dry_run()
            abs_ = [s.alpha_bar if s.alpha_bar is not None else self.schedule.alpha_bar_host(s.t) for s in self._plan]
            check_grid_prediction(abs_, self.kind, False)  # the scheduler's own step must form x0 as well
        return self._plan

    def _dry_run(self) -> list[Stage]:
        if self.name not in _SECOND_ORDER:  # one model call per step: the plan follows from timesteps and σs
            return self._first_order_plan()
        sched = _fresh(*self._args)
        z = torch.zeros(1, 1, device=self._args[3])
        sigma_space = self.name in SIGMA_SPACE_SCHEDULERS
        raw: list[tuple[Any, float | None, bool, bool, float | None]] = []
        for t in sched.timesteps:
            first = bool(getattr(sched, "state_in_first_order", True))
            sched.scale_model_input(z, t)
            ab = state_alpha_bar(sched)
            kw = {k: v for k, v in self.step_kwargs.items() if k != "generator"}
            z = sched.step(torch.zeros_like(z), t, z, **kw).prev_sample
            last = bool(getattr(sched, "state_in_first_order", True))
            raw.append((t.item(), ab, first, last, state_alpha_bar(sched)))
        stages, i = [], 0
        ts = [r[0] for r in raw]
        for k, (model_t, ab, first, last, ab_after) in enumerate(raw):
            if sigma_space:
                t_int = self._t_of(ab)
                t_prev = -1 if ab_after is None or ab_after >= 1.0 else self._t_of(ab_after)
            else:
                t_int = int(round(float(model_t)))
                later = [int(round(float(v))) for v in ts[k + 1:] if int(round(float(v))) != t_int]
                t_prev = later[0] if later else -1
            model_t = int(model_t) if not sigma_space and float(model_t).is_integer() else model_t
            last = last or k == len(raw) - 1  # a second-order scheduler's final step is a single Euler stage
            stages.append(Stage(i, t_int, t_prev, model_t, ab, first, last))
            i += int(last)
        return stages

    def _first_order_plan(self) -> list[Stage]:
        ts = [v.item() for v in self.scheduler.timesteps]
        sigma_space = self.name in SIGMA_SPACE_SCHEDULERS
        sigmas = [float(v) for v in self.scheduler.sigmas] if sigma_space else []
        stages = []
        for k, model_t in enumerate(ts):
            if sigma_space:
                ab, ab_after = 1 / (1 + sigmas[k] ** 2), 1 / (1 + sigmas[k + 1] ** 2)
                t_int, t_prev = self._t_of(ab), (-1 if ab_after >= 1.0 else self._t_of(ab_after))
            else:
                ab, t_int = None, int(round(float(model_t)))
                t_prev = int(round(float(ts[k + 1]))) if k + 1 < len(ts) else -1
                model_t = int(model_t) if float(model_t).is_integer() else model_t
            stages.append(Stage(k, t_int, t_prev, model_t, ab, True, True))
        return stages

    def _t_of(self, alpha_bar: float) -> int:
        return int(self.schedule.t_from_sigma(torch.tensor(((1 - alpha_bar) / alpha_bar) ** 0.5)))

    def model_input(self, x: Tensor, stage: Stage, k: int) -> Tensor:
        return self.scheduler.scale_model_input(x, self.scheduler.timesteps[k])

    def vp_scale(self, k: int, after: bool) -> float:
        return vp_scale(self.scheduler)

    def _output(self, x_vp: Tensor, eps_hat: Tensor, x0_hat: Tensor, raw: Tensor, guided: bool, stage: Stage) -> Tensor:
        """What ``scheduler.step`` gets: the raw output where nothing changed it, else ε̂ (x̂_0 clipped to
        ``clip_x0`` and ε re-derived from it) in the scheduler's prediction type."""
        if not guided and self.clip_x0 is None and self.kind == self.model_kind:
            return raw
        ab = torch.tensor(stage.alpha_bar if stage.alpha_bar is not None else self.schedule.alpha_bar_host(stage.t),
                          dtype=torch.float64).to(device=x_vp.device, dtype=x_vp.dtype)
        if self.clip_x0 is not None:
            x0_hat = x0_hat.clamp(-self.clip_x0, self.clip_x0)
            eps_hat = (x_vp - ab.sqrt() * x0_hat) / (1 - ab).sqrt()
        if self.kind == "v_prediction":   # from the pair (ε̂, x̂_0): defined at ᾱ = 0 too (zero terminal SNR)
            return ab.sqrt() * eps_hat - (1 - ab).sqrt() * x0_hat
        if self.kind == "sample":
            return x0_hat
        return from_eps(eps_hat, x_vp, ab, self.kind)

    def _step(self, out: Tensor, x: Tensor, k: int) -> Tensor:
        return self.scheduler.step(out, self.scheduler.timesteps[k], x, **self.step_kwargs).prev_sample

    def update(self, x: Tensor, pred: Prediction, stage: Stage, k: int, t: Tensor | None = None,
               t_prev: Tensor | None = None) -> Tensor:
        """``scheduler.step`` with the guided prediction (its own timestep: a scheduler is not retimed)."""
        x_vp = x / self.vp_scale(k, after=False)
        return self._step(self._output(x_vp, pred.eps_hat, pred.x0_hat, pred.raw, pred.guided, stage), x, k)


def check_keeps_corrections(scheduler: Any, terms: Sequence[Term], num_steps: int) -> None:
    """Refuse correctors where the scheduler discards state changes made between steps (module doc): UniPC's
    corrector; PNDM, whose Runge-Kutta warm-up restarts from saved states and repeats timesteps; DPM-Solver
    single-step of order > 1, which computes each step of an order-k group from the sample saved at the group's
    start (``self.sample``). Checked by reading each ``step`` of diffusers' schedulers for a sample kept across
    calls, and measured (``benchmarks/callback_table.py``: a correction that changes nothing downstream); the other
    multistep schedulers tagdiff drives (DPM-Solver++ 2M/SDE, DEIS) keep model outputs, not samples, so a corrected
    sample carries on.

    Raises:
        ValueError: naming the scheduler, the correctors and the fix."""
    name = type(scheduler).__name__
    correctors = [type(term).__name__ for term in terms if isinstance(term, Corrector) and term.active]
    if not correctors:
        return
    if name == "PNDMScheduler":
        raise ValueError(f"PNDMScheduler restarts its warm-up steps from saved states, discarding the changes "
                         f"{', '.join(correctors)} make between steps; use another scheduler, e.g. "
                         "pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)")
    if name == "DPMSolverSinglestepScheduler" and scheduler.config.get("solver_order", 2) > 1:
        raise ValueError(f"DPMSolverSinglestepScheduler (solver_order {scheduler.config.get('solver_order', 2)}) "
                         f"computes every step of an order-k group from the state at the group's start, discarding "
                         f"the changes {', '.join(correctors)} make inside a group; build it with solver_order=1 or "
                         "use DPMSolverMultistepScheduler")
    disabled = set(scheduler.config.get("disable_corrector") or [])
    if name == "UniPCMultistepScheduler" and not set(range(num_steps)) <= disabled:
        raise ValueError(f"UniPCMultistepScheduler's corrector recomputes each state from the previous one and "
                         f"discards the changes {', '.join(correctors)} make between steps; build it with "
                         f"disable_corrector=list(range({num_steps})) (tagdiff sample --sampler unipc_p) or use "
                         "DPMSolverMultistepScheduler")


def sample_scheduler(scheduler: Any, eps_model: EpsModel, noise: Tensor, *, num_inference_steps: int | None = None,
                     timesteps: Sequence[int] | None = None, terms: Sequence[Term] = (),
                     cond: Mapping[str, Any] | None = None, randn_like: RandnLike = torch.randn_like,
                     generator: torch.Generator | list[torch.Generator] | None = None,
                     step_kwargs: Mapping[str, Any] | None = None, clip_x0: float | None = None,
                     callback: Callback | Sequence[Callback] | None = None, progress: bool = False,
                     sigmas: Sequence[float] | None = None, mu: float | None = None) -> Tensor:
    """Sample with a diffusers scheduler, tagdiff's score terms, correctors (TAG) and step terms.

    Flow-matching schedulers (``FlowMatchEuler``/``Heun``, DPM-Solver++ / UniPC with ``use_flow_sigmas``;
    :mod:`tagdiff.sampling.flow_schedulers`) take a velocity model ``model(x_σ, timestep, **cond)`` as diffusers
    calls it, start from ``noise`` itself and return the state at the grid's last σ (x_0); terms see the VP view.

    Args:
        scheduler: a diffusers scheduler (:data:`SUPPORTED_SCHEDULERS`); its config defines the schedule (read with
            :meth:`VPSchedule.from_diffusers`) and its ``prediction_type``. It is not mutated.
        eps_model: ``(x, t, **cond) -> output`` of the model's ``prediction_type`` (attribute; default ε), called
            with the VP-space model input and the scheduler's timestep, shape ``(B,)`` (float for σ-space ones).
        noise: x_T ~ N(0, I), shape ``(B, *D)``: multiplied by ``scheduler.init_noise_sigma`` here, as pipelines do.
        num_inference_steps / timesteps: the grid, as for ``scheduler.set_timesteps``.
        terms: as in :func:`tagdiff.sample`; they see VP-space x and integer training timesteps (module docstring).
        cond: keyword conditioning for the model. randn_like: noise for the terms (corruption, TFG smoothing).
        generator: passed to ``scheduler.step`` where it takes one (a list of per-sample generators keeps samples
            independent of the batch, e.g. ``StackedRandomGenerator(seeds).generators``).
        step_kwargs: extra keyword arguments of ``scheduler.step`` (e.g. ``{"eta": 1.0}`` for DDIM).
        clip_x0: clamp x̂_0 to ``[-clip_x0, clip_x0]`` and hand the scheduler the ε re-derived from it (DDIM's
            ``use_clipped_model_output=True`` for every scheduler). ``None`` (default) keeps diffusers' behaviour.
            Gradient guidance (DPS) diverges without it on images (INTEGRATION.md).
        callback: called once per reverse step with a :class:`~tagdiff.StepInfo` (e.g. ``TimeGapRecorder``).
        sigmas / mu: flow schedulers only: a custom σ grid and the dynamic shift, passed to ``set_timesteps``.

    Returns:
        x_0 in VP space, shape of ``noise``.

    Raises:
        ValueError: an unsupported scheduler or prediction type, a model whose T differs from the scheduler's,
            a step keyword the scheduler's ``step`` does not take, a step term on a scheduler that cannot host it,
            an ε-model on a zero-terminal-SNR step; and everything :func:`tagdiff.sample` raises.
    """
    if num_inference_steps is None and timesteps is None and sigmas is None:
        raise ValueError("give num_inference_steps or timesteps")
    n = num_inference_steps if num_inference_steps is not None else len(timesteps if sigmas is None else sigmas)
    check_keeps_corrections(scheduler, terms, n)
    if is_flow_scheduler(scheduler):
        return sample_flow_scheduler(scheduler, eps_model, noise, num_inference_steps=num_inference_steps,
                                     timesteps=timesteps, sigmas=sigmas, mu=mu, terms=terms, cond=cond,
                                     randn_like=randn_like, generator=generator, step_kwargs=step_kwargs,
                                     callback=callback, progress=progress)
    if sigmas is not None or mu is not None:
        raise ValueError("sigmas and mu apply to flow-matching schedulers (FlowMatchEulerDiscreteScheduler, ...)")
    check_scheduler(scheduler)   # before reading its schedule
    schedule = VPSchedule.from_diffusers(scheduler)
    kind = model_prediction_type(eps_model)
    kw = dict(step_kwargs or {})
    driver = SchedulerDriver(scheduler, schedule, num_inference_steps, timesteps, noise.device, kw, clip_x0, kind)
    if generator is not None and "generator" in inspect.signature(driver.scheduler.step).parameters:
        driver.step_kwargs["generator"] = generator
    x = noise * driver.scheduler.init_noise_sigma
    return run_loop(driver, eps_model, x, terms=terms, cond=cond, randn_like=randn_like, callback=callback,
                    progress=progress)

