"""Validation sweep of the rivals' strengths for ``tagdiff bench label``: DPS as its Algorithm 1 (``dps_step``), MPGD
and DSG, without TAG, on validation targets and a validation seed (never the reported ones).

Each setting is scored as ``benchmarks/label_sweep.py`` scores the demo's (accuracy first, FID / 100 breaking near
ties); the chosen value is printed, with a warning when it sits at the grid's edge. TAG's ω is the suite's (ω_0 = 1,
chosen by label_sweep.py for DPS).

    python benchmarks/rivals_sweep.py --out runs/rivals_sweep.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from tagdiff_bench.label import LabelConfig, run_label

GRIDS = {"dps_step": ("dps_step_scale", (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)),
         "mpgd": ("mpgd_scale", (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)),
         "dsg": ("dsg_guidance_rate", (0.01, 0.03, 0.1, 0.3, 1.0))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--models-dir", default=None, help="default: the shipped models of --dataset")
    p.add_argument("--targets", default="1,4,8")
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--num-per-target", type=int, default=32)
    p.add_argument("--methods", default=",".join(GRIDS))
    p.add_argument("--out", default="runs/rivals_sweep.json")
    args = p.parse_args()
    base = LabelConfig(dataset=args.dataset, data_dir=args.data_dir, models_dir=args.models_dir,
                       targets=tuple(int(v) for v in args.targets.split(",")), seed=args.seed,
                       num_per_target=args.num_per_target)
    rows, chosen, t0 = [], {}, time.time()
    for method in args.methods.split(","):
        field, grid = GRIDS[method]
        scored = []
        for value in grid:
            cfg = replace(base, **{field: value})
            r = run_label(Path(args.out).with_suffix("") / "runs", cfg, progress=False, methods=(method,))
            m = r["methods"][method]
            rows.append({"method": method, field: value, "fid": m["fid"], "accuracy": m["accuracy"],
                         "time_gap": m["time_gap"]})
            scored.append((m["accuracy"] - m["fid"] / 100, value))
            print(f"{method:9s} {field}={value:<6g} FID {m['fid']:8.2f}  acc {m['accuracy']:.3f}  "
                  f"Time Gap {m['time_gap']:6.1f}", flush=True)
        best = max(scored)[1]
        chosen[field] = best
        edge = " (at the grid's edge: widen it)" if best in (grid[0], grid[-1]) else ""
        if method == "dsg" and best == 1.0:  # g_r is a mixing rate: 1 is the end of its range, not of a grid
            edge = " (the end of the rate's range [0, 1])"
        print(f"  chosen {field} = {best:g}{edge}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"chosen": chosen, "rows": rows, "targets": base.targets, "seed": base.seed,
                                          "num_per_target": base.num_per_target, "dataset": base.dataset,
                                          "seconds": time.time() - t0}, indent=2) + "\n")
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
