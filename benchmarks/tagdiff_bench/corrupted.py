"""The corrupted reverse process with and without TAG (docs/notation.md §3.5 Alg. 2, §9.2; Tables 1, 10, 11, 12
analogue).

Unconditional DDIM sampling where fresh N(0, σ²I) noise (σ = ``corruption_std``, one run per value of
``corruption_stds``) is added to x_t before every reverse step; TAG corrects
the state after the step, towards the timestep the step moved to (Alg. 2, ``placement="post"``), with
ω_t = ω_0 (1 − ᾱ_t). For each σ, ω_0 is chosen on a validation seed by FID over a grid (the paper's Table 10 is such
a grid), then ω = 0 and the chosen ω_0 are compared over the evaluation seeds. Metrics: FID against all held-out
images, the evaluation classifier's confidence and IS analogue, and the Time Gap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tagdiff.guidance import Corruption, TemporalAlignment, Term

from .common import (
    ExperimentConfig,
    Setup,
    draw,
    fmt_ms,
    grid_key,
    image_grid,
    markdown_table,
    preview,
    relative_change,
    sample_metrics,
)
from .runner import Comparison, Experiment, run

__all__ = ["CorruptedConfig", "run_corrupted", "PAPER", "EXPERIMENT"]

PAPER = {"source": "the paper's Tables 11/12 (CIFAR-10, DDIM 50 steps, 50k samples): FID without -> with TAG "
                   "at the best ω",
         "fid": {"0.0": [11.799, 11.799], "0.05": [78.882, 62.463], "0.1": [193.653, 115.578],
                 "0.2": [351.318, 230.899], "0.3": [410.127, 223.227]},
         "best_omega": {"0.05": 0.2, "0.1": 1.25, "0.2": 4.5, "0.3": 200}}


@dataclass(frozen=True)
class CorruptedConfig(ExperimentConfig):
    """Settings. ``corruption_stds`` are the std σ of the added noise (the paper's σ grid, plus 0.5 and 1.0: on 8×8
    digits the final denoising step removes most of the corruption up to σ ≈ 0.3, so the regime where it degrades
    samples starts later than on CIFAR-10); ``omegas`` the TAG ω_0 grid; ``eta`` DDIM's η."""

    corruption_stds: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
    omegas: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    num_samples: int = 512
    sweep_samples: int = 256
    num_steps: int = 50
    eta: float = 1.0
    placement: str = "post"


def _validate(cfg: CorruptedConfig) -> None:
    if any(s < 0 for s in cfg.corruption_stds) or any(w < 0 for w in cfg.omegas):
        raise ValueError(f"corruption_stds and omegas must be >= 0, got {cfg.corruption_stds} and {cfg.omegas}")


def _comparisons(setup: Setup, cfg: CorruptedConfig) -> Any:
    """One comparison per corruption std, judged by FID against all held-out images."""
    for std in cfg.corruption_stds:
        def run(omega: float, seed: int, n: int, std: float = std) -> dict[str, Any]:
            return _run(setup, cfg, std, omega, seed, n)

        # the cache key names the corruption std "sigma" (the name its cached runs were stored under)
        key = {"exp": "corrupted", "dataset": cfg.dataset, "sigma": std, "steps": cfg.num_steps, "eta": cfg.eta,
               "placement": cfg.placement, **grid_key(cfg)}
        yield Comparison((str(std),), key, run, n=cfg.num_samples, sweep_n=cfg.sweep_samples, omegas=cfg.omegas,
                         line=lambda r, std=std: (
                             f"  σ={std:<5} ω*={r['best_omega']:<5} FID {fmt_ms(r['without']['fid'])} -> "
                             f"{fmt_ms(r['with']['fid'])}  TG {r['without']['time_gap']['mean']:.1f} -> "
                             f"{r['with']['time_gap']['mean']:.1f}"))


def run_corrupted(out_dir: str | Path, cfg: CorruptedConfig = CorruptedConfig(), *, progress: bool = True,
                  resume: bool = True) -> dict[str, Any]:
    """Run the experiment; write ``results.json``, ``table.md`` and ``corrupted.png`` in ``out_dir``.

    Raises:
        ValueError: a negative corruption std or ω, a sweep seed that is also an evaluation seed, or an unavailable
            device.
    """
    return run(EXPERIMENT, out_dir, cfg, progress=progress, resume=resume)


