"""Datasets: exact Gaussian mixtures (ground truth for tests and the toy benchmark)."""

from .gmm import ExactTimePosterior as ExactTimePosterior
from .gmm import GaussianMixture as GaussianMixture
from .gmm import toy_mixture as toy_mixture

__all__ = ["DATASETS", "ExactTimePosterior", "GaussianMixture", "load_dataset", "toy_mixture"]

DATASETS = ("toy",)


def load_dataset(name: str, *, num_samples: int = 40_000, seed: int = 0, **kwargs: object):
    """Load a training set by name. Returns ``(x0, labels)``: ``x0`` of shape ``(N, *D)`` float32, ``labels`` ``(N,)``.

    * ``"toy"``: ``num_samples`` draws of the paper's two-Gaussian mixture (TAG.md §9.1; 40,000 in the paper).

    Raises:
        ValueError: for an unknown dataset name.
    """
    import torch

    if name == "toy":
        return toy_mixture().sample(num_samples, torch.Generator().manual_seed(seed))
    raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
