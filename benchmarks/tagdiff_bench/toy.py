"""The paper's toy experiment (docs/notation.md §6.1, App. E.1, Table 9): two Gaussians, an external drift, W1.

Data ``½N((10,10), I) + ½N((-10,-10), I)``; VP DDPM, linear β, T = 1000 training timesteps, 100 reverse steps
("trailing" grid); drift ``v(x, t) = -0.01 x`` added to the state before every reverse step. Four runs: no
drift; drift; drift + TAG with the learned MLP time predictor; drift + TAG with the exact TLS; each with the
learned MLP score model and with the exact score. W1 against fresh data samples, Time Gap measured with the
learned predictor (as the paper measures it with φ), and the quality of the learned predictor against the exact
time posterior (cross-entropy; cosine similarity of learned vs exact TLS along sampling trajectories).

All runs of one score model share x_T and the per-step noise (common random numbers), so their differences are
the effect of the drift and of TAG rather than sampling noise.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from tagdiff.data.gmm import toy_mixture
from tagdiff.guidance import LinearDrift, TemporalAlignment, Term, tls
from tagdiff.metrics.time_gap import TimeGapRecorder, evaluate_time_predictor
from tagdiff.metrics.toy import wasserstein1
from tagdiff.models.assets import assets_dir
from tagdiff.models.checkpoints import load_model
from tagdiff.sampling.samplers import StepInfo, sample_ddpm
from tagdiff.sampling.schedules import VPSchedule

__all__ = ["DEFAULT_OMEGA", "run_toy", "time_gap_axis_label"]

DEFAULT_OMEGA = 2.0  # chosen by benchmarks/toy_omega_sweep.py on a validation seed (docs/RESULTS.md)
DRIFT_COEF = -0.01
RUNS = ("no_drift", "drift", "drift_tag_learned", "drift_tag_exact")
PAPER = {"w1": {"drift": 6.458, "drift_tag_learned": 1.716}, "source": "the paper's Table 9 (1-layer predictor 1.716; "
         "depths 1-6 give 1.68-1.98)"}


class _TLSCosine:
    """Callback: cosine similarity of learned vs exact TLS at the trajectory states (first ``n`` samples)."""

    def __init__(self, learned: Any, exact: Any, n: int = 1000):
        self.learned, self.exact, self.n, self.values = learned, exact, n, []

    def __call__(self, info: StepInfo) -> None:
        x, t = info.x[: self.n], info.t[: self.n]
        a, b = tls(self.learned, x, t), tls(self.exact, x, t)
        self.values.append(float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()))


def run_toy(out_dir: str | Path, *, num_samples: int = 10_000, seed: int = 0, omega: float = DEFAULT_OMEGA,
            num_steps: int = 100, score_checkpoint: str | Path | None = None,
            predictor_checkpoint: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the toy benchmark; write ``out_dir/results.json`` and ``out_dir/toy.png``. Returns the results dict.

    Raises:
        CheckpointError: if a checkpoint folder is missing or corrupt.
        ValueError: for a non-positive sample or step count.
    """
    if num_samples < 2 or num_steps < 1:
        raise ValueError(f"need num_samples >= 2 and num_steps >= 1, got {num_samples} and {num_steps}")
    t_start = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    schedule = VPSchedule.linear(1000)
    gmm = toy_mixture()
    score_dir = Path(score_checkpoint) if score_checkpoint else assets_dir("toy") / "score"
    pred_dir = Path(predictor_checkpoint) if predictor_checkpoint else assets_dir("toy") / "time_predictor"
    learned_eps, learned_tp = load_model(score_dir), load_model(pred_dir)
    exact_eps, exact_tp = gmm.eps_model(schedule), gmm.time_posterior(schedule)
    timesteps = schedule.timesteps(num_steps)
    reference, _ = gmm.sample(num_samples, torch.Generator().manual_seed(seed + 1))
    drift = LinearDrift(DRIFT_COEF)
    run_terms: dict[str, list[Term]] = {
        "no_drift": [], "drift": [drift],
        "drift_tag_learned": [drift, TemporalAlignment(learned_tp, omega)],
        "drift_tag_exact": [drift, TemporalAlignment(exact_tp, omega)],
    }
    results: dict[str, Any] = {"w1": {}, "w1_exact_score": {}, "time_gap": {}, "time_gap_exact_score": {},
                               "time_gap_per_step": {}, "spread": {}, "spread_exact_score": {}}
    samples: dict[str, torch.Tensor] = {}
    tls_cos = _TLSCosine(learned_tp, exact_tp)
    for score_name, eps_model in (("learned", learned_eps), ("exact", exact_eps)):
        for run, terms in run_terms.items():
            g = torch.Generator().manual_seed(seed)
            x_T = torch.randn(num_samples, 2, generator=g)
            recorder = TimeGapRecorder(learned_tp)
            callbacks = [recorder]
            if score_name == "exact" and run == "drift_tag_learned":
                callbacks.append(tls_cos)
            with torch.no_grad():
                x0 = sample_ddpm(eps_model, x_T, timesteps, schedule, terms=terms, callback=callbacks,
                                 randn_like=lambda z, g=g: torch.randn(z.shape, generator=g, dtype=z.dtype),
                                 progress=progress)
            w1 = wasserstein1(x0, reference)
            suffix = "" if score_name == "learned" else "_exact_score"
            key_w1, key_tg = "w1" + suffix, "time_gap" + suffix
            results[key_w1][run] = w1
            results[key_tg][run] = recorder.mean
            results["spread" + suffix][run] = _spread(x0)
            if score_name == "learned":
                results["time_gap_per_step"][run] = recorder.per_step.tolist()
                samples[run] = x0
            if progress:
                print(f"  {score_name:7s} score  {run:18s} W1 {w1:6.3f}  time gap {recorder.mean:6.1f}", flush=True)
    held_out, _ = gmm.sample(2000, torch.Generator().manual_seed(seed + 2))
    ev_learned = evaluate_time_predictor(learned_tp, held_out, schedule, num_timesteps=50, seed=seed)
    ev_exact = evaluate_time_predictor(exact_tp, held_out, schedule, num_timesteps=50, seed=seed)
    results["predictor"] = {
        "cross_entropy_learned": ev_learned["cross_entropy"], "cross_entropy_exact": ev_exact["cross_entropy"],
        "accuracy_learned": ev_learned["accuracy"], "accuracy_exact": ev_exact["accuracy"],
        "mean_abs_error_learned": ev_learned["mean_abs_error"], "mean_abs_error_exact": ev_exact["mean_abs_error"],
        "tls_cosine_mean": float(torch.tensor(tls_cos.values).mean()), "tls_cosine_per_step": tls_cos.values,
        "note": "cross-entropy in nats on 2000 held-out samples forward-noised at 50 timesteps; the exact posterior's"
                " cross-entropy is the Bayes floor. TLS cosine along the exact-score drift+TAG(learned) trajectory.",
    }
    results["paper"] = PAPER
    results["config"] = {"num_samples": num_samples, "seed": seed, "omega": omega, "omega_schedule":
                         "one_minus_alpha_bar", "placement": "pre", "num_steps": num_steps, "timestep_spacing":
                         "trailing", "schedule": schedule.to_dict(), "drift": f"v(x, t) = {DRIFT_COEF} x, added to x_t "
                         "before every reverse step", "data": gmm.to_dict(), "score_checkpoint": str(score_dir),
                         "predictor_checkpoint": str(pred_dir), "torch": torch.__version__}
    results["seconds"] = time.time() - t_start
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _figure(out_dir / "toy.png", reference, samples, results, time_gap_axis_label(timesteps))
    return results


