"""Figures the command line writes beside its JSON reports (matplotlib; the library itself draws nothing)."""

from __future__ import annotations

from typing import Any

from .._utils import require

__all__ = ["plot_time_predictor_report"]


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
