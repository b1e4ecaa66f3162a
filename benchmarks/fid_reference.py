"""Time a benchmark run's evaluation with and without :class:`tagdiff.image_metrics.FIDReference`.

    PYTHONPATH=src HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/fid_reference.py \
        [--dataset mnist --data-dir ../shared/data/mnist --models-dir runs/mnist] [--samples 512 --rounds 5]

``sample_metrics`` (the evaluation of every ``bench`` run) used to recompute the evaluation classifier's features of
every held-out image (10,000 on MNIST) for each FID; it now keeps one ``FIDReference`` per class in the ``Setup``.
This script scores the same ``--samples`` images (held-out images with noise, a fixed seed) both ways, overall and
per class, interleaving the two variants for ``--rounds`` rounds in one process, checks that the FIDs are equal bit
for bit, and prints the median seconds of each and their ratio (the cached side is the whole `sample_metrics`,
accuracy and IS included, so the ratio is conservative).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tagdiff_bench.common import load_setup, sample_metrics

from tagdiff.metrics.images import fid


def _direct(setup, x, y):
    clf = setup.models["clf_eval"]
    overall = fid(setup.held_x, x, clf)
    per = [fid(setup.held_x[setup.held_y == k], x[y == k], clf) for k in y.unique().tolist()]
    return overall, per


def _cached(setup, x, y):
    m = sample_metrics(setup, x, target=y)
    return sample_metrics(setup, x)["fid"], [v["fid"] for v in m["per_target"].values()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-dir")
    ap.add_argument("--models-dir", "--checkpoints")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    setup = load_setup(args.dataset, args.models_dir, args.data_dir, "cpu")
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(setup.held_x), generator=g)[: args.samples]
    x = (setup.held_x[idx] + 0.3 * torch.randn(setup.held_x[idx].shape, generator=g)).clamp(-1, 1)
    y = setup.held_y[idx]
    _cached(setup, x, y)  # the first call fills the references; later calls are what every further run costs
    times = {"direct": [], "cached": []}
    results = {}
    for _ in range(args.rounds):
        for name, fn in (("direct", _direct), ("cached", _cached)):
            t0 = time.perf_counter()
            results[name] = fn(setup, x, y)
            times[name].append(time.perf_counter() - t0)
    assert results["direct"] == results["cached"], "FIDReference changed a FID"
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.dataset}: {len(setup.held_x)} held-out images, {args.samples} samples, overall + per-class FID, "
          f"median of {args.rounds} interleaved rounds")
    print(f"  direct (features of the held-out images every call): {med['direct']:.2f} s")
    print(f"  FIDReference (computed once per class):                {med['cached']:.2f} s")
    print(f"  ratio direct / cached: {med['direct'] / med['cached']:.1f}x; FIDs equal bit for bit")


if __name__ == "__main__":
    main()
