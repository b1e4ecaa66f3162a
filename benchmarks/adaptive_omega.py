"""Adaptive ω (the reviewers' question 6): TAG's strength set per step and per sample from the time predictor's own
reading of x (:class:`tagdiff.AdaptiveTemporalAlignment`: ``confidence`` 1 − p_φ(t|x)/max p_φ, or the sample's
Time Gap / 100 saturating at 1), against the tuned constant ω_t = ω_0 (1 − ᾱ_t), at equal cost (the gain comes from
the logits of the TLS's own forward: one predictor call per step in every arm).

The label suite's DPS (shipped digits models, targets 0, 3, 7, ``--num-per-target`` each, scale 16, DDIM(η = 1) 50
steps on the paper's grid, x̂_0 clipped). Each arm's ω_0 is chosen from ``--omegas`` on the validation seeds
(``--sweep-seeds``, never reported) by mean FID; the evaluation seeds report FID (per target class) and accuracy, the
paired change against DPS and against constant-ω TAG with Student-t 95 % intervals. A timing block (interleaved
rounds, medians) measures each arm's wall clock against constant-ω TAG.

    python benchmarks/adaptive_omega.py --out runs/i25/adaptive_omega.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from tagdiff_bench.common import draw, load_setup, sample_metrics
from tagdiff_bench.stats import mean_std, paired_ci

from tagdiff import AdaptiveTemporalAlignment, DPSGuidance, TemporalAlignment
from tagdiff.guidance import label_loss

ARMS = ("constant", "confidence", "gap")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--omegas", default="0.3,1,3,10")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--sweep-seeds", default="100,101")
    p.add_argument("--num-per-target", type=int, default=64)
    p.add_argument("--timing-rounds", type=int, default=5)
    p.add_argument("--out", default="runs/i25/adaptive_omega.json")
    args = p.parse_args()
    omegas = [float(v) for v in args.omegas.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    sweep_seeds = [int(v) for v in args.sweep_seeds.split(",")]
    setup = load_setup("digits")
    tp = setup.models["time_predictor"]
    target = torch.tensor([0, 3, 7]).repeat_interleave(args.num_per_target)
    t0 = time.time()

    def terms(arm: str | None, omega: float, target: torch.Tensor = target) -> list:
        out = [DPSGuidance(label_loss(setup.models["clf_clean"], target), 16.0)]
        if arm == "constant":
            out.append(TemporalAlignment(tp, omega))
        elif arm is not None:
            out.append(AdaptiveTemporalAlignment(tp, omega, signal=arm))
        return out

    def run(arm: str | None, omega: float, seed: int) -> dict:
        o = draw(setup, terms(arm, omega), n=len(target), seed=seed, num_steps=50)
        m = sample_metrics(setup, o["x0"], target)
        return {"fid": m["fid"], "accuracy": m["accuracy"], "time_gap": o["time_gap"]}

    results: dict = {"dps": [run(None, 0.0, s) for s in seeds]}
    chosen: dict = {}
    for arm in ARMS:
        val = {w: [run(arm, w, s)["fid"] for s in sweep_seeds] for w in omegas}
        best = min(omegas, key=lambda w: (statistics.mean(val[w]), w))
        per_seed = [min(omegas, key=lambda w, i=i: (val[w][i], w)) for i in range(len(sweep_seeds))]
        chosen[arm] = {"omega": best, "validation": {str(w): v for w, v in val.items()}, "per_seed_best": per_seed,
                       "edge": "upper" if best == omegas[-1] else "lower" if best == omegas[0] else None}
        results[arm] = [run(arm, best, s) for s in seeds]
        print(f"{arm:10s} ω_0* = {best:g} (per validation seed {per_seed})"
              + ("  (the grid's edge)" if chosen[arm]["edge"] else ""), flush=True)
    summary: dict = {}
    for name, runs in results.items():
        summary[name] = {k: mean_std([r[k] for r in runs]) for k in ("fid", "accuracy", "time_gap")}
        if name != "dps":
            summary[name]["vs_dps"] = paired_ci([r["fid"] for r in results["dps"]], [r["fid"] for r in runs])
        if name not in ("dps", "constant"):
            summary[name]["vs_constant"] = paired_ci([r["fid"] for r in results["constant"]],
                                                     [r["fid"] for r in runs])
        s = summary[name]
        line = f"{name:10s} FID {s['fid']['mean']:6.2f} ± {s['fid']['std']:.2f}  acc {s['accuracy']['mean']:.3f}"
        for key in ("vs_dps", "vs_constant"):
            if key in s:
                c = s[key]
                line += f"  {key} {100 * c['rel']:+.1f}% [{100 * c['t_rel_lo']:+.1f}, {100 * c['t_rel_hi']:+.1f}]"
        print(line + f"  Time Gap {s['time_gap']['mean']:.1f}", flush=True)
    # cost: interleaved rounds, 16 samples per target, medians; the ratio to constant-ω TAG per round
    small = torch.tensor([0, 3, 7]).repeat_interleave(16)
    times: dict = {arm: [] for arm in ARMS}
    for r in range(args.timing_rounds + 1):
        for arm in ARMS:
            start = time.perf_counter()
            draw(setup, terms(arm, chosen[arm]["omega"], small), n=len(small), seed=1000 + r, num_steps=50)
            if r:  # the first round warms up
                times[arm].append(time.perf_counter() - start)
    cost = {arm: {"median_s": statistics.median(times[arm]),
                  "ratio_to_constant": statistics.median(a / b for a, b in zip(times[arm], times["constant"],
                                                                              strict=True))} for arm in ARMS}
    print("cost (median ratio to constant-ω TAG): "
          + ", ".join(f"{a} ×{cost[a]['ratio_to_constant']:.2f}" for a in ARMS), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "runs": results, "chosen": chosen, "cost": cost,
                                          "seeds": seeds, "sweep_seeds": sweep_seeds, "omegas": omegas,
                                          "num_per_target": args.num_per_target,
                                          "seconds": time.time() - t0}, indent=2) + "\n")
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
