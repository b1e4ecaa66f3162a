"""The quality of a base model, unguided: FID of ``--num-samples`` samples against half of the held-out images, next
to the FID between the two disjoint real halves at the same n (FID is biased upward at small n, so the ratio at
equal n is what tells a good model), and the class histogram under the evaluation classifier.

VP ε-models sample with DDIM(η = 1) on the paper's grid (the label suite's sampler); flow models with flow Euler on
their σ grid; a class-conditional model trained with label dropout samples unconditionally through its null label.

    python benchmarks/base_quality.py --dataset mnist --data-dir ../shared/data/mnist \\
        --model checkpoints/mnist/unet --clf-eval checkpoints/mnist/clf_eval --out runs/base_quality_mnist.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from tagdiff import load, sample_ddim, sample_flow
from tagdiff.data import load_dataset
from tagdiff.metrics.images import class_histogram, fid
from tagdiff.models.flow_checkpoint import LoadedFlow


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", required=True, help="a VP or flow model folder or shipped name")
    p.add_argument("--clf-eval", required=True)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--num-steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    t0 = time.time()
    model, clf = load(args.model), load(args.clf_eval)
    held_x, _ = load_dataset(args.dataset, "held_out", data_dir=args.data_dir)
    g = torch.Generator().manual_seed(args.seed)
    x_T = torch.randn(args.num_samples, *model.sample_shape, generator=g)
    cond = {"y": torch.full((args.num_samples,), -1)} if getattr(model, "null_class", None) is not None else None
    randn_like = lambda z: torch.randn(z.shape, generator=g, dtype=z.dtype)  # noqa: E731
    with torch.no_grad():
        if isinstance(model, LoadedFlow):
            x0 = sample_flow(model, x_T, model.schedule, args.num_steps, cond=cond)
            sampler = f"flow Euler, {args.num_steps} steps"
        else:
            grid = model.schedule.timesteps(args.num_steps, "linspace")
            x0 = sample_ddim(model, x_T, grid, model.schedule, eta=1.0, clip_x0=1.0, cond=cond,
                             randn_like=randn_like)
            sampler = f"DDIM(eta = 1), {args.num_steps} steps, linspace grid"
    x0 = x0.clamp(-1, 1)
    perm = torch.randperm(held_x.shape[0], generator=torch.Generator().manual_seed(args.seed))
    half = held_x.shape[0] // 2
    n = min(args.num_samples, half)
    counts, entropy = class_histogram(clf, x0)
    out = {"model": args.model, "sampler": sampler, "n": n, "seed": args.seed,
           "fid_unguided_vs_held_out_half": fid(held_x[perm[:half]], x0[:n], clf),
           "fid_real_half_vs_half": fid(held_x[perm[:half]], held_x[perm[half:half + n]], clf),
           "class_histogram": counts.tolist(), "class_entropy": entropy, "max_entropy": math.log(len(counts))}
    out["ratio"] = out["fid_unguided_vs_held_out_half"] / out["fid_real_half_vs_half"]
    out["seconds"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"{args.model}: FID {out['fid_unguided_vs_held_out_half']:.2f} vs real halves "
          f"{out['fid_real_half_vs_half']:.2f} at n = {n} (ratio {out['ratio']:.2f}); class entropy "
          f"{entropy:.3f} of {math.log(len(counts)):.3f} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