def _spread(x: torch.Tensor) -> dict[str, float]:
    """Within-mode std along the diagonal (the direction that tells timesteps apart) and across it, and the
    fraction of samples in the upper mode. The data have std 1 in both directions and fraction 0.5."""
    upper = x.sum(1) > 0
    centred = x - torch.where(upper[:, None], torch.tensor([10.0, 10.0]), torch.tensor([-10.0, -10.0]))
    centred = centred - torch.where(upper[:, None], centred[upper].mean(0), centred[~upper].mean(0))
    along = centred @ torch.tensor([1.0, 1.0]) / 2**0.5
    across = centred @ torch.tensor([1.0, -1.0]) / 2**0.5
    return {"std_along_diagonal": float(along.std()), "std_across_diagonal": float(across.std()),
            "upper_mode_fraction": float(upper.float().mean())}


def time_gap_axis_label(timesteps: torch.Tensor) -> str:
    """The x-axis label of a per-step plot over the reverse grid ``timesteps`` (decreasing, shape ``(N,)``)."""
    first, last = int(timesteps[0]), int(timesteps[-1])
    return f"reverse step i (t from {first} down to {last})" if len(timesteps) > 1 else f"reverse step (t = {first})"


def _figure(path: Path, reference: torch.Tensor, samples: dict[str, torch.Tensor], results: dict[str, Any],
            xlabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    n = min(3000, reference.shape[0])
    panels = ((axes[0], "drift", "drift, no TAG"), (axes[1], "drift_tag_learned", "drift + TAG (learned)"))
    for ax, run, title in panels:
        ax.scatter(reference[:n, 0], reference[:n, 1], s=2, c="0.75", label="data")
        ax.scatter(samples[run][:n, 0], samples[run][:n, 1], s=2, c="C3" if run == "drift" else "C0", label="samples")
        ax.set_title(f"{title}: W1 = {results['w1'][run]:.2f}")
        ax.set_aspect("equal")
        ax.legend(loc="upper left", markerscale=4)
    for run in RUNS:
        axes[2].plot(results["time_gap_per_step"][run], label=f"{run} (mean {results['time_gap'][run]:.1f})")
    axes[2].set_xlabel(xlabel)
    axes[2].set_ylabel("time gap |argmax p(t|x) - t|")
    axes[2].set_title("Time Gap per step (learned predictor)")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
