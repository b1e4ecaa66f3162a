"""Label guidance with and without TAG on real digits (docs/notation.md §7.2, Tables 2/8 analogue).

For each target class: unguided sampling; DPS label guidance (loss -log p(y | x0_hat) of the clean classifier,
gradient through the ε-model); DPS + TAG; classifier guidance with the noise-aware classifier; classifier guidance +
TAG; TFG (x̂_0 clipped in its loss, as the benchmark) and the benchmark's own DPS (``dps_tfg``:
:class:`~tagdiff.guidance.DPSNormalized`, ∇log p / |log p|, no clipping in its loss or its step, as
``methods/dps.py``). Sampler: DDIM(η = 1), as the TFG benchmark, over its ``space_timesteps`` grid by default
(``timestep_spacing="linspace"``, the same grid at 50 steps; ``"trailing"`` is also available), x0_hat
clipped to [-1, 1] inside the step except for ``dps_tfg``. Metrics, as the TFG benchmark computes them: FID against
the held-out images of the target class in the feature space of the independent evaluation classifier, that
classifier's accuracy on the target, the mean Time Gap (learned time predictor) and wall time. All methods share x_T
and the sampling noise (common random numbers), so their differences are the effect of the guidance and of TAG.

The suite goes through the shared pipeline of :mod:`tagdiff.bench.common` (load the models, build each method's
terms, draw, metrics, table and figure): every (method, seed) run is a cached run of ``OUT/runs/`` (an interrupted
or repeated run resumes), its metrics are :func:`~tagdiff.bench.common.sample_metrics`. Names: ``omega`` is TAG's
ω_0; ``dps_guidance_scale`` / ``cg_guidance_scale`` are the guidance scales of DPS and of classifier guidance;
``eta`` is DDIM's η.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tagdiff.guidance import (
    DSG,
    ClassifierGuidance,
    DPSGuidance,
    DPSNormalized,
    DPSStep,
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
    mpgd,
)
from tagdiff.metrics.images import class_histogram, fid

from .common import (
    RunCache,
    Setup,
    draw,
    fmt_ms,
    image_grid,
    load_setup,
    markdown_table,
    mean_std,
    preview,
    sample_metrics,
    short_hash,
    write_outputs,
)
from .runner import Experiment, run, stopwatch

__all__ = ["LabelConfig", "METHODS", "ALL_METHODS", "method_terms", "label_run",
           "run_label", "run_label_seeds"]

METHODS = ("unguided", "dps", "dps+tag", "cg", "cg+tag")  # the demo's suite
BASELINES = ("dps+tcs", "dps+es", "dps+langevin", "dps+timeshift", "dps+tsg", "dps+sg")  # docs/notation.md §5, on DPS
RIVALS = ("dps_step", "dps_step+tag", "mpgd", "mpgd+tag", "dsg", "dsg+tag")  # guidance after the clip; MPGD; DSG
ALL_METHODS = (*METHODS, "tfg", "tfg+tag", "dps_tfg", "dps_tfg+tag", *BASELINES, *RIVALS)
PAPER_TABLE2 = {"cifar10_dps": {"fid": [217.1, 190.4], "accuracy": [57.5, 63.2]},
                "source": "the paper's Table 2 (CIFAR-10, DPS -> DPS+TAG): FID -12.3%, accuracy +9.9%"}
PREVIEW_PER_TARGET = 8  # samples per target class kept for the figure
# the run cache's names of renamed LabelConfig fields (part of every cached run's key)
KEY_NAMES = {"models_dir": "checkpoints", "dps_guidance_scale": "dps_scale", "cg_guidance_scale": "cg_scale"}


@dataclass(frozen=True)
class LabelConfig:
    """Settings of the label-guidance suite. The digits defaults (DPS scale 16, CG scale 4, ω_0 = 1) were chosen by
    ``benchmarks/label_sweep.py`` on other targets (1, 4, 8) and another seed (100) than the demo reports.
    ``dps_guidance_scale`` / ``cg_guidance_scale`` are the guidance scales of DPS and classifier guidance, ``omega``
    TAG's ω_0, ``eta`` DDIM's η; ``device`` is ``auto`` (CUDA, else MPS, else CPU), ``cpu``, ``cuda`` or ``mps``."""

    dataset: str = "digits"
    targets: tuple[int, ...] = (0, 3, 7)
    num_per_target: int = 64
    num_steps: int = 50
    eta: float = 1.0
    dps_guidance_scale: float = 16.0
    cg_guidance_scale: float = 4.0
    omega: float = 1.0
    placement: str = "pre"
    seed: int = 0
    data_dir: str | None = None
    models_dir: str | None = None  # the folder of the models (default: the shipped assets/<dataset>)
    device: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)
    # The grid: VPSchedule.timesteps(num_steps, timestep_spacing, steps_offset); "linspace" is the TFG benchmark's.
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    # TFG (Ye et al. 2024; docs/notation.md §4.3): ρ̄, μ̄, γ̄ and recurrence, "increase" schedules, N_iter = 4.
    # ρ̄ and μ̄ chosen
    # by benchmarks/tfg_sweep.py on validation targets/seed; γ̄ = 0.001 as TFG's CIFAR-10 label settings.
    tfg_rho: float = 0.1
    tfg_mu: float = 0.5
    tfg_gamma: float = 0.001
    tfg_recur: int = 1
    tfg_clip_x0: float = 1.0  # clamp x̂_0 in TFG's loss (the benchmark's clip_x0 = True); 0 = off
    dps_tfg_scale: float = 1.0  # the benchmark's DPS strength (``guidance_strength``)
    # Baselines (docs/notation.md §5; the paper does not report their settings): ES λ (ADM-ES/ComfyUI default 1.005),
    # Langevin snr (score_sde's 0.16), Time-Shift window and cutoff (training timesteps).
    es_lambda: float = 1.005
    langevin_snr: float = 0.16
    timeshift_window: int = 20
    timeshift_cutoff: int = 300
    # Timestep Guidance (Sadat et al. 2024) and Self-Guidance (Li et al. 2024b), docs/notation.md §5.5: scale w and time
    # perturbation δ (timesteps). Not reported by the paper and not tuned here: w = 1 with δ = 50 (TSG std) / 20 (SG).
    tsg_scale: float = 1.0
    tsg_delta: float = 50.0
    sg_scale: float = 1.0
    sg_delta: float = 20.0
    # DPS as its Alg. 1 (DPSStep: the guidance after the clipped step; "score" step = DPSGuidance's scale), MPGD's
    # x̂_0-space step size and DSG's guidance rate: chosen by benchmarks/rivals_sweep.py on validation targets/seed.
    # (the runs of docs/RESULTS.md §16: dps_step_scale ∈ 0.25–64 all worse than DPS, 4 the least bad; mpgd_scale 0.3
    # inside 0.03–10; dsg_guidance_rate 1, the end of its range [0, 1])
    dps_step_scale: float = 4.0
    mpgd_scale: float = 0.3
    dsg_guidance_rate: float = 1.0


# fields added after runs were cached: left out of the settings digest while at their default (cached runs resume)
_DIGEST_DEFAULTS = {"dps_step_scale": 4.0, "mpgd_scale": 0.3, "dsg_guidance_rate": 1.0}


def method_terms(method: str, models: dict[str, Any], target: Tensor, cfg: LabelConfig) -> list[Term]:
    """The guidance terms of one method (``ALL_METHODS``) for per-sample targets ``target`` (B,)."""
    terms: list[Term] = []
    if method.startswith("dps_tfg"):
        terms.append(DPSNormalized(label_loss(models["clf_clean"], target), cfg.dps_tfg_scale))
    elif method.startswith("dps_step"):
        terms.append(DPSStep(label_loss(models["clf_clean"], target), cfg.dps_step_scale))
    elif method.startswith("mpgd"):
        terms.append(mpgd(label_loss(models["clf_clean"], target), cfg.mpgd_scale))
    elif method.startswith("dsg"):
        terms.append(DSG(label_loss(models["clf_clean"], target), cfg.dsg_guidance_rate, eta=cfg.eta))
    elif method.startswith("dps"):
        terms.append(DPSGuidance(label_loss(models["clf_clean"], target), cfg.dps_guidance_scale))
    elif method.startswith("cg"):
        terms.append(ClassifierGuidance(models["clf_noisy"], target, cfg.cg_guidance_scale))
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


def label_run(setup: Setup, cfg: LabelConfig, method: str, *, progress: bool = False) -> dict[str, Any]:
    """One method at ``cfg.seed``: ``cfg.num_per_target`` samples per target class (targets in order).

    Returns:
        :func:`~tagdiff.bench.common.sample_metrics` (``fid``, ``accuracy``, ``confidence``, ``is``, ``per_target``)
        and ``time_gap``, ``time_gap_per_step``, ``seconds``, ``preview`` (the first :data:`PREVIEW_PER_TARGET`
        samples of every target, flattened) and, for ``unguided``, ``sanity`` (base-model checks).
    """
    target = torch.tensor(cfg.targets).repeat_interleave(cfg.num_per_target).to(setup.device)
    out = draw(setup, method_terms(method, setup.models, target, cfg), n=target.numel(), seed=cfg.seed,
               num_steps=cfg.num_steps, eta=cfg.eta, timestep_spacing=cfg.timestep_spacing,
               steps_offset=cfg.steps_offset, clip_x0=None if method.startswith("dps_tfg") else 1.0,
               progress=progress)
    x0 = out["x0"]
    per = min(PREVIEW_PER_TARGET, cfg.num_per_target)
    shown = x0.reshape(len(cfg.targets), cfg.num_per_target, *x0.shape[1:])[:, :per].reshape(-1, *x0.shape[1:])
    result = {**sample_metrics(setup, x0, target), "time_gap": out["time_gap"],
              "time_gap_per_step": out["time_gap_per_step"], "seconds": out["seconds"],
              "preview": preview(shown, len(shown))}
    if method == "unguided":
        result["sanity"] = _sanity(x0, setup.held_x, setup.models["clf_eval"], cfg.seed)
    return result


def run_label(out_dir: str | Path, cfg: LabelConfig = LabelConfig(), *, progress: bool = True,
              methods: tuple[str, ...] = METHODS, resume: bool = True) -> dict[str, Any]:
    """Run the suite at ``cfg.seed``; write ``results.json``, ``table.md`` and ``label.png`` in ``out_dir`` (and
    each method's run in ``out_dir/runs/``, reused when ``resume``); return the results
    ``{"methods": {m: {"fid", "accuracy", "confidence", "is", "time_gap", "seconds"}}, "per_target": {m: {y: {"fid",
    "accuracy"}}}, "time_gap_per_step": {m: [...]}, "sanity", "config", "paper", "seconds"}``.

    Raises:
        ValueError: an unknown method, a target class the classifiers do not have, or an unavailable device.
        CheckpointError: missing or corrupt checkpoints.
    """
    return run(label_experiment(methods), out_dir, cfg, progress=progress, resume=resume)


def _validate(cfg: LabelConfig, methods: tuple[str, ...] = METHODS) -> None:
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; expected some of {', '.join(ALL_METHODS)}")


def _measure(setup: Setup, cfg: LabelConfig, cache: RunCache, progress: bool,
             methods: tuple[str, ...] = METHODS) -> dict[str, Any]:
    """Every method at ``cfg.seed`` (one cached run each); the samples shown go to the figure only."""
    seconds = stopwatch()
    # the settings' digest names the fields as the cache always has (KEY_NAMES), so cached runs still resume
    settings = {KEY_NAMES.get(k, k): v for k, v in asdict(cfg).items() if k not in ("seed", "device")
                and not (k in _DIGEST_DEFAULTS and v == _DIGEST_DEFAULTS[k])}
    base = {"exp": "label", "dataset": cfg.dataset, "targets": ",".join(map(str, cfg.targets)),
            "n": cfg.num_per_target, "steps": cfg.num_steps, "eta": cfg.eta,
            "settings": short_hash(json.dumps({**settings, "checkpoints": setup.models_dir}, sort_keys=True))}
    results: dict[str, Any] = {"methods": {}, "per_target": {}, "time_gap_per_step": {}}
    runs: dict[str, dict[str, Any]] = {}
    for method in methods:
        runs[method] = r = cache.get({**base, "method": method, "seed": cfg.seed},
                                     lambda method=method: label_run(setup, cfg, method, progress=progress))
        results["methods"][method] = {k: r[k] for k in ("fid", "accuracy", "confidence", "is", "time_gap", "seconds")}
        results["per_target"][method] = r["per_target"]
        results["time_gap_per_step"][method] = r["time_gap_per_step"]
        if progress:
            print(f"  {method:9s} FID {r['fid']:7.2f}  acc {r['accuracy']:.3f}  time gap {r['time_gap']:6.1f}  "
                  f"{r['seconds']:5.1f} s", flush=True)
    if "unguided" in runs:
        results["sanity"] = runs["unguided"]["sanity"]
    results["_figure"] = {m: r["preview"] for m, r in runs.items()}
    results["seconds"] = seconds()
    return results


def _record(setup: Setup, cfg: LabelConfig) -> dict[str, Any]:
    return {"sampler": "ddim", "clip_x0": "1.0 (dps_tfg: none)",
            "reference_images_per_target": {str(y): int((setup.held_y == y).sum()) for y in cfg.targets},
            "fid_features": "EvalClassifier.features (128-d)"}


def _table(results: dict[str, Any], cfg: LabelConfig) -> str:
    rows = [[m, f"{r['fid']:.2f}", f"{r['accuracy']:.3f}", f"{r['time_gap']:.1f}", f"{r['seconds']:.1f}"]
            for m, r in results["methods"].items()]
    head = (f"Label guidance, {cfg.dataset}: targets {list(cfg.targets)}, {cfg.num_per_target} samples per target, "
            f"seed {cfg.seed}; DDIM(η={cfg.eta}) {cfg.num_steps} steps. FID per target class against its held-out "
            "images in the evaluation classifier's feature space, averaged over targets.\n\n")
    return head + markdown_table(["method", "FID", "accuracy", "Time Gap", "seconds"], rows)


def _sanity(unguided: Tensor, held_x: Tensor, clf_eval: Any, seed: int) -> dict[str, Any]:
    """Base-model checks: FID of unguided samples vs held-out data next to FID between two real halves (same
    feature network; FID is biased upward at small n, so compare the two at similar n), and the class histogram of
    unguided samples under the evaluation classifier (entropy close to log 10 = 2.303 for a balanced model)."""
    perm = torch.randperm(held_x.shape[0], generator=torch.Generator().manual_seed(seed)).to(held_x.device)
    half = held_x.shape[0] // 2
    n = min(unguided.shape[0], half)
    counts, entropy = class_histogram(clf_eval, unguided)
    return {"fid_unguided_vs_held_out": fid(held_x[perm[:half]], unguided[:n], clf_eval),
            "fid_real_half_vs_half": fid(held_x[perm[:half]], held_x[perm[half:half + n]], clf_eval),
            "n": n, "class_histogram": counts.tolist(), "class_entropy": entropy,
            "max_entropy": math.log(len(counts))}


def _figure(path: Path, results: dict[str, Any], cfg: LabelConfig, setup: Setup) -> None:
    """Samples of every method (rows: the target classes; tiles separated by a white border) above the Time Gap
    per reverse step."""
    previews, shape = results["_figure"], tuple(setup.eps_model.sample_shape)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(previews)
    rows, per = len(cfg.targets), min(PREVIEW_PER_TARGET, cfg.num_per_target)
    pad = 1
    tile_h, tile_w = shape[-2] + 2 * pad, shape[-1] + 2 * pad
    cols = min(len(methods), 5)
    panel_w = 2.9
    panel_h = panel_w * rows * tile_h / (per * tile_w) + 0.55
    grid_rows = -(-len(methods) // cols)
    fig = plt.figure(figsize=(cols * panel_w + 0.6, grid_rows * panel_h + 2.9), layout="constrained")
    sub = fig.subfigures(2, 1, height_ratios=[grid_rows * panel_h, 2.6])
    axes = sub[0].subplots(grid_rows, cols, squeeze=False)
    for ax in axes.flat[len(methods):]:
        ax.set_axis_off()
    for ax, method in zip(axes.flat, methods):
        x = torch.tensor(previews[method]).reshape(-1, *shape)
        ax.imshow(image_grid(x, rows, per, pad=pad), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        m = results["methods"][method]
        ax.set_title(f"{method}\nFID {m['fid']:.1f}  acc {m['accuracy']:.2f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([(i + 0.5) * tile_h - 0.5 for i in range(rows)], [str(y) for y in cfg.targets], fontsize=8)
        ax.tick_params(length=0)
        for side in ax.spines.values():
            side.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("target class", fontsize=9)
    sub[0].suptitle(f"Label guidance on {cfg.dataset}: each row is one target class ({per} of "
                    f"{cfg.num_per_target} samples, seed {cfg.seed}). FID per target class in the evaluation "
                    "classifier's feature space; acc = its accuracy on the target", fontsize=9)
    ax = sub[1].subplots()
    for method in methods:
        ax.plot(results["time_gap_per_step"][method], label=method)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("reverse step")
    ax.set_ylabel("Time Gap")
    ax.legend(fontsize=7, ncols=min(len(methods), 5))
    ax.set_title("Time Gap per reverse step (learned time predictor)", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def run_label_seeds(out_dir: str | Path, cfg: LabelConfig, seeds: tuple[int, ...], *,
                    methods: tuple[str, ...] = ALL_METHODS, progress: bool = True,
                    resume: bool = True) -> dict[str, Any]:
    """The suite over several seeds: ``out_dir/seed_<s>/`` holds each seed's :func:`run_label` (its runs are
    reused when ``resume``); ``out_dir/results.json`` and ``table.md`` hold ``{"methods": {m: {metric: mean_std}},
    "seeds": [...], "config": {...}}``.

    Raises:
        ValueError / CheckpointError: as :func:`run_label`.
    """
    from .common import fmt_ci, paired_ci

    per_seed = [run_label(Path(out_dir) / f"seed_{seed}", replace(cfg, seed=seed), progress=progress,
                          methods=methods, resume=resume) for seed in seeds]
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
            "against the method without its corrector, with its 95% paired bootstrap interval over seeds; (noise) = "
            "it or the Student-t interval contains 0.\n\n")
    write_outputs(out_dir, results, head + markdown_table(["method", "FID", "ΔFID [95% CI]", "accuracy", "Time Gap",
                                                           "seconds"], rows))
    return results


EXPERIMENT = Experiment(
    "label", LabelConfig, "label guidance: unguided / DPS / DPS+TAG / CG / CG+TAG (Table 2 analogue)", _validate,
    _table, measure=_measure, paper=PAPER_TABLE2, record=_record, figure=_figure, check_targets=True,
    tail=("seconds",), load=lambda cfg: load_setup(cfg.dataset, cfg.models_dir, cfg.data_dir, cfg.device))


def label_experiment(methods: tuple[str, ...] = METHODS) -> Experiment:
    """The label suite over ``methods`` (:data:`ALL_METHODS`)."""
    return replace(EXPERIMENT, validate=partial(_validate, methods=methods), measure=partial(_measure, methods=methods))
