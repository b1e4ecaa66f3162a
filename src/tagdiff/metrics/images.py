r"""Image-set metrics in a small classifier's feature space: FID, KID and the predicted-class histogram.

The TFG benchmark (docs/notation.md §4.4, §7.2) scores label guidance by FID against images of the target class and
by the
accuracy of an independent classifier. On 8×8 / 28×28 one-channel data there is no pretrained Inception, so the
features come from our own :class:`tagdiff.classifiers.EvalClassifier` (its penultimate ``features``), never
from a guidance network. The statistics are torchmetrics' ``FrechetInceptionDistance`` and
``KernelInceptionDistance`` with ``feature=`` a custom ``nn.Module`` (:class:`FeatureExtractor`), which works
offline (no Inception weights, no ``torch-fidelity``).

torchmetrics' custom-feature contract (torchmetrics 1.9, ``image/fid.py`` and ``image/kid.py``):

* The module is called as ``module(imgs)`` on exactly what is passed to ``update``: with a custom module,
  ``normalize`` does **not** rescale or cast the images; it only picks the dummy input (float ``rand`` in [0, 1]
  if ``True``, uint8 ``randint(0, 255)`` if ``False``, shape ``(1, *input_img_size)``, default ``(3, 299, 299)``)
  that FID feeds the module at construction to infer the feature width, unless the module has an
  ``int``/``Tensor`` attribute ``num_features``. :class:`FeatureExtractor` sets ``num_features``, so no dummy
  image is ever built.
* It must return ``(N, d)`` (FID also accepts ``(d,)`` for a single image).
* FID accumulates sums and sums of outer products in float64 whatever the feature dtype, but casts the final
  value back to the dtype of the last features (``orig_dtype``); KID keeps the features as given and computes the
  polynomial-kernel MMD in their dtype. :class:`FeatureExtractor` therefore returns float64 on the CPU: both metrics
  then run fully in float64 (``set_dtype`` is not needed).
* KID draws its subsets with the global ``torch.randperm``; :func:`kid` seeds it inside ``torch.random.fork_rng``
  so results are reproducible without disturbing the caller's RNG.

Small-sample bias: FID is the Fréchet distance between Gaussians fitted to the two feature sets; its plug-in
estimate is biased **upwards** by roughly ``O(d / n)`` (finite-sample covariance noise), so FID of two independent
samples of the *same* distribution is > 0 and shrinks as n grows; with ``n < d`` the covariances are singular.
Compare FIDs only at equal sample counts (and equal feature network); the benchmark's large absolute FIDs come
from its small sample counts (docs/notation.md §7.2). KID is unbiased (it can be slightly negative) and is preferable
for
small n.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from .._utils import require

__all__ = ["FIDReference", "FeatureExtractor", "class_histogram", "fid", "kid"]


def _torchmetrics_image() -> Any:
    return (require("torchmetrics.image.fid", "metrics", "FID/KID"),
            require("torchmetrics.image.kid", "metrics", "FID/KID"))


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    p = next(iter(model.parameters()), None)
    return p.dtype if p is not None and p.is_floating_point() else torch.float32


def _prepare_images(x: Tensor, name: str) -> Tensor:
    """Validate an image batch and map it to float in [-1, 1] (uint8 [0, 255] is rescaled; floats are clamped)."""
    if not isinstance(x, Tensor) or x.ndim != 4:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be images of shape (N, C, H, W), got {got}")
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating images in [-1, 1] (or uint8), got dtype {x.dtype}")
    bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
    if bad:
        raise ValueError(f"{name} contains {bad} image(s) with NaN/Inf values; FID/KID are undefined for them")
    return x.clamp(-1, 1)


class FeatureExtractor(nn.Module):
    """``nn.Module`` adapter that turns a feature network into torchmetrics' ``feature=`` argument.

    ``forward(imgs) -> (N, num_features)`` float64 on the CPU. ``imgs`` are ``(N, C, H, W)`` floats in ``[-1, 1]``
    (clamped to it, as saving to uint8 would) or uint8 in ``[0, 255]`` (rescaled). The network runs in eval mode
    (its train/eval mode is restored afterwards), without gradients, on its own device and dtype.

    Args:
        model: a network with a ``features(x) -> (N, d)`` method (e.g. :class:`tagdiff.classifiers.EvalClassifier`),
            or any module whose ``forward(x)`` returns ``(N, d)``.
        num_features: d; defaults to ``model.feature_dim`` or, failing that, is inferred with one forward pass of
            a zero image of shape ``sample_shape`` (default ``model.sample_shape``).

    Raises:
        TypeError: if d cannot be determined (no ``num_features``, ``feature_dim`` or sample shape).
        ValueError: in ``forward``, on malformed or non-finite images, or features that are not ``(N, d)``.
    """

    def __init__(self, model: nn.Module, num_features: int | None = None,
                 sample_shape: tuple[int, ...] | None = None):
        super().__init__()
        self.model = model
        features = getattr(model, "features", None)
        self._uses_features = callable(features) and not isinstance(model, FeatureExtractor)
        if num_features is None:
            num_features = getattr(model, "feature_dim", None)
        if num_features is None:
            shape = sample_shape if sample_shape is not None else getattr(model, "sample_shape", None)
            if shape is None:
                raise TypeError("cannot infer the feature width: pass num_features= or sample_shape=, or give the "
                                "model a feature_dim / sample_shape attribute")
            num_features = int(self._features(torch.zeros(1, *shape)).shape[-1])
        self.num_features = int(num_features)  # read by torchmetrics' FID instead of a dummy 3×299×299 forward

    def _features(self, x: Tensor) -> Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                x = x.to(device=_model_device(self.model), dtype=_model_dtype(self.model))
                f = self.model.features(x) if self._uses_features else self.model(x)
        finally:
            self.model.train(was_training)
        return f

    def forward(self, imgs: Tensor) -> Tensor:
        f = self._features(_prepare_images(imgs, "images"))
        if f.ndim != 2 or f.shape[0] != imgs.shape[0] or (hasattr(self, "num_features")
                                                           and f.shape[1] != self.num_features):
            raise ValueError(f"feature network must return (N, {getattr(self, 'num_features', 'd')}) features, "
                             f"got {tuple(f.shape)}")
        return f.detach().to(device="cpu", dtype=torch.float64)


def _extractor(feature_model: nn.Module, sample_shape: tuple[int, ...]) -> FeatureExtractor:
    if isinstance(feature_model, FeatureExtractor):
        return feature_model
    return FeatureExtractor(feature_model, sample_shape=sample_shape)


def _check_set(x: Tensor, name: str, min_n: int) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise ValueError(f"{name} must be images of shape (N, C, H, W)")
    if x.shape[0] < min_n:
        raise ValueError(f"{name} has {x.shape[0]} images; need at least {min_n}")


def _check_fake(real_shape: tuple[int, ...], fake: Tensor, min_n: int) -> None:
    _check_set(fake, "fake", min_n)
    if tuple(fake.shape[1:]) != tuple(real_shape):
        raise ValueError(f"real images are {tuple(real_shape)} but fake images are {tuple(fake.shape[1:])}")


def _check_pair(real: Tensor, fake: Tensor, min_n: int) -> tuple[int, ...]:
    _check_set(real, "real", min_n)
    _check_fake(tuple(real.shape[1:]), fake, min_n)
    return tuple(real.shape[1:])


class FIDReference:
    """The real side of :func:`fid`, computed once: torchmetrics' FID state after the ``real`` images' update.

    ``fid(FIDReference(real, model), fake)`` equals ``fid(real, fake, model)`` bit for bit (the same float64 sums
    of the same features in the same batches) and skips the forward pass of every real image, which dominates a
    benchmark run's evaluation when the reference set is large (10,000 held-out MNIST images). Each call works on
    a copy of the state, so a reference is never changed by use.

    Args: ``real`` ``(N, C, H, W)`` images in ``[-1, 1]`` (uint8 rescaled), N >= 2; ``feature_model`` and
    ``batch_size`` as in :func:`fid`.

    Raises:
        ValueError: malformed or non-finite images, or fewer than 2.
    """

    def __init__(self, real: Tensor, feature_model: nn.Module, *, batch_size: int = 256):
        _check_set(real, "real", 2)
        self.image_shape = tuple(real.shape[1:])
        tm_fid, _ = _torchmetrics_image()
        self._metric = tm_fid.FrechetInceptionDistance(feature=_extractor(feature_model, self.image_shape),
                                                       reset_real_features=False)
        for i in range(0, real.shape[0], batch_size):
            self._metric.update(real[i:i + batch_size], real=True)

    def fid(self, fake: Tensor, *, batch_size: int = 256) -> float:
        """:func:`fid` of ``fake`` against the reference (raises as :func:`fid`)."""
        _check_fake(self.image_shape, fake, 2)
        metric = copy.deepcopy(self._metric)
        for i in range(0, fake.shape[0], batch_size):
            metric.update(fake[i:i + batch_size], real=False)
        return max(float(metric.compute()), 0.0)


def fid(real: Tensor | FIDReference, fake: Tensor, feature_model: nn.Module | None = None, *,
        batch_size: int = 256) -> float:
    """Fréchet distance between Gaussians fitted to the features of ``real`` and ``fake`` (torchmetrics FID).

    ``FID = ||μ_r − μ_f||² + Tr(Σ_r + Σ_f − 2 (Σ_r Σ_f)^{1/2})`` with unbiased (n−1) covariances, float64.
    torchmetrics evaluates the trace term as the sum of square roots of the eigenvalues of ``Σ_r Σ_f``, which
    stays defined for singular covariances. Tiny negative round-off results are clipped to 0.

    Args:
        real, fake: ``(N, C, H, W)`` images in ``[-1, 1]`` (clamped; uint8 is rescaled), ``N >= 2`` each; N may
            differ. For label guidance, ``real`` are held-out images of the target class (docs/notation.md §7.2).
            ``real``
            may be a :class:`FIDReference` (its features computed once; then ``feature_model`` is not needed).
        feature_model: an :class:`~tagdiff.classifiers.EvalClassifier` (its ``features`` are used), any module
            returning ``(N, d)``, or a :class:`FeatureExtractor`.
        batch_size: images per feature forward pass (does not change the result).

    Biased upwards at small N (≈ O(d/N)); see the module docstring.

    Raises:
        ValueError: malformed or non-finite images, fewer than 2 per set, or different image shapes.
        TypeError: no ``feature_model`` with a tensor ``real``.
    """
    if isinstance(real, FIDReference):
        return real.fid(fake, batch_size=batch_size)
    if feature_model is None:
        raise TypeError("fid(real, fake, feature_model): a feature_model is needed unless real is an FIDReference")
    _check_pair(real, fake, 2)  # both sets, before any features are computed
    return FIDReference(real, feature_model, batch_size=batch_size).fid(fake, batch_size=batch_size)


def kid(real: Tensor, fake: Tensor, feature_model: nn.Module, *, subset_size: int = 50, subsets: int = 100,
        batch_size: int = 256, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (torchmetrics KID) in the feature space of ``feature_model``: ``(mean, std)``.

    The unbiased MMD² with the cubic polynomial kernel ``k(a, b) = (a·b / d + 1)³``, averaged over ``subsets``
    random subsets of ``subset_size`` images from each set (std: over subsets, population form), float64.
    ``subset_size`` is capped at ``min(len(real), len(fake))``, as the TFG code does (``min(n, 50)``,
    docs/notation.md §4.4).
    The mean is ≈ 0 (and may be slightly negative) for identical distributions. ``seed`` fixes the subsets.

    Args: as :func:`fid`.

    Raises:
        ValueError: malformed or non-finite images, fewer than 2 per set, different image shapes, or
            ``subset_size < 2`` / ``subsets < 1``.
    """
    shape = _check_pair(real, fake, 2)
    if subset_size < 2 or subsets < 1:
        raise ValueError(f"need subset_size >= 2 and subsets >= 1, got {subset_size}, {subsets}")
    subset_size = min(int(subset_size), real.shape[0], fake.shape[0])
    _, tm_kid = _torchmetrics_image()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = tm_kid.KernelInceptionDistance(feature=_extractor(feature_model, shape), subsets=int(subsets),
                                                subset_size=subset_size)
    for x, is_real in ((real, True), (fake, False)):
        for i in range(0, x.shape[0], batch_size):
            metric.update(x[i:i + batch_size], real=is_real)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


