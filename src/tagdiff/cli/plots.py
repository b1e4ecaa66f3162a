"""Figures the command line writes beside its JSON reports (matplotlib; the library itself draws nothing)."""

from __future__ import annotations

from typing import Any

from .._utils import require

__all__ = ["plot_time_gap", "plot_time_predictor_report", "save_grid"]


def plot_time_predictor_report(report: dict[str, Any], path: str | Any, title: str = "time predictor") -> None:
    """Figure of an :func:`evaluate_time_predictor` report: accuracy and mean |argmax - t| against t."""
    matplotlib = require("matplotlib", "cli", "the report figure")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    a1.plot(report["timesteps"], report["accuracy_per_t"])
    a1.set_xlabel("training timestep t")
    a1.set_ylabel("accuracy (argmax = t)")
    a2.plot(report["timesteps"], report["mean_abs_error_per_t"])
    a2.set_xlabel("training timestep t")
    a2.set_ylabel("time gap |argmax - t|")
    fig.suptitle(f"{title}: held-out, forward-noised data (CE {report['cross_entropy']:.3f} nats)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_time_gap(summary: dict[str, Any], path: str | Any) -> None:
    """Figure of a ``tagdiff sample`` summary's Time Gap per step (mean over the samples) against the timestep the
    state should be at, with ω_0 in the title (docs/notation.md §5)."""
    matplotlib = require("matplotlib", "cli", "the Time Gap figure")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, gap = summary["timesteps"][: len(summary["time_gap_per_step"])], summary["time_gap_per_step"]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.plot(t, gap, marker="o", ms=3)
    ax.invert_xaxis()  # sampling runs from t = T to 0
    ax.set_xlabel("timestep t of the state (sampling runs right to left)")
    ax.set_ylabel("Time Gap |argmax p(t | x) - t|")
    ax.set_title(f"Time Gap along the trajectory (ω_0 = {summary['config'].get('omega', 0):g}; mean "
                 f"{summary['time_gap']:.1f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_grid(x: Any, path: str | Any, ncol: int | None = None) -> None:
    """Save images ``(N, C, H, W)`` in [-1, 1] as one PNG grid (Pillow)."""
    import numpy as np
    import torch
    from PIL import Image

    n, c, h, w = x.shape
    ncol = ncol or int(np.ceil(np.sqrt(n)))
    nrow = int(np.ceil(n / ncol))
    grid = torch.full((c, nrow * (h + 1) + 1, ncol * (w + 1) + 1), -1.0)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = x[i]
    arr = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(arr.squeeze(-1) if c == 1 else arr)
    scale = max(1, 256 // img.width)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)
