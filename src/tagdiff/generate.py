"""``tagdiff sample``: draw samples from any checkpoint with any sampler, guidance and TAG options.

Writes ``samples.npz`` (``x``: ``(N, *D)`` float32 in VP data space, ``target``: ``(N,)`` or absent), ``summary.json``
(settings, Time Gap if a time predictor is given, seconds) and, for images, ``grid.png``.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._utils import StackedRandomGenerator
from .checkpoints import load_model
from .guidance import ClassifierGuidance, Corruption, DPSGuidance, TemporalAlignment, Term, label_loss
from .metrics import TimeGapRecorder
from .recipes import load_checkpoint
from .samplers import get_sampler
from .schedules import VPSchedule

__all__ = ["SampleConfig", "generate", "save_grid"]


@dataclass(frozen=True)
class SampleConfig:
    """What ``tagdiff sample`` does. Guidance ``cg`` needs a noisy classifier, ``dps`` a clean one."""

    checkpoint: str
    num_samples: int = 64
    sampler: str = "ddim"
    num_steps: int = 50
    eta: float = 1.0
    seed: int = 0
    guidance: str = "none"            # none | cg | dps
    classifier: str | None = None
    target: int | None = None
    guidance_scale: float = 1.0
    time_predictor: str | None = None
    omega: float = 0.0                 # TAG ω_0; 0 disables TAG (the predictor still records the Time Gap)
    omega_schedule: str = "one_minus_alpha_bar"
    placement: str = "pre"
    corruption_std: float = 0.0
    clip_x0: float | None = None
    bf16: bool = False
    per_sample_seeds: bool = False
    timestep_spacing: str = "trailing"  # VPSchedule.timesteps; "linspace" is the TFG benchmark's grid (1 step: [0])
    steps_offset: int = 0


def _check_classifier(guidance: str, clf: Any, path: str, schedule: VPSchedule, sample_shape: tuple[int, ...]) -> None:
    """cg needs a noise-aware classifier p(y | x_t, t) on the model's T, dps a clean one p(y | x); shapes must match."""
    from .classifiers import CleanClassifier, EvalClassifier, NoisyClassifier

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
    it only records the Time Gap: a mismatched predictor would record a meaningless one)."""
    T = getattr(predictor, "num_train_timesteps", None)
    if T is not None and T != schedule.num_train_timesteps:
        raise ValueError(f"time predictor {path} has T={T} timestep classes but the diffusion model has "
                         f"T={schedule.num_train_timesteps}; train the predictor on the model's schedule")
    shape = getattr(predictor, "sample_shape", None)
    if shape is not None and tuple(shape) != tuple(sample_shape):
        raise ValueError(f"time predictor {path} expects x of shape (B, {', '.join(map(str, shape))}) but the "
                         f"diffusion model makes (B, {', '.join(map(str, sample_shape))})")


def _terms(cfg: SampleConfig, predictor: Any, num_classes_hint: int | None, schedule: VPSchedule,
           sample_shape: tuple[int, ...]) -> tuple[list[Term], torch.Tensor | None]:
    terms: list[Term] = []
    target = None
    if cfg.corruption_std > 0:
        terms.append(Corruption(cfg.corruption_std))
    if cfg.guidance not in ("none", "cg", "dps"):
        raise ValueError(f"unknown guidance {cfg.guidance!r}; expected none, cg or dps")
    if cfg.guidance != "none":
        if cfg.classifier is None or cfg.target is None:
            raise ValueError(f"--guidance {cfg.guidance} needs --classifier and --target")
        clf = load_model(cfg.classifier)
        _check_classifier(cfg.guidance, clf, cfg.classifier, schedule, sample_shape)
        K = getattr(clf, "num_classes", num_classes_hint)
        if K is not None and not 0 <= cfg.target < K:
            raise ValueError(f"target class {cfg.target} out of range; the classifier has classes 0..{K - 1}")
        target = torch.full((cfg.num_samples,), cfg.target, dtype=torch.long)
        if cfg.guidance == "cg":
            terms.append(ClassifierGuidance(clf, target, cfg.guidance_scale))
        else:
            terms.append(DPSGuidance(label_loss(clf, target), cfg.guidance_scale))
    if cfg.omega != 0:
        if predictor is None:
            raise ValueError("--omega needs --time-predictor")
        terms.append(TemporalAlignment(predictor, cfg.omega, cfg.omega_schedule, cfg.placement))
    return terms, target


def generate(cfg: SampleConfig, out_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Sample according to ``cfg`` and write the outputs into ``out_dir``. Returns the summary dict.

    Raises:
        ValueError / CheckpointError: bad options or checkpoints (T or shape mismatches included).
    """
    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    eps_model, schedule = load_checkpoint(cfg.checkpoint)
    sampler = get_sampler(cfg.sampler)
    predictor = load_model(cfg.time_predictor) if cfg.time_predictor else None
    if predictor is not None:
        _check_predictor(predictor, cfg.time_predictor, schedule, eps_model.sample_shape)
    terms, target = _terms(cfg, predictor, None, schedule, eps_model.sample_shape)
    shape = (cfg.num_samples, *eps_model.sample_shape)
    if cfg.per_sample_seeds:
        rng = StackedRandomGenerator(range(cfg.seed, cfg.seed + cfg.num_samples))
        x_T, randn_like = rng.randn(shape), rng.randn_like
    else:
        g = torch.Generator().manual_seed(cfg.seed)
        x_T = torch.randn(shape, generator=g)

        def randn_like(z: torch.Tensor) -> torch.Tensor:
            return torch.randn(z.shape, generator=g, dtype=z.dtype)

    recorder = TimeGapRecorder(predictor) if predictor is not None else None
    kwargs: dict[str, Any] = {"eta": cfg.eta} if cfg.sampler == "ddim" else {}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    with autocast:
        grid = schedule.timesteps(cfg.num_steps, cfg.timestep_spacing, cfg.steps_offset)
        x0 = sampler(eps_model, x_T, grid, schedule, terms=terms, randn_like=randn_like,
                     callback=recorder, clip_x0=cfg.clip_x0, progress=progress, **kwargs)
    x0 = x0.float()
    arrays = {"x": x0.numpy()}
    if target is not None:
        arrays["target"] = target.numpy()
    np.savez_compressed(out_dir / "samples.npz", **arrays)
    summary = {"config": asdict(cfg), "num_samples": cfg.num_samples, "timesteps": grid.tolist(),
               "seconds": time.time() - t0,
               "time_gap": None if recorder is None else recorder.mean,
               "time_gap_per_step": None if recorder is None else recorder.per_step.tolist()}
    if x0.ndim == 4:
        save_grid(x0, out_dir / "grid.png")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def save_grid(x: torch.Tensor, path: str | Path, ncol: int | None = None) -> None:
    """Save images ``(N, C, H, W)`` in [-1, 1] as one PNG grid (Pillow)."""
    from PIL import Image

    n, c, h, w = x.shape
    ncol = ncol or int(np.ceil(np.sqrt(n)))
    nrow = int(np.ceil(n / ncol))
    grid = torch.full((c, nrow * (h + 1) + 1, ncol * (w + 1) + 1), -1.0)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = x[i]
    arr = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(arr.squeeze(-1) if c == 1 else arr)
    scale = max(1, 256 // img.width)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)
