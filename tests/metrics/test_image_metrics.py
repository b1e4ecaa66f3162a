"""FID / KID in an EvalClassifier feature space (through torchmetrics) and the predicted-class histogram."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from tagdiff.metrics.images import FeatureExtractor, FIDReference, class_histogram, fid, kid
from tagdiff.models.classifiers import EvalClassifier


def _features_net(size=8):
    torch.manual_seed(0)   # random weights are a fine (fixed) feature map for testing the statistics
    return EvalClassifier(1, size, 10, widths=(8, 16), feature_dim=16, dropout=0.5)


def _images(n, seed, shift=0.0, size=8, flip=False):
    """A vertical brightness ramp plus pixel noise; ``flip`` mirrors the ramp (a clearly different distribution)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.linspace(-0.6, 0.6, size)[None, None, :, None].expand(n, 1, size, size)
    base = -base if flip else base
    return (base + shift + 0.25 * torch.randn(n, 1, size, size, generator=g)).clamp(-1, 1)


def _frechet_numpy(f1: np.ndarray, f2: np.ndarray) -> float:
    """Closed-form Fréchet distance (pytorch-fid style): ||μ1-μ2||² + Tr(Σ1 + Σ2 - 2 sqrtm(Σ1 Σ2))."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_feature_extractor_contract():
    net = _features_net().train()
    fx = FeatureExtractor(net)
    assert fx.num_features == 16   # torchmetrics reads this instead of a dummy (1, 3, 299, 299) forward
    x = _images(5, 0)
    f = fx(x)
    assert f.shape == (5, 16) and f.dtype == torch.float64 and not f.requires_grad
    assert net.training   # run in eval mode (no dropout), mode restored
    torch.testing.assert_close(f, fx(x))   # deterministic: dropout off
    torch.testing.assert_close(f, net.eval().features(x).double())
    # uint8 images are rescaled to [-1, 1]; out-of-range floats are clamped
    u8 = ((x + 1) * 127.5).round().to(torch.uint8)
    torch.testing.assert_close(fx(u8), fx(u8.float() / 127.5 - 1))
    torch.testing.assert_close(fx(x * 3), fx((x * 3).clamp(-1, 1)))
    # a plain module without feature_dim: width inferred from a dummy forward of the sample shape
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 7))
    assert FeatureExtractor(plain, sample_shape=(1, 8, 8)).num_features == 7
    with pytest.raises(TypeError):
        FeatureExtractor(plain)
    with pytest.raises(ValueError, match="NaN"):
        fx(torch.full((2, 1, 8, 8), float("nan")))


def test_fid_self_zero_and_matches_closed_form():
    net = _features_net()
    real, fake = _images(300, 1), _images(250, 2, shift=0.2, flip=True)
    assert fid(real, real, net) == pytest.approx(0.0, abs=1e-6)
    fx = FeatureExtractor(net)
    expected = _frechet_numpy(fx(real).numpy(), fx(fake).numpy())
    got = fid(real, fake, net, batch_size=64)
    assert isinstance(got, float) and expected > 0.1
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-8)
    # the batch size does not matter beyond float32 rounding of the features, which depends on the batch (another
    # blocking of the network's matrix products): measured 1.1e-9 relative with MKL at AVX2, 0 natively; allowed
    # 1e-6, the bound of the closed-form comparison above (dropping the 44-image partial batch changes FID by 2 %)
    assert fid(real, fake, fx, batch_size=1000) == pytest.approx(got, rel=1e-6)


def test_fid_reference_equals_fid_bit_for_bit_and_is_not_changed_by_use():
    net = _features_net()
    real = _images(300, 1)
    ref = FIDReference(real, net, batch_size=64)
    fakes = [_images(250, 2, shift=0.2, flip=True), _images(40, 3), _images(250, 2, shift=0.2, flip=True)]
    got = [fid(ref, f, batch_size=64) for f in fakes]
    assert got == [fid(real, f, net, batch_size=64) for f in fakes]   # exact: the same float64 sums
    assert got[0] == got[2] and got[0] > 10 * got[1]                  # reuse leaves the reference as it was
    with pytest.raises(ValueError, match="fake images are"):
        ref.fid(_images(5, 1, size=28))
    with pytest.raises(ValueError, match="at least 2"):
        ref.fid(_images(1, 1))
    with pytest.raises(TypeError, match="feature_model"):
        fid(real, fakes[0])


def test_fid_same_distribution_small_shifted_large():
    net = _features_net()
    real = _images(400, 3)
    same = fid(real, _images(400, 4), net)
    shifted = fid(real, _images(400, 5, shift=0.3), net)
    other = fid(real, _images(400, 5, flip=True), net)
    assert 0 < same < shifted < other and same < 0.1 * other
    # the small-sample bias: two independent small samples of the same distribution look further apart
    small = np.mean([fid(_images(20, 10 + i), _images(20, 20 + i), net) for i in range(3)])
    assert small > 2 * same


def test_fid_28x28():
    net = _features_net(28)
    real = _images(64, 6, size=28)
    assert fid(real, real, net) == pytest.approx(0.0, abs=1e-6)
    assert fid(real, _images(64, 7, size=28, flip=True), net) > 3 * fid(real, _images(64, 8, size=28), net)


def test_fid_validation():
    net = _features_net()
    with pytest.raises(ValueError, match="at least 2"):
        fid(_images(1, 0), _images(5, 1), net)
    with pytest.raises(ValueError, match="fake images are"):
        fid(_images(5, 0), _images(5, 1, size=28), net)
    with pytest.raises(ValueError):
        fid(torch.randn(5, 64), _images(5, 1), net)


def test_kid_same_distribution_near_zero():
    net = _features_net()
    real = _images(200, 11)
    mean_same, std_same = kid(real, _images(200, 12), net, subset_size=50, subsets=50)
    mean_shift, _ = kid(real, _images(200, 13, flip=True), net, subset_size=50, subsets=50)
    assert abs(mean_same) < 3 * std_same + 1e-4
    assert mean_shift > 20 * max(abs(mean_same), 1e-6) and mean_shift > 3 * std_same
    # reproducible given the seed, independent of the caller's RNG state
    torch.manual_seed(123)
    again = kid(real, _images(200, 12), net, subset_size=50, subsets=50)
    assert again == (mean_same, std_same)
    # subset_size is capped at the set sizes (TFG: min(n, 50))
    m, s = kid(real[:20], _images(30, 14), net)
    assert math.isfinite(m) and math.isfinite(s)
    with pytest.raises(ValueError):
        kid(real, real, net, subset_size=1)


def test_kid_matches_manual_mmd_with_full_subsets():
    net = _features_net()
    real, fake = _images(40, 15), _images(40, 16, shift=0.2)
    fx = FeatureExtractor(net)
    a, b = fx(real), fx(fake)
    d = a.shape[1]

    def k(u, v):
        return (u @ v.T / d + 1) ** 3

    m = a.shape[0]
    kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
    expected = ((kxx.sum() - kxx.trace()) / (m * (m - 1)) + (kyy.sum() - kyy.trace()) / (m * (m - 1))
                - 2 * kxy.sum() / m**2)
    mean, std = kid(real, fake, net, subset_size=40, subsets=3)   # each subset is a permutation of all images
    assert mean == pytest.approx(float(expected), rel=1e-9) and std == pytest.approx(0.0, abs=1e-12)


class _OneHotFirstPixels(torch.nn.Module):
    """Logits = the first K pixels of row 0: a controllable 'classifier'."""

    def __init__(self, K):
        super().__init__()
        self.K = K
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x[:, 0, 0, : self.K] + self.dummy


def test_class_histogram_entropy():
    K, n = 4, 12
    x = -torch.ones(n, 1, 8, 8)
    x[torch.arange(n), 0, 0, torch.arange(n) % K] = 1
    counts, h = class_histogram(_OneHotFirstPixels(K), x, batch_size=5)
    assert counts.tolist() == [3, 3, 3, 3] and counts.dtype == torch.int64
    assert h == pytest.approx(math.log(K), rel=1e-12)
    x = -torch.ones(n, 1, 8, 8)
    x[:, 0, 0, 2] = 1
    counts, h = class_histogram(_OneHotFirstPixels(K), x)
    assert counts.tolist() == [0, 0, 12, 0] and h == 0.0
    counts, h = class_histogram(_features_net().train(), _images(10, 0))
    assert counts.shape == (10,) and int(counts.sum()) == 10 and 0 <= h <= math.log(10)
