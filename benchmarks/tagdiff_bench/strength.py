"""Rising DPS strength with and without TAG (docs/notation.md §7.2, Table 3 analogue).

Table 3's strengths 1, 1.5, 2.5 and 5 multiply the tuned DPS strength (its 1.0 row equals Table 2's DPS). Here they
multiply the suite's tuned DPS guidance scale (``dps_guidance_scale``, by default
``LabelConfig.dps_guidance_scale``, 16 on digits). DPS is the score-space label guidance of the label suite (``-log
p(y | x0_hat)`` of the clean classifier, through the ε-model), sampled with DDIM(η = 1), 50 trailing steps, x0_hat
clipped to [-1, 1]. For each strength, ω_0 is chosen on a validation seed by FID; the table reports mean ± std over
the evaluation seeds of FID (against held-out images of the target class, in the evaluation classifier's features),
accuracy and Time Gap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tagdiff.guidance import DPSGuidance, TemporalAlignment, Term, label_loss

from .common import ExperimentConfig, Setup, draw, fmt_ci, fmt_ms, grid_key, markdown_table, sample_metrics
from .label import LabelConfig
from .runner import Comparison, Experiment, run

__all__ = ["StrengthConfig", "run_strength", "PAPER", "EXPERIMENT"]

PAPER = {"source": "the paper's Table 3 (CIFAR-10 DPS -> DPS+TAG; FID, accuracy %)",
         "1.0": {"fid": [217.1, 190.4], "accuracy": [57.5, 63.2]},
         "1.5": {"fid": [269.5, 231.9], "accuracy": [51.4, 62.3]},
         "2.5": {"fid": [334.1, 289.7], "accuracy": [41.9, 51.9]},
         "5.0": {"fid": [384.8, 347.8], "accuracy": [29.4, 41.0]}}


@dataclass(frozen=True)
class StrengthConfig(ExperimentConfig):
    """Settings: ``strengths`` multiply ``dps_guidance_scale`` (the tuned DPS guidance scale); ``omegas`` is the TAG
    ω_0 grid."""

    strengths: tuple[float, ...] = (1.0, 1.5, 2.5, 5.0)
    dps_guidance_scale: float = field(default=LabelConfig.dps_guidance_scale, metadata={"aliases": ("--dps-scale",)})
    omegas: tuple[float, ...] = (0.5, 1.0, 2.0)
    targets: tuple[int, ...] = tuple(range(10))
    num_per_target: int = 32
    sweep_per_target: int = 16
    num_steps: int = 50


def _validate(cfg: StrengthConfig) -> None:
    if min(cfg.strengths) <= 0 or min(cfg.omegas) < 0:
        raise ValueError(f"strengths must be > 0 and omegas >= 0, got {cfg.strengths} and {cfg.omegas}")


def _comparisons(setup: Setup, cfg: StrengthConfig) -> Any:
    """One comparison per strength: DPS at ``strength × dps_guidance_scale``, judged by FID and accuracy on the
    targets."""
    for strength in cfg.strengths:
        def run(omega: float, seed: int, n: int, strength: float = strength) -> dict[str, Any]:
            target = torch.tensor(cfg.targets).repeat_interleave(n // len(cfg.targets)).to(setup.device)
            terms: list[Term] = [DPSGuidance(label_loss(setup.models["clf_clean"], target),
                                             strength * cfg.dps_guidance_scale)]
            if omega > 0:
                terms.append(TemporalAlignment(setup.models["time_predictor"], omega))
            out = draw(setup, terms, n=target.numel(), seed=seed, num_steps=cfg.num_steps,
                       timestep_spacing=cfg.timestep_spacing, steps_offset=cfg.steps_offset)
            return {**sample_metrics(setup, out["x0"], target), "time_gap": out["time_gap"], "seconds": out["seconds"]}

        key = {"exp": "strength", "dataset": cfg.dataset, "scale": strength * cfg.dps_guidance_scale,
               "steps": cfg.num_steps, "targets": ",".join(map(str, cfg.targets)), **grid_key(cfg)}
        yield Comparison((str(strength),), key, run, n=cfg.num_per_target * len(cfg.targets),
                         sweep_n=cfg.sweep_per_target * len(cfg.targets), omegas=cfg.omegas,
                         line=lambda r, strength=strength: (
                             f"  strength {strength:<4} ω*={r['best_omega']:<4} FID {fmt_ms(r['without']['fid'])} -> "
                             f"{fmt_ms(r['with']['fid'])}  acc {fmt_ms(r['without']['accuracy'], 3)} -> "
                             f"{fmt_ms(r['with']['accuracy'], 3)}"))


def run_strength(out_dir: str | Path, cfg: StrengthConfig = StrengthConfig(), *, progress: bool = True,
                 resume: bool = True) -> dict[str, Any]:
    """Run the experiment; write ``results.json`` and ``table.md`` (and ``strength.png``) in ``out_dir``.

    Raises:
        ValueError: a non-positive strength, a negative ω, a target class the classifiers do not have, or an
            unavailable device.
    """
    return run(EXPERIMENT, out_dir, cfg, progress=progress, resume=resume)


def _table(results: dict[str, Any], cfg: StrengthConfig) -> str:
    rows = []
    for s, r in results["strength"].items():
        a, b = r["without"], r["with"]
        p = PAPER.get(s)
        rows.append([s, f"{float(s) * cfg.dps_guidance_scale:g}", r["best_omega"], fmt_ms(a["fid"]), fmt_ms(b["fid"]),
                     fmt_ci(r["paired"]["fid"], "t"),
                     fmt_ms(a["accuracy"], 3), fmt_ms(b["accuracy"], 3),
                     f"{a['time_gap']['mean']:.1f} → {b['time_gap']['mean']:.1f}",
                     f"{p['fid'][0]} → {p['fid'][1]}; {p['accuracy'][0]} → {p['accuracy'][1]}" if p else "–"])
    head = (f"DPS strength sweep, {cfg.dataset}: targets {list(cfg.targets)}, {cfg.num_per_target} samples per target "
            f"per seed; ω_0 ∈ {list(cfg.omegas)} chosen on seed {cfg.sweep_seed} ({cfg.sweep_per_target} per target); "
            f"mean ± std over seeds {list(cfg.seeds)}. ΔFID: the paired change with its Student-t 95 % interval over "
            "the seeds; (noise) where it holds 0.\n\n")
    return head + markdown_table(["strength", "DPS scale", "ω_0*", "FID DPS", "FID DPS+TAG", "ΔFID [95% CI]", "acc DPS",
                                  "acc DPS+TAG", "Time Gap", "paper (CIFAR-10) FID; acc"], rows)


def _figure(path: Path, results: dict[str, Any], cfg: StrengthConfig, setup: Setup) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = [float(k) for k in results["strength"]]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, metric in zip(axes, ("fid", "accuracy")):
        for name, label in (("without", "DPS"), ("with", "DPS + TAG")):
            m = [results["strength"][k][name][metric] for k in results["strength"]]
            ax.errorbar(s, [v["mean"] for v in m], [v["std"] for v in m], marker="o", capsize=3, label=label)
        ax.set_xlabel("DPS strength (× tuned scale)")
        ax.set_ylabel(metric)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


EXPERIMENT = Experiment(
    "strength", StrengthConfig, "DPS strength 1-5× with/without TAG (Table 3)", _validate, _table,
    section="strength", comparisons=_comparisons, paper=PAPER, check_targets=True, figure=_figure,
    record=lambda setup, cfg: {"sampler": "ddim", "eta": 1.0, "clip_x0": 1.0})
