"""Images/s of ``tagdiff.training.train`` against a plain PyTorch loop doing the same steps (goal: ratio ≤ 1.1×).

    PYTHONPATH=src HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/train_throughput.py [--steps 100] [--rounds 5]

The digits SimpleCNN time predictor (8×8, widths 32..256, batch 256, grad clip 1, Adam 1e-3), one process on the CPU.
The plain loop draws the same batches (per-step generator, indices, t, noise), does the same forward / cross-entropy /
backward / clip / Adam step and nothing else; ``train`` adds its bookkeeping (loss ``.item()``, history, Ctrl-C
check, lock file, the training state saved once at the end, the export). Runs alternate, ``--rounds`` of each;
medians are compared.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()

    from tagdiff import SimpleCNNTimePredictor, VPSchedule
    from tagdiff.data.images import load_digits
    from tagdiff.training import TrainConfig, time_loss, train

    data, _ = load_digits("train")
    sched = VPSchedule.linear(1000)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=1e-3, seed=0, save_every=args.steps,
                      grad_clip=1.0)
    B, N, T = cfg.batch_size, data.shape[0], sched.num_train_timesteps

    def run_train(tmp: Path, r: int) -> float:
        torch.manual_seed(0)
        model = SimpleCNNTimePredictor(1, 8, T)
        t0 = time.perf_counter()
        train(model, time_loss, data, sched, cfg, tmp / f"r{r}", progress=False)
        return time.perf_counter() - t0

    def run_plain() -> float:
        torch.manual_seed(0)
        model = SimpleCNNTimePredictor(1, 8, T).train()
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        t0 = time.perf_counter()
        for step in range(cfg.steps):
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            idx = torch.randint(0, N, (B,), generator=g)
            t = torch.randint(0, T, (B,), generator=g)
            noise = torch.randn((B, *data.shape[1:]), generator=g)
            loss = F.cross_entropy(model(sched.q_sample(data[idx], t, noise)).float(), t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
        return time.perf_counter() - t0

    run_plain()  # warm-up (allocator, kernels)
    times: dict[str, list[float]] = {"train": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            times["train"].append(run_train(Path(tmp), r))
            times["plain"].append(run_plain())
    imgs = cfg.steps * B
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{cfg.steps} steps x {B} images, {args.rounds} interleaved rounds, {torch.get_num_threads()} thread(s)")
    for k in ("plain", "train"):
        print(f"  {k:5s}: median {med[k]:6.2f} s = {imgs / med[k]:8.0f} images/s   "
              f"(runs: {', '.join(f'{s:.2f}' for s in times[k])})")
    print(f"  ratio train / plain (time): {med['train'] / med['plain']:.3f}x (goal <= 1.1x)")


if __name__ == "__main__":
    main()
