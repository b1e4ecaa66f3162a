"""Training from a lazy image folder never holds the decoded dataset: peak RSS against the size of the whole set.

    PYTHONPATH=src HF_HUB_OFFLINE=1 python benchmarks/stream_rss.py [--n 10000] [--size 28] [--steps 30] [--cli]

Writes ``--n`` random RGB PNGs of ``--size``² pixels to a temporary folder, trains a SimpleCNN time predictor
``--steps`` steps from :class:`~tagdiff.data.folder.ImageFolderDataset` (batch 64, decoded per batch), and prints the
peak resident set size (``ru_maxrss``) before and after, against the float32 size of the whole decoded set. "Before"
is after the same training on a 64-image tensor, so that the model, Adam, activations and export are already counted.
Then it loads the folder whole with ``load_folder`` to show what holding it costs: the peak rises by about that size.

``--cli`` also runs ``tagdiff train time-predictor --dataset folder`` and ``--dataset hf`` (the ``imagefolder``
builder, its Arrow cache in the temporary folder) on the ``--n`` images, each in a fresh process, against the same
command on a quarter of the images (whose held-out report evaluates the same 500 images), and prints each process's
peak RSS (``VmHWM``); holding the set would show as the decoded size of the other three quarters.
The HF cache is first built in a process of its own, whose peak is printed too.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--cli", action="store_true", help="also measure the tagdiff train command (folder and hf)")
    args = ap.parse_args()

    from PIL import Image

    from tagdiff import SimpleCNNTimePredictor, VPSchedule
    from tagdiff.data.folder import ImageFolderDataset, load_folder
    from tagdiff.training.loop import TrainConfig, time_loss, train

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "imgs"
        root.mkdir()
        t0 = time.perf_counter()
        for i in range(args.n):
            Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)).save(root / f"{i:05d}.png")
        print(f"wrote {args.n} PNGs ({args.size}x{args.size} RGB) in {time.perf_counter() - t0:.1f} s")
        decoded = args.n * 3 * args.size * args.size * 4 / 2**20

        ds = ImageFolderDataset(root, "all")
        sched = VPSchedule.linear(1000)
        cfg = TrainConfig(steps=args.steps, batch_size=64, lr=1e-3, save_every=args.steps, seed=0)
        # the same training on a 64-image tensor first: the peak then includes the model, Adam, activations, export
        warm = torch.stack([ds[i] for i in range(64)])
        train(SimpleCNNTimePredictor(3, args.size, 1000), time_loss, warm, sched, cfg, Path(tmp) / "warm",
              progress=False)
        before = peak_mib()
        t0 = time.perf_counter()
        train(SimpleCNNTimePredictor(3, args.size, 1000), time_loss, ds, sched, cfg, Path(tmp) / "run", progress=False)
        after = peak_mib()
        print(f"trained {args.steps} steps x 64 images from the lazy folder in {time.perf_counter() - t0:.1f} s")
        print(f"whole decoded dataset (float32): {decoded:8.1f} MiB")
        print(f"peak RSS after a 64-image warm-up: {before:6.1f} MiB")
        print(f"peak RSS after training:         {after:8.1f} MiB  (+{after - before:.1f} MiB)")
        x, _ = load_folder(root, "all")
        loaded = peak_mib()
        print(f"peak RSS after load_folder:      {loaded:8.1f} MiB  (+{loaded - after:.1f} MiB; tensor "
              f"{x.numel() * 4 / 2**20:.1f} MiB)")
        assert after - before < decoded / 2, "training from the lazy folder held a large part of the dataset"
        if args.cli:
            cli_rss(root, Path(tmp), args, decoded)


# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's peak (inherited through fork and exec)
_HWM = ("[int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0]")
_CHILD = ("import sys; from tagdiff.cli import main; code = main(sys.argv[1:]); "
          f"print('PEAK', {_HWM}); sys.exit(code)")


_BUILD = ("import sys; from tagdiff.data.streaming import HFImageDataset; HFImageDataset(sys.argv[1]); "
          f"print('PEAK', {_HWM})")


def cli_rss(root: Path, tmp: Path, args: argparse.Namespace, decoded: float) -> None:
    import os
    import shutil
    import subprocess
    import sys

    small = tmp / "small"  # a quarter of the images: its held-out split still gives the report its 500 images
    small.mkdir()
    n_small = args.n // 4
    for p in sorted(root.iterdir())[:n_small]:
        shutil.copy(p, small / p.name)
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp / "hf_cache"), "HF_HUB_OFFLINE": "1"}

    def peak(dataset: str, folder: Path, out: str) -> tuple[float, float]:
        cmd = ["train", "time-predictor", "--dataset", dataset, "--data-dir", str(folder), "--steps",
               str(args.steps), "--batch-size", "64", "--seed", "0", "--quiet", "--device", "cpu", "--out",
               str(tmp / out)]
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", _CHILD, *cmd], env=env, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stderr[-2000:])
        return float(r.stdout.split("PEAK")[-1]), time.perf_counter() - t0

    print(f"\ntagdiff train time-predictor --steps {args.steps} --batch-size 64 (fresh process each; decoded size "
          f"of {args.n - n_small} images {decoded * (args.n - n_small) / args.n:.1f} MiB):")
    for dataset in ("folder", "hf"):
        base, _ = peak(dataset, small, f"cli_small_{dataset}")
        if dataset == "hf":  # datasets' imagefolder builder writes its Arrow cache first: measured on its own
            r = subprocess.run([sys.executable, "-c", _BUILD, str(root)], env=env, capture_output=True, text=True)
            print(f"  building the HF imagefolder cache of {args.n} images alone: peak RSS "
                  f"{float(r.stdout.split('PEAK')[-1]):7.1f} MiB")
        full, sec = peak(dataset, root, f"cli_{dataset}")
        print(f"  --dataset {dataset:6s}: peak RSS {full:7.1f} MiB on {args.n} images vs {base:7.1f} MiB on {n_small} "
              f"(+{full - base:.1f} MiB; {sec:.0f} s{', cache built' if dataset == 'hf' else ''})")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
