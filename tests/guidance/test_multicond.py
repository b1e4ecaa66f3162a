"""Multi-condition TAG (docs/notation.md §3.7, Props. B.1/B.2): reparameterisation against closed forms, and the three
predictor variants against plain TemporalAlignment."""

from __future__ import annotations

import pytest
import torch

from tagdiff import MLPTimePredictor, VPSchedule, sample_ddim, tls
from tagdiff.data.gmm import GaussianMixture
from tagdiff.guidance import (
    DPSGuidance,
    MultiConditionTAG,
    StepContext,
    TemporalAlignment,
    combined_loss,
    label_loss,
    reparameterize,
)

F64 = torch.float64
SCH = VPSchedule.linear(1000)
MIX = GaussianMixture([[4.0, 0.0], [-4.0, 2.0], [0.0, -5.0]], stds=[0.6, 1.0, 0.8], weights=[0.5, 0.3, 0.2])
MODEL = MIX.eps_model(SCH)
TP = MIX.time_posterior(SCH)  # exact, unconditional (num_classes None)
CTX = StepContext(SCH, MODEL)
T_MIXED = torch.tensor([80, 250, 400, 550, 700, 900])
TARGET = torch.tensor([1.0, -2.0], dtype=F64)


def _cond_predictor() -> MLPTimePredictor:
    torch.manual_seed(0)
    return MLPTimePredictor(2, 1000, hidden=16, num_layers=2, num_classes=3, cond_dim=4).double().eval()


CTP = _cond_predictor()


def _x(n: int = 6, seed: int = 0) -> torch.Tensor:
    return 2.5 * torch.randn(n, 2, dtype=F64, generator=torch.Generator().manual_seed(seed))


