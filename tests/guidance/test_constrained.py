"""DPS as its Algorithm 1 (guidance after the clip), MPGD and DSG, each against a hand-written loop of its defining
algorithm (the DPS paper's Alg. 1 and code, the TFG benchmark's ``methods/mpgd.py``, the DSG authors'
``condition_methods.py``) on an exact Gaussian-mixture ε-model, in float64."""

from __future__ import annotations

import math

import pytest
import torch

from tagdiff import DSG, DPSGuidance, DPSStep, VPSchedule, mpgd, sample_ddim, sample_ddpm
from tagdiff.data.gmm import GaussianMixture

F64 = torch.float64
SCH = VPSchedule.linear(1000)
MIX = GaussianMixture([[2.0, 0.0], [-2.0, 1.5]], stds=[0.5, 0.8], weights=[0.6, 0.4])
MODEL = MIX.eps_model(SCH)
Y = torch.tensor([1.0, -1.0], dtype=F64)
TS = [999, 800, 600, 400, 200, 50]


def sq_loss(x0):
    """ℓ = ‖x0 − y‖² per sample (an inverse problem with A = identity)."""
    return ((x0 - Y.to(x0)) ** 2).sum(-1)


def noise(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype)


def x_T(n=6, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


def ab(t):
    return 1.0 if t < 0 else float(SCH.alpha_bar[t])


def x0_and_grad(x, t):
    """x̂_0(x_t) from the exact ε-model and ∇_{x_t} ℓ(x̂_0(x_t)) through the model."""
    x = x.detach().requires_grad_(True)
    eps = MODEL(x, torch.full((x.shape[0],), t))
    x0 = (x - math.sqrt(1 - ab(t)) * eps) / math.sqrt(ab(t))
    loss = sq_loss(x0)
    (g,) = torch.autograd.grad(loss.sum(), x)
    return x0.detach(), eps.detach(), g, loss.detach()


def dps_algorithm_1(x, scale, step_size, clip, seed):
    """The DPS paper's Alg. 1 on a strided grid: ancestral DDPM from the clipped x̂_0, then x −= ζ ∇ℓ, with ζ the
    score-equivalent s β/√α or a constant s (the DPS code's ``x_t -= norm_grad * scale``)."""
    rnd = noise(seed)
    for t, tp in zip(TS, TS[1:] + [-1]):
        x0, _, g, loss = x0_and_grad(x, t)
        x0c = x0.clamp(-clip, clip) if clip else x0
        a_t, a_p = ab(t), ab(tp)
        alpha, beta = a_t / a_p, 1 - a_t / a_p
        mean = math.sqrt(a_p) * beta / (1 - a_t) * x0c + math.sqrt(alpha) * (1 - a_p) / (1 - a_t) * x
        if tp >= 0:
            mean = mean + math.sqrt(max((1 - a_p) / (1 - a_t) * beta, 1e-20)) * rnd(x)
        zeta = scale * beta / math.sqrt(alpha) if step_size == "score" else scale
        x = mean - zeta * g
    return x


@pytest.mark.parametrize("step_size", ["score", "constant"])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_dps_step_is_the_papers_algorithm_1(step_size, clip):
    ours = sample_ddpm(MODEL, x_T(), torch.tensor(TS), SCH, terms=[DPSStep(sq_loss, 0.3, step_size=step_size)],
                       clip_x0=clip, randn_like=noise(1))
    ref = dps_algorithm_1(x_T(), 0.3, step_size, clip, 1)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)


