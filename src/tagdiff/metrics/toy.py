"""Distances between point sets of the vector (toy) experiments."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from .._utils import require

__all__ = ["wasserstein1"]


def wasserstein1(a: Tensor | np.ndarray, b: Tensor | np.ndarray, max_iter: int = 1_000_000) -> float:
    """Exact W1 distance between two empirical distributions (uniform weights, Euclidean cost), via POT's
    network-simplex solver ``ot.emd2``. Memory is ``O(len(a) · len(b))``.

    Raises:
        ValueError: if the point sets have different dimensions or contain NaN/Inf.
    """
    ot = require("ot", "metrics", "wasserstein1 (the POT package)")

    a = np.asarray(a.detach().cpu() if isinstance(a, Tensor) else a, dtype=np.float64)
    b = np.asarray(b.detach().cpu() if isinstance(b, Tensor) else b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"point sets must be (n, d) and (m, d), got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("point sets contain NaN/Inf")
    M = ot.dist(a, b, metric="euclidean")
    return float(ot.emd2(np.full(len(a), 1 / len(a)), np.full(len(b), 1 / len(b)), M, numItermax=max_iter))
