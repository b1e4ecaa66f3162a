"""The Time-Gap diagnostic (the paper's Def. F.1) and the held-out evaluation of a time predictor."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..sampling.loop import StepInfo
from ..sampling.schedules import VPSchedule

__all__ = ["TimeGapRecorder", "evaluate_time_predictor", "time_gap"]


@torch.no_grad()
def time_gap(time_predictor: Any, x: Tensor, t: Tensor, c: Tensor | None = None) -> Tensor:
    """Per-sample ``|argmax_s p_φ(s | x) - t|`` in training-timestep units, shape ``(B,)`` float32.

    Raises:
        NonFiniteError: the predictor's logits ``(B, T)`` hold NaN/Inf (e.g. NaN weights): the argmax of such
            logits is meaningless, so no Time Gap is reported.
    """
    from .._utils import NonFiniteError

    logits = time_predictor(x, c)
    finite = torch.isfinite(logits).reshape(logits.shape[0], -1).all(-1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten()
        raise NonFiniteError(f"time predictor logits are not finite for samples {bad[:8].tolist()}"
                             f"{' (and more)' if bad.numel() > 8 else ''}; the Time Gap is undefined (check the "
                             "predictor's weights)")
    t_pred = logits.argmax(-1)
    return (t_pred - torch.as_tensor(t, device=t_pred.device)).abs().float()


class TimeGapRecorder:
    """Sampling callback recording the per-step Time Gap ``|argmax p_φ(· | x_t) - t|`` (the paper's Def. F.1, Eq. 128).

    Measured on the state x_t entering each step (after the previous step's ``post`` correctors, before this
    step's ``pre`` correctors), i.e. on the sampler's trajectory. Pass it as ``callback=`` to any sampler.

    No work is done twice: where a TAG corrector of the same step already evaluated this predictor at this very x_t
    (``info.shared["time_logits"]``, same tensor, t, condition and predictor), its logits are reused instead of a second
    forward pass. Gaps stay on the samples' device until read (no host synchronisation in the loop).

    It also keeps each step's ``StepInfo.shared["tls_norm"]`` list (created here if absent), to which every TAG
    correction of the step appends its per-sample ``‖ω_t·TLS‖`` (see :class:`~tagdiff.guidance.TemporalAlignment`).
    ``post`` corrections append after this callback ran, so the lists are read only when
    :attr:`tls_norm_per_sample` is asked for: that trace shows where along the trajectory TAG acted.

    Attributes:
        timesteps: list of the N training timesteps visited.
        gaps: list of N per-sample tensors ``(B,)``.
        tls_norm_per_step: ``(N,)`` mean per-sample ‖ω_t · TLS‖ of the TAG corrections made in each step (0 where
            none acted), from ``info.shared["tls_norm"]``: where TAG acts along the trajectory.
    """

    def __init__(self, time_predictor: Any, c: Tensor | None = None):
        self.time_predictor = time_predictor
        self.c = c
        self.timesteps: list[int] = []
        self.gaps: list[Tensor] = []
        self._tls: list[list[Tensor]] = []

    def __call__(self, info: StepInfo) -> None:
        self.timesteps.append(info.timestep if info.timestep is not None else int(info.t.reshape(-1)[0]))
        logits = None
        seen = info.shared.get("time_logits")
        if seen is not None and seen[0] is info.x and seen[1] is info.t and seen[2] is None and self.c is None \
                and seen[3].shape[0] == info.x.shape[0] and seen[4] is self.time_predictor:
            logits = seen[3]
        if logits is None:
            self.gaps.append(time_gap(self.time_predictor, info.x, info.t, self.c))
        else:
            self.gaps.append((logits.argmax(-1) - info.t).abs().float())
        self._tls.append(info.shared.setdefault("tls_norm", []))

    @property
    def tls_norm_per_sample(self) -> Tensor:
        """``(N, B)``: per step and sample, the summed ``‖ω_t·TLS‖`` of the step's TAG corrections (0 where TAG
        did not act; with ``post`` placement the correction of step ``i`` targets ``t_prev`` of that step)."""
        rows = []
        for gap, norms in zip(self.gaps, self._tls):
            rows.append(sum((n.detach().float().cpu() for n in norms), torch.zeros_like(gap).cpu()))
        return torch.stack(rows) if rows else torch.zeros(0, 0)

    @property
    def tls_norm_per_step(self) -> Tensor:
        """``(N,)`` mean over samples of :attr:`tls_norm_per_sample`."""
        per = self.tls_norm_per_sample
        return per.mean(1) if per.numel() else torch.zeros(len(self.gaps))

    @property
    def per_sample(self) -> Tensor:
        """``(N, B)`` gaps (on the CPU)."""
        return torch.stack(self.gaps).cpu()

    @property
    def per_step(self) -> Tensor:
        """``(N,)`` mean gap per step (the curve of the paper's Figs 4-9)."""
        return self.per_sample.mean(1)

    @property
    def mean(self) -> float:
        """Time-Gap: the mean over steps and samples."""
        return float(self.per_sample.mean())


@torch.no_grad()
def evaluate_time_predictor(time_predictor: Any, x0: Tensor, schedule: VPSchedule, *, num_timesteps: int = 100,
                            num_buckets: int = 10, c: Tensor | None = None, seed: int = 0,
                            batch_size: int = 4096) -> dict[str, Any]:
    """Accuracy, mean |argmax - t| and cross-entropy of a time predictor on forward-noised held-out data.

    For each of ``num_timesteps`` evenly spaced training timesteps, every sample of ``x0`` is noised to that t
    with seeded noise. Results are reported per timestep and per bucket of ``T / num_buckets`` timesteps.

    Returns:
        dict with ``timesteps``, ``accuracy``, ``mean_abs_error``, ``cross_entropy`` (per evaluated t),
        ``buckets`` (list of ``{"t_min", "t_max", "accuracy", "mean_abs_error", "cross_entropy"}``) and the overall
        ``accuracy``, ``mean_abs_error``, ``cross_entropy`` (nats).
    """
    T = schedule.num_train_timesteps
    ts = torch.linspace(0, T - 1, min(num_timesteps, T)).round().long().unique()
    g = torch.Generator().manual_seed(seed)
    acc, mae, ce = [], [], []
    for t_int in ts.tolist():
        a = m = e = 0.0
        for s in range(0, x0.shape[0], batch_size):
            xb = x0[s:s + batch_size]
            cb = None if c is None else c[s:s + batch_size]
            t = torch.full((xb.shape[0],), t_int, dtype=torch.long)
            noise = torch.randn(xb.shape, generator=g).to(xb)
            xt = schedule.q_sample(xb, t, noise)
            logits = time_predictor(xt, cb).double()
            pred = logits.argmax(-1)
            a += float((pred == t_int).sum())
            m += float((pred - t_int).abs().sum())
            e += float(-torch.log_softmax(logits, -1)[:, t_int].sum())
        n = x0.shape[0]
        acc.append(a / n)
        mae.append(m / n)
        ce.append(e / n)
    buckets = []
    width = T / num_buckets
    for b in range(num_buckets):
        sel = [(i) for i, t in enumerate(ts.tolist()) if b * width <= t < (b + 1) * width]
        if sel:
            buckets.append({"t_min": int(b * width), "t_max": int((b + 1) * width) - 1,
                            "accuracy": float(np.mean([acc[i] for i in sel])),
                            "mean_abs_error": float(np.mean([mae[i] for i in sel])),
                            "cross_entropy": float(np.mean([ce[i] for i in sel]))})
    return {"timesteps": ts.tolist(), "accuracy_per_t": acc, "mean_abs_error_per_t": mae, "cross_entropy_per_t": ce,
            "buckets": buckets, "accuracy": float(np.mean(acc)), "mean_abs_error": float(np.mean(mae)),
            "cross_entropy": float(np.mean(ce))}
