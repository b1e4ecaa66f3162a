"""Training images/s: ``tagdiff.training.train`` in 1 and 2 processes against a plain PyTorch loop (goal ≤ 1.1×).

    PYTHONPATH=src HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/train_throughput.py \
        [--datasets digits,mnist] [--rounds 3] [--mnist-dir ../shared/data/mnist]

Freshly initialised SimpleCNN time predictors (the paper's, docs/notation.md §2.2; T = 1000, Adam 1e-3, grad clip 1,
seed 0):

* ``digits``: 8×8, batch 256, ``--digits-steps`` (60) steps, data an in-memory tensor (the CLI's digits path);
* ``mnist``: 28×28, batch 64, ``--mnist-steps`` (30) steps, data the lazy :class:`~tagdiff.data.streaming.MNISTDataset`
  through the DataLoader (the CLI's mnist path; 0 workers).

Every configuration runs in its own worker process with one thread (``torch.set_num_threads(1)``), timed inside
the worker around the training call only (no interpreter start, imports, data loading or process-group set-up):

* ``plain``: a plain loop drawing the same batches (per-step generator, indices, t, noise) from the in-memory
  tensor, doing the same forward / cross-entropy / backward / clip / Adam step and nothing else;
* ``train x1``: :func:`train` alone (its bookkeeping: loss ``.item()``, history, Ctrl-C check, lock file, the LR
  scheduler, the training state saved once at the end, the export);
* ``train-tensor x1`` (MNIST only): :func:`train` on the same images as one in-memory tensor (the Python API's
  other path): its ratio to ``plain`` is the framework's overhead alone, without the per-item decoding of the lazy
  Dataset that ``train x1`` pays and the plain loop does not;
* ``train x2``: :func:`train` in 2 processes (gloo, accelerate; each process half of every batch; the time of the
  slower process).

The configurations alternate within each of ``--rounds`` rounds; medians are reported, and the ratios
(train x1 / plain in time, train x2 / train x1 in images/s) are taken between medians of the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {"digits": {"batch": 256, "size": 8}, "mnist": {"batch": 64, "size": 28}}


def _data(name: str, mnist_dir: str, lazy: bool):
    from tagdiff.data.images import load_digits
    from tagdiff.data.mnist import load_mnist
    from tagdiff.data.streaming import MNISTDataset

    if name == "digits":
        return load_digits("train")[0]
    return MNISTDataset("train", data_dir=mnist_dir) if lazy else load_mnist("train", data_dir=mnist_dir)[0]


def worker(spec: dict) -> None:
    """One timed run; prints ``{"seconds": ...}`` (rank 0 of a 2-process run prints the slower process's time)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from tagdiff import SimpleCNNTimePredictor, VPSchedule
    from tagdiff.training.loop import TrainConfig, time_loss, train

    torch.set_num_threads(1)
    name, mode, steps = spec["dataset"], spec["mode"], spec["steps"]
    B, size = SETTINGS[name]["batch"], SETTINGS[name]["size"]
    data = _data(name, spec["mnist_dir"], lazy=mode == "train")
    sched = VPSchedule.linear(1000)
    cfg = TrainConfig(steps=steps, batch_size=B, lr=1e-3, seed=0, save_every=steps, grad_clip=1.0)
    torch.manual_seed(0)
    model = SimpleCNNTimePredictor(1, size, 1000)
    torch.optim.Adam([nn.Parameter(torch.zeros(1))])  # the first optimiser imports torch._dynamo (seconds, once)
    if mode == "plain":
        t0 = time.perf_counter()
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        N, T = data.shape[0], 1000
        for step in range(steps):
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            idx = torch.randint(0, N, (B,), generator=g)
            t = torch.randint(0, T, (B,), generator=g)
            noise = torch.randn((B, *data.shape[1:]), generator=g)
            loss = F.cross_entropy(model(sched.q_sample(data[idx], t, noise)).float(), t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
        seconds = time.perf_counter() - t0
    else:
        import accelerate  # noqa: F401  (one-off imports and the process group are not per-step costs)

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from tagdiff.training.distributed import make_accelerator

            make_accelerator("cpu").wait_for_everyone()
        t0 = time.perf_counter()
        train(model, time_loss, data, sched, cfg, spec["out"], progress=False, resume=False)
        seconds = time.perf_counter() - t0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        s = torch.tensor([seconds])
        dist.all_reduce(s, op=dist.ReduceOp.MAX)
        seconds = float(s)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"seconds": seconds}))


def run(spec: dict, processes: int) -> float:
    from tagdiff.training.distributed import _free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if processes > 1:
        env.update(WORLD_SIZE=str(processes), LOCAL_WORLD_SIZE=str(processes), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(_free_port()))
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    procs = [subprocess.Popen(cmd, env={**env, **({"RANK": str(r), "LOCAL_RANK": str(r)} if processes > 1 else {})},
                              stdout=subprocess.PIPE, text=True) for r in range(processes)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"worker failed: {spec} x{processes}")
    return json.loads(outs[0].strip().splitlines()[-1])["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="digits,mnist")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--digits-steps", type=int, default=60)
    ap.add_argument("--mnist-steps", type=int, default=30)
    ap.add_argument("--mnist-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"))
    ap.add_argument("--out", type=Path, default=None, help="write the medians as JSON here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))

    names = [d for d in args.datasets.split(",") if d]
    def configs(name: str) -> tuple[tuple[str, int], ...]:
        return (("plain", 1), ("train", 1)) + ((("train-tensor", 1),) if name == "mnist" else ()) + (("train", 2),)

    times: dict[str, dict[str, list[float]]] = {n: {f"{m} x{p}": [] for m, p in configs(n)} for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in names:
                steps = args.digits_steps if name == "digits" else args.mnist_steps
                for mode, procs in configs(name):
                    spec = {"dataset": name, "mode": mode, "steps": steps, "mnist_dir": args.mnist_dir,
                            "out": f"{tmp}/{name}_{mode}{procs}_{r}"}
                    times[name][f"{mode} x{procs}"].append(run(spec, procs))
    result = {}
    print(f"{args.rounds} interleaved rounds, one thread per process, medians (seconds of each run in brackets)")
    print(f"{'dataset':7s} {'config':16s} {'images/s':>9s}   runs (s)")
    for name in names:
        steps = args.digits_steps if name == "digits" else args.mnist_steps
        imgs = steps * SETTINGS[name]["batch"]
        med = {k: statistics.median(v) for k, v in times[name].items()}
        for k, v in times[name].items():
            print(f"{name:7s} {k:16s} {imgs / med[k]:9.0f}   ({', '.join(f'{s:.2f}' for s in v)})")
        ratio, speedup = med["train x1"] / med["plain x1"], med["train x1"] / med["train x2"]
        print(f"{name:7s} train x1 / plain (time): {ratio:.3f}x (goal <= 1.1x); 2 processes / 1 (images/s): "
              f"{speedup:.2f}x")
        result[name] = {"images_per_step": SETTINGS[name]["batch"], "steps": steps, "seconds": times[name],
                        "images_per_s": {k: imgs / m for k, m in med.items()}, "train_over_plain": ratio,
                        "two_over_one_process": speedup}
        if "train-tensor x1" in med:
            result[name]["train_tensor_over_plain"] = med["train-tensor x1"] / med["plain x1"]
            print(f"{name:7s} train-tensor x1 / plain (time): {result[name]['train_tensor_over_plain']:.3f}x "
                  "(the framework alone, no per-item decoding)")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
