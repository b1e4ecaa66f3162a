"""Classifier-free guidance and its fixes, with and without TAG, from scale 1 to collapse.

The question: at high guidance scales, does TAG keep samples on the manifold as well as, or better than, the CFG
fixes (APG, the guidance interval, CFG++), and do they combine? One class-conditional ε-model trained with label
dropout (``MODELS_DIR/unet_class``; the null label is ``y = -1``, :class:`tagdiff.interop.UNetEpsModel`) samples
``num_per_target`` images of every class of the evaluation classifier, for every guidance scale s of ``scales``
(diffusers' convention: ε̂ = ε_u + s (ε_c - ε_u), s = 1 is the conditional model) and every method:

* ``cfg``: :class:`~tagdiff.guidance.ClassifierFreeGuidance` (Ho & Salimans 2022);
* ``apg``: :class:`~tagdiff.guidance.AdaptiveProjectedGuidance` (Sadat et al. 2024) on ε, η = ``apg_eta``, norm
  threshold ``apg_norm_threshold``, no momentum (the settings of the earlier smoke sweep);
* ``cfgzero``: :class:`~tagdiff.guidance.CFGZeroStar` (Fan et al. 2025): the optimised scale α* on the
  unconditional branch, on the velocity of a flow model with its zero-init (the first ``cfgzero_zero_init_steps``
  steps at zero velocity), on ε for a VP model (no zero-init);
* ``interval``: CFG only inside the σ interval ``interval_sigma`` (Kynkäänniemi et al. 2024; EDM2's (0.28, 5.42],
  mapped to training timesteps by :func:`~tagdiff.guidance.cfg.interval_from_sigma`: 82..578 on the linear schedule);
  the conditional model outside it;
* ``cfg++``: :class:`~tagdiff.guidance.CFGPlusPlus` (Chung et al. 2024) on its own axis λ ∈ ``cfgpp_lambdas`` (the
  paper's λ ∈ [0, 1] is not a CFG scale); it needs DDIM's unclipped update, so the sampler does not clip and CFG++
  clamps its own x̂_0^λ to ±``cfgpp_clip_x0`` (without it this model collapses at every λ; docs/RESULTS.md §15);
* ``<method>+tag``: the same with :class:`~tagdiff.guidance.TemporalAlignment` (Alg. 1, ω_t = ω_0 (1 − ᾱ_t), the
  unconditional time predictor ``MODELS_DIR/time_predictor``);
* ``<method>+ctag``: TAG with the class-conditional time predictor p_φ(t | x, y) of ``MODELS_DIR/
  time_predictor_class`` (``tagdiff train time-predictor --condition class``) at the sample's own class, so that
  TAG pulls toward the manifold of the class being guided to rather than toward the unconditional one.

Sampler: DDIM η = 0 over ``steps`` steps of the ``timestep_spacing`` grid, x̂_0 clipped to [-1, 1] inside the step
(``clip_x0``) except for CFG++ (above). Every run of a seed shares x_T (common random numbers).

Flow-matching models (``MODELS_DIR/unet_class`` a class-conditional flow UNet, ``tagdiff train diffusion --objective
flow --class-conditional --cond-drop 0.1``; ``time_predictor/`` a σ predictor, ``tagdiff train time-predictor
--checkpoint FLOW``): the flow Euler sampler on the model's σ grid of ``steps`` steps (diffusers'
``FlowMatchEulerDiscreteScheduler``), its first σ at 1 − 1/T (the CFG terms are score terms, undefined at σ = 1);
no x̂_0 clip (``clip_x0`` and the grid options do not apply); CFG and APG act on ε̂ of the VP view, which for CFG
equals CFG on the velocity (ε̂ is affine in v with label-free weights); the interval's σ is the VP view's EDM σ;
CFG++ (a DDIM rule) is refused.

**ω_0 is chosen per (method family, scale)** by FID on the validation seed ``sweep_seed`` (``sweep_per_target`` per
class) over ``{0} ∪ omegas``, then the base method (ω = 0) and the chosen ω_0 are run on the evaluation ``seeds``
(:func:`~tagdiff.bench.common.tag_comparison`). Per scale because the off-manifold push grows with s: one ω_0 for all
scales would be tuned for one of them and handicap TAG at the others (the fairest choice for TAG; the ω_0 found at
each scale is reported). A chosen ω_0 = 0 means the validation seed preferred no TAG: the "+tag" row then equals
the base row. At s = 1 every family is the conditional model, so their runs are one run (key ``family = cond``).

Metrics of each run (``x0`` ``(n, C, H, W)`` in [-1, 1], after ``decode``): :func:`~tagdiff.bench.common.
sample_metrics` (accuracy of the evaluation classifier on the class; ``fid``: the mean over classes of the FID
against that class's held-out images in the evaluation classifier's features, as the label suite), the mean Time
Gap of the unconditional time predictor along the trajectory, and two saturation measures (:func:`saturation`):
``saturation``, the fraction of pixels with |x_0| > 0.98 (compare with the held-out images' own fraction,
``results["reference"]``), and ``intensity_w1``, the 1-D Wasserstein-1 distance between the pixel-intensity
distributions of the samples and of all held-out images (in pixel units of [-1, 1]).

Latent models (``vae``, ``--vae DIR``: a ``tagdiff train vae`` folder): the ε-model and the time predictors
then work on that VAE's scaled latents ``(n, c, h, w)``: CFG, APG, the interval, CFG++ and TAG act on latents, TAG
and the Time Gap use the *latent* time predictor (so the Time Gap is measured in latent space, not comparable in
value with a pixel model's), and every sample is decoded by :meth:`tagdiff.latent.LatentSpace.decode` (then clamped
to [-1, 1]) before FID, accuracy and saturation, which stay those of the pixel evaluation classifier on images.
x̂_0 clamping is off for latents (``clip_x0`` and ``cfgpp_clip_x0`` are forced to 0: ±1 is not a bound of the
latents). The pairing is checked (:func:`tagdiff.latent.sampling_space`, :func:`tagdiff.latent.
check_predictor_space`): a latent model without ``vae`` or with another VAE, a pixel time predictor with a latent
model (or the reverse), or a pixel model with ``vae`` is refused in one line naming both.

Models folder (``--models-dir DIR``; default the shipped ``assets/<dataset>``): ``DIR/unet_class/`` (a
class-conditional diffusers ``UNet2DModel`` folder with ``num_class_embeds = K + 1`` and ``tagdiff.json`` recording
``null_class``, as ``benchmarks/train_class_unet.py`` writes), ``DIR/time_predictor/`` and ``DIR/clf_eval/``
(``tagdiff train time-predictor`` / ``train classifier --kind eval``). With ``vae``: ``DIR/unet_class/`` and
``DIR/time_predictor/`` (and ``time_predictor_class/`` for ``+ctag``) are the latent models (``tagdiff train
diffusion --vae VAE --class-conditional --cond-drop 0.1`` / ``train time-predictor --vae VAE --checkpoint
DIR/unet_class``); ``DIR/clf_eval/`` is a pixel evaluation classifier, and where DIR has none the shipped
``assets/<dataset>/clf_eval`` is used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tagdiff._utils import resolve_device
from tagdiff.data import load_dataset
from tagdiff.guidance import (
    AdaptiveProjectedGuidance,
    CFGPlusPlus,
    CFGZeroStar,
    ClassifierFreeGuidance,
    TemporalAlignment,
)
from tagdiff.guidance.cfg import interval_from_sigma
from tagdiff.guidance.temporal import check_predictor_schedule
from tagdiff.models.assets import assets_dir
from tagdiff.models.checkpoints import load_model
from tagdiff.models.classifiers import EvalClassifier
from tagdiff.models.flow_checkpoint import is_flow_checkpoint, load_flow
from tagdiff.models.latent import LatentSpace, check_predictor_space, sampling_space
from tagdiff.models.load import load_checkpoint
from tagdiff.models.time_predictor import TimePredictor
from tagdiff.sampling.flow import FlowModel

from .cfg_report import figure, table
from .common import (
    ExperimentConfig,
    RunCache,
    Setup,
    draw,
    mean_std,
    preview,
    sample_metrics,
    tag_comparison,
)
from .runner import Experiment, run

__all__ = ["METHODS", "ALL_METHODS", "CFGConfig", "cfg_terms", "load_cfg_setup", "load_decoder", "run_cfg",
           "saturation", "EXPERIMENT"]

METHODS = ("cfg", "cfg+tag", "apg", "apg+tag", "interval", "interval+tag", "cfg++")
FAMILIES = ("cfg", "apg", "cfgzero", "interval", "cfg++")
ALL_METHODS = (*METHODS, "cfgzero", "cfgzero+tag", "cfg+++tag", "cfg+ctag", "apg+ctag", "cfgzero+ctag", "interval+ctag",
               "cfg+++ctag")
NULL = {"y": -1}  # the dropped label of UNetEpsModel (mapped to its null_class)
SATURATION_LEVEL = 0.98


@dataclass(frozen=True)
class CFGConfig(ExperimentConfig):
    """Settings of ``tagdiff bench cfg`` (module docstring). ``scales``: CFG scales s (> 0); ``cfgpp_lambdas``:
    CFG++'s λ (>= 0); ``omegas``: the ω_0 grid (0 is always added); ``num_per_target`` / ``sweep_per_target``:
    samples per class on each evaluation / the validation seed; ``num_steps``: DDIM steps; ``clip_x0``: the sampler's
    x̂_0 clamp (0 = off); ``unet``: the sub-folder of the class-conditional model; ``vae``: the VAE folder of
    latent models (module docstring; forces ``clip_x0 = cfgpp_clip_x0 = 0``)."""

    scales: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
    cfgpp_lambdas: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)
    methods: tuple[str, ...] = METHODS
    omegas: tuple[float, ...] = (0.25, 1.0, 4.0)
    num_per_target: int = 32
    sweep_per_target: int = 16
    num_steps: int = field(default=20, metadata={"aliases": ("--steps",)})
    clip_x0: float = 1.0
    interval_sigma: tuple[float, ...] = (0.28, 5.42)
    apg_eta: float = 0.0
    apg_norm_threshold: float = 2.0
    cfgzero_zero_init_steps: int = field(default=1, metadata={"help": (
        "flow models: CFG-Zero*'s zero-init, the first steps at zero velocity (default: 1, diffusers' guider)")})
    cfgpp_clip_x0: float = 1.0
    unet: str = "unet_class"
    vae: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [m for m in self.methods if m not in ALL_METHODS]
        if bad or not self.methods:
            raise ValueError(f"unknown methods {bad or '(none given)'}; expected some of {', '.join(ALL_METHODS)}")
        checks = [("scales", self.scales, lambda v: v > 0, "> 0"),
                  ("cfgpp_lambdas", self.cfgpp_lambdas, lambda v: v >= 0, ">= 0"),
                  ("omegas", self.omegas, lambda v: v >= 0, ">= 0"),
                  ("interval_sigma", self.interval_sigma, lambda v: v >= 0, ">= 0 (two values, low < high)")]
        for name, values, ok, what in checks:
            wrong = [v for v in values if not (math.isfinite(v) and ok(v))]
            if wrong or not values or (name == "interval_sigma" and (len(values) != 2 or values[0] >= values[1])):
                raise ValueError(f"{name} must be finite values {what}, got {list(values)}")
        for name, v in (("num_per_target", self.num_per_target), ("sweep_per_target", self.sweep_per_target)):
            if v < 2:
                raise ValueError(f"{name} must be >= 2 (FID needs two samples per class), got {v}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.cfgzero_zero_init_steps < 0:
            raise ValueError(f"cfgzero_zero_init_steps must be >= 0, got {self.cfgzero_zero_init_steps}")
        for name, v in (("clip_x0", self.clip_x0), ("cfgpp_clip_x0", self.cfgpp_clip_x0),
                        ("apg_norm_threshold", self.apg_norm_threshold)):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be >= 0 (0 = off), got {v}")
        if not math.isfinite(self.apg_eta):
            raise ValueError(f"apg_eta must be finite, got {self.apg_eta}")
        if self.vae is not None:  # latents: no x̂_0 clamp (±1 bounds images, not latents)
            object.__setattr__(self, "clip_x0", 0.0)
            object.__setattr__(self, "cfgpp_clip_x0", 0.0)


def load_decoder(path: str | Path, device: str | torch.device = "cpu",
                 space: LatentSpace | None = None) -> Callable[[Tensor], Tensor]:
    """The decode hook of latent models: a function mapping latents ``(n, *latent_shape)`` to images ``(n,
    *image_shape)`` clamped to [-1, 1], on the latents' device (no gradients; :meth:`LatentSpace.decode` in batches
    of 256). ``space``: an already loaded :class:`~tagdiff.latent.LatentSpace` of ``path``.

    Raises:
        CheckpointError: ``path`` is not a loadable AutoencoderKL folder; the hook raises ValueError for latents of
            another shape.
    """
    space = space if space is not None else LatentSpace.from_pretrained(path, device)

    def decode(z: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat([space.decode(b.to(space.device)).to(z.device) for b in z.split(256)]).clamp(-1, 1)

    return decode


def load_cfg_setup(cfg: CFGConfig) -> Setup:
    """The class-conditional ε-model (``MODELS_DIR/<cfg.unet>``), the time predictor, the evaluation classifier and
    the held-out split of ``cfg.dataset`` (images ``(N, C, H, W)`` in [-1, 1]), on ``cfg.device``; with ``cfg.vae``
    also ``models["latent_space"]``, the :class:`~tagdiff.latent.LatentSpace` the ε-model and predictors work in
    (``clf_eval`` from ``MODELS_DIR/clf_eval`` if present, else the shipped pixel classifier of the dataset).

    Raises:
        CheckpointError: a missing or corrupt model or VAE folder; ValueError: a UNet without a null label, a model
            of the wrong kind, mismatched T or image shapes, a VAE/model/predictor mismatch (a latent model without
            ``vae`` or with another VAE, a pixel model with ``vae``, a pixel predictor with a latent model or the
            reverse; :mod:`tagdiff.latent`), an unavailable device; DatasetError: missing data.
    """
    dev = resolve_device(cfg.device)
    root = Path(cfg.models_dir) if cfg.models_dir else assets_dir(cfg.dataset)
    flow = None
    if is_flow_checkpoint(root / cfg.unet):  # a flow model: sampled through its VP view (module docstring)
        if any(m.startswith("cfg++") for m in cfg.methods):
            raise ValueError(f"{root / cfg.unet} is a flow-matching model; CFG++ is a DDIM rule: leave cfg++ out")
        loaded = load_flow(root / cfg.unet, dev)
        flow, eps_model = loaded.schedule, FlowModel(loaded, loaded.schedule.num_train_timesteps)
        eps_model.null_class, schedule = loaded.null_class, loaded.schedule.vp_schedule
    else:
        eps_model, schedule = load_checkpoint(root / cfg.unet, dev)
    if getattr(eps_model, "null_class", None) is None:
        raise ValueError(f"{root / cfg.unet} is not a class-conditional UNet trained with label dropout (no "
                         "null_class in its tagdiff.json)")
    space = sampling_space(root / cfg.unet, tuple(eps_model.sample_shape), cfg.vae, dev)  # pairing first
    predictors = {"time_predictor": load_model(root / "time_predictor", dev)}
    if any(m.endswith("+ctag") for m in cfg.methods):
        predictors["time_predictor_class"] = load_model(root / "time_predictor_class", dev)
    for name, predictor in predictors.items():
        check_predictor_space(root / name, predictor, root / cfg.unet, space, cfg.vae)
    clf_dir = root / "clf_eval"
    if cfg.vae is not None and not clf_dir.exists():
        clf_dir = assets_dir(cfg.dataset) / "clf_eval"  # the metric network of latent runs: a pixel classifier
    tp, clf = predictors["time_predictor"], load_model(clf_dir, dev)
    if not isinstance(tp, TimePredictor) or not isinstance(clf, EvalClassifier):
        raise ValueError(f"{root}: time_predictor/ must hold a time predictor and {clf_dir} an evaluation "
                         f"classifier, got {type(tp).__name__} and {type(clf).__name__}")
    T = schedule.num_train_timesteps
    if flow is not None:
        check_predictor_schedule(tp, schedule, f"{root / 'time_predictor'} (a flow model needs the σ predictor of "
                                 "tagdiff train time-predictor --checkpoint FLOW)")
    if tp.num_train_timesteps != T:
        raise ValueError(f"{root / 'time_predictor'} was trained with T={tp.num_train_timesteps} timesteps but the "
                         f"diffusion model has T={T}")
    if tuple(getattr(tp, "sample_shape", eps_model.sample_shape)) != tuple(eps_model.sample_shape):
        raise ValueError(f"{root / 'time_predictor'} expects shape {tuple(tp.sample_shape)}, the model makes "
                         f"{tuple(eps_model.sample_shape)}")
    held_x, held_y = load_dataset(cfg.dataset, "held_out", data_dir=cfg.data_dir)
    models = {"eps_model": eps_model, "schedule": schedule, "time_predictor": tp, "clf_eval": clf,
              **({"flow": flow} if flow is not None else {})}
    if space is not None:
        if tuple(held_x.shape[1:]) != tuple(space.image_shape):
            raise ValueError(f"--vae {cfg.vae} decodes images of shape {tuple(space.image_shape)} but {cfg.dataset} "
                             f"has images of shape {tuple(held_x.shape[1:])}")
        models["latent_space"] = space
    if "time_predictor_class" in predictors:
        tpc = predictors["time_predictor_class"]
        if not isinstance(tpc, TimePredictor) or tpc.num_train_timesteps != T:
            raise ValueError(f"{root / 'time_predictor_class'} must be a class-conditional time predictor with T={T}")
        models["time_predictor_class"] = tpc
    return Setup(cfg.dataset, models, held_x.to(dev), held_y.to(dev), str(root), dev)


def cfg_terms(method: str, scale: float, omega: float, setup: Setup, cfg: CFGConfig,
              window: tuple[int, int], y: Tensor | None = None) -> list:
    """The terms of ``method`` (:data:`ALL_METHODS`) at guidance scale ``scale`` (λ for CFG++) and TAG strength
    ``omega`` (used by ``+tag`` / ``+ctag`` methods only; ω = 0 still adds the TAG term, which is then a no-op);
    ``y`` ``(n,)``: the samples' classes, the condition of ``+ctag``'s predictor.

    Raises:
        ValueError: an unknown method, or ``+ctag`` without ``y`` or without ``setup.models["time_predictor_class"]``.
    """
    base = method.removesuffix("+tag").removesuffix("+ctag")
    if base == "cfg":
        terms: list = [ClassifierFreeGuidance(scale, NULL)]
    elif base == "apg":
        terms = [AdaptiveProjectedGuidance(scale, NULL, parallel_weight=cfg.apg_eta,
                                           norm_threshold=cfg.apg_norm_threshold)]
    elif base == "cfgzero":
        flow = "flow" in setup.models
        terms = [CFGZeroStar(scale, NULL, zero_init_steps=cfg.cfgzero_zero_init_steps if flow else 0)]
    elif base == "interval":
        terms = [ClassifierFreeGuidance(scale, NULL, window=window)]
    elif base == "cfg++":
        terms = [CFGPlusPlus(scale, NULL, clip_x0=cfg.cfgpp_clip_x0 or None)]
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(ALL_METHODS)}")
    if method.endswith("+tag"):
        terms.append(TemporalAlignment(setup.models["time_predictor"], omega))
    elif method.endswith("+ctag"):
        if y is None or "time_predictor_class" not in setup.models:
            raise ValueError(f"{method} needs the samples' classes y and a class-conditional time predictor "
                             "(MODELS_DIR/time_predictor_class)")
        terms.append(TemporalAlignment(setup.models["time_predictor_class"], omega, condition=y))
    return terms


def saturation(x0: Tensor, real: Tensor, level: float = SATURATION_LEVEL, quantiles: int = 1024) -> dict[str, float]:
    """Saturation of images ``x0`` ``(n, C, H, W)`` in [-1, 1] against real images ``real`` ``(m, C, H, W)``.

    Returns:
        ``{"saturation": fraction of pixels of x0 with |x| > level, "intensity_w1": W1}``, where W1 is the
        Wasserstein-1 distance between the empirical distributions of all pixel values of ``x0`` and of ``real``,
        ∫ |F⁻¹_x0(u) − F⁻¹_real(u)| du, evaluated at ``quantiles`` midpoints u = (k + ½)/quantiles (pixel units).
    """
    u = (torch.arange(quantiles, dtype=torch.float64) + 0.5) / quantiles
    q = [torch.quantile(z.detach().reshape(-1).double().cpu(), u) for z in (x0, real)]
    return {"saturation": float((x0.abs() > level).double().mean()), "intensity_w1": float((q[0] - q[1]).abs().mean())}


def run_cfg(out_dir: str | Path, cfg: CFGConfig = CFGConfig(), *, progress: bool = True,
            resume: bool = True) -> dict[str, Any]:
    """Run the experiment; write ``results.json``, ``table.md`` and ``cfg.png`` in ``out_dir``; return the results.

    Returns:
        ``{"runs": {"<family>/<scale>": tag_comparison result ("without" = the base method, "with" = + TAG at the
        chosen ω_0) or {"without": ...} when no "+tag" method of the family is asked}, "runs_ctag": the same for
        "+ctag" (when asked; its "sweep" grid names are "ctag:<ω>"), "config", "reference",
        "window", "figure"}``; families ``cfg``, ``apg``, ``interval`` on ``scales`` and ``cfg++`` on
        ``cfgpp_lambdas``.

    Raises:
        ValueError / CheckpointError: bad settings or checkpoints (see :class:`CFGConfig`, :func:`load_cfg_setup`).
    """
    return run(EXPERIMENT, out_dir, cfg, progress=progress, resume=resume)


def _measure(setup: Setup, cfg: CFGConfig, cache: RunCache, progress: bool) -> dict[str, Any]:
    """Every (family, scale): the base method over the seeds and, when asked, the comparison with "+tag" and
    "+ctag" (ω_0 chosen on the validation seed); then the held-out reference and the guidance window."""
    K = setup.models["clf_eval"].num_classes
    window = interval_from_sigma(setup.schedule, *cfg.interval_sigma)
    space = setup.models.get("latent_space")
    decode = (lambda z: z) if space is None else load_decoder(cfg.vae, setup.device, space)
    results: dict[str, Any] = {"runs": {}}
    families = [f for f in FAMILIES
                if any(m in cfg.methods for m in (f, f"{f}+tag", f"{f}+ctag"))]
    for family in families:
        axis = cfg.cfgpp_lambdas if family == "cfg++" else cfg.scales
        for scale in axis:
            def run(omega: float, seed: int, n: int, variant: str | None = None, family: str = family,
                    scale: float = scale) -> dict[str, Any]:
                y = torch.arange(K).repeat_interleave(n // K).to(setup.device)
                method = family + (f"+{variant or 'tag'}" if omega else "")
                out = draw(setup, cfg_terms(method, scale, omega, setup, cfg, window, y), n=y.numel(), seed=seed,
                           num_steps=cfg.num_steps, eta=0.0, sampler="euler" if "flow" in setup.models else "ddim",
                           clip_x0=None if family == "cfg++" else (cfg.clip_x0 or None),
                           timestep_spacing=cfg.timestep_spacing, steps_offset=cfg.steps_offset,
                           cond={"y": y}, clamp=cfg.vae is None)
                x0 = decode(out["x0"])
                return {**sample_metrics(setup, x0, y), **saturation(x0, setup.held_x), "time_gap": out["time_gap"],
                        "seconds": out["seconds"], "preview": preview(x0)}

            zero_init = family == "cfgzero" and "flow" in setup.models and cfg.cfgzero_zero_init_steps > 0
            shared = scale == 1.0 and family != "cfg++" and not zero_init  # s = 1: the conditional model
            key = {"exp": "cfg", "dataset": cfg.dataset, "family": "cond" if shared else family, "scale": scale,
                   "steps": cfg.num_steps, "spacing": cfg.timestep_spacing, "offset": cfg.steps_offset,
                   "clip": cfg.cfgpp_clip_x0 if family == "cfg++" else cfg.clip_x0,
                   **({} if shared or family != "apg" else {"apg": f"{cfg.apg_eta},{cfg.apg_norm_threshold}"}),
                   **({"zero_init": cfg.cfgzero_zero_init_steps} if zero_init else {}),
                   **({"window": f"{window[0]}-{window[1]}"} if family == "interval" and not shared else {}),
                   **({"unet": cfg.unet} if cfg.unet != "unet_class" else {}),
                   **({"checkpoints": cfg.models_dir} if cfg.models_dir else {}),  # (the key's name of cached runs)
                   **({"vae": space.hash} if space is not None else {})}
            n, sweep_n = cfg.num_per_target * K, cfg.sweep_per_target * K
            if f"{family}+tag" in cfg.methods:
                r = tag_comparison(cache, key, lambda w, s, m: run(w, s, m), omegas=cfg.omegas, seeds=cfg.seeds,
                                   sweep_seed=cfg.sweep_seed, n=n, sweep_n=sweep_n)
            else:
                runs = [cache.get({**key, "omega": 0.0, "seed": s, "n": n}, lambda s=s, n=n: run(0.0, s, n))
                        for s in cfg.seeds]
                nums = [{k: float(v) for k, v in r.items() if isinstance(v, int | float)} for r in runs]
                r = {"without": {k: mean_std([x[k] for x in nums]) for k in nums[0]}, "runs": {"without": nums},
                     "preview": {"without": runs[0]["preview"]}}
            results["runs"][f"{family}/{scale:g}"] = r
            if f"{family}+ctag" in cfg.methods:  # the ω = 0 runs are the base method's (no variant in their key)
                rc = tag_comparison(cache, key, run, omegas=cfg.omegas, seeds=cfg.seeds, sweep_seed=cfg.sweep_seed,
                                    n=n, sweep_n=sweep_n, variants=("ctag",))
                results.setdefault("runs_ctag", {})[f"{family}/{scale:g}"] = rc
            if progress:
                w = r.get("best_omega")
                tail = "" if w is None else f" -> TAG ω*={w:g}: FID {r['with']['fid']['mean']:.2f}"
                print(f"  {family:8s} s={scale:<5g} FID {r['without']['fid']['mean']:.2f}{tail}", flush=True)
    results["reference"] = {"saturation_held_out": saturation(setup.held_x, setup.held_x)["saturation"],
                            "held_out_images": int(setup.held_x.shape[0])}
    results["window"] = list(window)
    results["figure"] = "cfg.png"
    return results


def _record(setup: Setup, cfg: CFGConfig) -> dict[str, Any]:
    space = setup.models.get("latent_space")
    flow = "flow" in setup.models
    return {"null_cond": NULL, "sampler": "flow euler" if flow else "ddim", "ddim_eta": None if flow else 0.0,
            "tag_placement": "pre",
            "omega_schedule": "one_minus_alpha_bar",
            "omega_choice": "per (family, scale), by FID on the validation seed",
            "classes": setup.models["clf_eval"].num_classes, "torch": torch.__version__,
            "latent": None if space is None else {**space.describe(), "decode": "LatentSpace.decode, clamped to "
                                                  "[-1, 1], before every metric; Time Gap of the latent predictor on "
                                                  "latents"}}


EXPERIMENT = Experiment(
    "cfg", CFGConfig, "classifier-free guidance scale 1-32: CFG, APG, interval, CFG++, with/without TAG "
                      "(class-conditional UNet)", lambda cfg: None, table,
    measure=_measure, load=load_cfg_setup, record=_record, tail=("figure",),
    figure=lambda path, results, cfg, setup: figure(path, results, cfg))
