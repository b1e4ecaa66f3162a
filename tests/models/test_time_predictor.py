"""Time-predictor networks (architecture and interface only; training/checkpoints are tested elsewhere)."""

from __future__ import annotations

import pytest
import torch

from tagdiff import MLPTimePredictor, SimpleCNNTimePredictor, TemporalAlignment, VPSchedule, tls
from tagdiff.models.time_predictor import TimePredictor

F64 = torch.float64


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _simplecnn_count(in_channels: int, image_size: int, T: int, widths=(32, 64, 128, 256), cond: int = 0,
                     num_classes: int = 0) -> int:
    """Parameter count of docs/notation.md §2.2's SimpleCNN: 3x3 convs, 2x2 pools (ceil), flatten, Linear(-> T)."""
    n, c, s = 0, in_channels, image_size
    for w in widths:
        n += c * w * 9 + w
        c, s = w, -(-s // 2)
    n += (c * s * s + cond) * T + T
    if num_classes:
        n += (num_classes + 1) * cond   # class embeddings + the null embedding
    return n


def _mlp(num_classes=None, T=50, dtype=torch.float32):
    torch.manual_seed(0)
    return MLPTimePredictor(3, T, hidden=32, num_layers=4, num_classes=num_classes, cond_dim=8).to(dtype).eval()


def _cnn(in_channels=3, size=32, T=100, num_classes=None, dtype=torch.float32):
    torch.manual_seed(0)
    return SimpleCNNTimePredictor(in_channels, size, T, widths=(8, 16, 16, 32), num_classes=num_classes,
                                  cond_dim=8).to(dtype).eval()


# ---------------------------------------------------------------------------------------------- shapes and size


@pytest.mark.parametrize("num_classes", [None, 4])
def test_mlp_outputs_B_by_T_logits(num_classes):
    m = _mlp(num_classes, T=37)
    out = m(torch.randn(5, 3))
    assert out.shape == (5, 37) and out.dtype == torch.float32
    assert isinstance(m, TimePredictor) and m.num_train_timesteps == 37 and m.sample_shape == (3,)
    assert len([layer for layer in m.net if isinstance(layer, torch.nn.Linear)]) == 4


@pytest.mark.parametrize("in_channels, size", [(1, 8), (1, 28), (3, 32), (3, 28), (1, 5)])
@pytest.mark.parametrize("num_classes", [None, 10])
def test_simplecnn_outputs_B_by_T_logits(in_channels, size, num_classes):
    torch.manual_seed(0)
    m = SimpleCNNTimePredictor(in_channels, size, 1000, num_classes=num_classes).eval()
    c = None if num_classes is None else torch.arange(3) % num_classes
    out = m(torch.randn(3, in_channels, size, size), c)
    assert out.shape == (3, 1000) and torch.isfinite(out).all()
    assert m.sample_shape == (in_channels, size, size)
    assert _n_params(m) == _simplecnn_count(in_channels, size, 1000, cond=64 if num_classes else 0,
                                            num_classes=num_classes or 0)


def test_simplecnn_parameter_count_matches_paper():
    """docs/notation.md §2.2: 32x32x3, T=1000, flatten (2x2x256 = 1024) -> Linear(1000) gives ≈1.41 M parameters;
    adding a 64-d
    class embedding before the linear layer gives ≈1.48 M, the paper's reported count."""
    uncond = _n_params(SimpleCNNTimePredictor(3, 32, 1000))
    convs = (3 * 32 + 32 * 64 + 64 * 128 + 128 * 256) * 9 + (32 + 64 + 128 + 256)
    assert convs == 388_416                       # "≈ 0.388 M" for the convolutions
    assert uncond == convs + 1024 * 1000 + 1000 == 1_413_416
    assert abs(uncond - 1.41e6) < 0.005e6
    cond = _n_params(SimpleCNNTimePredictor(3, 32, 1000, num_classes=10))
    assert cond == uncond + 64 * 1000 + 11 * 64
    assert abs(cond - 1.48e6) < 0.005e6


def test_simplecnn_layout():
    m = SimpleCNNTimePredictor(3, 32, 1000)
    convs = [layer for layer in m.features if isinstance(layer, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 256]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(layer, torch.nn.AvgPool2d) for layer in m.features) == 4
    assert sum(isinstance(layer, torch.nn.ReLU) for layer in m.features) == 4
    assert m.head.in_features == 1024 and m.head.out_features == 1000


# ---------------------------------------------------------------------------------------------- log_prob / predict_t


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_log_prob_is_gathered_log_softmax(kind, dtype):
    m = _mlp(dtype=dtype) if kind == "mlp" else _cnn(size=8, dtype=dtype)
    x = torch.randn(6, *m.sample_shape, dtype=dtype)
    t = torch.tensor([0, 1, 7, 20, 49, 3])
    logits = m(x)
    ref = torch.log_softmax(logits, -1)[torch.arange(6), t]
    got = m.log_prob(x, t)
    assert got.shape == (6,) and got.dtype == dtype
    tol = 1e-12 if dtype == F64 else 1e-5
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    # a scalar t broadcasts over the batch
    torch.testing.assert_close(m.log_prob(x, torch.tensor(7)), torch.log_softmax(logits, -1)[:, 7], rtol=tol, atol=tol)


def test_predict_t_is_argmax():
    m = _cnn(size=8)
    x = torch.randn(7, 3, 8, 8)
    assert torch.equal(m.predict_t(x), m(x).argmax(-1))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_tls_of_float64_network_matches_finite_differences(kind):
    """In float64, the TLS of a network predictor is the derivative of its log_prob (no silent float32 rounding)."""
    m = _mlp(dtype=F64) if kind == "mlp" else _cnn(in_channels=1, size=5, dtype=F64)
    x = torch.randn(3, *m.sample_shape, dtype=F64)
    t = torch.tensor([2, 30, 45])
    g = tls(m, x, t)
    flat = x.reshape(3, -1)
    h = 1e-6
    fd = torch.zeros_like(flat)
    for j in range(flat.shape[1]):
        e = torch.zeros_like(flat)
        e[:, j] = h
        fd[:, j] = (m.log_prob((flat + e).reshape(x.shape), t) - m.log_prob((flat - e).reshape(x.shape), t)) / (2 * h)
    torch.testing.assert_close(g.reshape(3, -1), fd, rtol=1e-6, atol=1e-7)


def test_log_prob_rejects_timestep_out_of_range():
    m = _mlp(T=50)
    x = torch.randn(2, 3)
    for bad in (50, -1):
        with pytest.raises(ValueError, match="outside the predictor's 0..49"):
            m.log_prob(x, torch.tensor([0, bad]))


# ---------------------------------------------------------------------------------------------- conditioning


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_condition_none_uses_the_null_embedding(kind):
    m = _mlp(num_classes=4) if kind == "mlp" else _cnn(size=8, num_classes=4)
    x = torch.randn(5, *m.sample_shape)
    null = m.cond.table.weight[4].expand(5, -1)
    with torch.no_grad():
        if kind == "mlp":
            ref = m.net(torch.cat([x, null], -1))
        else:
            ref = m.head(torch.cat([m.features(x), null], -1))
        out = m(x)
        torch.testing.assert_close(out, ref)
        # the condition matters, and each class has its own embedding
        outs = torch.stack([m(x, torch.full((5,), c)) for c in range(4)])
    for c in range(4):
        assert not torch.allclose(outs[c], out)
        for d in range(c):
            assert not torch.allclose(outs[c], outs[d])
    # a scalar condition broadcasts; a per-sample condition picks per sample
    with torch.no_grad():
        torch.testing.assert_close(m(x, torch.tensor(2)), outs[2])
        mixed = m(x, torch.tensor([0, 1, 2, 3, 0]))
    torch.testing.assert_close(mixed, outs[[0, 1, 2, 3, 0], torch.arange(5)])


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_condition_minus_one_means_no_condition(kind):
    """-1 marks a dropped condition (condition dropout): it uses the null embedding, per sample."""
    m = _mlp(num_classes=4) if kind == "mlp" else _cnn(size=8, num_classes=4)
    x = torch.randn(4, *m.sample_shape)
    with torch.no_grad():
        mixed = m(x, torch.tensor([-1, 2, -1, 0]))
        torch.testing.assert_close(mixed[[0, 2]], m(x)[[0, 2]])
        torch.testing.assert_close(mixed[1], m(x, torch.tensor(2))[1])
        torch.testing.assert_close(mixed[3], m(x, torch.tensor(0))[3])


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("bad", [-2, 4, 5, 100])
def test_condition_outside_classes_raises(kind, bad):
    """Class indices are 0..K-1; index K is the internal null slot and must not be accepted as a condition."""
    m = _mlp(num_classes=4) if kind == "mlp" else _cnn(size=8, num_classes=4)
    x = torch.randn(2, *m.sample_shape)
    with pytest.raises(ValueError, match=r"outside 0\.\.3"):
        m(x, torch.tensor([0, bad]))
    with pytest.raises(ValueError, match=r"outside 0\.\.3"):
        m.log_prob(x, torch.tensor(0), torch.tensor(bad))


# ---------------------------------------------------------------------------------------------- bad shapes


@pytest.mark.parametrize("shape", [(4, 4), (4, 2), (4,), (4, 3, 1), (3,)])
def test_mlp_wrong_input_shape_raises(shape):
    m = _mlp()
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 3\)"):
        m(torch.randn(shape))