def test_dps_step_equals_score_space_dps_without_clipping_and_keeps_the_guidance_with_it():
    """Unclipped, DDPM + DPSStep(ℓ, s) = DDPM + DPSGuidance(ℓ, s) (ζ_t = s β_t / √α_t is exactly what Δs adds to the
    DDPM mean); with a clip the score-space form loses guidance where x̂_0 is clipped, the after-clip form does not."""
    a = sample_ddpm(MODEL, x_T(), torch.tensor(TS), SCH, terms=[DPSStep(sq_loss, 0.3)], randn_like=noise(2))
    b = sample_ddpm(MODEL, x_T(), torch.tensor(TS), SCH, terms=[DPSGuidance(sq_loss, 0.3)], randn_like=noise(2))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    plain, after, before = (sample_ddpm(MODEL, x_T(), torch.tensor(TS), SCH, terms=terms, clip_x0=0.5,
                                        randn_like=noise(2))
                            for terms in ([], [DPSStep(sq_loss, 0.3)], [DPSGuidance(sq_loss, 0.3)]))
    fit = {k: float(sq_loss(v.clamp(-0.5, 0.5)).mean()) for k, v in (("plain", plain), ("after", after),
                                                                     ("before", before))}
    assert fit["after"] < fit["before"] < fit["plain"], fit


def test_mpgd_is_the_tfg_benchmarks_mpgd():
    """methods/mpgd.py: x0 += s ∇_{x0} log p(x0) (no gradient through the model), then the DDIM(η) step from
    (x0', ε) with the same noise."""
    s, eta = 0.2, 1.0
    rnd = noise(3)
    x = x_T()
    for t, tp in zip(TS, TS[1:] + [-1]):
        x0, eps, _, _ = x0_and_grad(x, t)
        z = x0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(-sq_loss(z).sum(), z)
        x0 = x0 + s * g
        a_t, a_p = ab(t), ab(tp)
        std = eta * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
        x = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - std**2) * eps + (std * rnd(x) if std > 0 else 0)
    ours = sample_ddim(MODEL, x_T(), torch.tensor(TS), SCH, eta=eta, terms=[mpgd(sq_loss, s)], randn_like=noise(3))
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("rate, interval", [(0.2, 1), (1.0, 2)])
def test_dsg_is_the_authors_spherical_step(rate, interval):
    """condition_methods.py::DSG per sample: d* = −r g/‖g‖, d_sample = σ z, x = μ + r (d_s + g_r (d* − d_s)) / ‖·‖, with
    r = √n σ_t, every ``interval``-th step; the DDIM(η = 1) mean from the clipped x̂_0."""
    rnd, x, clip = noise(4), x_T(), 1.0
    for i, (t, tp) in enumerate(zip(TS, TS[1:] + [-1])):
        x0, _, g, _ = x0_and_grad(x, t)
        a_t, a_p = ab(t), ab(tp)
        x0 = x0.clamp(-clip, clip)
        eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        std = math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
        mean = math.sqrt(a_p) * x0 + math.sqrt(max(1 - a_p - std**2, 0)) * eps
        if tp < 0:
            x = mean
            continue
        d_s = std * rnd(x)
        if i % interval:
            x = mean + d_s
            continue
        r = math.sqrt(2) * std
        d_star = -r * g / (g.norm(dim=1, keepdim=True) + 1e-8)
        mix = d_s + rate * (d_star - d_s)
        x = mean + r * mix / (mix.norm(dim=1, keepdim=True) + 1e-8)
    ours = sample_ddim(MODEL, x_T(), torch.tensor(TS), SCH, eta=1.0, clip_x0=clip,
                       terms=[DSG(sq_loss, rate, interval=interval)], randn_like=noise(4))
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-10)


def test_dsg_at_rate_zero_is_ddim():
    plain = sample_ddim(MODEL, x_T(), torch.tensor(TS), SCH, eta=1.0, randn_like=noise(5))
    zero = sample_ddim(MODEL, x_T(), torch.tensor(TS), SCH, eta=1.0, terms=[DSG(sq_loss, 0.0)], randn_like=noise(5))
    torch.testing.assert_close(zero, plain, rtol=0, atol=1e-12)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="step size"):
        DPSStep(sq_loss, 1.0, step_size="huge")
    with pytest.raises(ValueError, match="guidance_scale"):
        DPSStep(sq_loss, -1.0)
    with pytest.raises(ValueError, match=r"guidance_rate must be in \[0, 1\]"):
        DSG(sq_loss, 1.5)
    with pytest.raises(ValueError, match="eta > 0"):
        DSG(sq_loss, 0.5, eta=0.0)
    with pytest.raises(ValueError, match="guidance_scale"):
        mpgd(sq_loss, float("nan"))
