"""The figure of docs/RESULTS.md §18: FID against Euler / DDIM steps for the digits flow and VP models, without and
with Temporal Alignment Guidance (mean ± std over the seeds of ``benchmarks/flow_fewstep.py``'s JSON).

    python benchmarks/flow_figure.py runs/i24/flow_fewstep.json docs/flow_fewstep_digits.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    src, out = sys.argv[1], sys.argv[2]
    res = json.load(open(src))["results"]
    fig, ax = plt.subplots(figsize=(5.4, 3.4))
    for kind, colour in (("flow", "tab:blue"), ("vp", "tab:orange")):
        keys = sorted((k for k in res if k.startswith(kind + "/")), key=lambda k: int(k.split("/")[1]))
        steps = [int(k.split("/")[1]) for k in keys]
        for arm, style in (("without", "-"), ("with", "--")):
            m = [res[k][arm]["mean"] for k in keys]
            sd = [res[k][arm]["std"] for k in keys]
            name = "flow (Euler)" if kind == "flow" else "VP (DDIM)"
            label = name + (" + TAG (ω* per step count)" if arm == "with" else "")
            ax.errorbar(steps, m, sd, ls=style, marker="o", ms=3, capsize=2, color=colour, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sampling steps (= model evaluations)")
    ax.set_ylabel("FID (digits, eval-classifier features)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
