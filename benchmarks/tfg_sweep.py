"""Choose TFG's ρ̄, μ̄ (γ̄ = 0.001, as the TFG paper's CIFAR-10 label settings) for the digits label suite.

Validation protocol as in label_sweep.py: targets 1, 4, 8 and seed 100, never the reported targets/seeds;
the score is accuracy − FID/100. Run: ``python benchmarks/tfg_sweep.py`` (about 2 minutes on 2 cores).
"""

import itertools
import json

from tagdiff_bench.label import LabelConfig, run_label

rows = []
for rho, mu in itertools.product((0.1, 0.25, 0.5, 1.0, 4.0), (0.5, 2.0, 8.0)):
    # the grid and unclipped TFG loss of the sweep that chose the documented ρ̄, μ̄ (trailing grid, TFG loss unclipped)
    cfg = LabelConfig(targets=(1, 4, 8), num_per_target=16, seed=100, tfg_rho=rho, tfg_mu=mu, tfg_gamma=0.001,
                      timestep_spacing="trailing", tfg_clip_x0=0.0)
    m = run_label("runs/tfg_sweep_tmp", cfg, progress=False, methods=("tfg",))["methods"]["tfg"]
    rows.append({"rho": rho, "mu": mu, "fid": m["fid"], "accuracy": m["accuracy"], "time_gap": m["time_gap"]})
    print(f"rho {rho:5} mu {mu:4}  FID {m['fid']:7.2f}  acc {m['accuracy']:.3f}  TG {m['time_gap']:.1f}", flush=True)
best = max(rows, key=lambda r: r["accuracy"] - r["fid"] / 100)
print("best", best)
json.dump({"rows": rows, "best": best}, open("runs/tfg_sweep.json", "w"), indent=1)