def _run(setup: Setup, cfg: CorruptedConfig, std: float, omega: float, seed: int, n: int) -> dict[str, Any]:
    terms: list[Term] = [Corruption(std)]
    if omega > 0:
        terms.append(TemporalAlignment(setup.models["time_predictor"], omega, placement=cfg.placement))
    out = draw(setup, terms, n=n, seed=seed, num_steps=cfg.num_steps, eta=cfg.eta,
               timestep_spacing=cfg.timestep_spacing, steps_offset=cfg.steps_offset)
    return {**sample_metrics(setup, out["x0"]), "time_gap": out["time_gap"], "seconds": out["seconds"],
            "preview": preview(out["x0"])}


def _table(results: dict[str, Any], cfg: CorruptedConfig) -> str:
    rows = []
    for std, r in results["corruption_std"].items():
        a, b = r["without"], r["with"]
        paper = PAPER["fid"].get(std)
        rows.append([std, r["best_omega"], fmt_ms(a["fid"]), fmt_ms(b["fid"]),
                     f"{100 * relative_change(a['fid']['mean'], b['fid']['mean']):+.1f}%",
                     f"{a['is']['mean']:.2f} → {b['is']['mean']:.2f}",
                     f"{a['confidence']['mean']:.3f} → {b['confidence']['mean']:.3f}",
                     f"{a['time_gap']['mean']:.1f} → {b['time_gap']['mean']:.1f}",
                     f"{paper[0]:.1f} → {paper[1]:.1f} ({100 * relative_change(*paper):+.0f}%)" if paper else "–"])
    head = (f"Corrupted reverse process, {cfg.dataset}: N(0, σ²I) added before every step (σ = corruption std); "
            f"DDIM(η={cfg.eta}) {cfg.num_steps} steps, TAG {cfg.placement}, "
            f"ω_t = ω_0(1-ᾱ_t); ω_0 chosen on seed {cfg.sweep_seed} ({cfg.sweep_samples} samples); mean ± std over "
            f"seeds {list(cfg.seeds)} with {cfg.num_samples} samples each.\n\n")
    table = markdown_table(["σ", "ω_0*", "FID without", "FID with TAG", "ΔFID", "IS analogue", "confidence",
                            "Time Gap", "paper FID (CIFAR-10)"], rows)
    grid_rows = []
    for std, r in results["corruption_std"].items():
        for w, m in r["sweep"]["grid"].items():
            grid_rows.append([std, w, f"{m['time_gap']:.1f}", f"{m['fid']:.2f}", f"{m['is']:.2f}"])
    grid = markdown_table(["σ", "ω_0", "Time Gap", "FID", "IS analogue"], grid_rows)
    return head + table + "\nω_0 grid on the validation seed (Table 1/10 analogue):\n\n" + grid


def _figure(path: Path, results: dict[str, Any], cfg: CorruptedConfig, setup: Setup) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stds = list(results["corruption_std"])
    shape = tuple(setup.eps_model.sample_shape)
    fig, axes = plt.subplots(2, len(stds) + 1, figsize=(2.4 * (len(stds) + 1), 5.2),
                             gridspec_kw={"width_ratios": [1] * len(stds) + [1.6]})
    for j, std in enumerate(stds):
        r = results["corruption_std"][std]
        for i, name in enumerate(("without", "with")):
            x = torch.tensor(r["preview"][name]).reshape(-1, *shape)
            ax = axes[i, j]
            ax.imshow(image_grid(x, 4, 4), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            w = 0.0 if name == "without" else r["best_omega"]
            ax.set_title(f"σ={std} ω={w}\nFID {r[name]['fid']['mean']:.1f}", fontsize=8)
    gs = axes[0, -1].get_gridspec()
    for ax in axes[:, -1]:
        ax.remove()
    ax = fig.add_subplot(gs[:, -1])
    for std in stds:
        grid = results["corruption_std"][std]["sweep"]["grid"]
        ws = sorted(grid, key=float)
        lo = min([float(w) for w in ws if float(w) > 0] or [1.0]) / 2
        ax.plot([float(w) or lo for w in ws], [grid[w]["fid"] for w in ws], marker="o", label=f"σ={std}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("ω_0 (leftmost point: ω = 0)")
    ax.set_ylabel("FID (validation seed)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


EXPERIMENT = Experiment(
    "corrupted", CorruptedConfig, "corrupted reverse process σ × ω (Tables 1, 10-12)", _validate, _table,
    section="corruption_std", comparisons=_comparisons, paper=PAPER, figure=_figure,
    record=lambda setup, cfg: {"sampler": "ddim", "omega_schedule": "one_minus_alpha_bar",
                               "fid_reference": "all held-out images"})
