"""``tagdiff sample`` on a text-to-image pipeline folder (Stable-Diffusion style): the pipeline's own call with
TAG as :class:`~tagdiff.integrations.diffusers.TAGCallback` (Alg. 2 placement, after each scheduler step).

A pipeline folder whose UNet is a ``UNet2DConditionModel`` is sampled this way: the pipeline encodes ``--prompt``
with its text encoder, runs classifier-free guidance at ``--cfg-scale`` (diffusers' ``guidance_scale``; default
7.5, the pipeline's), and decodes with its VAE. ``--sampler`` picks the scheduler, built from the pipeline's own
scheduler config (``ddim`` / ``ddpm`` are diffusers' DDIM / DDPM here; ``unipc_p`` is UniPC with its corrector off,
the UniPC that keeps TAG's corrections). The time predictor is a latent one of the pipeline's VAE (``tagdiff train
time-predictor --checkpoint PIPELINE --dataset folder:IMAGES``). With ω = 0 the latents are the pipeline's own, bit
for bit.

Writes what ``tagdiff sample`` writes: ``samples.npz`` (``x``: decoded images ``(N, C, H, W)`` in [-1, 1], ``z``:
the final latents), ``grid.png``, ``summary.json`` (with the Time Gap per step when a time predictor is given) and
``time_gap.png``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["generate_with_pipeline", "pipeline_scheduler"]

# What tagdiff's own loop offers and the pipeline route does not (it runs the pipeline's call).
_REFUSED = {"guidance": ("none", "--guidance {} (the pipeline guides with the prompt: --prompt, --cfg-scale)"),
            "corruption_std": (0.0, "--corruption-std (tagdiff's own loop only)"),
            "per_sample_seeds": (False, "--per-sample-seeds (the pipeline draws the batch from one generator)"),
            "compile": (False, "--compile"), "bf16": (False, "--bf16")}


def pipeline_scheduler(name: str, config: dict[str, Any]) -> Any:
    """The diffusers scheduler ``--sampler name`` means for a pipeline, built from the pipeline's scheduler config.

    Raises:
        ValueError: an unknown or unsupported scheduler name.
    """
    import diffusers

    from ..sampling.schedulers import ALIAS_CONFIG, SCHEDULER_ALIASES, check_scheduler

    cls_name = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler"}.get(name, SCHEDULER_ALIASES.get(name, name))
    cls = getattr(diffusers, cls_name, None) if cls_name.endswith("Scheduler") else None
    if cls is None:
        raise ValueError(f"unknown scheduler {name!r}; expected ddim, ddpm, one of {', '.join(SCHEDULER_ALIASES)}, "
                         "or a diffusers scheduler class name")
    keep = {k: v for k, v in config.items() if not k.startswith("_")}
    scheduler = cls.from_config({**keep, **ALIAS_CONFIG.get(name, {})})
    check_scheduler(scheduler)
    return scheduler


def generate_with_pipeline(cfg: Any, out_dir: str | Path, folder: Any, *, progress: bool = True) -> dict[str, Any]:
    """Sample the pipeline at ``folder`` (a :class:`~tagdiff.models.pipeline.DiffusersFolder`) with ``cfg``
    (:class:`~tagdiff.cli.sample.SampleConfig`) and write the outputs into ``out_dir``. Returns the summary.

    Raises:
        ValueError: options the pipeline route does not take (named), no prompt, a predictor that is not a latent
            time predictor of this pipeline, a scheduler that drops TAG's corrections (UniPC with its corrector:
            use ``unipc_p``; PNDM); CheckpointError: a pipeline that does not load.
    """
    from diffusers import DiffusionPipeline

    from .._io import ensure_output_dir
    from .._utils import resolve_device
    from ..integrations.diffusers import TAGCallback
    from ..models.checkpoints import CheckpointError
    from ..models.load import load
    from ..models.time_predictor import TimePredictor
    from .plots import plot_time_gap, save_grid

    t0 = time.time()
    for field_, (default, what) in _REFUSED.items():
        if getattr(cfg, field_) != default:
            raise ValueError(f"{what.format(getattr(cfg, field_))} is not available for the pipeline "
                             f"{cfg.checkpoint} (sampled through its own call with TAGCallback)")
    if not cfg.prompt:
        raise ValueError(f"{cfg.checkpoint} is a text-conditional pipeline ({folder.pipeline_class or 'unet/'}): "
                         "give --prompt TEXT")
    if cfg.vae is not None and Path(cfg.vae).resolve() != Path(folder.vae_dir or "").resolve():
        raise ValueError(f"--vae {cfg.vae}: the pipeline {cfg.checkpoint} decodes with its own vae/; leave --vae out")
    if cfg.omega > 0 and cfg.time_predictor is None:
        raise ValueError("--omega needs --time-predictor")
    device = resolve_device(cfg.device)
    out_dir = ensure_output_dir(out_dir)
    from diffusers.utils import logging as diffusers_logging

    bars = [diffusers_logging]
    try:
        from transformers.utils import logging as transformers_logging

        bars.append(transformers_logging)
    except ImportError:  # pragma: no cover - a pipeline without a text encoder
        pass
    if not progress:
        for module in bars:
            module.disable_progress_bar()
    try:
        pipe = DiffusionPipeline.from_pretrained(folder.root, use_safetensors=not cfg.allow_pickle or None)
    except Exception as e:  # diffusers raises many types for a bad folder
        raise CheckpointError(f"could not load the pipeline in {folder.root}: "
                              f"{(str(e).splitlines() or [type(e).__name__])[0]}") from None
    finally:
        for module in bars:
            module.enable_progress_bar()
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=not progress)
    pipe.scheduler = pipeline_scheduler(cfg.sampler, dict(pipe.scheduler.config))
    callback = None
    if cfg.time_predictor is not None:
        predictor = load(cfg.time_predictor, device)
        if not isinstance(predictor, TimePredictor):
            raise ValueError(f"--time-predictor {cfg.time_predictor} holds a {type(predictor).__name__}, not a time "
                             "predictor")
        callback = TAGCallback(predictor, cfg.omega, cfg.omega_schedule, record_time_gap=True)
    kwargs: dict[str, Any] = {"eta": cfg.eta} if type(pipe.scheduler).__name__ == "DDIMScheduler" else {}
    generator = torch.Generator().manual_seed(cfg.seed)
    prompts = [cfg.prompt] * cfg.num_samples
    c, h, w = folder.image_shape
    z = pipe(prompts, num_inference_steps=cfg.num_steps, height=h, width=w, generator=generator,
             guidance_scale=7.5 if cfg.cfg_scale is None else cfg.cfg_scale, output_type="latent",
             callback_on_step_end=callback, **kwargs).images
    shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0  # SD3: latents / scaling_factor + shift_factor
    with torch.no_grad():  # the pipeline's own decoding
        x = pipe.vae.decode(z / pipe.vae.config.scaling_factor + shift, return_dict=False)[0].clamp(-1, 1)
    x, z = x.float().cpu(), z.float().cpu()
    np.savez_compressed(out_dir / "samples.npz", x=x.numpy(), z=z.numpy())
    save_grid(x, out_dir / "grid.png")
    gaps = None if callback is None else callback.time_gaps
    summary = {"config": asdict(cfg), "pipeline": folder.pipeline_class, "scheduler": type(pipe.scheduler).__name__,
               "placement": "post (TAGCallback)", "device": str(device), "num_samples": cfg.num_samples,
               "seconds": time.time() - t0,
               "time_gap": None if not gaps else float(torch.cat([g for _, _, g in gaps]).mean()),
               "time_gap_per_step": None if gaps is None else [float(g.mean()) for _, _, g in gaps],
               "timesteps": None if gaps is None else [t for _, t, _ in gaps],
               "corrections": None if callback is None else [[i, t, float(n.mean())] for i, t, n in callback.history]}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if gaps:
        plot_time_gap(summary, out_dir / "time_gap.png")
    return summary
