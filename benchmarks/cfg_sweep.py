"""A small CFG-family sweep on digits (pixel space): CFG, APG, guidance interval, CFG++, each with and without TAG.

A precursor of ``tagdiff bench cfg`` (issue 13, item 5), standalone until the CLI wires it. On the shipped
class-conditional UNet (``assets/digits/unet_class``) it samples ``--per-class`` images of each digit with DDIM
(η = 0, x̂_0 clipped to [-1, 1]; CFG++ runs on ``DDIMScheduler(clip_sample=False)``, its only valid update, with its
own x̂_0^λ clipping (``cfg++noclip``: the paper's unclipped update; ``cfg@ddim``: CFG on that unclipped path) for every
guidance scale, and reports the evaluation classifier's accuracy, the per-class FID in its feature space
(:func:`tagdiff.bench.common.sample_metrics`), the Time Gap of the unconditional time predictor, and a saturation
measure (fraction of pixels at the clip bound, |x| > 0.98). TAG's ω_0 is chosen on ``--sweep-seed`` (never
reported) for CFG at scale ``--omega-scale``; the table reports ``--seeds``.

    python benchmarks/cfg_sweep.py --out runs/cfg_sweep.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from diffusers import DDIMScheduler

from tagdiff import (
    AdaptiveProjectedGuidance,
    CFGPlusPlus,
    ClassifierFreeGuidance,
    TemporalAlignment,
    TimeGapRecorder,
    sample_ddim,
    sample_scheduler,
)
from tagdiff.assets import assets_dir
from tagdiff.bench.common import load_setup, mean_std, sample_metrics
from tagdiff.guidance.cfg import interval_from_sigma
from tagdiff.interop import load_unet

NULL = {"y": -1}


def terms_for(method: str, scale: float, omega: float, setup, window) -> list:
    base = {"cfg": lambda: ClassifierFreeGuidance(scale, NULL),
            "apg": lambda: AdaptiveProjectedGuidance(scale, NULL, eta=0.0, norm_threshold=2.0),
            "interval": lambda: ClassifierFreeGuidance(scale, NULL, window=window),
            "cfg++": lambda: CFGPlusPlus(scale, NULL, clip_x0=1.0),
            "cfg++noclip": lambda: CFGPlusPlus(scale, NULL)}[method.removesuffix("+tag").removesuffix("@ddim")]()
    tag = [TemporalAlignment(setup.models["time_predictor"], omega)] if method.endswith("+tag") else []
    return [base, *tag]


def run(model, schedule, setup, method: str, scale: float, omega: float, seed: int, per_class: int, steps: int,
        window) -> dict:
    y = torch.arange(10).repeat_interleave(per_class)
    x_T = torch.randn((y.numel(), 1, 8, 8), generator=torch.Generator().manual_seed(seed))
    recorder = TimeGapRecorder(setup.models["time_predictor"])
    terms = terms_for(method, scale, omega, setup, window)
    t0 = time.time()
    if method.startswith("cfg++") or method.endswith("@ddim"):  # the unclipped DDIMScheduler path
        x0 = sample_scheduler(DDIMScheduler(clip_sample=False, timestep_spacing="trailing"), model, x_T,
                              num_inference_steps=steps, terms=terms, cond={"y": y}, callback=recorder)
    else:
        x0 = sample_ddim(model, x_T, schedule.timesteps(steps), schedule, terms=terms, cond={"y": y},
                         callback=recorder, clip_x0=1.0)
    sat = float((x0.abs() > 0.98).float().mean())
    m = sample_metrics(setup, x0.clamp(-1, 1), y)
    return {"accuracy": m["accuracy"], "fid": m["fid"], "time_gap": recorder.mean, "saturation": sat,
            "seconds": time.time() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scales", default="1,2,4,8,16,32")
    p.add_argument("--lambdas", default="0.2,0.4,0.6,0.8,1.0", help="CFG++ λ (its own axis, in [0, 1])")
    p.add_argument("--methods", default="cfg,cfg+tag,apg,apg+tag,interval,interval+tag,cfg++,cfg+++tag,"
                   "cfg@ddim,cfg++noclip,cfg++noclip+tag",
                   help="cfg@ddim: CFG on CFG++'s unclipped DDIMScheduler path, its reference")
    p.add_argument("--omegas", default="0.25,1,4")
    p.add_argument("--omega-scale", type=float, default=8.0)
    p.add_argument("--seeds", default="0")
    p.add_argument("--sweep-seed", type=int, default=100)
    p.add_argument("--per-class", type=int, default=16)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--out", default="runs/cfg_sweep.json")
    args = p.parse_args()

    setup = load_setup("digits")
    model, schedule = load_unet(assets_dir("digits") / "unet_class")
    window = interval_from_sigma(schedule, 0.28, 5.42)  # Kynkäänniemi et al.'s EDM2 interval, mapped to VP t
    seeds = [int(s) for s in args.seeds.split(",")]
    common = dict(per_class=args.per_class, steps=args.steps, window=window)
    sweep = {}
    for om in (float(o) for o in args.omegas.split(",")):
        r = run(model, schedule, setup, "cfg+tag", args.omega_scale, om, args.sweep_seed, **common)
        sweep[om] = r
        print(f"sweep omega={om}: {r}", flush=True)
    omega = max(sweep, key=lambda o: sweep[o]["accuracy"] - sweep[o]["fid"] / 100)
    results = {"omega": omega, "window": window, "sweep": {str(k): v for k, v in sweep.items()}, "rows": []}
    for method in args.methods.split(","):
        axis = args.lambdas if method.startswith("cfg++") else args.scales
        for s in (float(v) for v in axis.split(",")):
            per_seed = [run(model, schedule, setup, method, s, omega, seed, **common) for seed in seeds]
            row = {"method": method, "scale": s,
                   **{k: mean_std([r[k] for r in per_seed]) for k in ("accuracy", "fid", "time_gap", "saturation")}}
            results["rows"].append(row)
            print(method, s, {k: round(row[k]["mean"], 4) for k in ("accuracy", "fid", "time_gap", "saturation")},
                  flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
