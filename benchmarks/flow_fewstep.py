"""Few-step sampling of a flow model (Euler, 1-8 steps) with and without Temporal Alignment Guidance, beside a VP model
(DDIM) at equal model evaluations; or (``--label``) label guidance on both, ± TAG: DPS with the clean classifier, or
(``--guidance cg``) classifier guidance with noisy classifiers (the flow's σ-aware one from ``tagdiff train
classifier --kind noisy --checkpoint FLOW``); ``--dps-scales`` is then the CG scale grid.

For each step count, ω_0 (flow form ω_0 (1 − ᾱ(σ)), docs/notation.md §2.4) is chosen on the validation seed 100 from
``--omegas`` by FID; the evaluation seeds 0-4 report FID (all held-out images, the evaluation classifier's features)
without and with TAG and the paired change with its Student-t 95 % interval over the seeds. One step of the flow grid
is σ = 1 → 0. With ``--label`` and several ``--dps-scales``, each model's DPS scale is chosen first, on the same
validation seed without TAG, by accuracy − FID / 100 (the label suite's rule, benchmarks/label_sweep.py), then ω_0 at
that scale.

Models (``--dataset digits``: the shipped ``digits_flow`` and ``digits`` with their time predictors and classifiers;
other datasets: ``--flow-dir`` and ``--vp-dir`` folders holding ``unet/`` and ``time_predictor/``, and
``--classifiers-dir`` holding ``clf_clean/`` and ``clf_eval/``). A class-conditional model trained with label
dropout is sampled unconditionally through its null label (y = -1).

    python benchmarks/flow_fewstep.py --out runs/flow_fewstep.json
    python benchmarks/flow_fewstep.py --dataset mnist --data-dir ../shared/data/mnist \
        --flow-dir checkpoints/mnist_flow --vp-dir checkpoints/mnist --classifiers-dir checkpoints/mnist \
        --out runs/flow_fewstep_mnist.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tagdiff_bench.stats import mean_std, paired_ci

from tagdiff import ClassifierGuidance, DPSGuidance, TemporalAlignment, load, sample_ddim, sample_flow
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
    p.add_argument("--dps-scales", default="16", help="guidance scales; several: chosen per model (docstring)")
    p.add_argument("--guidance", choices=("dps", "cg"), default="dps",
                   help="with --label: DPS with the clean classifier, or classifier guidance with a noisy one (the VP "
                        "model's clf_noisy; the flow model's σ-aware --flow-noisy-classifier)")
    p.add_argument("--flow-noisy-classifier", default=None,
                   help="cg: train classifier --kind noisy --checkpoint FLOW (default: FLOW_DIR/clf_noisy)")
    p.add_argument("--flow-clip-x0", type=float, default=None,
                   help="clamp x̂_0 to ±this inside the flow Euler step (sample_flow's clip_x0; default: none, as "
                        "diffusers); the VP DDIM always clips to ±1")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--flow-dir", default=None, help="folder with unet/ and time_predictor/ (default: digits_flow)")
    p.add_argument("--vp-dir", default=None, help="folder with unet/ and time_predictor/ (default: digits)")
    p.add_argument("--classifiers-dir", default=None, help="folder with clf_clean/, clf_eval/ (default: digits)")
    p.add_argument("--out", default="runs/flow_fewstep.json")
    args = p.parse_args()
    steps = [int(v) for v in args.steps.split(",")]
    omegas = [float(v) for v in args.omegas.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    dps_scales = [float(v) for v in args.dps_scales.split(",")]
    held_x, held_y = load_dataset(args.dataset, "held_out", data_dir=args.data_dir)
    clfs = args.classifiers_dir or "digits"
    clf = load(f"{clfs}/clf_eval")
    ref = FIDReference(held_x, clf)
    targets = torch.tensor([0, 3, 7]).repeat_interleave(args.num_samples // 3)
    refs = {y: FIDReference(held_x[held_y == y], clf) for y in (0, 3, 7)}
    clean = load(f"{clfs}/clf_clean")
    flow_dir, vp_dir = args.flow_dir or "digits_flow", args.vp_dir or "digits"
    noisy = {"vp": load(f"{clfs}/clf_noisy"),
             "flow": load(args.flow_noisy_classifier or f"{flow_dir}/clf_noisy")} if args.guidance == "cg" else {}
    models = {"flow": (load(f"{flow_dir}/unet"), load(f"{flow_dir}/time_predictor")),
              "vp": (load(f"{vp_dir}/unet"), load(f"{vp_dir}/time_predictor"))}
    t0 = time.time()

    def draw(kind: str, k: int, omega: float, seed: int, dps_scale: float = dps_scales[0]) -> float:
        model, tp = models[kind]
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(args.num_samples, *model.sample_shape, generator=g)
        x = x[: len(targets)] if args.label else x
        cond = {"y": torch.full((len(x),), -1)} if getattr(model, "null_class", None) is not None else None
        if not args.label:
            terms = []
        elif args.guidance == "cg":
            terms = [ClassifierGuidance(noisy[kind], targets, dps_scale)]
        else:
            terms = [DPSGuidance(label_loss(clean, targets), dps_scale)]
        terms += [TemporalAlignment(tp, omega)] if omega > 0 else []
        with torch.no_grad() if not terms else torch.enable_grad():
            if kind == "flow":
                grid = model.schedule.sigmas(k)
                if args.label:  # score guidance needs σ < 1 (ᾱ > 0) at the first step: start at σ = 1 − 1/T
                    grid = torch.cat([grid[:1].clamp(max=1 - 1 / model.schedule.num_train_timesteps), grid[1:]])
                out = sample_flow(model, x, model.schedule, sigmas=grid, terms=terms, cond=cond,
                                  clip_x0=args.flow_clip_x0)
            else:
                out = sample_ddim(model, x, model.schedule.timesteps(k, "trailing"), model.schedule, eta=0.0,
                                  clip_x0=1.0, terms=terms, cond=cond)
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
            scale_val = {}
            if args.label and len(dps_scales) > 1:  # the model's DPS scale first, without TAG (docstring)
                scale_val = {c: draw(kind, k, 0.0, args.sweep_seed, c) for c in dps_scales}
                c = max(dps_scales, key=lambda c: (scale_val[c][1] - scale_val[c][0] / 100, -c))
                print(f"{kind:4s} {k} steps  DPS scale* = {c:g} of {dps_scales}"
                      + ("  (the grid's edge)" if c in (dps_scales[0], dps_scales[-1]) else ""), flush=True)
            else:
                c = dps_scales[0]
            val = {w: draw(kind, k, w, args.sweep_seed, c) for w in [0.0, *omegas]}
            score = {w: (v[0] if isinstance(v, tuple) else v) for w, v in val.items()}
            best = min(score, key=lambda w: (score[w], w))
            runs_without = [draw(kind, k, 0.0, s, c) for s in seeds]
            runs_with = [draw(kind, k, best, s, c) if best > 0 else r for s, r in zip(seeds, runs_without)]
            (without, acc0), (with_, acc1) = split(runs_without), split(runs_with)
            ci = paired_ci(without, with_)
            results[f"{kind}/{k}"] = {"validation": {str(w): v for w, v in val.items()}, "best_omega": best,
                                      **({"dps_scale": c, "scale_validation": {
                                          str(a): v for a, v in scale_val.items()}} if args.label else {}),
                                      "without": mean_std(without), "with": mean_std(with_), "paired": ci,
                                      **({"accuracy": [mean_std(acc0), mean_std(acc1)]} if acc0 else {})}
            print(f"{kind:4s} {k} steps  ω*={best:<4g}" + (f" scale {c:g}" if args.label else "")
                  + f" FID {mean_std(without)['mean']:7.2f} ± "
                  f"{mean_std(without)['std']:.2f} -> {mean_std(with_)['mean']:7.2f} ± {mean_std(with_)['std']:.2f}  "
                  f"{100 * ci['rel']:+.1f}% [{100 * ci['t_rel_lo']:+.1f}, {100 * ci['t_rel_hi']:+.1f}]"
                  + (f"  acc {mean_std(acc0)['mean']:.3f} -> {mean_std(acc1)['mean']:.3f}" if acc0 else ""), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"results": results, "seeds": seeds, "sweep_seed": args.sweep_seed,
                                          "num_samples": args.num_samples, "omegas": omegas, "label": args.label,
                                          "dps_scales": dps_scales, "dataset": args.dataset,
                                          "flow_clip_x0": args.flow_clip_x0, "guidance": args.guidance,
                                          "flow_dir": flow_dir, "vp_dir": vp_dir, "classifiers_dir": clfs,
                                          "seconds": time.time() - t0}, indent=2) + "\n")
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
