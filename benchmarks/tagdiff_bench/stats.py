"""Statistics of the experiments: mean ± std over seeds and the paired interval of a change (common random numbers:
seed s of both arms shares x_T and the sampling noise)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["fmt_ci", "mean_std", "paired_ci"]


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std", "n", "values"}``; std is the sample standard deviation (0 for one value)."""
    v = [float(x) for x in values]
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return {"mean": m, "std": s, "n": len(v), "values": v}


def paired_ci(before: Sequence[float], after: Sequence[float], level: float = 0.95, *,
              num_resamples: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Paired difference ``after - before`` over seeds, with a bootstrap and a Student-t interval.

    Seed ``s`` of both arms shares x_T and the sampling noise (common random numbers), so the per-seed differences
    ``d_s`` are the unit of resampling. The headline interval ``[lo, hi]`` is the percentile bootstrap of the mean of
    ``d`` (``num_resamples`` resamples of the seeds with replacement, drawn from ``torch.Generator`` seeded with
    ``seed``: the same inputs give the same interval). With few seeds the percentile bootstrap is too narrow (it
    cannot see beyond the observed ``d_s``; with 5 seeds its coverage is nearer 90 % than 95 %), so the Student-t
    interval ``[t_lo, t_hi]`` is computed as well and ``inside_noise`` is set when *either* interval contains 0 (the
    conservative reading). ``rel*`` divide by ``|mean(before)|``.

    Returns:
        ``{"diff", "lo", "hi", "rel", "rel_lo", "rel_hi", "t_lo", "t_hi", "t_rel_lo", "t_rel_hi", "n", "level",
        "method", "inside_noise"}``;
        one seed: no interval (``lo = hi = t_lo = t_hi = nan``, ``inside_noise`` True).

    Raises:
        ValueError: unpaired or empty inputs, or ``level`` outside (0, 1).
    """
    from scipy import stats

    if len(before) != len(after) or not before:
        raise ValueError(f"need paired values, got {len(before)} and {len(after)}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    d = torch.tensor([float(b) - float(a) for a, b in zip(before, after)], dtype=torch.float64)
    n, m = len(d), float(d.mean())
    base = abs(sum(float(a) for a in before) / n) or float("nan")
    nan = float("nan")
    lo = hi = t_lo = t_hi = nan
    if n > 1:
        half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * float(d.std()) / math.sqrt(n)
        t_lo, t_hi = m - half, m + half
        g = torch.Generator().manual_seed(seed)
        means = d[torch.randint(0, n, (num_resamples, n), generator=g)].mean(1)
        q = torch.tensor([0.5 - level / 2, 0.5 + level / 2], dtype=torch.float64)
        lo, hi = (float(v) for v in torch.quantile(means, q))
    holds_zero = n == 1 or not (lo > 0 or hi < 0) or not (t_lo > 0 or t_hi < 0)
    return {"diff": m, "lo": lo, "hi": hi, "rel": m / base, "rel_lo": lo / base, "rel_hi": hi / base,
            "t_lo": t_lo, "t_hi": t_hi, "t_rel_lo": t_lo / base, "t_rel_hi": t_hi / base, "n": n, "level": level,
            "method": "paired percentile bootstrap over seeds",
            "inside_noise": holds_zero}


def fmt_ci(ci: dict[str, Any], interval: str = "bootstrap") -> str:
    """``-12.3% [-20.1, -4.5]``: the relative change of a :func:`paired_ci` result and its ``interval`` (``"bootstrap"``
    or ``"t"``, the Student-t one), in %; ``(noise)`` when the bootstrap or the Student-t interval holds 0.

    Raises:
        ValueError: an unknown ``interval``.
    """
    if interval not in ("bootstrap", "t"):
        raise ValueError(f"interval must be 'bootstrap' or 't', got {interval!r}")
    lo, hi = (ci["rel_lo"], ci["rel_hi"]) if interval == "bootstrap" else (ci["t_rel_lo"], ci["t_rel_hi"])
    if math.isnan(ci["lo"]):
        return f"{100 * ci['rel']:+.1f}%"
    tag = " (noise)" if ci["inside_noise"] else ""
    return f"{100 * ci['rel']:+.1f}% [{100 * lo:+.1f}, {100 * hi:+.1f}]{tag}"
