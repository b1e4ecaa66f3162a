"""Data parallelism over processes: batch sharding, the process launcher, and Hugging Face ``accelerate`` glue.

A run with ``N > 1`` processes is either started by ``accelerate launch`` / ``torchrun`` (which set ``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) or by :func:`launch`, which starts the same command
``N`` times with those variables (offline, no config file; gloo on CPU, nccl on GPUs, chosen by ``accelerate``).
Every process draws the whole global batch from ``(seed, step)`` and keeps its :func:`shard` of it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

__all__ = ["finish", "launch", "make_accelerator", "shard", "world_size"]


def world_size() -> int:
    """Number of processes of this run (``WORLD_SIZE``, set by the launchers; 1 when run alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def shard(batch_size: int, rank: int, world: int) -> slice:
    """Positions ``[start, stop)`` of the global batch that process ``rank`` of ``world`` takes.

    Contiguous, as equal as possible (the first ``batch_size % world`` processes take one more), disjoint, and
    together exactly ``range(batch_size)``; it depends only on its arguments, so on the seed and step through the
    batch drawn from them.

    Raises:
        ValueError: ``world < 1``, ``rank`` outside ``[0, world)``, or ``batch_size < world`` (a process without
            samples).
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    if batch_size < world:
        raise ValueError(f"batch size {batch_size} is smaller than the number of processes {world}")
    base, rem = divmod(batch_size, world)
    start = rank * base + min(rank, rem)
    return slice(start, start + base + (rank < rem))


def make_accelerator(device_type: str, mixed_precision: str = "no") -> Any:
    """An ``accelerate.Accelerator`` for this process (``cpu=True`` for CPU runs: gloo; ``mixed_precision`` ``"no"``,
    ``"bf16"`` or ``"fp16"`` as accelerate's), or ``None`` when alone."""
    if world_size() <= 1:
        return None
    try:
        from accelerate import Accelerator
    except ImportError:
        raise RuntimeError("data-parallel training needs Hugging Face accelerate: "
                           "pip install 'tagdiff[train]'") from None
    return Accelerator(cpu=device_type == "cpu", mixed_precision=mixed_precision)


def finish(acc: Any) -> None:
    """End this process's part of a data-parallel run: wait for every process, then tear the process group down.
    A group left to the interpreter's exit can abort it ("terminate called without an active exception", seen with
    gloo on one process of a finished two-process run). A no-op when ``acc`` is ``None`` (one process)."""
    if acc is None:
        return
    import torch.distributed as dist

    acc.wait_for_everyone()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(argv: list[str], num_processes: int, grace_s: float = 60.0) -> int:
    """Run ``python -m tagdiff.cli *argv`` in ``num_processes`` processes on this machine; return an exit code.

    The parent ignores Ctrl-C (the terminal sends it to every process, and each stops at the same step boundary
    and the main one saves); when a process fails, the others get ``grace_s`` seconds and are then terminated.
    """
    env = {**os.environ, "WORLD_SIZE": str(num_processes), "LOCAL_WORLD_SIZE": str(num_processes),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    procs = []
    try:
        for rank in range(num_processes):
            penv = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            procs.append(subprocess.Popen([sys.executable, "-m", "tagdiff.cli", *argv], env=penv,
                                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)))
        failed_at = None
        while any(p.poll() is None for p in procs):
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        signal.signal(signal.SIGINT, old)
    codes = [p.returncode for p in procs]
    return next((c for c in codes if c), 0)
