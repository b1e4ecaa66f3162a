r"""TAG inside diffusers pipelines: :class:`TAGCallback` for ``callback_on_step_end``, :func:`sample_pipeline` for
the pipelines without callbacks (``DDPMPipeline``, ``DDIMPipeline``), and where diffusers' guiders fit.

**Pipelines with ``callback_on_step_end``** (``StableDiffusionPipeline`` and most others). The callback runs after
``latents = scheduler.step(...)``, so the ``latents`` it sees are x_{t_prev} and a correction there is TAG's Alg. 2
placement (the paper's App. E.2) with target the timestep the step moved to::

    pipe(prompt, callback_on_step_end=TAGCallback(time_predictor, omega=0.5))

* VP schedulers (DDIM, DDPM, PNDM, DPM-Solver(++), UniPC, DEIS): the target is ``scheduler.timesteps[i + 1]``.
  Two diffusers details carry over unchanged: DDIM with ``timestep_spacing="linspace"`` steps to ``t - T // N``,
  which is not always the next grid point; PNDM's PLMS re-does its first step from the saved x_T at step 1, so the
  state correction after step 0 only reaches the model input of step 1.
* σ-space schedulers (Euler, Euler-Ancestral, Heun, KDPM2, LMS, DPM-SDE; their state is x_σ = x_VP sqrt(1 + σ²),
  the initial σ ≈ 14.6 for SD, float timesteps): σ is the state's, ``scheduler.sigmas[scheduler.step_index]`` after
  the step (:func:`tagdiff.scheduler_loop.vp_scale`); the time predictor sees x_VP = x_σ / sqrt(1 + σ²), the target
  is the nearest training timestep in log σ (:meth:`VPSchedule.t_from_sigma`), and the correction maps back as
  Δx_σ = sqrt(1 + σ²) Δx_VP. Second-order schedulers (Heun, KDPM2) call back after each half step; TAG acts at step
  boundaries only (``scheduler.state_in_first_order``).
* Flow schedulers (SD3, Flux, ...: ``FlowMatchEulerDiscreteScheduler`` with its shifts, ``FlowMatchHeunDiscrete``,
  DPM-Solver++ / UniPC with ``use_flow_sigmas``; :mod:`tagdiff.sampling.flow_schedulers`): the latents are
  x_σ = (1 - σ) x_0 + σ ε at σ = ``scheduler.sigmas[scheduler.step_index]``. The time predictor is a σ-bin
  predictor (:func:`tagdiff.time_predictor.flow_time_loss`; schedule ``FlowSchedule(num_train_timesteps=T)
  .vp_schedule``, which the callback uses), it sees the VP view x_σ / r with r = sqrt((1 - σ)² + σ²), the target is
  the nearest σ bin, and the correction is Δx_σ = r ω_t TLS. Flux's packed latents ``(B, H/2 · W/2, 4C)`` are
  unpacked for a ``(C, H, W)`` predictor (:func:`unpack_latents`, as ``FluxPipeline._unpack_latents``) and the
  correction packed back. Flow schedulers tagdiff does not drive (``FlowMatchLCMScheduler``, DEIS's flow σs, ...)
  are refused at the first call, before any correction.
* After the last step there is no target (the state is x_0): the callback returns the latents unchanged.
* ω = 0 (or a step outside the window) returns the pipeline's own latents object: the pipeline's output is
  reproduced bit for bit.

Pipelines call the callback under ``torch.no_grad()``; the TLS is computed under ``torch.enable_grad()`` on a detached
copy (:class:`tagdiff.TemporalAlignment`). The callback does not touch the scheduler (its step index and multistep
history stay as the pipeline left them; see :mod:`tagdiff.scheduler_loop` for what a correction means to a multistep
solver's history).

**``DDPMPipeline`` / ``DDIMPipeline``** have no callback, and ``DDIMPipeline.__init__`` rebuilds its scheduler from
the config, so a scheduler wrapper handed to it is silently dropped. :func:`sample_pipeline` is the documented
equivalent: it takes the pipeline's own UNet and scheduler and runs the pipeline's loop through
:func:`tagdiff.sample_scheduler` with any tagdiff terms (TAG at Alg. 1 or Alg. 2 placement, CFG-family and gradient
guidance), drawing the same initial noise; with no terms its output equals the pipeline's bit for bit.

**Guiders** (``diffusers.guiders``: ``ClassifierFreeGuidance``, ``AdaptiveProjectedGuidance``, ...) cannot carry
TAG: a guider's ``forward(pred_cond, pred_uncond)`` combines the denoiser's predictions and never sees the latents,
ᾱ_t or the scheduler, while TAG moves the *state* along ∇_x log p_φ(t | x_t). Guiders and TAG compose instead: run
the guider as usual and add TAG with :class:`TAGCallback` (classic pipelines) or as a denoise-loop block of a
modular pipeline inserted after the ``"after_denoiser"`` step (not shipped here). The CFG-family guiders have
tagdiff counterparts as score terms (:mod:`tagdiff.guidance.cfg`; ``AdaptiveProjectedGuidance`` equals
:class:`tagdiff.guidance.cfg.AdaptiveProjectedGuidance` on the same inputs), usable in tagdiff's own loops.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..guidance.temporal import TemporalAlignment, check_time_predictor
from ..metrics.time_gap import time_gap
from ..models.unet import UNetEpsModel
from ..sampling.flow_schedulers import flow_schedule_of, flow_sigma_now, is_flow_scheduler
from ..sampling.schedulers import (
    SIGMA_SPACE_SCHEDULERS,
    check_keeps_corrections,
    check_scheduler,
    sample_scheduler,
    state_alpha_bar,
    vp_scale,
)
from ..sampling.schedules import VPSchedule
from ..sampling.terms import Term

try:  # the base class diffusers pipelines recognise (tensor_inputs read from it)
    from diffusers.callbacks import PipelineCallback as _CallbackBase
except ImportError:  # pragma: no cover - diffusers < 0.28
    _CallbackBase = object

__all__ = ["TAGCallback", "callback_target", "pack_latents", "sample_pipeline", "unpack_latents"]


def pack_latents(x: Tensor) -> Tensor:
    """``(B, C, H, W)`` latents as Flux pipelines pack them: 2×2 patches into tokens, ``(B, H/2 · W/2, 4C)``
    (``FluxPipeline._pack_latents``)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(latents: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """The inverse of :func:`pack_latents`: packed ``(B, H/2 · W/2, 4C)`` to ``(B, *shape)``, ``shape = (C, H, W)``.

    Raises:
        ValueError: packed latents that do not hold ``shape``'s 2×2 patches.
    """
    c, h, w = shape
    b = latents.shape[0]
    if h % 2 or w % 2 or tuple(latents.shape[1:]) != ((h // 2) * (w // 2), 4 * c):
        raise ValueError(f"latents of shape {tuple(latents.shape)} are not packed (B, seq, 4C) latents of a "
                         f"(B, {c}, {h}, {w}) time predictor")
    return latents.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def callback_target(scheduler: Any, step_index: int, schedule: VPSchedule) -> tuple[int, float] | None:
    """The TAG target of the state a pipeline hands ``callback_on_step_end`` after step ``step_index``.

    Returns:
        ``(t_prev, scale)``: the training timestep of the state and x_scheduler / x_VP (sqrt(1 + σ²) for σ-space
        schedulers, 1 for VP ones; for flow schedulers the nearest σ bin and r(σ)); ``None`` where there is no
        target (after the last step, or between the two model calls of a second-order scheduler's step).

    Raises:
        ValueError: a scheduler tagdiff cannot drive (:func:`tagdiff.scheduler_loop.check_scheduler`).
    """
    name = check_scheduler(scheduler)
    if is_flow_scheduler(scheduler):   # x_σ at σ = sigmas[step_index]: the σ bin, r(σ)
        sigma = flow_sigma_now(scheduler)
        if not bool(getattr(scheduler, "state_in_first_order", True)) or sigma is None or sigma <= 0.0:
            return None
        flow = flow_schedule_of(scheduler)
        return int(flow.class_of(torch.tensor(sigma, dtype=torch.float64))), float(flow.r(torch.tensor(sigma)))
    if name in SIGMA_SPACE_SCHEDULERS:
        if not bool(getattr(scheduler, "state_in_first_order", True)):
            return None
        ab = state_alpha_bar(scheduler)
        if ab is None or ab >= 1.0:
            return None
        sigma = ((1.0 - ab) / ab) ** 0.5
        return int(schedule.t_from_sigma(torch.tensor(sigma, dtype=torch.float64))), vp_scale(scheduler)
    timesteps = scheduler.timesteps
    if step_index + 1 >= len(timesteps):
        return None
    return int(round(float(timesteps[step_index + 1]))), 1.0


class TAGCallback(_CallbackBase):
    """TAG as a diffusers ``callback_on_step_end`` (Alg. 2 placement; see the module docstring for the targets).

    Args:
        time_predictor: a :class:`~tagdiff.time_predictor.TimePredictor` over the pipeline's latents (VP space, the
            pipeline scheduler's T training timesteps; σ bins on flow pipelines, unpacked ``(C, H, W)`` latents on
            Flux's), in ``eval()`` mode, on the pipeline's device.
        omega: ω_0; the correction is ω_t · TLS with ω_t = ω_0 (1 - ᾱ_t) by default (docs/notation.md §3.3).
        omega_schedule, window, condition, on_nonfinite: as in :class:`tagdiff.TemporalAlignment`.
        schedule: the VP schedule the predictor was trained on; ``None`` reads it from the pipeline's scheduler
            (:meth:`VPSchedule.from_diffusers`; a flow scheduler's σ bins, :func:`flow_schedule_of`) at each call.
        record_time_gap: also record the Time Gap |argmax p_φ(· | x_VP) − t_prev| of every state the callback sees
            (before its correction; one more predictor evaluation per step, the latents untouched), also at ω = 0.

    Attributes:
        history: one ``(step_index, t_prev, ‖Δx_VP‖ per sample)`` per correction of the last run (cleared at step 0).
        time_gaps: with ``record_time_gap``, one ``(step_index, t_prev, gap per sample)`` per state with a target.

    Raises:
        ValueError (at the first call, before any correction): an unsupported scheduler, a scheduler that discards
            corrections between steps (UniPC with its corrector on: pass ``disable_corrector``; PNDM), or a predictor
            whose T, schedule or input shape does not match the pipeline's.
    """

    tensor_inputs = ["latents"]

    def __init__(self, time_predictor: Callable[..., Tensor], omega: float = 1.0,
                 omega_schedule: str | Callable[[Tensor, VPSchedule], Tensor] = "one_minus_alpha_bar",
                 window: tuple[int, int] | None = None, condition: Tensor | int | None = None,
                 schedule: VPSchedule | None = None, on_nonfinite: str = "raise", record_time_gap: bool = False):
        if _CallbackBase is not object:
            super().__init__()
        self.tag = TemporalAlignment(time_predictor, omega, omega_schedule, placement="post", window=window,
                                     condition=condition, on_nonfinite=on_nonfinite)
        self.schedule = schedule
        self.record_time_gap = record_time_gap
        self._checked: tuple[int, ...] | None = None
        self.history: list[tuple[int, int, Tensor]] = []
        self.time_gaps: list[tuple[int, int, Tensor]] = []

    def _schedule_of(self, scheduler: Any) -> VPSchedule:
        if self.schedule is not None:
            return self.schedule
        return flow_schedule_of(scheduler).vp_schedule if is_flow_scheduler(scheduler) else \
            VPSchedule.from_diffusers(scheduler)

    def callback_fn(self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]
                    ) -> dict[str, Any]:
        scheduler = pipeline.scheduler
        if step_index == 0:   # the first call, before any correction: refuse what TAG cannot correct
            self.history, self.time_gaps = [], []
            check_scheduler(scheduler)
            check_keeps_corrections(scheduler, [self.tag], len(scheduler.timesteps))
        schedule = self._schedule_of(scheduler)
        target = callback_target(scheduler, step_index, schedule)
        latents = callback_kwargs["latents"]
        if target is None or (self.tag.omega == 0.0 and not self.record_time_gap):
            return callback_kwargs
        t_prev, scale = target
        t = torch.full((latents.shape[0],), t_prev, dtype=torch.long, device=latents.device)
        x_vp = self._vp_state(latents, scale, schedule)
        if self.record_time_gap:
            c = None if self.tag.condition is None else torch.as_tensor(self.tag.condition, device=x_vp.device)
            self.time_gaps.append((step_index, t_prev, time_gap(self.tag.time_predictor, x_vp, t, c).cpu()))
        if self.tag.omega == 0.0 or not self.tag.strength.active(t):
            return callback_kwargs
        step = self.tag.tls_step(x_vp, t, schedule)
        self.history.append((step_index, t_prev, step.reshape(step.shape[0], -1).norm(dim=-1).detach()))
        if step.shape != latents.shape:   # packed latents: the correction packed as the pipeline packs them
            step = pack_latents(step)
        callback_kwargs["latents"] = latents + (scale * step).to(latents.dtype)
        return callback_kwargs

    def _vp_state(self, latents: Tensor, scale: float, schedule: VPSchedule) -> Tensor:
        """x_VP = latents / scale in the predictor's dtype, checked against the predictor once per shape."""
        x_vp = latents.detach() / scale
        shape = getattr(self.tag.time_predictor, "sample_shape", None)
        if x_vp.ndim == 3 and shape is not None and len(shape) == 3 and tuple(x_vp.shape[1:]) != tuple(shape):
            x_vp = unpack_latents(x_vp, tuple(shape))
        params = getattr(self.tag.time_predictor, "parameters", None)
        first = next(iter(params()), None) if callable(params) else None
        if first is not None and first.dtype != x_vp.dtype:  # e.g. a float32 predictor in a float16 pipeline
            x_vp = x_vp.to(first.dtype)
        shape = tuple(x_vp.shape[1:])
        if self._checked != shape:
            check_time_predictor(self.tag.time_predictor, x_vp, schedule)
            self._checked = shape
        return x_vp

    def __call__(self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]
                 ) -> dict[str, Any]:
        return self.callback_fn(pipeline, step_index, timestep, callback_kwargs)

    def __repr__(self) -> str:
        return f"TAGCallback({self.tag!r})"


def sample_pipeline(pipeline: Any, *, terms: Sequence[Term] = (), batch_size: int = 1,
                    num_inference_steps: int = 50, generator: torch.Generator | list[torch.Generator] | None = None,
                    eta: float = 0.0, use_clipped_model_output: bool | None = None, clip_x0: float | None = None,
                    cond: dict[str, Any] | None = None, null_class: int | None = None, output_type: str = "pil",
                    return_dict: bool = True, progress: bool | None = None) -> Any:
    """``DDPMPipeline`` / ``DDIMPipeline.__call__`` with tagdiff terms: the pipeline's own UNet and scheduler.

    Draws x_T exactly as the pipeline does (``randn_tensor`` of the UNet's sample shape with ``generator``), runs
    :func:`tagdiff.sample_scheduler` over ``pipeline.scheduler`` (any scheduler tagdiff supports, so
    ``pipeline.scheduler = EulerDiscreteScheduler.from_config(...)`` works too) and post-processes like the pipeline
    (``(x / 2 + 0.5).clamp(0, 1)``, then ``"np"`` / ``"pil"``). With no terms (or ω = 0) the images equal
    ``pipeline(batch_size=..., num_inference_steps=..., generator=..., eta=...)`` bit for bit.

    Args:
        pipeline: a diffusers pipeline with ``unet`` (``UNet2DModel``) and ``scheduler`` attributes.
        terms: tagdiff terms (:class:`tagdiff.TemporalAlignment`, CFG-family, DPS, ...); they see VP-space x and
            integer training timesteps.
        eta, use_clipped_model_output: DDIM's (passed to ``scheduler.step`` where it takes them, as the pipeline).
        clip_x0: as in :func:`tagdiff.sample_scheduler` (``None``: diffusers' behaviour).
        cond: keyword conditioning for the UNet (``{"y": labels}`` for a class-conditional ``UNet2DModel``).
        null_class: the UNet's null class index if it was trained with label dropout (``y = -1`` then selects it;
            :class:`tagdiff.interop.UNetEpsModel`), so that CFG terms can use ``null_cond={"y": -1}``.
        output_type: ``"pil"``, ``"np"`` (``(B, H, W, C)`` in [0, 1]) or ``"pt"`` (``(B, C, H, W)``).
        return_dict: return an ``ImagePipelineOutput`` (else a 1-tuple), as the pipeline.
        progress: a progress bar; ``None`` (default) shows one unless the pipeline's was disabled
            (``pipeline.set_progress_bar_config(disable=True)``), as the pipeline's own call does.

    Raises:
        ValueError: a bad ``output_type`` or generator list, a pipeline that is not an unconditional ``UNet2DModel``
            one (e.g. ``StableDiffusionPipeline``: the message points to :class:`TAGCallback`), and everything
            :func:`tagdiff.sample_scheduler` raises.
    """
    from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
    from diffusers.utils.torch_utils import randn_tensor

    if output_type not in ("pil", "np", "pt"):
        raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
    unet_class = type(getattr(pipeline, "unet", None)).__name__
    if unet_class != "UNet2DModel" or not hasattr(pipeline, "scheduler"):
        raise ValueError(f"sample_pipeline drives unconditional pixel pipelines (DDPMPipeline, DDIMPipeline: a "
                         f"UNet2DModel and a scheduler); {type(pipeline).__name__} has a {unet_class}: pass "
                         "callback_on_step_end=TAGCallback(time_predictor, omega) to the pipeline's own call instead")
    if progress is None:  # as the pipeline: a bar unless set_progress_bar_config(disable=True)
        progress = not getattr(pipeline, "_progress_bar_config", {}).get("disable", False)
    if isinstance(generator, list) and len(generator) != batch_size:
        raise ValueError(f"got {len(generator)} generators for batch_size={batch_size}")
    unet, scheduler = pipeline.unet, pipeline.scheduler
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    shape = (batch_size, unet.config.in_channels, *size)
    device = getattr(pipeline, "_execution_device", unet.device)
    noise = randn_tensor(shape, generator=generator, device=device, dtype=unet.dtype)
    kind = scheduler.config.get("prediction_type", "epsilon")
    model = UNetEpsModel(unet, scheduler.config.num_train_timesteps, kind, null_class)
    step_kwargs: dict[str, Any] = {}
    accepted = set(inspect.signature(scheduler.step).parameters)
    if "eta" in accepted:
        step_kwargs["eta"] = eta
    if "use_clipped_model_output" in accepted:
        step_kwargs["use_clipped_model_output"] = use_clipped_model_output
    image = sample_scheduler(scheduler, model, noise, num_inference_steps=num_inference_steps, terms=terms, cond=cond,
                             generator=generator, step_kwargs=step_kwargs, clip_x0=clip_x0, progress=progress)
    image = (image / 2 + 0.5).clamp(0, 1)
    if output_type != "pt":
        image = image.cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "pil":
            image = pipeline.numpy_to_pil(image)
    return ImagePipelineOutput(images=image) if return_dict else (image,)
