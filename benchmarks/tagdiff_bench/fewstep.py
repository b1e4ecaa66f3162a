"""Few-step unconditional sampling with and without TAG (docs/notation.md §7.4; Tables 4 and 17 analogue).

The discretisation error of a coarse grid acts as the "external noise" TAG corrects. For each sampler (DDIM η = 0
and DDPM) and step count, ω_0 and the placement (Alg. 1 "pre" / Alg. 2 "post") are chosen together on a validation
seed by FID; ω = 0 and the chosen setting are then compared over the evaluation seeds.

The grid is the TFG benchmark's by default (``timestep_spacing="linspace"``, equal to ``space_timesteps`` of
``YWolfeee/Training-Free-Guidance/diffusion/unet/openai.py`` at the paper's step counts; diffusers' ``"leading"``
agrees for one step): one step is ``[0]``, three ``[999, 500, 0]``. So the paper's one-step sampler evaluates
ε_θ(x_T, t = 0), and Alg. 1 ("pre") corrects x_T, which is maximally off the t = 0 manifold, toward class 0; Alg. 2
("post") has no timestep to target after the last step. On the ``"trailing"`` grid one
step starts at t = T − 1, where x_T is already on the manifold. Each run records the per-step ‖ω_t·TLS‖
(``tls_norm_per_step``) so the tables can show where TAG acted; with the default ω schedule ω_t = ω_0 (1 − ᾱ_t) is
only ω_0 · 1e-4 at t = 0 (``omega_schedule="constant"`` lifts that).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tagdiff.guidance import TemporalAlignment

from .common import (
    ExperimentConfig,
    RunCache,
    Setup,
    draw,
    fmt_ci,
    fmt_ms,
    grid_key,
    image_grid,
    markdown_table,
    preview,
    relative_change,
    sample_metrics,
)
from .runner import Comparison, Experiment, run

__all__ = ["FewStepConfig", "run_fewstep", "PAPER", "EXPERIMENT"]

PAPER = {"source": "the paper's Table 4 (CIFAR-10 FID without -> with TAG; the caption says DDPM sampling)",
         "fid": {"1": [460.0, 271.1], "3": [234.1, 160.5], "5": [158.6, 118.8], "10": [106.3, 93.1],
                 "50": [71.8, 70.9], "100": [67.6, 66.5]}}


@dataclass(frozen=True)
class FewStepConfig(ExperimentConfig):
    samplers: tuple[str, ...] = ("ddim", "ddpm")
    steps: tuple[int, ...] = (1, 3, 5, 10, 50, 100)
    omegas: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    placements: tuple[str, ...] = ("pre", "post")
    num_samples: int = 512
    sweep_samples: int = 256
    omega_schedule: str = field(default="one_minus_alpha_bar", metadata={
        "choices": ("one_minus_alpha_bar", "constant", "sqrt_one_minus_alpha_bar"), "help": "TAG's ω_t schedule"})


def _validate(cfg: FewStepConfig) -> None:
    bad = [s for s in cfg.samplers if s not in ("ddim", "ddpm")]
    bad += [p for p in cfg.placements if p not in ("pre", "post")]
    if bad or min(cfg.steps) < 1 or min(cfg.omegas) < 0:
        raise ValueError(f"bad few-step settings: samplers {cfg.samplers} (ddim, ddpm), placements {cfg.placements} "
                         f"(pre, post), steps {cfg.steps} (>= 1), omegas {cfg.omegas} (>= 0)")


def _comparisons(setup: Setup, cfg: FewStepConfig) -> Any:
    """One comparison per (sampler, step count): unconditional samples judged by FID, TAG's placement searched
    with ω_0; each result keeps the per-step trace of its first evaluation seed."""
    for sampler in cfg.samplers:
        for steps in cfg.steps:
            def run(omega: float, seed: int, n: int, placement: str | None, sampler: str = sampler,
                    steps: int = steps) -> dict[str, Any]:
                terms = [TemporalAlignment(setup.models["time_predictor"], omega, cfg.omega_schedule,
                                           placement=placement or "pre")]
                out = draw(setup, terms if omega > 0 else [], n=n, seed=seed, num_steps=steps, sampler=sampler,
                           eta=0.0, timestep_spacing=cfg.timestep_spacing, steps_offset=cfg.steps_offset)
                return {**sample_metrics(setup, out["x0"]), "time_gap": out["time_gap"], "seconds": out["seconds"],
                        "preview": preview(out["x0"]), "timesteps": out["timesteps"],
                        "tls_norm_per_step": out["tls_norm_per_step"], "time_gap_per_step": out["time_gap_per_step"]}

            key = {"exp": "fewstep", "dataset": cfg.dataset, "sampler": sampler, "steps": steps, **grid_key(cfg),
                   **({"omega_schedule": cfg.omega_schedule} if cfg.omega_schedule != "one_minus_alpha_bar" else {})}
            yield Comparison((f"{sampler}/{steps}",), key, run, n=cfg.num_samples, sweep_n=cfg.sweep_samples,
                             omegas=cfg.omegas, variants=cfg.placements,
                             extra=lambda cache, r, key=key, run=run: {"trace": _trace(cache, key, run, r, cfg)},
                             line=lambda r, sampler=sampler, steps=steps: (
                                 f"  {sampler} {steps:3d} steps  best {r['sweep']['best']:>9}  FID "
                                 f"{fmt_ms(r['without']['fid'])} -> {fmt_ms(r['with']['fid'])}"))


def run_fewstep(out_dir: str | Path, cfg: FewStepConfig = FewStepConfig(), *, progress: bool = True,
                resume: bool = True) -> dict[str, Any]:
    """Run the experiment; write ``results.json``, ``table.md`` and ``fewstep.png`` in ``out_dir``.

    Raises:
        ValueError: an unknown sampler or placement, a step count < 1, a negative ω, or an unavailable device.
    """
    return run(EXPERIMENT, out_dir, cfg, progress=progress, resume=resume)


def _trace(cache: RunCache, key: dict[str, Any], run: Any, r: dict[str, Any], cfg: FewStepConfig) -> dict[str, Any]:
    """The grid, per-step Time Gap and per-step ‖ω_t·TLS‖ of the first evaluation seed with and without the chosen
    TAG setting (read back from the run cache; the keys are those of :func:`tag_comparison`)."""
    out = {}
    for name, (w, v) in (("without", (0.0, None)), ("with", (r["best_omega"], r["best_variant"]))):
        k = {**key, "omega": w, **({"variant": v} if v and w else {}), "seed": cfg.seeds[0], "n": cfg.num_samples}
        res = cache.get(k, lambda w=w, v=v: run(w, cfg.seeds[0], cfg.num_samples, v))
        out[name] = {f: res.get(f) for f in ("timesteps", "time_gap_per_step", "tls_norm_per_step")}
    return out


def _table(results: dict[str, Any], cfg: FewStepConfig) -> str:
    rows = []
    for name, r in results["runs"].items():
        sampler, steps = name.split("/")
        a, b = r["without"], r["with"]
        paper = PAPER["fid"].get(steps)
        rows.append([sampler, steps, r["sweep"]["best"], fmt_ms(a["fid"], 2), fmt_ms(b["fid"], 2),
                     "TAG off" if not r["best_omega"] else fmt_ci(r["paired"]["fid"], "t") if "paired" in r else
                     f"{100 * relative_change(a['fid']['mean'], b['fid']['mean']):+.1f}%",
                     f"{a['is']['mean']:.2f} → {b['is']['mean']:.2f}",
                     f"{a['time_gap']['mean']:.1f} → {b['time_gap']['mean']:.1f}",
                     f"{paper[0]} → {paper[1]} ({100 * relative_change(*paper):+.0f}%)" if paper else "–"])
    trace = ["", f"Per-step mean ‖ω_t·TLS‖ of the chosen TAG setting (seed {cfg.seeds[0]}; step's t → norm; with "
             "post placement the correction of the step at t acts on x at the step's t_prev):", ""]
    for name, r in results["runs"].items():
        tr = r.get("trace", {}).get("with", {})
        if tr.get("tls_norm_per_step") is not None and r["best_omega"] > 0:
            ts, norms = tr["timesteps"], tr["tls_norm_per_step"]
            pairs = ", ".join(f"t={t}: {v:.3g}" for t, v in list(zip(ts, norms))[:6])
            trace.append(f"- {name} ({r['sweep']['best']}): {pairs}{' …' if len(ts) > 6 else ''}")
    head = (f"Few-step unconditional sampling, {cfg.dataset}, grid {cfg.timestep_spacing!r}"
            f"{f' (steps_offset {cfg.steps_offset})' if cfg.steps_offset else ''}, ω schedule {cfg.omega_schedule}: "
            "TAG setting (placement:ω_0) chosen on seed "
            f"{cfg.sweep_seed} ({cfg.sweep_samples} samples) over ω_0 ∈ {list(cfg.omegas)} × {list(cfg.placements)}; "
            f"mean ± std over seeds {list(cfg.seeds)} with {cfg.num_samples} samples each. FID against all held-out "
            "images. ΔFID: mean paired change over seeds with its 95% Student-t interval (3-5 seeds: too few for a "
            "bootstrap); (noise) = it or the paired bootstrap interval contains 0.\n\n")
    return head + markdown_table(["sampler", "steps", "best TAG", "FID without", "FID with TAG", "ΔFID [95% CI]",
                                  "IS analogue", "Time Gap", "paper FID (CIFAR-10)"], rows) + "\n".join(trace) + "\n"


def _figure(path: Path, results: dict[str, Any], cfg: FewStepConfig, setup: Setup) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shape = tuple(setup.eps_model.sample_shape)
    few = [s for s in cfg.steps if s <= 5] or list(cfg.steps[:1])
    sampler = cfg.samplers[0]
    fig, axes = plt.subplots(2, len(few) + 1, figsize=(2.4 * (len(few) + 1) + 1.5, 5.2), squeeze=False)
    for j, steps in enumerate(few):
        r = results["runs"][f"{sampler}/{steps}"]
        for i, name in enumerate(("without", "with")):
            ax = axes[i, j]
            ax.imshow(image_grid(torch.tensor(r["preview"][name]).reshape(-1, *shape), 4, 4), cmap="gray",
                      vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            label = "no TAG" if name == "without" else f"TAG {r['sweep']['best']}"
            ax.set_title(f"{sampler} {steps} step(s), {label}\nFID {r[name]['fid']['mean']:.1f}", fontsize=8)
    gs = axes[0, -1].get_gridspec()
    for ax in axes[:, -1]:
        ax.remove()
    ax = fig.add_subplot(gs[:, -1])
    for s in cfg.samplers:
        for name, style in (("without", "--"), ("with", "-")):
            ys = [results["runs"][f"{s}/{k}"][name]["fid"]["mean"] for k in cfg.steps]
            ax.plot(cfg.steps, ys, style, marker="o", label=f"{s} {'+ TAG' if name == 'with' else ''}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("steps")
    ax.set_ylabel("FID (mean over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


EXPERIMENT = Experiment(
    "fewstep", FewStepConfig, "1-100 step DDIM/DDPM with/without TAG (Tables 4, 17)", _validate, _table,
    comparisons=_comparisons, paper=PAPER, figure=_figure, record=lambda setup, cfg: {"ddim_eta": 0.0})
