"""Label guidance through fast diffusers solvers, with and without TAG (docs/notation.md §7.4's question for
solvers).

Does TAG help fast solvers, where the discretisation error of a few large steps adds to the guidance error? For each
solver (DDIM η = 0, DPM-Solver++ 2M, UniPC, Euler; every one a diffusers scheduler driven by
:func:`tagdiff.sample_scheduler`), step count and guidance (DPS, classifier guidance), ω_0 is chosen on a validation
seed by FID and ω = 0 is compared with it over the evaluation seeds (the protocol of :mod:`tagdiff.bench.common`).

Choices, all recorded in ``results.json["config"]``:

* every scheduler uses the ``"trailing"`` spacing (the first step starts at t = T − 1) and no clipping of its own;
  x̂_0 is clipped to [-1, 1] and ε re-derived from it before every ``scheduler.step`` (``clip_x0=1``, as DDIM's
  ``use_clipped_model_output``): gradient guidance diverges without it on images (INTEGRATION.md);
* UniPC runs with its corrector disabled (UniP-2M): UniC recomputes the state from the previous step and would
  discard TAG's correction (see :mod:`tagdiff.scheduler_loop`); the no-TAG row uses the same solver;
* guidance scales are the label suite's (``LabelConfig.dps_guidance_scale``, ``cg_guidance_scale``), TAG's placement
  is Alg. 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tagdiff.guidance import ClassifierGuidance, DPSGuidance, TemporalAlignment, label_loss

from .common import ExperimentConfig, Setup, draw, fmt_ci, fmt_ms, markdown_table, preview, sample_metrics
from .label import LabelConfig
from .runner import Comparison, Experiment, run

__all__ = ["SOLVERS", "SolversConfig", "solver_scheduler", "run_solvers", "EXPERIMENT"]

SOLVERS = ("ddim", "dpmpp2m", "unipc", "euler")


def solver_scheduler(name: str, schedule_config: dict[str, Any], num_steps: int, timestep_spacing: str = "trailing",
                     steps_offset: int = 0) -> tuple[Any, dict[str, Any]]:
    """The diffusers scheduler of ``name`` (:data:`SOLVERS`) on a tagdiff schedule, and its ``step`` keywords.

    Raises:
        ValueError: for an unknown name, or a spacing diffusers' schedulers do not have (``space_timesteps``).
    """
    import diffusers

    if timestep_spacing not in ("trailing", "leading", "linspace"):
        raise ValueError(f"diffusers schedulers take timestep_spacing trailing, leading or linspace, got "
                         f"{timestep_spacing!r}")
    cfg = {**schedule_config, "timestep_spacing": timestep_spacing, "steps_offset": steps_offset}
    if name == "ddim":
        return diffusers.DDIMScheduler(**cfg, clip_sample=False), {"eta": 0.0}
    if name == "dpmpp2m":
        return diffusers.DPMSolverMultistepScheduler(**cfg, algorithm_type="dpmsolver++", solver_order=2), {}
    if name == "unipc":
        return diffusers.UniPCMultistepScheduler(**cfg, disable_corrector=list(range(num_steps))), {}
    if name == "euler":
        return diffusers.EulerDiscreteScheduler(**cfg), {}
    raise ValueError(f"unknown solver {name!r}; expected one of {', '.join(SOLVERS)}")


@dataclass(frozen=True)
class SolversConfig(ExperimentConfig):
    solvers: tuple[str, ...] = SOLVERS
    steps: tuple[int, ...] = (10, 25)
    guidances: tuple[str, ...] = ("dps", "cg")
    omegas: tuple[float, ...] = (0.5, 1.0, 2.0)
    targets: tuple[int, ...] = (0, 3, 7)
    num_per_target: int = 32
    sweep_per_target: int = 16
    dps_guidance_scale: float = field(default=LabelConfig().dps_guidance_scale, metadata={"aliases": ("--dps-scale",)})
    cg_guidance_scale: float = field(default=LabelConfig().cg_guidance_scale, metadata={"aliases": ("--cg-scale",)})
    timestep_spacing: str = field(default="trailing", metadata={"choices": ("trailing", "leading", "linspace"),
                                                                "help": "the schedulers' timestep_spacing (default: "
                                                                        "trailing, the first step at T - 1)"})


def _validate(cfg: SolversConfig) -> None:
    bad = [s for s in cfg.solvers if s not in SOLVERS] + [g for g in cfg.guidances if g not in ("dps", "cg")]
    if bad or min(cfg.steps) < 1 or min(cfg.omegas) < 0:
        raise ValueError(f"bad solver settings {bad or ''}: solvers {cfg.solvers} ({', '.join(SOLVERS)}), guidances "
                         f"{cfg.guidances} (dps, cg), steps {cfg.steps} (>= 1), omegas {cfg.omegas} (>= 0)")


def _comparisons(setup: Setup, cfg: SolversConfig) -> Any:
    """One comparison per (guidance, solver, step count), judged by FID and accuracy on the targets."""
    for guidance in cfg.guidances:
        for solver in cfg.solvers:
            for steps in cfg.steps:
                def run(omega: float, seed: int, n: int, guidance: str = guidance, solver: str = solver,
                        steps: int = steps) -> dict[str, Any]:
                    per = n // len(cfg.targets)
                    target = torch.tensor(cfg.targets).repeat_interleave(per).to(setup.device)
                    if guidance == "dps":
                        terms: list = [DPSGuidance(label_loss(setup.models["clf_clean"], target),
                                                   cfg.dps_guidance_scale)]
                    else:
                        terms = [ClassifierGuidance(setup.models["clf_noisy"], target, cfg.cg_guidance_scale)]
                    if omega > 0:
                        terms.append(TemporalAlignment(setup.models["time_predictor"], omega))
                    out = draw(setup, terms, n=target.numel(), seed=seed, num_steps=steps,
                               scheduler=solver_scheduler(solver, setup.schedule.to_diffusers_config(), steps,
                                                          cfg.timestep_spacing, cfg.steps_offset))
                    return {**sample_metrics(setup, out["x0"], target), "time_gap": out["time_gap"],
                            "seconds": out["seconds"], "preview": preview(out["x0"])}

                key = {"exp": "solvers", "dataset": cfg.dataset, "guidance": guidance, "solver": solver,
                       "steps": steps, "targets": ",".join(map(str, cfg.targets)),
                       "scale": cfg.dps_guidance_scale if guidance == "dps" else cfg.cg_guidance_scale,
                       **({} if cfg.timestep_spacing == "trailing" and not cfg.steps_offset
                          else {"grid": cfg.timestep_spacing, "offset": cfg.steps_offset})}
                yield Comparison((f"{guidance}/{solver}/{steps}",), key, run, n=cfg.num_per_target * len(cfg.targets),
                                 sweep_n=cfg.sweep_per_target * len(cfg.targets), omegas=cfg.omegas,
                                 line=lambda r, g=guidance, solver=solver, steps=steps: (
                                     f"  {g} {solver:8s} {steps:3d} steps  ω*={r['best_omega']:<4}  FID "
                                     f"{fmt_ms(r['without']['fid'])} -> {fmt_ms(r['with']['fid'])}"))


def run_solvers(out_dir: str | Path, cfg: SolversConfig = SolversConfig(), *, progress: bool = True,
                resume: bool = True) -> dict[str, Any]:
    """Run the experiment; write ``results.json`` and ``table.md`` in ``out_dir``; return the results.

    Raises:
        ValueError: an unknown solver or guidance, a step count < 1, a negative ω, bad targets, or an unavailable
            device.
    """
    return run(EXPERIMENT, out_dir, cfg, progress=progress, resume=resume)


def _table(results: dict[str, Any], cfg: SolversConfig) -> str:
    rows = []
    for name, r in results["runs"].items():
        guidance, solver, steps = name.split("/")
        a, b = r["without"], r["with"]
        rows.append([guidance, solver, steps, r["best_omega"], fmt_ms(a["fid"], 2), fmt_ms(b["fid"], 2),
                     fmt_ci(r["paired"]["fid"], "t"),
                     f"{a['accuracy']['mean']:.3f} → {b['accuracy']['mean']:.3f}",
                     f"{a['time_gap']['mean']:.1f} → {b['time_gap']['mean']:.1f}",
                     f"{a['seconds']['mean']:.1f} → {b['seconds']['mean']:.1f}"])
    head = (f"Label guidance through diffusers solvers, {cfg.dataset}: targets {list(cfg.targets)}, ω_0 chosen on seed "
            f"{cfg.sweep_seed} ({cfg.sweep_per_target} per target) over {list(cfg.omegas)}; mean ± std over seeds "
            f"{list(cfg.seeds)} with {cfg.num_per_target} samples per target. DPS scale "
            f"{cfg.dps_guidance_scale}, CG scale {cfg.cg_guidance_scale}; {cfg.timestep_spacing} grids, x̂_0 clipped to "
            "[-1, 1] before every step. FID per target class in the evaluation classifier's features. ΔFID: the paired "
            "change over the seeds with its Student-t 95 % interval; (noise) where it holds 0.\n\n")
    return head + markdown_table(["guidance", "solver", "steps", "ω*", "FID without", "FID with TAG", "ΔFID [95% CI]",
                                  "accuracy", "Time Gap", "seconds"], rows)


EXPERIMENT = Experiment(
    "solvers", SolversConfig,
    "label guidance through DDIM / DPM-Solver++ / UniPC / Euler schedulers, with/without TAG", _validate, _table,
    comparisons=_comparisons, check_targets=True,
    record=lambda setup, cfg: {"clip_x0": 1.0, "ddim_eta": 0.0, "unipc": "corrector disabled (UniP-2M)",
                               "dpmpp2m": "algorithm_type=dpmsolver++, solver_order=2", "tag_placement": "pre"})