@torch.no_grad()
def class_histogram(eval_classifier: nn.Module, x: Tensor, *, batch_size: int = 512) -> tuple[Tensor, float]:
    """Histogram of the classifier's argmax predictions on ``x`` and its entropy.

    Returns:
        ``(counts, entropy)``: counts int64 ``(K,)`` (K = number of logits) summing to ``N``; entropy (nats) of the
        empirical class distribution, ``-Σ p_k log p_k`` with ``0 log 0 = 0``: 0 when all samples get one class,
        ``log K`` when the predictions are uniform over the K classes (a diversity check for guided samples).

    Raises:
        ValueError: empty ``x`` or logits not shaped ``(B, K)``.
    """
    if x.shape[0] == 0:
        raise ValueError("class_histogram of an empty set is undefined")
    x = _prepare_images(x, "x")
    device, dtype = _model_device(eval_classifier), _model_dtype(eval_classifier)
    was_training = eval_classifier.training
    eval_classifier.eval()
    counts: Tensor | None = None
    try:
        for i in range(0, x.shape[0], batch_size):
            logits = eval_classifier(x[i:i + batch_size].to(device=device, dtype=dtype))
            if logits.ndim != 2 or logits.shape[0] != min(batch_size, x.shape[0] - i):
                raise ValueError(f"classifier must return logits of shape (B, K), got {tuple(logits.shape)}")
            c = torch.bincount(logits.argmax(-1).cpu(), minlength=logits.shape[1])
            counts = c if counts is None else counts + c
    finally:
        eval_classifier.train(was_training)
    assert counts is not None
    p = counts.double() / counts.sum()
    entropy = -float((p[p > 0] * p[p > 0].log()).sum())
    return counts.long(), entropy if entropy > 0 else 0.0  # avoid -0.0