@pytest.mark.parametrize("shape", [(2, 1, 8, 8), (2, 3, 16, 16), (2, 3, 8, 9), (3, 8, 8), (2, 3 * 64)])
def test_cnn_wrong_input_shape_raises(shape):
    m = _cnn(size=8)
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 3, 8, 8\)"):
        m(torch.randn(shape))


def test_tag_check_uses_predictor_contract():
    """TemporalAlignment validates T and shape through the TimePredictor attributes before sampling."""
    m = _mlp(T=50)
    TemporalAlignment(m).check(torch.zeros(2, 3), VPSchedule.linear(50))
    with pytest.raises(ValueError, match="T=50"):
        TemporalAlignment(m).check(torch.zeros(2, 3), VPSchedule.linear(1000))
    with pytest.raises(ValueError, match="shape"):
        TemporalAlignment(m).check(torch.zeros(2, 4), VPSchedule.linear(50))


# ---------------------------------------------------------------------------------------------- batch independence


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("num_classes", [None, 4])
@pytest.mark.parametrize("train", [False, True])
def test_no_batch_coupling(kind, num_classes, train):
    m = _mlp(num_classes) if kind == "mlp" else _cnn(size=8, num_classes=num_classes)
    m.train(train)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, *m.sample_shape, generator=g)
    c = None if num_classes is None else torch.tensor([0, 1, 2, 3, 0, 1])
    with torch.no_grad():
        full = m(x, c)
        for i in range(6):
            alone = m(x[i:i + 1], None if c is None else c[i:i + 1])
            torch.testing.assert_close(alone[0], full[i], rtol=1e-5, atol=1e-5)
        x2 = x.clone()
        x2[1:] = torch.randn(5, *m.sample_shape, generator=g) * 3
        torch.testing.assert_close(m(x2, c)[0], full[0], rtol=1e-5, atol=1e-5)
    # the Jacobian has no cross-sample blocks: ∂ log p(t | x_0) / ∂ x_j = 0 for j ≠ 0
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(m.log_prob(xg, torch.tensor(3), c)[0], xg)
    assert grad[0].abs().sum() > 0
    assert torch.equal(grad[1:], torch.zeros_like(grad[1:]))
