"""Ctrl-C at random moments, then resume: is the result the uninterrupted run, bit for bit? And do two trainings into
one folder collide?

    PYTHONPATH=src HF_HUB_OFFLINE=1 python benchmarks/sigint_resume.py [--tries 20] [--seed 0]

Each try starts ``tagdiff train diffusion`` (toy MLP, EMA on) in a fresh folder as a subprocess and sends SIGINT at a
random moment: in 3 tries of 20 uniformly during the start-up (before training), otherwise uniformly over the
training, timed from the moment the run takes its lock file (when its training begins). It then reruns the same
command to completion and compares
``train_state.safetensors`` (weights, EMA, Adam moments) and ``model.safetensors`` with an uninterrupted reference
run. Then two identical trainings are started into one folder at once: one must train, the other refuse (lock).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

TRAIN = ["-m", "tagdiff.cli", "train", "diffusion", "--dataset", "toy", "--hidden", "64", "--steps", "3000",
         "--batch-size", "256", "--save-every", "50", "--ema-decay", "0.99", "--seed", "3", "--quiet"]


def _run(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, *TRAIN, "--out", str(out), *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _same(a: Path, b: Path) -> bool:
    for name in ("train_state.safetensors", "model.safetensors"):
        x, y = load_file(a / name), load_file(b / name)
        if x.keys() != y.keys() or any(not x[k].equal(y[k]) for k in x):
            return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tries", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    opts = ap.parse_args()
    rng = random.Random(opts.seed)
    with tempfile.TemporaryDirectory(prefix="tagdiff-sigint-") as tmp:
        root = Path(tmp)
        t0 = time.time()
        short = _run(root / "short", "--steps", "1")  # start-up and export only
        short.communicate()
        t1 = time.time()
        ref = _run(root / "ref")
        ref.communicate()
        startup, wall = t1 - t0, time.time() - t1
        assert ref.returncode == 0, "reference run failed"
        equal, where = 0, []
        for i in range(opts.tries):
            out = root / f"try{i}"
            proc = _run(out)
            t_start = time.time()
            if rng.random() < 0.15:  # during start-up
                time.sleep(rng.uniform(0.0, startup))
            else:  # during training: from the moment it holds the lock
                while not (out / ".lock").exists() and proc.poll() is None:
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, max(0.1, wall - startup)))
            delay = time.time() - t_start
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate()
            msg = (err.strip().splitlines() or ["(no message)"])[-1]
            if proc.returncode == 0:
                where.append("finished before the signal")
            elif "saved to" in msg:
                where.append("step " + msg.split("step ")[1].split()[0])
            elif "nothing was saved" in msg:
                where.append("before training")
            elif "is kept" in msg:
                where.append("kept state at step " + msg.split("step ")[1].split()[0])
            elif proc.returncode == -signal.SIGINT or "KeyboardInterrupt" in err:
                where.append("during start-up (Python's default handler)")
            else:
                where.append(f"rc {proc.returncode}: {msg[:80]}")
            again = _run(out)
            _, err2 = again.communicate()
            ok = again.returncode == 0 and _same(root / "ref", out)
            equal += ok
            print(f"try {i:2d}: SIGINT after {delay:5.2f} s -> {where[-1]:28s} resumed: "
                  f"{'equal bit for bit' if ok else 'DIFFERENT ' + err2[-200:]}", flush=True)
        print(f"{opts.tries} tries (reference run {wall:.1f} s, start-up {startup:.1f} s): {equal}/{opts.tries} "
              "resumed runs equal the uninterrupted one bit for bit")
        a, b = _run(root / "both"), _run(root / "both")
        (_, ea), (_, eb) = a.communicate(), b.communicate()
        rcs = sorted([a.returncode, b.returncode])
        refused = [e.strip() for e, p in ((ea, a), (eb, b)) if p.returncode == 2]
        print(f"two trainings into one folder: exit codes {rcs}; refused with: {refused[0] if refused else '-'}")
        ok_lock = rcs == [0, 2] and _same(root / "ref", root / "both")
        print(f"the finished run equals the reference: {ok_lock}")
    return 0 if equal == opts.tries and ok_lock else 1


if __name__ == "__main__":
    sys.exit(main())
