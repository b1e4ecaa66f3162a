"""ω sweep for the toy benchmark, on a validation seed distinct from `tagdiff bench toy`'s (seed 0).

Prints and writes the W1 under drift for each ω_0 (schedule ω_0 (1 − ᾱ_t), Alg. 1 placement), for the learned
score + learned predictor and the exact score + exact TLS. This is how the toy's DEFAULT_OMEGA was chosen.

    python benchmarks/toy_omega_sweep.py --out runs/toy_sweep.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tagdiff import LinearDrift, TemporalAlignment, VPSchedule, sample_ddpm, wasserstein1
from tagdiff.data import toy_mixture
from tagdiff.models.assets import assets_dir
from tagdiff.models.checkpoints import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=123, help="x_T and sampling-noise seed")
    p.add_argument("--ref-seed", type=int, default=999, help="reference data seed")
    p.add_argument("--omegas", default="0,0.5,1,2,2.5,3,4,8,16")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    schedule, gmm = VPSchedule.linear(1000), toy_mixture()
    learned = (load_model(assets_dir("toy") / "score"), load_model(assets_dir("toy") / "time_predictor"))
    exact = (gmm.eps_model(schedule), gmm.time_posterior(schedule))
    ref, _ = gmm.sample(args.num_samples, torch.Generator().manual_seed(args.ref_seed))
    omegas = [float(w) for w in args.omegas.split(",")]
    rows, t0 = [], time.time()
    print(f"{'omega':>6s} {'W1 learned':>11s} {'W1 exact':>9s}")
    for omega in omegas:
        row = {"omega": omega}
        for name, (eps_model, predictor) in (("learned", learned), ("exact", exact)):
            g = torch.Generator().manual_seed(args.seed)
            terms = [LinearDrift(-0.01)] + ([TemporalAlignment(predictor, omega)] if omega else [])
            x = sample_ddpm(eps_model, torch.randn(args.num_samples, 2, generator=g), schedule.timesteps(100),
                            schedule, terms=terms, randn_like=lambda z, g=g: torch.randn(z.shape, generator=g))
            row[name] = wasserstein1(x, ref)
            row[f"{name}_upper_mode_fraction"] = float((x.sum(1) > 0).float().mean())
        rows.append(row)
        print(f"{omega:6.2f} {row['learned']:11.3f} {row['exact']:9.3f}", flush=True)
    result = {"rows": rows, "config": vars(args), "seconds": time.time() - t0}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
