"""Few-step sampling of the shipped digits flow model (Euler, 1-8 steps) with and without Temporal Alignment Guidance,
beside the VP digits model (DDIM) at equal model evaluations.

For each step count, ω_0 (flow form ω_0 (1 − ᾱ(σ)), docs/notation.md §2.4) is chosen on the validation seed 100 from
``--omegas`` by FID; the evaluation seeds 0-4 report FID (all held-out digits, the evaluation classifier's features)
without and with TAG and the paired change with its Student-t 95 % interval over the seeds. The flow predictor is the
shipped ``digits_flow/time_predictor``, the VP one ``digits/time_predictor``. One step of the flow grid is σ = 1 → 0.

    python benchmarks/flow_fewstep.py --out runs/flow_fewstep.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tagdiff_bench.stats import mean_std, paired_ci

from tagdiff import DPSGuidance, TemporalAlignment, load, sample_ddim, sample_flow
from tagdiff.data import load_dataset
from tagdiff.guidance import label_loss
from tagdiff.metrics.images import FIDReference, fid


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", default="1,2,4,8")
    p.add_argument("--omegas", default="0.1,0.3,1,3")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--sweep-seed", type=int, default=100)
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--label", action="store_true",
                   help="DPS label guidance (targets 0, 3, 7; clean classifier; scale --dps-scale; 50 steps) instead: "
                        "FID per target class and accuracy under the evaluation classifier")
    p.add_argument("--dps-scale", type=float, default=16.0)
    p.add_argument("--out", default="runs/flow_fewstep.json")
    args = p.parse_args()
    steps = [int(v) for v in args.steps.split(",")]
    omegas = [float(v) for v in args.omegas.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    held_x, held_y = load_dataset("digits", "held_out")
    clf = load("digits/clf_eval")
    ref = FIDReference(held_x, clf)
    targets = torch.tensor([0, 3, 7]).repeat_interleave(args.num_samples // 3)
    refs = {y: FIDReference(held_x[held_y == y], clf) for y in (0, 3, 7)}
    clean = load("digits/clf_clean")
    models = {"flow": (load("digits_flow"), load("digits_flow/time_predictor")),
              "vp": (load("digits"), load("digits/time_predictor"))}
    t0 = time.time()

    def draw(kind: str, k: int, omega: float, seed: int) -> float:
        model, tp = models[kind]
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(args.num_samples, *model.sample_shape, generator=g)
        x = x[: len(targets)] if args.label else x
        terms = [DPSGuidance(label_loss(clean, targets), args.dps_scale)] if args.label else []
        terms += [TemporalAlignment(tp, omega)] if omega > 0 else []
        with torch.no_grad() if not terms else torch.enable_grad():
            if kind == "flow":
                grid = model.schedule.sigmas(k)
                if args.label:  # score guidance needs σ < 1 (ᾱ > 0) at the first step: start at σ = 1 − 1/T
                    grid = torch.cat([grid[:1].clamp(max=1 - 1 / model.schedule.num_train_timesteps), grid[1:]])
                out = sample_flow(model, x, model.schedule, sigmas=grid, terms=terms)
            else:
                out = sample_ddim(model, x, model.schedule.timesteps(k, "trailing"), model.schedule, eta=0.0,
                                  clip_x0=1.0, terms=terms)
        out = out.clamp(-1, 1)
        if not args.label:
            return fid(ref, out)
        with torch.no_grad():
            acc = float((clf(out).argmax(-1) == targets).float().mean())
        return sum(fid(refs[y], out[targets == y]) for y in refs) / len(refs), acc

    def split(runs: list) -> tuple[list[float], list[float] | None]:
        if runs and isinstance(runs[0], tuple):
            return [r[0] for r in runs], [r[1] for r in runs]
        return runs, None

    results: dict = {}
    for kind in ("flow", "vp"):
        for k in steps:
            val = {w: draw(kind, k, w, args.sweep_seed) for w in [0.0, *omegas]}
            score = {w: (v[0] if isinstance(v, tuple) else v) for w, v in val.items()}
            best = min(score, key=lambda w: (score[w], w))
            runs_without = [draw(kind, k, 0.0, s) for s in seeds]
            runs_with = [draw(kind, k, best, s) if best > 0 else r for s, r in zip(seeds, runs_without)]
            (without, acc0), (with_, acc1) = split(runs_without), split(runs_with)
            ci = paired_ci(without, with_)
            results[f"{kind}/{k}"] = {"validation": {str(w): v for w, v in val.items()}, "best_omega": best,
                                      "without": mean_std(without), "with": mean_std(with_), "paired": ci,
                                      **({"accuracy": [mean_std(acc0), mean_std(acc1)]} if acc0 else {})}
            print(f"{kind:4s} {k} steps  ω*={best:<4g} FID {mean_std(without)['mean']:7.2f} ± "
                  f"{mean_std(without)['std']:.2f} -> {mean_std(with_)['mean']:7.2f} ± {mean_std(with_)['std']:.2f}  "
                  f"{100 * ci['rel']:+.1f}% [{100 * ci['t_rel_lo']:+.1f}, {100 * ci['t_rel_hi']:+.1f}]"
                  + (f"  acc {mean_std(acc0)['mean']:.3f} -> {mean_std(acc1)['mean']:.3f}" if acc0 else ""), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"results": results, "seeds": seeds, "sweep_seed": args.sweep_seed,
                                          "num_samples": args.num_samples, "omegas": omegas, "label": args.label,
                                          "dps_scale": args.dps_scale,
                                          "seconds": time.time() - t0}, indent=2) + "\n")
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
