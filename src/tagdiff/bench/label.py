"""Label guidance with and without TAG on real digits (TAG.md §9.3, Tables 2/8 analogue).

For each target class: unguided sampling; DPS label guidance (loss -log p(y | x0_hat) of the clean classifier,
gradient through the ε-model); DPS + TAG; classifier guidance with the noise-aware classifier; classifier guidance +
TAG; TFG (x̂_0 clipped in its loss, as the benchmark) and the benchmark's own DPS (``dps_tfg``:
:class:`~tagdiff.guidance.DPSNormalized`, ∇log p / |log p|, no clipping in its loss or its step, as
``methods/dps.py``). Sampler: DDIM(η = 1), as the TFG benchmark, over its ``space_timesteps`` grid by default
(``timestep_spacing="linspace"``, the same grid at 50 steps; the runs before issue 12 used ``"trailing"``), x0_hat
clipped to [-1, 1] inside the step except for ``dps_tfg``. Metrics, as the TFG benchmark computes them: FID against
the held-out images of the target class in the feature space of the independent evaluation classifier, that
classifier's accuracy on the target, the mean Time Gap (learned time predictor) and wall time. All methods share x_T
and the sampling noise (common random numbers), so their differences are the effect of the guidance and of TAG.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoints import load_model
from ..guidance import (
    ClassifierGuidance,
    DPSGuidance,
    DPSNormalized,
    EpsilonScaling,
    LangevinCorrector,
    SelfGuidance,
    TemporalAlignment,
    Term,
    TFGGuidance,
    TimeCorrection,
    TimeShift,
    TimestepGuidance,
    label_loss,
)
from ..image_metrics import fid
from ..recipes import load_checkpoint

__all__ = ["LabelConfig", "METHODS", "ALL_METHODS", "assets_dir", "load_label_models", "run_label", "run_label_seeds"]

METHODS = ("unguided", "dps", "dps+tag", "cg", "cg+tag")  # the demo's suite
BASELINES = ("dps+tcs", "dps+es", "dps+langevin", "dps+timeshift", "dps+tsg", "dps+sg")  # TAG.md §7, on DPS
ALL_METHODS = (*METHODS, "tfg", "tfg+tag", "dps_tfg", "dps_tfg+tag", *BASELINES)
PAPER_TABLE2 = {"cifar10_dps": {"fid": [217.1, 190.4], "accuracy": [57.5, 63.2]},
                "source": "TAG.md Table 2 (CIFAR-10, DPS -> DPS+TAG): FID -12.3%, accuracy +9.9%"}


def assets_dir(dataset: str) -> Path:
    """Folder of the shipped checkpoints for ``dataset`` (``unet/``, ``time_predictor/``, ``clf_*``)."""
    return Path(str(resources.files("tagdiff") / "assets" / dataset))


@dataclass(frozen=True)
class LabelConfig:
    """Settings of the label-guidance suite. The digits defaults (DPS scale 16, CG scale 4, ω_0 = 1) were chosen by
    ``benchmarks/label_sweep.py`` on other targets (1, 4, 8) and another seed (100) than the demo reports."""

    dataset: str = "digits"
    targets: tuple[int, ...] = (0, 3, 7)
    num_per_target: int = 64
    num_steps: int = 50
    eta: float = 1.0
    dps_scale: float = 16.0
    cg_scale: float = 4.0
    omega: float = 1.0
    placement: str = "pre"
    seed: int = 0
    data_dir: str | None = None
    checkpoints: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # The grid: VPSchedule.timesteps(num_steps, timestep_spacing, steps_offset); "linspace" is the TFG benchmark's.
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    # TFG (Ye et al. 2024; TAG.md §6.3): ρ̄, μ̄, γ̄ and recurrence, "increase" schedules, N_iter = 4. ρ̄ and μ̄ chosen
    # by benchmarks/tfg_sweep.py on validation targets/seed; γ̄ = 0.001 as TFG's CIFAR-10 label settings.
    tfg_rho: float = 0.1
    tfg_mu: float = 0.5
    tfg_gamma: float = 0.001
    tfg_recur: int = 1
    tfg_clip_x0: float = 1.0  # clamp x̂_0 in TFG's loss (the benchmark's clip_x0 = True); 0 = off (the runs before 12)
    dps_tfg_scale: float = 1.0  # the benchmark's DPS strength (``guidance_strength``)
    # Baselines (TAG.md §7; the paper does not report their settings): ES λ (ADM-ES/ComfyUI default 1.005),
    # Langevin snr (score_sde's 0.16), Time-Shift window and cutoff (training timesteps).
    es_lambda: float = 1.005
    langevin_snr: float = 0.16
    timeshift_window: int = 20
    timeshift_cutoff: int = 300
    # Timestep Guidance (Sadat et al. 2024) and Self-Guidance (Li et al. 2024b), TAG.md §7.5: scale w and time
    # perturbation δ (timesteps). Not reported by the paper and not tuned here: w = 1 with δ = 50 (TSG std) / 20 (SG).
    tsg_scale: float = 1.0
    tsg_delta: float = 50.0
    sg_scale: float = 1.0
    sg_delta: float = 20.0


def load_label_models(checkpoints: str | Path) -> dict[str, Any]:
    """Load ``unet`` (+ schedule), ``time_predictor``, ``clf_noisy``, ``clf_clean``, ``clf_eval`` from a folder."""
    root = Path(checkpoints)
    eps_model, schedule = load_checkpoint(root / "unet")
    models = {"eps_model": eps_model, "schedule": schedule}
    from ..classifiers import CleanClassifier, EvalClassifier, NoisyClassifier
    from ..time_predictor import TimePredictor

    kinds = {"time_predictor": ((TimePredictor,), "a time predictor (train time-predictor)"),
             "clf_noisy": ((NoisyClassifier,), "a noisy classifier (train classifier --kind noisy)"),
             "clf_clean": ((CleanClassifier, EvalClassifier), "a clean classifier (train classifier --kind clean)"),
             "clf_eval": ((EvalClassifier,), "an evaluation classifier (train classifier --kind eval)")}
    for name, (classes, what) in kinds.items():
        models[name] = load_model(root / name)
        if not isinstance(models[name], classes):
            raise ValueError(f"{root / name} holds {type(models[name]).__name__}; {name} must be {what}")
    T = schedule.num_train_timesteps
    for name in ("time_predictor", "clf_noisy"):
        if getattr(models[name], "num_train_timesteps", T) != T:
            raise ValueError(f"{root / name} was trained with T={models[name].num_train_timesteps} timesteps but the "
                             f"diffusion model has T={T}")
    for name in ("time_predictor", "clf_noisy", "clf_clean", "clf_eval"):
        shape = tuple(getattr(models[name], "sample_shape", eps_model.sample_shape))
        if shape != tuple(eps_model.sample_shape):
            raise ValueError(f"{root / name} expects images of shape {shape} but the diffusion model makes "
                             f"{tuple(eps_model.sample_shape)}")
    return models


def method_terms(method: str, models: dict[str, Any], target: Tensor, cfg: LabelConfig) -> list[Term]:
    """The guidance terms of one method (``ALL_METHODS``) for per-sample targets ``target`` (B,)."""
    terms: list[Term] = []
    if method.startswith("dps_tfg"):
        terms.append(DPSNormalized(label_loss(models["clf_clean"], target), cfg.dps_tfg_scale))
    elif method.startswith("dps"):
        terms.append(DPSGuidance(label_loss(models["clf_clean"], target), cfg.dps_scale))
    elif method.startswith("cg"):
        terms.append(ClassifierGuidance(models["clf_noisy"], target, cfg.cg_scale))
    elif method.startswith("tfg"):
        terms.append(TFGGuidance(label_loss(models["clf_clean"], target), rho=cfg.tfg_rho, mu=cfg.tfg_mu,
                                 gamma=cfg.tfg_gamma, num_recur=cfg.tfg_recur, clip_x0=cfg.tfg_clip_x0 or None))
    corrector = method.partition("+")[2]
    if corrector == "tag":
        terms.append(TemporalAlignment(models["time_predictor"], cfg.omega, placement=cfg.placement))
    elif corrector == "tcs":
        terms.append(TimeCorrection(models["time_predictor"], clip_x0=1.0))
    elif corrector == "es":
        terms.append(EpsilonScaling(cfg.es_lambda))
    elif corrector == "langevin":
        terms.append(LangevinCorrector(cfg.langevin_snr))
    elif corrector == "timeshift":
        terms.append(TimeShift(cfg.timeshift_window, cfg.timeshift_cutoff))
    elif corrector == "tsg":
        terms.append(TimestepGuidance(cfg.tsg_scale, cfg.tsg_delta))
    elif corrector == "sg":
        terms.append(SelfGuidance(cfg.sg_scale, cfg.sg_delta))
    return terms


def run_label(out_dir: str | Path, cfg: LabelConfig = LabelConfig(), *, progress: bool = True,
              methods: tuple[str, ...] = METHODS) -> dict[str, Any]:
    """Run the suite; write ``out_dir/results.json`` and ``out_dir/label.png``; return the results.

    Raises:
        ValueError: an unknown method or a target class the classifiers do not have.
        CheckpointError: missing or corrupt checkpoints.
    """
    t_start = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; expected some of {', '.join(ALL_METHODS)}")
    from .common import draw, load_setup

    setup = load_setup(cfg.dataset, cfg.checkpoints, cfg.data_dir)
    models, held_x, held_y = setup.models, setup.held_x, setup.held_y
    K = models["clf_eval"].num_classes
    if not cfg.targets or min(cfg.targets) < 0 or max(cfg.targets) >= K:
        raise ValueError(f"target classes {list(cfg.targets)} out of range; the classifiers have classes 0..{K - 1}")
    target = torch.tensor(cfg.targets).repeat_interleave(cfg.num_per_target)
    results: dict[str, Any] = {"methods": {}, "per_target": {}, "time_gap_per_step": {}}
    samples: dict[str, Tensor] = {}
    for method in methods:
        out = draw(setup, method_terms(method, models, target, cfg), n=target.numel(), seed=cfg.seed,
                   num_steps=cfg.num_steps, eta=cfg.eta, timestep_spacing=cfg.timestep_spacing,
                   steps_offset=cfg.steps_offset, clip_x0=None if method.startswith("dps_tfg") else 1.0,
                   progress=progress)
        x0, seconds = out["x0"], out["seconds"]
        with torch.no_grad():
            pred = models["clf_eval"](x0).argmax(-1)
        per_target = {}
        for y in cfg.targets:
            sel = target == y
            per_target[str(y)] = {"fid": fid(held_x[held_y == y], x0[sel], models["clf_eval"]),
                                  "accuracy": float((pred[sel] == y).float().mean())}
        results["per_target"][method] = per_target
        results["methods"][method] = {
            "fid": sum(v["fid"] for v in per_target.values()) / len(per_target),
            "accuracy": float((pred == target).float().mean()),
            "time_gap": out["time_gap"], "seconds": seconds}
        results["time_gap_per_step"][method] = out["time_gap_per_step"]
        samples[method] = x0
        if progress:
            m = results["methods"][method]
            print(f"  {method:9s} FID {m['fid']:7.2f}  acc {m['accuracy']:.3f}  time gap {m['time_gap']:6.1f}  "
                  f"{seconds:5.1f} s", flush=True)
    if "unguided" in samples:
        results["sanity"] = _sanity(samples["unguided"], held_x, models["clf_eval"], cfg.seed)
    n_ref = {str(y): int((held_y == y).sum()) for y in cfg.targets}
    results["config"] = {**asdict(cfg), "sampler": "ddim", "clip_x0": "1.0 (dps_tfg: none)",
                         "reference_images_per_target": n_ref, "fid_features": "EvalClassifier.features (128-d)",
                         "checkpoints": setup.checkpoints, "torch": torch.__version__}
    results["paper"] = PAPER_TABLE2
    results["seconds"] = time.time() - t_start
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _figure(out_dir / "label.png", samples, results, cfg)
    return results


def _sanity(unguided: Tensor, held_x: Tensor, clf_eval: Any, seed: int) -> dict[str, Any]:
    """Base-model checks: FID of unguided samples vs held-out data next to FID between two real halves (same
    feature network; FID is biased upward at small n, so compare the two at similar n), and the class histogram of
    unguided samples under the evaluation classifier (entropy close to log 10 = 2.303 for a balanced model)."""
    import math

    from ..image_metrics import class_histogram

    perm = torch.randperm(held_x.shape[0], generator=torch.Generator().manual_seed(seed))
    half = held_x.shape[0] // 2
    n = min(unguided.shape[0], half)
    counts, entropy = class_histogram(clf_eval, unguided)
    return {"fid_unguided_vs_held_out": fid(held_x[perm[:half]], unguided[:n], clf_eval),
            "fid_real_half_vs_half": fid(held_x[perm[:half]], held_x[perm[half:half + n]], clf_eval),
            "n": n, "class_histogram": counts.tolist(), "class_entropy": entropy,
            "max_entropy": math.log(len(counts))}


def _figure(path: Path, samples: dict[str, Tensor], results: dict[str, Any], cfg: LabelConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(samples)
    per = min(8, cfg.num_per_target)
    fig = plt.figure(figsize=(2.6 * len(methods) + 4.5, 0.5 * len(cfg.targets) + 2.0))
    gs = fig.add_gridspec(1, len(methods) + 1, width_ratios=[1] * len(methods) + [1.4])
    for j, method in enumerate(methods):
        x = samples[method].reshape(len(cfg.targets), cfg.num_per_target, *samples[method].shape[1:])[:, :per]
        c, h, w = x.shape[2:]
        grid = x.permute(0, 3, 1, 4, 2).reshape(len(cfg.targets) * h, per * w, c)  # rows: targets
        ax = fig.add_subplot(gs[0, j])
        ax.imshow(((grid + 1) / 2).clamp(0, 1).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
        m = results["methods"][method]
        ax.set_title(f"{method}\nFID {m['fid']:.1f}  acc {m['accuracy']:.2f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([(i + 0.5) * h for i in range(len(cfg.targets))], [str(y) for y in cfg.targets])
    ax = fig.add_subplot(gs[0, -1])
    for method in methods:
        ax.plot(results["time_gap_per_step"][method], label=method)
    ax.set_xlabel("reverse step")
    ax.set_ylabel("time gap")
    ax.legend(fontsize=7)
    ax.set_title("Time Gap per step", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_label_seeds(out_dir: str | Path, cfg: LabelConfig, seeds: tuple[int, ...], *,
                    methods: tuple[str, ...] = ALL_METHODS, progress: bool = True,
                    resume: bool = True) -> dict[str, Any]:
    """The suite over several seeds: ``out_dir/seed_<s>/`` holds each seed's run (reused when ``resume`` and its
    config matches, so an interrupted run resumes by seed); ``out_dir/results.json`` and ``table.md`` hold
    ``{"methods": {m: {metric: mean_std}}, "seeds": [...], "config": {...}}``.
    """
    from dataclasses import replace

    from .common import fmt_ci, fmt_ms, markdown_table, mean_std, paired_ci, write_outputs

    per_seed = []
    for seed in seeds:
        c, sub = replace(cfg, seed=seed), Path(out_dir) / f"seed_{seed}"
        prev = sub / "results.json"
        done = None
        if resume and prev.exists():
            old = json.loads(prev.read_text())
            if old["config"].get("seed") == seed and set(old["methods"]) == set(methods) and all(
                    old["config"].get(k) == v for k, v in asdict(c).items() if k not in ("checkpoints", "targets")):
                done = old
        per_seed.append(done or run_label(sub, c, progress=progress, methods=methods))
    agg = {m: {k: mean_std([r["methods"][m][k] for r in per_seed]) for k in ("fid", "accuracy", "time_gap", "seconds")}
           for m in methods}
    paired = {m: {k: paired_ci(agg[m.partition("+")[0]][k]["values"], agg[m][k]["values"]) for k in ("fid", "accuracy")}
              for m in methods if "+" in m and m.partition("+")[0] in agg}
    results = {"methods": agg, "paired": paired, "seeds": list(seeds),
               "config": {**per_seed[0]["config"], "seed": list(seeds)}, "paper": PAPER_TABLE2}
    rows = []
    for m in methods:
        a = agg[m]
        delta = fmt_ci(paired[m]["fid"]) if m in paired else ""
        rows.append([m, fmt_ms(a["fid"], 2), delta, fmt_ms(a["accuracy"], 3), fmt_ms(a["time_gap"]),
                     f"{a['seconds']['mean']:.1f}"])
    head = (f"Label guidance, {cfg.dataset}: targets {list(cfg.targets)}, {cfg.num_per_target} samples per target per "
            f"seed, grid {cfg.timestep_spacing!r}; mean ± std over seeds {list(seeds)}. ΔFID: mean paired change "
            "against the method without its corrector, with its 95% Student-t interval over seeds; (noise) = the "
            "interval contains 0.\n\n")
    write_outputs(out_dir, results, head + markdown_table(["method", "FID", "ΔFID [95% CI]", "accuracy", "Time Gap",
                                                           "seconds"], rows))
    return results
