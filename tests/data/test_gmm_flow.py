"""tagdiff.data.gmm_flow: the exact flow mixture against finite differences and against the VP mixture through the
scaling x / r, ᾱ(σ) (float64)."""

from __future__ import annotations

import pytest
import torch

from tagdiff import GaussianMixture
from tagdiff.data.gmm_flow import FlowGaussianMixture
from tagdiff.guidance import tls
from tagdiff.sampling.flow import FlowSchedule

GMM = GaussianMixture([[2.0, 1.0], [-1.5, -2.0], [0.5, -3.0]], stds=[0.5, 0.8, 0.3], weights=[0.3, 0.5, 0.2])
FGMM = FlowGaussianMixture(GMM)
FLOW = FlowSchedule(num_train_timesteps=100)


def _x(n=6, seed=0, scale=2.0):
    return scale * torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _fd_grad(f, x, h=1e-5):
    """Central differences of a per-sample scalar function f: (B, D) -> (B,)."""
    g = torch.zeros_like(x)
    for d in range(x.shape[1]):
        e = torch.zeros_like(x)
        e[:, d] = h
        g[:, d] = (f(x + e) - f(x - e)) / (2 * h)
    return g


@pytest.mark.parametrize("prior", [None, "uniform", "logit_normal"])
@pytest.mark.parametrize("space", ["vp", "flow"])
def test_sigma_tls_matches_finite_differences(prior, space):
    """The closed-form TLS (Thm 3.3 form) equals central differences of log p(t | x) to 1e-6 (measured ~1e-9)."""
    x = _x()
    t = torch.tensor([0, 5, 30, 60, 90, 99])

    def log_post(z):
        logits = FGMM.sigma_logits(z, FLOW, prior, space)
        return torch.log_softmax(logits, -1)[torch.arange(z.shape[0]), t]

    closed = FGMM.sigma_tls(x, t, FLOW, prior, space)
    assert (closed - _fd_grad(log_post, x)).abs().max() < 1e-6
    if space == "vp":  # TAG's tls() on the exact posterior (autograd) is the same vector
        assert (tls(FGMM.time_posterior(FLOW, prior), x, t) - closed).abs().max() < 1e-10


def test_score_and_velocity_match_finite_differences_and_the_velocity_identities():
    x, sigma = _x(8), torch.linspace(0.05, 1.0, 8, dtype=torch.float64)
    assert (FGMM.score(x, sigma) - _fd_grad(lambda z: FGMM.log_prob(z, sigma), x)).abs().max() < 1e-6
    s = sigma[:, None]
    v = FGMM.velocity(x, sigma)
    assert torch.allclose(-(x + (1 - s) * v) / s, FGMM.score(x, sigma), atol=1e-12)


def test_flow_mixture_is_the_vp_mixture_through_x_over_r():
    """p_σ(x) = r^{-D} p^VP_{ᾱ(σ)}(x / r): the score is score^VP(x / r) / r, ε̂ and x̂_0 are the VP mixture's at x / r,
    and the VP-view σ logits are the VP time logits on the flow's VP schedule (equal class masses)."""
    x = _x(5)
    vp = FLOW.vp_schedule
    for t in (0, 17, 50, 98):
        sigma = float(FLOW.train_sigmas[t])
        r = float(FlowSchedule.r(torch.tensor(sigma, dtype=torch.float64)))
        tt = torch.full((5,), t)
        assert torch.allclose(FGMM.score(x, sigma), GMM.score(x / r, tt, vp) / r, atol=1e-12)
        assert torch.allclose(FGMM.eps_hat(x, sigma), GMM.eps(x / r, tt, vp), atol=1e-12)
        assert torch.allclose(FGMM.x0_hat(x, sigma), GMM.x0_hat(x / r, tt, vp), atol=1e-12)
        assert torch.allclose(FGMM.velocity(x, sigma), GMM.eps(x / r, tt, vp) - GMM.x0_hat(x / r, tt, vp), atol=1e-12)
        assert torch.allclose(FGMM.log_prob(x, sigma), GMM.log_prob(x / r, tt, vp) - 2 * torch.log(torch.tensor(r)),
                              atol=1e-12)
    # σ = 1 (ᾱ = 0): the marginal is N(0, I), whatever the data
    assert torch.allclose(FGMM.score(x, 1.0), -x, atol=1e-12)
    logits = FGMM.sigma_logits(x, FLOW)
    assert torch.allclose(torch.log_softmax(logits, -1), torch.log_softmax(GMM.time_logits(x, vp), -1), atol=1e-9)


def test_priors_enter_the_logits_as_log_masses_and_are_checked():
    x = _x(4)
    base = FGMM.sigma_logits(x, FLOW)
    ln = FGMM.sigma_logits(x, FLOW, "logit_normal")
    assert torch.allclose(ln - base, (FLOW.sigma_prior("logit_normal") * 100).log().expand(4, -1), atol=1e-12)
    with pytest.raises(ValueError, match="unknown sigma density"):
        FGMM.sigma_logits(x, FLOW, "gamma")
    with pytest.raises(ValueError, match="summing to 1"):
        FGMM.time_posterior(FLOW, torch.ones(100))
    with pytest.raises(ValueError, match="unknown posterior space"):
        FGMM.sigma_logits(x, FLOW, space="sigma")
