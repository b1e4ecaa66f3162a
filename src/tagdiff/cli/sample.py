"""``tagdiff sample``: draw samples from any checkpoint with any sampler, guidance and TAG options.

Writes ``samples.npz`` (``x``: ``(N, *D)`` float32 in VP data space, ``target``: ``(N,)`` or absent), ``summary.json``
(settings, Time Gap if a time predictor is given, seconds) and, for images, ``grid.png``.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import ensure_output_dir
from .._utils import resolve_device, seeded_noise
from ..guidance import ClassifierGuidance, Corruption, DPSGuidance, TemporalAlignment, Term, label_loss
from ..metrics.time_gap import TimeGapRecorder
from ..models.checkpoints import load_model
from ..models.flow_checkpoint import LoadedFlow
from ..models.load import load_checkpoint
from ..sampling.predictions import model_prediction_type
from ..sampling.samplers import SAMPLERS, get_sampler
from ..sampling.schedulers import make_scheduler, sample_scheduler
from ..sampling.schedules import VPSchedule
from ..training.distributed import finish, make_accelerator, shard
from .plots import save_grid

__all__ = ["DEFAULT_GUIDANCE_SCALE", "SampleConfig", "generate", "resolved_clip", "resolved_scale", "save_grid"]

# The demo's scales (dps_guidance_scale 16, cg_guidance_scale 4, the label experiment's), used when guidance_scale is
# None.
DEFAULT_GUIDANCE_SCALE = {"dps": 16.0, "cg": 4.0, "none": 0.0}


@dataclass(frozen=True)
class SampleConfig:
    """What ``tagdiff sample`` does. Guidance ``cg`` needs a noisy classifier, ``dps`` a clean one.

    ``guidance_scale=None`` takes the demo's scale for the guidance (:data:`DEFAULT_GUIDANCE_SCALE`: DPS 16, CG 4).
    ``clip_x0="auto"`` clamps x0_hat to [-1, 1] for image models (the demo's setting; unclipped DPS on images
    diverges to pure noise) and does not clip vector models; ``None`` never clips. ``device``: ``auto | cpu | cuda
    | mps``; x_T and the noise are drawn on the CPU from the seed and moved, so a seed gives the same noise on
    every device. ``allow_pickle`` lets a diffusers folder with only pickle weights load.

    ``vae``: a latent model's ``AutoencoderKL`` folder (:mod:`tagdiff.latent`). Sampling, TAG and the Time Gap then
    run on latents (the time predictor must be a latent one of the same VAE); DPS takes its clean-classifier loss
    through the decoder; ``clip_x0="auto"`` does not clip latents; the final latents are decoded, clamped to
    [-1, 1], and saved as images (``x``; the latents as ``z``). Classifier guidance (a noisy *image* classifier)
    is refused with a VAE.
    """

    checkpoint: str
    num_samples: int = 64
    sampler: str = "ddim"
    num_steps: int = 50
    eta: float = 1.0
    seed: int = 0
    guidance: str = "none"            # none | cg | dps
    classifier: str | None = None
    target: int | None = None
    guidance_scale: float | None = None
    time_predictor: str | None = None
    omega: float = 0.0                 # TAG ω_0; 0 disables TAG (the predictor still records the Time Gap)
    omega_schedule: str = "one_minus_alpha_bar"
    placement: str = "pre"
    corruption_std: float = 0.0
    clip_x0: float | str | None = "auto"
    bf16: bool = False
    per_sample_seeds: bool = False
    cfg_scale: float | None = None     # classifier-free guidance scale for class-conditional UNets (with --target)
    compile: bool = False              # torch.compile the ε-model's forward (first call compiles: seconds to minutes)
    device: str = "cpu"
    allow_pickle: bool = False
    timestep_spacing: str = "trailing"  # VPSchedule.timesteps; "linspace" is the TFG benchmark's grid (1 step: [0])
    steps_offset: int = 0
    vae: str | None = None             # the AutoencoderKL folder of a latent checkpoint (decoded at the end)
    prompt: str | None = None          # text-conditional pipelines (tagdiff.cli.pipeline): the prompt of every sample
    shift: float | None = None         # flow models: the σ grid's shift (default: the scheduler config's)


def resolved_scale(cfg: SampleConfig) -> float:
    """The guidance scale ``cfg`` uses (its own, or the demo's default for its guidance)."""
    return DEFAULT_GUIDANCE_SCALE.get(cfg.guidance, 0.0) if cfg.guidance_scale is None else float(cfg.guidance_scale)


def resolved_clip(cfg: SampleConfig, sample_shape: tuple[int, ...]) -> float | None:
    """The x0_hat clamp ``cfg`` uses for a model making samples of ``sample_shape``.

    Raises:
        ValueError: a zero, negative or non-finite ``clip_x0``.
    """
    if cfg.clip_x0 == "auto":
        return 1.0 if len(sample_shape) == 3 else None
    if cfg.clip_x0 is None:
        return None
    v = float(cfg.clip_x0)
    if not (v > 0 and v < float("inf")):
        raise ValueError(f"clip_x0 must be a positive number, 'auto' or None, got {cfg.clip_x0!r}")
    return v


def _check_classifier(guidance: str, clf: Any, path: str, schedule: VPSchedule, sample_shape: tuple[int, ...]) -> None:
    """cg needs a noise-aware classifier p(y | x_t, t) on the model's T, dps a clean one p(y | x); shapes must match."""
    from ..models.classifiers import CleanClassifier, EvalClassifier, NoisyClassifier

    if guidance == "cg" and not isinstance(clf, NoisyClassifier):
        raise ValueError(f"--guidance cg needs a noisy classifier p(y | x_t, t) (train classifier --kind noisy); "
                         f"{path} holds {type(clf).__name__}")
    if guidance == "dps" and not isinstance(clf, CleanClassifier | EvalClassifier):
        raise ValueError(f"--guidance dps needs a clean classifier p(y | x) (train classifier --kind clean); "
                         f"{path} holds {type(clf).__name__}")
    T = getattr(clf, "num_train_timesteps", None)
    if T is not None and T != schedule.num_train_timesteps:
        raise ValueError(f"{path} was trained with T={T} timesteps but the diffusion model has "
                         f"T={schedule.num_train_timesteps}")
    if tuple(clf.sample_shape) != tuple(sample_shape):
        raise ValueError(f"{path} expects samples of shape {tuple(clf.sample_shape)} but the diffusion model makes "
                         f"{tuple(sample_shape)}")


def _check_predictor(predictor: Any, path: str, schedule: VPSchedule, sample_shape: tuple[int, ...]) -> None:
    """The time predictor must classify the model's T timesteps on the model's sample shape (also for ω = 0, where
    it only records the Time Gap: a mismatched predictor would record a meaningless one); its recorded schedule's
    ᾱ must be the model's, not only its T."""
    from ..guidance.temporal import check_predictor_schedule

    check_predictor_schedule(predictor, schedule, f"time predictor {path}")
    shape = getattr(predictor, "sample_shape", None)
    if shape is not None and tuple(shape) != tuple(sample_shape):
        raise ValueError(f"time predictor {path} expects x of shape (B, {', '.join(map(str, shape))}) but the "
                         f"diffusion model makes (B, {', '.join(map(str, sample_shape))})")


def _terms(cfg: SampleConfig, predictor: Any, num_classes_hint: int | None, schedule: VPSchedule,
           sample_shape: tuple[int, ...], device: torch.device, space: Any = None
           ) -> tuple[list[Term], torch.Tensor | None]:
    terms: list[Term] = []
    target = None
    if cfg.corruption_std > 0:
        terms.append(Corruption(cfg.corruption_std))
    if cfg.guidance not in ("none", "cg", "dps"):
        raise ValueError(f"unknown guidance {cfg.guidance!r}; expected none, cg or dps")
    if cfg.guidance != "none":
        if cfg.classifier is None or cfg.target is None:
            raise ValueError(f"--guidance {cfg.guidance} needs --classifier and --target")
        if space is not None and cfg.guidance == "cg":
            raise ValueError(f"--guidance cg needs a noisy classifier on latents; {cfg.classifier} is an image "
                             "classifier: with --vae use --guidance dps (through the decoder)")
        clf = load_model(cfg.classifier, device)
        _check_classifier(cfg.guidance, clf, cfg.classifier, schedule,
                          sample_shape if space is None else space.image_shape)
        K = getattr(clf, "num_classes", num_classes_hint)
        if K is not None and not 0 <= cfg.target < K:
            raise ValueError(f"target class {cfg.target} out of range; the classifier has classes 0..{K - 1}")
        target = torch.full((cfg.num_samples,), cfg.target, dtype=torch.long, device=device)
        scale = resolved_scale(cfg)
        if cfg.guidance == "cg":
            terms.append(ClassifierGuidance(clf, target, scale))
        else:
            loss = label_loss(clf, target)
            terms.append(DPSGuidance(loss if space is None else space.image_loss(loss), scale))
    if cfg.cfg_scale is not None:
        if cfg.target is None:
            raise ValueError("--cfg-scale needs --target (the class to guide towards)")
        if not (cfg.cfg_scale >= 0 and cfg.cfg_scale < float("inf")):
            raise ValueError(f"--cfg-scale must be a finite number >= 0, got {cfg.cfg_scale!r}")
        from ..guidance.cfg import ClassifierFreeGuidance

        terms.append(ClassifierFreeGuidance(cfg.cfg_scale, {"y": -1}))  # y = -1: the UNet's null class
        target = torch.full((cfg.num_samples,), cfg.target, dtype=torch.long, device=device)
    if cfg.omega != 0:
        if predictor is None:
            raise ValueError("--omega needs --time-predictor")
        terms.append(TemporalAlignment(predictor, cfg.omega, cfg.omega_schedule, cfg.placement))
    return terms, target


def _conditioning(cfg: SampleConfig, eps_model: Any, target: torch.Tensor | None) -> dict[str, Any]:
    """``{"y": target}`` for a class-conditional UNet (it needs labels), else nothing; a label the UNet does not have,
    or --cfg-scale on an unconditional model, is refused."""
    n = getattr(getattr(eps_model, "unet", None), "config", {}).get("num_class_embeds")
    if cfg.cfg_scale is not None and getattr(eps_model, "null_class", None) is None:
        raise ValueError(f"--cfg-scale needs a class-conditional UNet trained with label dropout (e.g. --checkpoint "
                         f"digits/unet_class); {cfg.checkpoint} has none")
    if n is None:
        return {}
    if target is None:
        raise ValueError(f"{cfg.checkpoint} is class-conditional: give --target Y (and --cfg-scale S for CFG)")
    null = getattr(eps_model, "null_class", None)
    if not 0 <= cfg.target < n or cfg.target == null:
        raise ValueError(f"--target {cfg.target} is not a class of {cfg.checkpoint} (classes 0..{n - 1}"
                         f"{f', {null} = no label' if null is not None else ''})")
    return {"y": target}


def generate(cfg: SampleConfig, out_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Sample according to ``cfg`` and write the outputs into ``out_dir``. Returns the summary dict.

    Checkpoints are folders or shipped names (``"digits"``, ``"digits/clf_clean"``; ``tagdiff models``).

    Raises:
        ValueError / CheckpointError: bad options or checkpoints (T or shape mismatches, a checkpoint of the wrong
            kind, an unwritable ``out_dir``, a device this machine lacks).
    """
    from ..models.checkpoints import resolve_checkpoint
    from ..models.latent import check_predictor_space, sampling_space
    from ..models.nets import MLPEpsModel
    from ..models.pipeline import is_diffusers_model_folder, read_diffusers_folder
    from ..models.time_predictor import TimePredictor
    from ..models.unet import UNetEpsModel

    if is_diffusers_model_folder(path := resolve_checkpoint(cfg.checkpoint)):
        folder = read_diffusers_folder(path)
        if folder.is_text_conditional:  # a Stable-Diffusion-style pipeline: its own call, TAG as its callback
            from .pipeline import generate_with_pipeline

            return generate_with_pipeline(cfg, out_dir, folder, progress=progress)
        if cfg.vae is None and folder.vae_dir is not None:  # a latent pipeline decodes with its own VAE
            cfg = replace(cfg, vae=str(folder.vae_dir))
    if cfg.prompt is not None:
        raise ValueError(f"--prompt is for text-conditional pipelines; {cfg.checkpoint} has no text encoder")
    t0 = time.time()
    device = resolve_device(cfg.device)
    acc, full = make_accelerator(device.type), cfg  # acc: None unless WORLD_SIZE > 1 (sample --num-processes)
    if acc is not None:  # this process draws samples [start, stop) with seeds seed + start ... seed + stop - 1
        if not cfg.per_sample_seeds:
            raise ValueError("sampling in several processes needs --per-sample-seeds (each sample its own seed)")
        sl, device = shard(cfg.num_samples, acc.process_index, acc.num_processes), acc.device
        cfg = replace(cfg, num_samples=sl.stop - sl.start, seed=cfg.seed + sl.start)
    if not (cfg.eta >= 0 and cfg.eta < float("inf")):
        raise ValueError(f"eta must be a finite number >= 0, got {cfg.eta!r}")
    if not (cfg.corruption_std >= 0 and cfg.corruption_std < float("inf")):
        raise ValueError(f"corruption_std must be a finite number >= 0, got {cfg.corruption_std!r}")
    out_dir = ensure_output_dir(out_dir)
    eps_model, schedule = load_checkpoint(cfg.checkpoint, device, allow_pickle=cfg.allow_pickle)
    if isinstance(eps_model, LoadedFlow):  # a flow-matching model: flow Euler / Heun (cli/sample_flow.py)
        from .sample_flow import generate_flow

        return generate_flow(cfg, out_dir, eps_model, device, guidance_scale=resolved_scale(cfg), progress=progress,
                             t0=t0, multi_process=acc is not None)
    if cfg.shift is not None:
        raise ValueError(f"--shift shifts a flow model's σ grid; {cfg.checkpoint} is a VP diffusion model")
    if not isinstance(eps_model, MLPEpsModel | UNetEpsModel):
        raise ValueError(f"--checkpoint {cfg.checkpoint} holds a {type(eps_model).__name__}, not an ε-model (a "
                         "tagdiff MLPEpsModel or a diffusers UNet2DModel, e.g. --checkpoint digits)")
    space = sampling_space(cfg.checkpoint, eps_model.sample_shape, cfg.vae, device)  # None: a pixel model
    if cfg.compile:  # the wrapper keeps its attributes (sample_shape, prediction_type); only forward is compiled
        eps_model.forward = torch.compile(eps_model.forward)
    scheduler = None if cfg.sampler in SAMPLERS else make_scheduler(
        cfg.sampler, schedule.to_diffusers_config(prediction_type=model_prediction_type(eps_model)))
    sampler = None if scheduler is not None else get_sampler(cfg.sampler)
    predictor = load_model(cfg.time_predictor, device) if cfg.time_predictor else None
    if predictor is not None:
        if not isinstance(predictor, TimePredictor):
            raise ValueError(f"--time-predictor {cfg.time_predictor} holds a {type(predictor).__name__}, not a time "
                             "predictor (e.g. --time-predictor digits/time_predictor)")
        check_predictor_space(cfg.time_predictor, predictor, cfg.checkpoint, space, cfg.vae)
        _check_predictor(predictor, cfg.time_predictor, schedule, eps_model.sample_shape)
    terms, target = _terms(cfg, predictor, None, schedule, eps_model.sample_shape, device, space)
    cond = _conditioning(cfg, eps_model, target)
    clip_x0 = None if space is not None and cfg.clip_x0 == "auto" else resolved_clip(cfg, eps_model.sample_shape)
    shape = (cfg.num_samples, *eps_model.sample_shape)
    x_T, randn_like, generator = seeded_noise(shape, cfg.seed, device, per_sample=cfg.per_sample_seeds)
    recorder = TimeGapRecorder(predictor) if predictor is not None else None
    kwargs: dict[str, Any] = {"eta": cfg.eta} if cfg.sampler == "ddim" else {}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    with autocast:
        if scheduler is not None:  # a diffusers scheduler (its own grid, clipping through clip_x0)
            x0 = sample_scheduler(scheduler, eps_model, x_T, num_inference_steps=cfg.num_steps, terms=terms, cond=cond,
                                  randn_like=randn_like, callback=recorder, clip_x0=clip_x0, progress=progress,
                                  generator=generator,
                                  step_kwargs={"eta": cfg.eta} if scheduler.__class__.__name__ == "DDIMScheduler"
                                  else None)
            grid = type(scheduler).from_config(scheduler.config)
            grid.set_timesteps(cfg.num_steps)
            grid = grid.timesteps  # the scheduler's own grid (float for σ-space schedulers)
        else:
            grid = schedule.timesteps(cfg.num_steps, cfg.timestep_spacing, cfg.steps_offset)
            x0 = sampler(eps_model, x_T, grid, schedule, terms=terms, cond=cond, randn_like=randn_like,
                         callback=recorder, clip_x0=clip_x0, progress=progress, **kwargs)
    x0 = x0.float().cpu()
    if acc is not None:  # gather the shards on the main process, in sample order
        from accelerate.utils import gather_object

        gaps = None if recorder is None else [v.cpu() for v in recorder.gaps]
        parts = gather_object([(x0, None if target is None else target.cpu(), gaps)])
        cfg = full
        if not acc.is_main_process:
            finish(acc)   # waits for the main process to write the outputs
            return {}
        x0 = torch.cat([p[0] for p in parts])
        target = None if target is None else torch.cat([p[1] for p in parts])
        if recorder is not None:
            recorder.gaps = [torch.cat([p[2][i] for p in parts]) for i in range(len(gaps))]
    arrays = {"x": x0.numpy()}
    if space is not None:  # latents -> images (clamped to the data range), the latents kept as z
        arrays = {"x": space.decode_batched(x0).clamp(-1, 1).numpy(), "z": x0.numpy()}
        x0 = torch.from_numpy(arrays["x"])
    if target is not None:
        arrays["target"] = target.cpu().numpy()
    np.savez_compressed(out_dir / "samples.npz", **arrays)
    summary = {"config": asdict(cfg), "guidance_scale": resolved_scale(cfg), "clip_x0": clip_x0,
               "device": str(device), "num_samples": cfg.num_samples, "timesteps": grid.tolist(),
               "seconds": time.time() - t0, "vae": None if space is None else space.describe(),
               "time_gap": None if recorder is None else recorder.mean,
               "time_gap_per_step": None if recorder is None else recorder.per_step.tolist()}
    if x0.ndim == 4:
        save_grid(x0, out_dir / "grid.png")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if recorder is not None:
        from .plots import plot_time_gap

        plot_time_gap(summary, out_dir / "time_gap.png")
    finish(acc)
    return summary