def quad(y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((y - TARGET) ** 2).sum(-1)


def _clean_logits(y: torch.Tensor) -> torch.Tensor:
    return MIX.class_logits(y, torch.full((y.shape[0],), -1), SCH)


LABEL = label_loss(_clean_logits, 2)


def _x0_hat_jacobian(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Analytic x0_hat and d x0_hat / d x_t of the mixture: J = Σ r_k c_k I + Σ_k r_k m_k (g_k - ḡ)^T."""
    ab = SCH.alpha_bar[t][:, None]
    a = ab.sqrt()
    r = torch.softmax(MIX.component_log_probs(x, ab[:, 0]), -1)                   # (B, K)
    v = ab * MIX.stds ** 2 + 1 - ab                                               # (B, K)
    c = a * MIX.stds ** 2 / v                                                     # (B, K)
    diff = x[:, None, :] - a[..., None] * MIX.means[None]                         # (B, K, D)
    m = MIX.means[None] + c[..., None] * diff                                     # (B, K, D)
    g = -diff / v[..., None]
    g_bar = (r[..., None] * g).sum(1, keepdim=True)
    x0 = (r[..., None] * m).sum(1)
    J = (r * c).sum(1)[:, None, None] * torch.eye(2, dtype=F64) + torch.einsum("bk,bki,bkj->bij", r, m, g - g_bar)
    return x0, J


# ---------------------------------------------------------------- reparameterize
@pytest.mark.parametrize("eta_schedule", ["one_minus_alpha_bar", "constant"])
@pytest.mark.parametrize("ctx", [CTX, None])
def test_eta_zero_returns_x_bit_for_bit(eta_schedule, ctx):
    x = _x()
    out = reparameterize(x, T_MIXED, quad, 0.0, SCH, eta_schedule, ctx=ctx)
    assert out is x and torch.equal(out, _x())


@pytest.mark.parametrize("eta_schedule", ["one_minus_alpha_bar", "constant", lambda t, s: 0.5 + t.double() / 1000])
def test_reparameterize_through_model_matches_analytic_jacobian(eta_schedule):
    x, eta = _x(), 0.7
    x0, J = _x0_hat_jacobian(x, T_MIXED)
    torch.testing.assert_close(x0, MIX.x0_hat(x, T_MIXED, SCH), rtol=1e-12, atol=1e-12)  # sanity of the helper
    grad = torch.einsum("bij,bi->bj", J, x0 - TARGET)                              # ∇_x ½||x0_hat(x) - y*||²
    ab = SCH.alpha_bar[T_MIXED]
    w = {"one_minus_alpha_bar": 1 - ab, "constant": torch.ones_like(ab)}.get(eta_schedule) if isinstance(
        eta_schedule, str) else 0.5 + T_MIXED.double() / 1000.0
    expected = x - (eta ** 2 * w)[:, None] * grad
    out = reparameterize(x, T_MIXED, quad, eta, SCH, eta_schedule, ctx=CTX)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert not out.requires_grad and out.dtype == F64


def test_reparameterize_finite_difference_and_loss_decrease():
    x, t, h = _x(4, seed=3), torch.full((4,), 500), 1e-6
    grad_fd = torch.stack([(quad(MIX.x0_hat(x + h * e, t, SCH)) - quad(MIX.x0_hat(x - h * e, t, SCH))) / (2 * h)
                           for e in torch.eye(2, dtype=F64)], -1)
    out = reparameterize(x, t, quad, 1.0, SCH, "constant", ctx=CTX)
    torch.testing.assert_close(out, x - grad_fd, rtol=1e-6, atol=1e-7)
    small = reparameterize(x, t, quad, 0.1, SCH, ctx=CTX)       # a small step lowers ℓ(x0_hat(x')) per sample
    assert (quad(MIX.x0_hat(small, t, SCH)) < quad(MIX.x0_hat(x, t, SCH))).all()


def test_reparameterize_on_x_directly():
    x = _x()
    out = reparameterize(x, T_MIXED, quad, 0.9, SCH)            # ctx=None: ∇_x ½||x - y*||² = x - y*
    torch.testing.assert_close(out, x - (0.81 * (1 - SCH.alpha_bar[T_MIXED]))[:, None] * (x - TARGET),
                               rtol=1e-13, atol=1e-13)


def test_reparameterize_is_per_sample():
    x = _x()
    full = reparameterize(x, T_MIXED, LABEL, 0.8, SCH, ctx=CTX)
    for i in range(x.shape[0]):
        alone = reparameterize(x[i:i + 1], T_MIXED[i:i + 1], LABEL, 0.8, SCH, ctx=CTX)
        torch.testing.assert_close(alone, full[i:i + 1], rtol=1e-12, atol=1e-12)


def test_combined_loss_sums_per_sample_losses():
    x0 = _x()
    torch.testing.assert_close(combined_loss(quad, LABEL)(x0), quad(x0) + LABEL(x0), rtol=0, atol=0)
    torch.testing.assert_close(combined_loss(quad, LABEL, weights=[2.0, -0.5])(x0), 2 * quad(x0) - 0.5 * LABEL(x0))
    # the reparameterisation is linear in the loss: one step on ℓ1 + ℓ2 moves by the sum of both gradients
    x = _x(seed=1)
    both = reparameterize(x, T_MIXED, combined_loss(quad, LABEL), 0.6, SCH, ctx=CTX)
    d1 = reparameterize(x, T_MIXED, quad, 0.6, SCH, ctx=CTX) - x
    d2 = reparameterize(x, T_MIXED, LABEL, 0.6, SCH, ctx=CTX) - x
    torch.testing.assert_close(both, x + d1 + d2, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- MultiConditionTAG
@pytest.mark.parametrize("c", [0, 2, torch.tensor([0, 1, 2, -1, 1, 0])])
def test_joint_equals_temporal_alignment_with_condition(c):
    x, t = _x(), T_MIXED
    ctx = StepContext(SCH, MODEL, t=t)
    out = MultiConditionTAG(CTP, 0.7, "joint", condition=c).pre(x, t, ctx)
    assert torch.equal(out, TemporalAlignment(CTP, 0.7, condition=c).pre(x, t, ctx))
    assert not torch.equal(out, x)


def test_joint_null_condition_equals_condition_none():
    x, t = _x(), T_MIXED
    ctx = StepContext(SCH, MODEL, t=t)
    out = MultiConditionTAG(CTP, 0.7, "joint", condition=-1).pre(x, t, ctx)
    assert torch.equal(out, TemporalAlignment(CTP, 0.7).pre(x, t, ctx))
    assert not torch.equal(out, MultiConditionTAG(CTP, 0.7, "joint", condition=1).pre(x, t, ctx))  # c matters


def test_single_and_unconditional_with_eta_zero_equal_plain_tag():
    x, t = _x(), T_MIXED
    ctx = StepContext(SCH, MODEL, t=t)
    single = MultiConditionTAG(CTP, 0.9, "single", condition=1, losses=[quad], reparam_scale=0.0)
    assert torch.equal(single.pre(x, t, ctx), TemporalAlignment(CTP, 0.9, condition=1).pre(x, t, ctx))
    uncond = MultiConditionTAG(TP, 0.9, "unconditional", losses=[quad, LABEL], reparam_scale=0.0)
    assert torch.equal(uncond.pre(x, t, ctx), TemporalAlignment(TP, 0.9).pre(x, t, ctx))


def test_tls_is_taken_at_the_reparameterised_point_and_applied_to_x():
    x, t, omega = _x(), T_MIXED, 0.9
    ctx = StepContext(SCH, MODEL, t=t)
    w = (omega * (1 - SCH.alpha_bar[t]))[:, None]
    single = MultiConditionTAG(CTP, omega, "single", condition=1, losses=[quad], reparam_scale=0.8).pre(x, t, ctx)
    x1 = reparameterize(x, t, quad, 0.8, SCH, ctx=ctx)
    torch.testing.assert_close(single, x + w * tls(CTP, x1, t, torch.tensor(1)), rtol=1e-12, atol=1e-12)
    uncond = MultiConditionTAG(TP, omega, "unconditional", losses=[quad, LABEL], reparam_scale=0.8,
                               reparam_scale_tilde=0.5,
                               reparam_schedule="constant").pre(x, t, ctx)
    x2 = reparameterize(reparameterize(x, t, quad, 0.8, SCH, "constant", ctx), t, LABEL, 0.5, SCH, "constant", ctx)
    torch.testing.assert_close(uncond, x + w * tls(TP, x2, t), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(uncond, TemporalAlignment(TP, omega).pre(x, t, ctx))  # η > 0 changes the result


@pytest.mark.parametrize("variant,kw", [("joint", {"condition": 1}),
                                        ("single", {"condition": 2, "losses": [quad]}),
                                        ("unconditional", {"losses": [quad, LABEL]})])
def test_omega_zero_and_outside_window_are_identity(variant, kw):
    x, t = _x(), T_MIXED
    ctx = StepContext(SCH, MODEL, t=t)
    for term in (MultiConditionTAG(CTP, 0.0, variant, reparam_scale=0.5, **kw),
                 MultiConditionTAG(CTP, 2.0, variant, reparam_scale=0.5, window=(1, 50), **kw)):
        out = term.pre(x, t, ctx)
        assert out is x and torch.equal(out, _x())


def test_in_sampler_omega_zero_is_bit_identical_and_batch_independent():
    x, grid = 3 * torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(7)), SCH.timesteps(8)
    dps = DPSGuidance(combined_loss(quad, LABEL), 0.05)
    ref = sample_ddim(MODEL, x, grid, SCH, terms=[dps])
    off = sample_ddim(MODEL, x, grid, SCH, terms=[MultiConditionTAG(TP, 0.0, "unconditional", losses=[quad]), dps])
    assert torch.equal(off, ref)
    tag = MultiConditionTAG(CTP, 0.3, "single", condition=2, losses=[quad], reparam_scale=0.5)
    out = sample_ddim(MODEL, x, grid, SCH, terms=[tag, dps])
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    alone = sample_ddim(MODEL, x[1:2], grid, SCH, terms=[tag, dps])
    torch.testing.assert_close(alone, out[1:2], rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- bad input
def test_bad_eta_raises_naming_the_value():
    with pytest.raises(ValueError, match="-0.5"):
        reparameterize(_x(), T_MIXED, quad, -0.5, SCH, ctx=CTX)
    with pytest.raises(ValueError, match="nan"):
        reparameterize(_x(), T_MIXED, quad, float("nan"), SCH)
    with pytest.raises(ValueError, match="'cosine'"):
        reparameterize(_x(), T_MIXED, quad, 1.0, SCH, "cosine")
    with pytest.raises(ValueError, match="-2.0"):
        MultiConditionTAG(CTP, 1.0, "single", condition=0, losses=[quad], reparam_scale=-2.0)
    with pytest.raises(ValueError, match="-0.1"):
        MultiConditionTAG(TP, 1.0, "unconditional", losses=[quad, quad], reparam_scale_tilde=-0.1)


def test_bad_variant_and_condition_raise():
    with pytest.raises(ValueError, match="'both'"):
        MultiConditionTAG(CTP, 1.0, "both", condition=0)
    with pytest.raises(ValueError, match=r"\[3\].*0\.\.2"):
        MultiConditionTAG(CTP, 1.0, "joint", condition=3)
    with pytest.raises(ValueError, match=r"\[-2\].*0\.\.2"):
        MultiConditionTAG(CTP, 1.0, "single", condition=torch.tensor([0, -2]), losses=[quad])
    with pytest.raises(ValueError, match="num_classes=None"):
        MultiConditionTAG(TP, 1.0, "joint", condition=0)
    with pytest.raises(ValueError, match="without a condition"):
        MultiConditionTAG(CTP, 1.0, "unconditional", condition=0, losses=[quad])
    with pytest.raises(ValueError, match="needs a condition"):
        MultiConditionTAG(CTP, 1.0, "single", losses=[quad])
    with pytest.raises(ValueError, match="at least one loss"):
        MultiConditionTAG(CTP, 1.0, "single", condition=0)
    with pytest.raises(ValueError, match="takes no losses"):
        MultiConditionTAG(CTP, 1.0, "joint", condition=0, losses=[quad])


def test_check_and_loss_shape_errors():
    tag = MultiConditionTAG(CTP, 1.0, "joint", condition=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="batch size 6"):
        tag.check(_x(), SCH)
    with pytest.raises(ValueError, match="T=10"):
        tag.check(_x(3), VPSchedule.linear(10))
    with pytest.raises(ValueError, match="shape"):
        MultiConditionTAG(CTP, 1.0, "joint", condition=0).check(torch.zeros(2, 3, dtype=F64), SCH)
    with pytest.raises(ValueError, match=r"per-sample with shape \(6,\)"):
        reparameterize(_x(), T_MIXED, lambda y: quad(y).sum(), 1.0, SCH, ctx=CTX)
    with pytest.raises(ValueError, match="2 finite numbers"):
        combined_loss(quad, LABEL, weights=[1.0])
