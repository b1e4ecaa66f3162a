"""Label classifiers: shapes, input validation, per-sample independence, checkpoints and real (tiny) training."""

from __future__ import annotations

import functools

import pytest
import torch

from tagdiff import VPSchedule
from tagdiff.guidance.classifier import grad_log_prob
from tagdiff.models.checkpoints import MODEL_CLASSES, load_model, save_model
from tagdiff.models.classifiers import (
    CleanClassifier,
    EvalClassifier,
    NoisyClassifier,
    accuracy,
    clean_classifier_loss,
    noisy_classifier_loss,
)
from tagdiff.training.loop import TrainConfig, train

SIZES = [(1, 8), (1, 28), (3, 5)]


def _noisy(c=1, s=8, K=10, T=50):
    torch.manual_seed(0)
    return NoisyClassifier(c, s, K, T, widths=(8, 16), emb_dim=16)


def _clean(c=1, s=8, K=10):
    torch.manual_seed(0)
    return CleanClassifier(c, s, K, widths=(8, 16), hidden=32)


def _eval(c=1, s=8, K=10):
    torch.manual_seed(0)
    return EvalClassifier(c, s, K, widths=(8, 16), feature_dim=24, dropout=0.3)


def halves(n: int, seed: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """2-class synthetic images in [-1, 1]: class 0 = bright top half, class 1 = bright bottom half, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    top = torch.zeros(n, 1, size, size)
    top[:, :, : size // 2] = 1
    pattern = torch.where(y[:, None, None, None] == 0, top, 1 - top)   # 1 on the bright half, 0 elsewhere
    brightness = 0.5 + 0.5 * torch.rand(n, 1, 1, 1, generator=g)
    x = -1 + 2 * brightness * pattern + 0.3 * torch.randn(n, 1, size, size, generator=g)
    return x.clamp(-1, 1), y


# ----------------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("c, s", SIZES)
def test_output_shapes_and_attributes(c, s):
    x = torch.randn(3, c, s, s)
    n = _noisy(c, s, K=7, T=50)
    assert n(x, torch.tensor([0, 10, 49])).shape == (3, 7)
    assert n.sample_shape == (c, s, s) and n.num_classes == 7 and n.num_train_timesteps == 50
    for m in (_clean(c, s, K=7), _eval(c, s, K=7)):
        assert m(x).shape == (3, 7) and m.sample_shape == (c, s, s) and m.num_classes == 7
        assert not hasattr(m, "num_train_timesteps")   # train() must not compare it with the schedule's T
    e = _eval(c, s, K=7)
    assert e.features(x).shape == (3, 24) and e.feature_dim == 24


def test_default_sizes_build_for_mnist_and_digits():
    for s in (8, 28):
        x = torch.randn(2, 1, s, s)
        assert NoisyClassifier(1, s)(x, torch.tensor([0, 999])).shape == (2, 10)
        assert CleanClassifier(1, s)(x).shape == (2, 10)
        assert EvalClassifier(1, s).eval()(x).shape == (2, 10)


def test_float64_forward():
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    assert _noisy().double()(x, torch.tensor([3, 4])).dtype == torch.float64
    assert _clean().double()(x).dtype == torch.float64
    assert _eval().double().eval().features(x).dtype == torch.float64


def test_no_batch_coupling():
    """A sample's logits do not depend on the other samples of its batch (GroupNorm, no batch statistics): equal up to
    the float32 rounding of another batch blocking (measured ≤ 4e-7 across kernel sets; allowed 1e-4 relative + 1e-5,
    while batch statistics would move them by O(1e-1))."""
    torch.manual_seed(1)
    x, t = torch.randn(6, 1, 8, 8), torch.tensor([0, 7, 13, 21, 35, 49])
    noisy = _noisy()
    for mode in (True, False):   # GroupNorm only: per-sample in train mode too
        noisy.train(mode)
        full = noisy(x, t)
        single = torch.cat([noisy(x[i:i + 1], t[i:i + 1]) for i in range(6)])
        torch.testing.assert_close(full, single, rtol=1e-4, atol=1e-5)
    for m in (_clean(), _eval().eval()):
        full = m(x)
        torch.testing.assert_close(full, torch.cat([m(x[i:i + 1]) for i in range(6)]), rtol=1e-4, atol=1e-5)
        # a sample's logits do not depend on the other samples in the batch
        torch.testing.assert_close(m(torch.cat([x[:1], torch.randn(5, 1, 8, 8)]))[0], full[0], rtol=1e-4, atol=1e-5)


def test_noisy_classifier_depends_on_t():
    m = _noisy()
    for p in m.parameters():   # the FiLM layers start at zero (t-independent); move them off zero
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 1, 8, 8)
    assert not torch.allclose(m(x, torch.tensor([0, 0])), m(x, torch.tensor([40, 40])))


# ----------------------------------------------------------------------------------------------- validation


def test_noisy_classifier_t_shapes():
    m, x = _noisy(T=50), torch.randn(4, 1, 8, 8)
    ref = m(x, torch.full((4,), 5))
    torch.testing.assert_close(m(x, 5), ref)                       # scalar broadcast
    torch.testing.assert_close(m(x, torch.tensor([5])), ref)       # 1-element broadcast
    for bad in (torch.zeros(4, 1, dtype=torch.long), torch.zeros(3, dtype=torch.long),
                torch.zeros(5, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long)):
        with pytest.raises(ValueError, match="shape"):
            m(x, bad)
    with pytest.raises(ValueError, match="integer"):
        m(x, torch.full((4,), 5.0))
    with pytest.raises(ValueError, match="out of range"):
        m(x, torch.tensor([0, 1, 2, 50]))
    with pytest.raises(ValueError, match="out of range"):
        m(x, torch.tensor([-1, 1, 2, 3]))


@pytest.mark.parametrize("make", [_clean, _eval, _noisy])
def test_wrong_image_shape_rejected(make):
    m = make()
    call = (lambda z: m(z, 0)) if isinstance(m, NoisyClassifier) else m
    for bad in (torch.randn(2, 1, 9, 9), torch.randn(2, 3, 8, 8), torch.randn(1, 8, 8), torch.randn(2, 64)):
        with pytest.raises(ValueError, match="expects images of shape"):
            call(bad)
    with pytest.raises(ValueError, match="floating"):
        call(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


def test_constructor_validation():
    with pytest.raises(ValueError):
        NoisyClassifier(1, 8, widths=())
    with pytest.raises(ValueError):
        CleanClassifier(1, 8, num_classes=1)
    with pytest.raises(ValueError):
        EvalClassifier(1, 8, dropout=1.0)


def test_losses_need_labels():
    s = VPSchedule.linear(50, beta_start=2e-3, beta_end=0.4)
    x0, t, noise = torch.randn(4, 1, 8, 8), torch.arange(4), torch.randn(4, 1, 8, 8)
    for loss, m in ((noisy_classifier_loss, _noisy(K=2)), (clean_classifier_loss, _clean(K=2))):
        with pytest.raises(ValueError, match="labels"):
            loss(m, x0, t, noise, s, None)
        with pytest.raises(ValueError, match="cond_drop"):
            loss(m, x0, t, noise, s, torch.tensor([0, 1, -1, 0]))
        assert loss(m, x0, t, noise, s, torch.tensor([0, 1, 1, 0])).shape == ()
    with pytest.raises(ValueError, match="t_max"):
        noisy_classifier_loss(_noisy(K=2), x0, t, noise, s, torch.zeros(4, dtype=torch.long), t_max=50)


def test_noisy_loss_t_max_remaps_timesteps():
    s = VPSchedule.linear(50, beta_start=2e-3, beta_end=0.4)
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x, t):
            seen.append(t.clone())
            return torch.zeros(x.shape[0], 2, requires_grad=True)

    t = torch.arange(50)
    noisy_classifier_loss(Spy(), torch.zeros(50, 1, 8, 8), t, torch.zeros(50, 1, 8, 8), s,
                          torch.zeros(50, dtype=torch.long), t_max=9)
    assert seen[0].min() == 0 and seen[0].max() == 9 and torch.bincount(seen[0]).tolist() == [5] * 10


def test_clean_loss_noise_augmentation():
    s = VPSchedule.linear(50, beta_start=2e-3, beta_end=0.4)
    m, x0, c = _clean(K=2), torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 1, 0])
    noise = torch.randn(4, 1, 8, 8)
    a = clean_classifier_loss(m, x0, torch.zeros(4, dtype=torch.long), noise, s, c, noise_std=0.0)
    b = clean_classifier_loss(m, x0, torch.zeros(4, dtype=torch.long), torch.zeros_like(noise), s, c)
    torch.testing.assert_close(a, b)   # noise_std = 0 and zero noise agree: t is ignored, noise only augments
    assert not torch.allclose(a, clean_classifier_loss(m, x0, torch.zeros(4, dtype=torch.long), noise, s, c,
                                                       noise_std=1.0))


def test_accuracy_helper():
    class Fixed(torch.nn.Module):   # predicts the class given by the sign of the first pixel
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, t=None):
            return torch.stack([-x[:, 0, 0, 0], x[:, 0, 0, 0]], 1) * self.w

    x = torch.randn(10, 1, 8, 8)
    y = (x[:, 0, 0, 0] > 0).long()
    m = Fixed().train()
    assert accuracy(m, x, y, batch_size=3) == 1.0 and m.training
    y[:4] = 1 - y[:4]
    assert accuracy(m, x, y, batch_size=4) == pytest.approx(0.6)
    assert accuracy(m, x, 1) == pytest.approx(float((x[:, 0, 0, 0] > 0).float().mean()))
    assert accuracy(m, x, y, t=3) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        accuracy(m, x, y[:5])
    with pytest.raises(ValueError):
        accuracy(m, x[:0], y[:0])


# ----------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("make", [_noisy, _clean, _eval])
def test_checkpoint_round_trip(make, tmp_path):
    m = make(1, 8, K=3)
    assert MODEL_CLASSES[type(m).__name__] is type(m)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1)
    save_model(m, tmp_path / "ckpt")
    m2 = load_model(tmp_path / "ckpt")
    assert type(m2) is type(m) and m2.config == m.config and not m2.training
    x = torch.randn(4, 1, 8, 8)
    m.eval()
    if isinstance(m, NoisyClassifier):
        torch.testing.assert_close(m2(x, torch.tensor([0, 5, 20, 49])), m(x, torch.tensor([0, 5, 20, 49])))
    else:
        torch.testing.assert_close(m2(x), m(x))
    if isinstance(m, EvalClassifier):
        torch.testing.assert_close(m2.features(x), m.features(x))


# ----------------------------------------------------------------------------------------------- training


def test_noisy_classifier_learns_and_guides(tmp_path):
    schedule = VPSchedule.linear(50, beta_start=2e-3, beta_end=0.4)
    x, y = halves(256, seed=0)
    model = _noisy(K=2, T=50)
    cfg = TrainConfig(steps=150, batch_size=64, lr=3e-3, seed=0, save_every=1000)
    res = train(model, noisy_classifier_loss, x, schedule, cfg, tmp_path / "noisy", labels=y, progress=False)
    # t ~ U{0..49}: above t ≈ 30 the label is unrecoverable (CE = log 2), so ≈0.35 is near the Bayes loss
    assert res["final_loss"] < 0.45
    xt, yt = halves(256, seed=1)
    g = torch.Generator().manual_seed(2)
    # Bayes accuracy of this task: ≈1 up to t ≈ 18 (ᾱ = 0.22), ≈0.93 at t = 25 (ᾱ = 0.055)
    for t, min_acc in ((0, 0.95), (8, 0.95), (15, 0.95), (25, 0.8)):
        noisy_x = schedule.q_sample(xt, torch.full((256,), t), torch.randn(xt.shape, generator=g))
        assert accuracy(model, noisy_x, yt, t=t) > min_acc, t
    # the exported checkpoint reloads and guides: ∇ log p(y=1 | x_t, t) brightens the bottom half
    clf = load_model(tmp_path / "noisy")
    t = torch.full((4,), 10)
    grad = grad_log_prob(lambda z: clf(z, t), torch.zeros(4, 1, 8, 8), torch.ones(4, dtype=torch.long))
    assert grad.shape == (4, 1, 8, 8)
    assert bool((grad[:, :, 4:].mean((1, 2, 3)) > grad[:, :, :4].mean((1, 2, 3))).all())


@pytest.mark.parametrize("kind", ["clean", "eval"])
def test_clean_and_eval_classifiers_learn(kind, tmp_path):
    schedule = VPSchedule.linear(50, beta_start=2e-3, beta_end=0.4)   # unused by the loss but required by train()
    x, y = halves(256, seed=3)
    model = _clean(K=2) if kind == "clean" else _eval(K=2)
    loss = functools.partial(clean_classifier_loss, noise_std=0.1)
    cfg = TrainConfig(steps=60, batch_size=64, lr=3e-3, seed=1, save_every=1000)
    train(model, loss, x, schedule, cfg, tmp_path / kind, labels=y, progress=False)
    xt, yt = halves(256, seed=4)
    assert accuracy(model, xt, yt) > 0.97
