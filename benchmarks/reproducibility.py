"""How exact are the published figures? Run one command under several CPU kernel sets and thread counts.

    HF_HUB_OFFLINE=1 python benchmarks/reproducibility.py --out runs/repro [--command demo]

Each variant runs ``tagdiff demo`` (or ``--command``'s argument list after ``tagdiff``) in a fresh process with its
environment: ``ATEN_CPU_CAPABILITY`` (PyTorch's own vectorised kernels: default = no SIMD, avx2, avx512),
``MKL_ENABLE_INSTRUCTIONS`` / ``ONEDNN_MAX_CPU_ISA`` (the BLAS and convolution code paths: AVX2 is what an AMD EPYC
runs) and ``OMP_NUM_THREADS`` (1 or 2). The same seed gives the same x_T and noise on every machine (torch's CPU
generator is software); what differs is float rounding inside the kernels. The script prints, per method, each
variant's figures and their spread (max − min), and writes ``repro.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

VARIANTS = {
    "native-1t": {"OMP_NUM_THREADS": "1"},
    "native-2t": {"OMP_NUM_THREADS": "2"},
    "aten-default-1t": {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"},
    "aten-avx2-2t": {"ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "2"},
    "amd-like-1t": {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                    "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"},
    "sse42-2t": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41",
                 "OMP_NUM_THREADS": "2"},
}
FIGURES = ("fid", "accuracy", "time_gap")


def run(name: str, env: dict[str, str], command: list[str], out: Path) -> dict:
    folder = out / name
    done = folder / "results.json"
    if not done.exists():
        full = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
        subprocess.run([sys.executable, "-m", "tagdiff.cli", *command, "--out", str(folder), "--quiet"], env=full,
                       check=True)
    return json.loads(done.read_text())


def figures(results: dict) -> dict[str, dict[str, float]]:
    """method → {figure: value} from a demo/bench results.json (``methods`` → ``metrics``)."""
    out = {}
    for method, r in results["methods"].items():
        m = r.get("metrics", r)
        out[method] = {k: float(m[k]) for k in FIGURES if k in m}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/repro"))
    ap.add_argument("--command", default="demo", help="the tagdiff command to run (default: demo)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    args = ap.parse_args()
    names = args.variants.split(",")
    table = {n: figures(run(n, VARIANTS[n], args.command.split(), args.out)) for n in names}
    methods = list(table[names[0]])
    print(f"{'method':28s} {'figure':9s} " + " ".join(f"{n:>15s}" for n in names) + f" {'spread':>9s}")
    summary = {}
    for m in methods:
        for f in FIGURES:
            vals = [table[n][m].get(f) for n in names]
            if any(v is None for v in vals):
                continue
            spread = max(vals) - min(vals)
            summary.setdefault(m, {})[f] = {"values": dict(zip(names, vals)), "spread": spread}
            print(f"{m:28s} {f:9s} " + " ".join(f"{v:15.4f}" for v in vals) + f" {spread:9.4f}")
    (args.out / "repro.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
