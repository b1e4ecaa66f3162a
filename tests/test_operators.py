"""Measurement operators for inverse problems: adjoints, losses, measurements and input checks (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from tagdiff.operators import (
    OPERATORS,
    BoxInpainting,
    GaussianBlur,
    Identity,
    Operator,
    RandomInpainting,
    SuperResolution,
    make_operator,
)

DT = torch.float64

LINEAR = {
    "identity": Identity(),
    "sr2": SuperResolution(2),
    "sr4": SuperResolution(4),
    "blur1": GaussianBlur(1, 1.0),
    "blur5": GaussianBlur(5, 1.0),
    "blur7_wide": GaussianBlur(7, 3.0),
    "box": BoxInpainting((1, 2, 5, 3)),
    "random": RandomInpainting(0.4, seed=3),
}
SHAPES = [(2, 3, 8, 8), (3, 1, 12, 8)]


def _rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(LINEAR))
def test_adjoint_dot_product_and_vjp(name, shape):
    A = LINEAR[name]
    x = _rand(shape, 0).requires_grad_()
    y = _rand(A.output_shape(shape), 1)
    Ax = A(x)
    assert Ax.shape == A.output_shape(shape)
    aty = A.adjoint(y)
    assert aty.shape == shape
    lhs, rhs = (Ax * y).sum().item(), (x.detach() * aty).sum().item()
    assert abs(lhs - rhs) < 1e-10 * max(1.0, abs(lhs))
    (vjp,) = torch.autograd.grad(Ax, x, y)
    torch.testing.assert_close(aty, vjp, rtol=0, atol=1e-12)


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("name", ["identity", "sr2", "blur5", "box", "random"])
def test_loss_matches_norm_and_finite_differences(name, squared):
    A = LINEAR[name]
    shape = (2, 2, 8, 8)
    x = _rand(shape, 4)
    y = A(_rand(shape, 5))
    loss_fn = A.loss(y, squared=squared)
    val = loss_fn(x)
    assert val.shape == (2,)
    expect = (A(x) - y).flatten(1).norm(dim=1)
    torch.testing.assert_close(val, expect**2 if squared else expect, rtol=1e-12, atol=0)

    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss_fn(xg).sum(), xg)
    h = 1e-6
    for b, c, i, j in [(0, 0, 0, 0), (0, 1, 3, 4), (1, 0, 7, 2), (1, 1, 5, 5), (0, 0, 2, 7)]:
        xp, xm = x.clone(), x.clone()
        xp[b, c, i, j] += h
        xm[b, c, i, j] -= h
        fd = (loss_fn(xp)[b] - loss_fn(xm)[b]).item() / (2 * h)
        assert abs(fd - grad[b, c, i, j].item()) < 1e-6 * max(1.0, abs(fd))


def test_loss_is_per_sample_and_finite_at_the_solution():
    A = SuperResolution(2)
    x = _rand((3, 1, 8, 8), 6).requires_grad_()
    y = A(x).detach()
    y[1] += 1.0
    loss = A.loss(y)(x)
    torch.testing.assert_close(loss[[0, 2]], torch.zeros(2, dtype=DT))
    assert loss[1].item() == pytest.approx(4.0)  # ‖1‖ over 16 low-res pixels
    (g,) = torch.autograd.grad(loss[1], x)
    assert torch.isfinite(g).all() and g[[0, 2]].abs().max() == 0  # no coupling across the batch
    (g0,) = torch.autograd.grad(A.loss(y)(x)[0], x)
    assert torch.isfinite(g0).all() and g0.abs().max() == 0  # zero residual: zero (not NaN) gradient


def test_super_resolution_values():
    x = torch.full((1, 2, 8, 8), -0.37, dtype=DT)
    torch.testing.assert_close(SuperResolution(2)(x), torch.full((1, 2, 4, 4), -0.37, dtype=DT))
    x = _rand((2, 3, 8, 12), 7)
    y = SuperResolution(4)(x)
    block = x[1, 2, 4:8, 8:12].mean()
    torch.testing.assert_close(y[1, 2, 1, 2], block)


def test_blur_kernel_and_constants():
    blur = GaussianBlur(9, 3.0)
    k = blur.kernel()
    assert k.shape == (9, 9)
    assert k.sum().item() == pytest.approx(1.0, abs=1e-14)
    torch.testing.assert_close(k, k.flip(0))
    torch.testing.assert_close(k, k.T)
    assert k[4, 4] == k.max()
    assert (k[4, 5] / k[4, 4]).item() == pytest.approx(math.exp(-1 / 18))
    x = torch.full((2, 3, 10, 10), 0.6, dtype=DT)
    torch.testing.assert_close(blur(x), x)  # reflect padding: constant everywhere, borders included
    delta = torch.zeros(1, 1, 15, 15, dtype=DT)
    delta[0, 0, 7, 7] = 1.0
    torch.testing.assert_close(blur(delta)[0, 0, 3:12, 3:12], k)  # interior impulse response is the kernel
    assert torch.equal(GaussianBlur(1, 2.0)(x), x)


def test_inpainting_zeroes_exactly_the_mask():
    x = _rand((2, 3, 8, 10), 8)
    y = BoxInpainting((2, 3, 4, 5))(x)
    inside = torch.zeros(8, 10, dtype=torch.bool)
    inside[2:6, 3:8] = True
    assert (y[..., inside] == 0).all()
    assert torch.equal(y[..., ~inside], x[..., ~inside])

    op = RandomInpainting(0.5, seed=1)
    y = op(x)
    m = op.mask(8, 10)
    assert torch.equal(y[..., ~m], torch.zeros_like(y[..., ~m]))
    assert torch.equal(y[..., m], x[..., m])
    assert (x != 0).all()


def test_random_mask_fraction_and_determinism():
    op = RandomInpainting(0.3, seed=11)
    m = op.mask(28, 28)
    assert (~m).sum().item() == round(0.3 * 784)
    assert torch.equal(m, RandomInpainting(0.3, seed=11).mask(28, 28))
    assert not torch.equal(m, RandomInpainting(0.3, seed=12).mask(28, 28))
    assert op.mask(8, 8).shape == (8, 8) and torch.equal(op.mask(28, 28), m)
    x = _rand((4, 3, 28, 28), 9)
    y = op(x)
    for c in range(3):  # shared across channels and batch
        assert torch.equal(y[:, c] == 0, (~m).expand(4, 28, 28))


def test_measure_noise():
    A = SuperResolution(2)
    x = _rand((4, 3, 32, 32), 10)
    assert torch.equal(A.measure(x), A(x))
    B = SuperResolution(2, noise_std=0.1)
    y1 = B.measure(x, generator=torch.Generator().manual_seed(0))
    y2 = B.measure(x, generator=torch.Generator().manual_seed(0))
    y3 = B.measure(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    resid = y1 - A(x)
    assert resid.std().item() == pytest.approx(0.1, rel=0.04)  # 3072 draws: sd of the estimate ≈ 1.3%
    assert abs(resid.mean().item()) < 0.01
    assert not B.measure(x.clone().requires_grad_()).requires_grad


def test_custom_operator_subclass_gets_measure_and_loss():
    class Square(Operator):
        def forward(self, x):
            return x**2

    A = Square(noise_std=0.0)
    x = _rand((2, 1, 4, 4), 12)
    torch.testing.assert_close(A.loss(A.measure(x))(x), torch.zeros(2, dtype=DT))
    with pytest.raises(NotImplementedError):
        A.adjoint(x)


@pytest.mark.parametrize("size", [8, 28])
@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_make_operator_defaults(name, size):
    op = make_operator(name, size, noise_std=0.05)
    assert isinstance(op, Operator) and op.noise_std == 0.05
    x = _rand((2, 1, size, size), 13)
    assert op(x).shape == op.output_shape(x.shape)
    assert set(OPERATORS) == {"sr2", "sr4", "deblur", "inpaint_box", "inpaint_random", "denoise"}


def test_make_operator_specific_defaults():
    assert make_operator("inpaint_box", 28).box == (7, 7, 14, 14)
    assert make_operator("inpaint_box", 8).box == (2, 2, 4, 4)
    blur = make_operator("deblur", 28)
    assert (blur.kernel_size, blur.blur_std) == (13, 1.75)
    assert make_operator("sr4", (8, 12))(torch.zeros(1, 1, 8, 12)).shape == (1, 1, 2, 3)


def test_bad_inputs_raise_with_the_bad_value():
    A = SuperResolution(2)
    x = torch.zeros(2, 1, 8, 8, dtype=DT)
    with pytest.raises(ValueError, match=r"\(2, 1, 4, 4\).*\(2, 1, 8, 8\)"):
        A.loss(torch.zeros(2, 1, 8, 8, dtype=DT))(x)
    with pytest.raises(ValueError, match=r"factor 4.*\(1, 1, 8, 6\)"):
        SuperResolution(4)(torch.zeros(1, 1, 8, 6))
    with pytest.raises(ValueError, match="-0.1"):
        GaussianBlur(noise_std=-0.1)
    with pytest.raises(ValueError, match="got 4"):
        GaussianBlur(4, 1.0)
    with pytest.raises(ValueError, match="got 0"):
        GaussianBlur(5, 0.0)
    with pytest.raises(ValueError, match="'sr3'.*deblur"):
        make_operator("sr3", 8)
    with pytest.raises(ValueError, match="got 0"):
        SuperResolution(0)
    with pytest.raises(ValueError, match="1.5"):
        RandomInpainting(1.5)
    with pytest.raises(ValueError, match=r"\(6, 0, 4, 4\).*\(8, 8\)"):
        BoxInpainting((6, 0, 4, 4))(x)
    with pytest.raises(ValueError, match="kernel_size 9"):
        GaussianBlur(9, 3.0)(torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match=r"\(8, 8\)"):
        Identity().output_shape((8, 8))
