"""TAG with a wrong time predictor (the reviewers' question 2): undertrained predictors (10 % and 30 % of the shipped
digits predictor's 12,000 steps, the same command otherwise) in the label suite's DPS, with and without TAG.

Per predictor and seed: FID (per target class, the evaluation classifier's features), accuracy, and the Time Gap as
the *shipped* predictor measures it and as the predictor TAG uses measures it (does the Time Gap warn?), plus the
predictor's own held-out accuracy and cross-entropy from its training report. ω_0 = 1 (the suite's, chosen for the
shipped predictor); targets 0, 3, 7, 64 each, DDIM(η = 1) 50 steps on the paper's grid, x̂_0 clipped, seeds 0-4.
The predictors come from (about 1 and 3 minutes on one thread)::

    tagdiff train time-predictor --dataset digits --out runs/i25/tp_1200 --steps 1200 --quiet
    tagdiff train time-predictor --dataset digits --out runs/i25/tp_3600 --steps 3600 --quiet
    python benchmarks/wrong_predictors.py --out runs/i25/wrong_predictors.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tagdiff_bench.common import draw, load_setup, sample_metrics
from tagdiff_bench.stats import mean_std, paired_ci

from tagdiff import DPSGuidance, TemporalAlignment, load
from tagdiff.guidance import label_loss
from tagdiff.metrics.time_gap import TimeGapRecorder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--predictors", default="runs/i25/tp_1200,runs/i25/tp_3600")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--omega", type=float, default=1.0)
    p.add_argument("--out", default="runs/i25/wrong_predictors.json")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    setup = load_setup("digits")
    shipped = setup.models["time_predictor"]
    target = torch.tensor([0, 3, 7]).repeat_interleave(64)
    loss = label_loss(setup.models["clf_clean"], target)
    predictors = {"shipped (12000 steps)": (shipped, "src/tagdiff/assets/digits/time_predictor")}
    for path in args.predictors.split(","):
        predictors[f"{Path(path).name} ({Path(path).name.split('_')[-1]} steps)"] = (load(path), path)
    t0 = time.time()

    def run(tp: object | None, seed: int) -> dict:
        terms = [DPSGuidance(loss, 16.0)] + ([TemporalAlignment(tp, args.omega)] if tp is not None else [])
        own = TimeGapRecorder(tp) if tp is not None else None
        out = draw(setup, terms, n=len(target), seed=seed, num_steps=50, extra_callbacks=[own] if own else None)
        m = sample_metrics(setup, out["x0"], target)
        return {"fid": m["fid"], "accuracy": m["accuracy"], "time_gap_shipped": out["time_gap"],
                "time_gap_own": own.mean if own is not None else None}

    base = [run(None, s) for s in seeds]
    results: dict = {"dps": {k: mean_std([r[k] for r in base]) for k in ("fid", "accuracy", "time_gap_shipped")}}
    for name, (tp, path) in predictors.items():
        runs = [run(tp, s) for s in seeds]
        report = Path(path) / "report.json"
        held = json.loads(report.read_text()) if report.is_file() else {}
        results[name] = {**{k: mean_std([r[k] for r in runs]) for k in ("fid", "accuracy", "time_gap_shipped",
                                                                          "time_gap_own")},
                         "fid_change": paired_ci([r["fid"] for r in base], [r["fid"] for r in runs]),
                         "held_out": {k: held.get(k) for k in ("accuracy", "mean_abs_error", "cross_entropy")}}
        r = results[name]
        c = r["fid_change"]
        print(f"{name:24s} FID {results['dps']['fid']['mean']:.2f} -> {r['fid']['mean']:.2f} "
              f"({100 * c['rel']:+.1f} % [{100 * c['t_rel_lo']:+.1f}, {100 * c['t_rel_hi']:+.1f}])  acc "
              f"{r['accuracy']['mean']:.3f}  Time Gap (shipped / own) {r['time_gap_shipped']['mean']:.1f} / "
              f"{r['time_gap_own']['mean']:.1f}  held-out |argmax - t| {r['held_out']['mean_abs_error']}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"results": results, "seeds": seeds, "omega": args.omega,
                                          "seconds": time.time() - t0}, indent=2) + "\n")
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
