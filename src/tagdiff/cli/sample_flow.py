"""``tagdiff sample`` on a flow-matching checkpoint: flow Euler / Heun (:func:`~tagdiff.sampling.flow.sample_flow`,
diffusers' ``FlowMatchEulerDiscreteScheduler`` / ``FlowMatchHeunDiscreteScheduler`` steps on its σ grid, ``--shift``)
with TAG (``--time-predictor`` trained by ``tagdiff train time-predictor --checkpoint FLOW``, ``--omega``), DPS with
a clean classifier, classifier-free guidance on the velocity, the corrupted reverse process, and the Time Gap.

What a flow has no use for is refused with one line (:func:`check_flow_options`): VP samplers, ``--eta``, VP grid
options, ``--clip-x0`` (the flow steps never form a clamped x̂_0), several processes. Classifier guidance (``--guidance
cg``) takes the σ-aware noisy classifier of ``tagdiff train classifier --kind noisy --checkpoint FLOW`` (trained on
the flow's VP view at its σ bins; a VP model's noisy classifier is refused by its schedule).

Classifier-free guidance is applied to the velocity, ``v = v_u + s (v_c - v_u)`` (what diffusers' flow pipelines
do); ε̂ and x̂_0 are affine in v with weights free of the label, so this equals CFG on ε̂ wherever that is defined,
and it is defined at σ = 1 too. DPS and CG (score terms) are undefined at σ = 1 (ᾱ = 0): with ``--guidance dps``
or ``cg`` the grid's first σ is lowered to ``1 - 1/T`` (the noise is drawn there; recorded as ``sigmas`` in the
summary).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import ensure_output_dir
from .._utils import seeded_noise
from ..guidance import ClassifierGuidance, Corruption, DPSGuidance, TemporalAlignment, Term, label_loss
from ..metrics.time_gap import TimeGapRecorder
from ..sampling.flow import FLOW_METHODS, FlowModel, sample_flow
from .plots import save_grid

__all__ = ["check_flow_options", "generate_flow"]


def check_flow_options(cfg: Any) -> None:
    """Refuse the options that mean nothing for a flow model, one line each (module docstring)."""
    if cfg.sampler not in FLOW_METHODS:
        raise ValueError(f"--sampler {cfg.sampler} is a VP sampler but {cfg.checkpoint} is a flow-matching model: "
                         f"use --sampler {' or '.join(FLOW_METHODS)}")
    if cfg.eta != 1.0:
        raise ValueError("--eta is DDIM's noise level; the flow samplers (euler, heun) are deterministic")
    if cfg.timestep_spacing != "trailing" or cfg.steps_offset:
        raise ValueError("--timestep-spacing / --steps-offset shape VP grids; a flow model samples diffusers' "
                         "FlowMatchEulerDiscreteScheduler σ grid (change it with --shift)")
    if cfg.clip_x0 not in ("auto", None):
        raise ValueError("--clip-x0 is not applied by the flow samplers (their steps never form a clamped x0); "
                         "leave it at auto")


class _VelocityCFG:
    """``v_u + s (v_c - v_u)`` of a class-conditional velocity network (label -1: its null class), one batched call."""

    def __init__(self, net: Any, scale: float):
        self.net, self.scale = net, float(scale)
        self.sample_shape = net.sample_shape

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **cond: Any) -> torch.Tensor:
        if self.scale == 1.0:
            return self.net(x, t, y=y, **cond)
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        v = self.net(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, torch.full_like(y, -1)]), **cond)
        v_c, v_u = v.chunk(2)
        return v_u + self.scale * (v_c - v_u)


def _flow_schedule(model: Any, shift: float | None) -> Any:
    flow = model.schedule
    if shift is not None:
        return replace(flow, shift=float(shift), use_dynamic_shifting=False)
    if flow.use_dynamic_shifting:
        raise ValueError("this flow model's scheduler uses dynamic shifting (Flux: a shift per resolution); pass "
                         "--shift S for a static one")
    return flow


def _terms(cfg: Any, model: Any, predictor: Any, space: Any, device: torch.device,
           scale: float) -> tuple[list[Term], Any]:
    from ..models.checkpoints import load_model
    from ..models.classifiers import CleanClassifier, EvalClassifier

    terms: list[Term] = []
    target = None if cfg.target is None else torch.full((cfg.num_samples,), cfg.target, dtype=torch.long,
                                                        device=device)
    if cfg.corruption_std > 0:
        terms.append(Corruption(cfg.corruption_std))
    if cfg.guidance == "cg":
        terms.append(ClassifierGuidance(_flow_noisy_classifier(cfg, model, space, device), target, scale))
    if cfg.guidance == "dps":
        if cfg.classifier is None or target is None:
            raise ValueError("--guidance dps needs --classifier and --target")
        clf = load_model(cfg.classifier, device)
        if not isinstance(clf, CleanClassifier | EvalClassifier):
            raise ValueError(f"--guidance dps needs a clean classifier p(y | x) (train classifier --kind clean); "
                             f"{cfg.classifier} holds {type(clf).__name__}")
        shape = model.sample_shape if space is None else space.image_shape
        if tuple(clf.sample_shape) != tuple(shape):
            raise ValueError(f"{cfg.classifier} expects samples of shape {tuple(clf.sample_shape)} but the flow model "
                             f"makes {tuple(shape)}")
        K = getattr(clf, "num_classes", None)
        if K is not None and not 0 <= cfg.target < K:
            raise ValueError(f"target class {cfg.target} out of range; the classifier has classes 0..{K - 1}")
        loss = label_loss(clf, target)
        terms.append(DPSGuidance(loss if space is None else space.image_loss(loss), scale))
    if cfg.omega != 0:
        if predictor is None:
            raise ValueError("--omega needs --time-predictor")
        terms.append(TemporalAlignment(predictor, cfg.omega, cfg.omega_schedule, cfg.placement))
    return terms, target


def _flow_noisy_classifier(cfg: Any, model: Any, space: Any, device: torch.device) -> Any:
    """The σ-aware noisy classifier of ``--guidance cg`` on a flow: a NoisyClassifier whose recorded schedule is the
    flow's VP view (``train classifier --kind noisy --checkpoint FLOW``), of the flow's sample shape and classes."""
    from ..guidance.temporal import check_predictor_schedule
    from ..models.classifiers import NoisyClassifier
    from ..models.load import load

    if cfg.classifier is None or cfg.target is None:
        raise ValueError("--guidance cg needs --classifier and --target")
    if space is not None:
        raise ValueError(f"--guidance cg needs a noisy classifier on latents; {cfg.classifier} is an image classifier: "
                         "with --vae use --guidance dps (through the decoder)")
    clf = load(cfg.classifier, device)
    if not isinstance(clf, NoisyClassifier):
        raise ValueError(f"--guidance cg needs a noisy classifier p(y | x_σ, σ) (train classifier --kind noisy "
                         f"--checkpoint {cfg.checkpoint}); {cfg.classifier} holds {type(clf).__name__}")
    check_predictor_schedule(clf, model.schedule.vp_schedule, f"--classifier {cfg.classifier} (a flow model needs "
                             f"the σ-aware classifier of tagdiff train classifier --kind noisy --checkpoint FLOW)")
    if tuple(clf.sample_shape) != tuple(model.sample_shape):
        raise ValueError(f"{cfg.classifier} expects samples of shape {tuple(clf.sample_shape)} but the flow model "
                         f"makes {tuple(model.sample_shape)}")
    if not 0 <= cfg.target < clf.num_classes:
        raise ValueError(f"target class {cfg.target} out of range; the classifier has classes 0..{clf.num_classes - 1}")
    return clf


def _network(cfg: Any, model: Any, target: Any) -> tuple[Any, dict[str, Any]]:
    """The velocity network to sample (CFG-wrapped for --cfg-scale) and its conditioning."""
    net = model.model
    n = getattr(getattr(net, "unet", None), "config", {}).get("num_class_embeds")
    if cfg.cfg_scale is not None:
        if model.null_class is None:
            raise ValueError(f"--cfg-scale needs a class-conditional flow UNet trained with label dropout; "
                             f"{cfg.checkpoint} has none")
        if target is None:
            raise ValueError("--cfg-scale needs --target (the class to guide towards)")
        net = _VelocityCFG(net, cfg.cfg_scale)
    if n is None:
        return net, {}
    if target is None:
        raise ValueError(f"{cfg.checkpoint} is class-conditional: give --target Y (and --cfg-scale S for CFG)")
    if not 0 <= cfg.target < n or cfg.target == model.null_class:
        raise ValueError(f"--target {cfg.target} is not a class of {cfg.checkpoint} (classes 0..{n - 1})")
    return net, {"y": target}


def generate_flow(cfg: Any, out_dir: str | Path, model: Any, device: torch.device, *, guidance_scale: float,
                  progress: bool = True, t0: float | None = None, multi_process: bool = False) -> dict[str, Any]:
    """:func:`tagdiff.cli.sample.generate` for a flow checkpoint (``model``: a loaded
    :class:`~tagdiff.models.flow_checkpoint.LoadedFlow`); same outputs (``samples.npz``, ``grid.png``,
    ``summary.json``, ``time_gap.png`` with a time predictor).

    Raises:
        ValueError / CheckpointError: the refused options (:func:`check_flow_options`), mismatched predictors or
            classifiers, a class-conditional model without ``--target``.
    """
    from ..guidance.temporal import check_predictor_schedule
    from ..models.checkpoints import load_model
    from ..models.latent import check_predictor_space, sampling_space
    from ..models.time_predictor import TimePredictor

    t0 = time.time() if t0 is None else t0
    check_flow_options(cfg)
    if multi_process:
        raise ValueError("sampling a flow model in several processes is not supported yet; use one process")
    if not (cfg.corruption_std >= 0 and cfg.corruption_std < float("inf")):
        raise ValueError(f"corruption_std must be a finite number >= 0, got {cfg.corruption_std!r}")
    out_dir = ensure_output_dir(out_dir)
    flow = _flow_schedule(model, cfg.shift)
    space = sampling_space(cfg.checkpoint, model.sample_shape, cfg.vae, device)
    predictor = load_model(cfg.time_predictor, device) if cfg.time_predictor else None
    if predictor is not None:
        if not isinstance(predictor, TimePredictor):
            raise ValueError(f"--time-predictor {cfg.time_predictor} holds a {type(predictor).__name__}, not a time "
                             "predictor")
        check_predictor_space(cfg.time_predictor, predictor, cfg.checkpoint, space, cfg.vae)
        check_predictor_schedule(predictor, flow.vp_schedule, f"time predictor {cfg.time_predictor} (σ bins of "
                                 "tagdiff train time-predictor --checkpoint FLOW)")
        shape = getattr(predictor, "sample_shape", None)
        if shape is not None and tuple(shape) != tuple(model.sample_shape):
            raise ValueError(f"time predictor {cfg.time_predictor} expects x of shape (B, {', '.join(map(str, shape))})"
                             f" but the flow model makes (B, {', '.join(map(str, model.sample_shape))})")
    terms, target = _terms(cfg, model, predictor, space, device, guidance_scale)
    net, cond = _network(cfg, model, target)
    if cfg.compile:
        net = torch.compile(net)
    sigmas = flow.sigmas(cfg.num_steps)
    if cfg.guidance in ("dps", "cg") and sigmas[0] == 1.0:   # score guidance is undefined at σ = 1 (docstring)
        sigmas[0] = 1.0 - 1.0 / flow.num_train_timesteps
    shape = (cfg.num_samples, *model.sample_shape)
    x_T, randn_like, generator = seeded_noise(shape, cfg.seed, device, per_sample=cfg.per_sample_seeds)
    recorder = TimeGapRecorder(predictor) if predictor is not None else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    with autocast:
        x0 = sample_flow(FlowModel(net, flow.num_train_timesteps), x_T, flow, sigmas=sigmas, method=cfg.sampler,
                         terms=terms, cond=cond, randn_like=randn_like, callback=recorder, progress=progress)
    x0 = x0.float().cpu()
    arrays = {"x": x0.numpy()}
    if space is not None:
        arrays = {"x": space.decode_batched(x0).clamp(-1, 1).numpy(), "z": x0.numpy()}
        x0 = torch.from_numpy(arrays["x"])
    if target is not None:
        arrays["target"] = target.cpu().numpy()
    np.savez_compressed(out_dir / "samples.npz", **arrays)
    summary = {"config": asdict(cfg), "flow": {"num_train_timesteps": flow.num_train_timesteps, "shift": flow.shift},
               "sampler": f"flow {cfg.sampler}", "sigmas": sigmas.tolist(),
               "guidance_scale": guidance_scale, "clip_x0": None, "device": str(device),
               "num_samples": cfg.num_samples, "timesteps": (sigmas[:-1] * flow.num_train_timesteps).tolist(),
               "seconds": time.time() - t0, "vae": None if space is None else space.describe(),
               "time_gap": None if recorder is None else recorder.mean,
               "time_gap_per_step": None if recorder is None else recorder.per_step.tolist()}
    if x0.ndim == 4:
        save_grid(x0, out_dir / "grid.png")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if recorder is not None:
        from .plots import plot_time_gap

        plot_time_gap(summary, out_dir / "time_gap.png")
    return summary
