"""σ time predictors for flow models (models/time_predictor.py, "Over σ"): training batches, a learned toy σ-predictor
against the exact σ posterior, TAG's ω in flow form."""

from __future__ import annotations

import pytest
import torch

from tagdiff import GaussianMixture, MLPTimePredictor, Strength
from tagdiff.data.gmm_flow import FlowGaussianMixture
from tagdiff.guidance.temporal import check_time_predictor
from tagdiff.models.time_predictor import flow_time_batch, flow_time_loss
from tagdiff.sampling.flow import FlowSchedule

GMM = GaussianMixture([[2.0, 2.0], [-2.0, -1.0]], stds=[0.5, 0.7])


def test_flow_batches_are_the_vp_view_with_the_bin_of_sigma_as_target():
    flow = FlowSchedule(num_train_timesteps=20)
    x0 = torch.randn(4096, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x, t = flow_time_batch(x0, flow, "logit_normal", torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    sigma = flow.sample_sigma(4096, "logit_normal", g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    r = flow.r(sigma)[:, None]
    assert torch.allclose(x, ((1 - sigma[:, None]) * x0 + sigma[:, None] * noise) / r, atol=1e-14)
    assert torch.equal(t, flow.class_of(sigma)) and t.min() >= 0 and t.max() <= 19
    with pytest.raises(ValueError, match="has 30 classes but the flow schedule has T=20"):
        flow_time_loss(MLPTimePredictor(2, 30), x0.float(), flow)


def test_tag_omega_in_flow_form_is_omega0_sigma2_over_r2():
    """ω_t = ω_0 (1 - ᾱ_t) on the flow's VP schedule is ω_0 σ_t² / ((1 - σ_t)² + σ_t²)."""
    flow = FlowSchedule()
    t = torch.tensor([0, 99, 499, 998, 999])
    sig = flow.train_sigmas[t]
    w = Strength(2.0, "one_minus_alpha_bar")(t, flow.vp_schedule, torch.zeros(5, 1, dtype=torch.float64))
    assert torch.allclose(w.reshape(-1), 2.0 * sig**2 / ((1 - sig) ** 2 + sig**2), atol=1e-12)


def test_learned_sigma_predictor_is_within_two_percent_of_the_exact_posterior():
    """A 4-layer MLP over T = 100 σ bins, trained 1200 seeded steps on CPU (about 10 s) with SD3's logit-normal σ
    density, against the exact posterior p(t | x_VP) ∝ π(t) p_{σ_t}(x_VP) with that density's bin masses as prior:
    held-out cross-entropies (continuous σ draws, nearest-bin targets) within 2 % (measured ratio ≈ 1.0002)."""
    torch.manual_seed(0)
    flow = FlowSchedule(num_train_timesteps=100)
    net = MLPTimePredictor(2, 100, hidden=128, num_layers=4)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    steps = 1200
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = flow_time_loss(net, GMM.sample(1024, g)[0], flow, "logit_normal", g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.schedule = flow.vp_schedule   # as a checkpoint records it: TAG checks it against the sampler's
    exact = FlowGaussianMixture(GMM).time_posterior(flow, "logit_normal")
    ge = torch.Generator().manual_seed(123)
    x, t = flow_time_batch(GMM.sample(20_000, ge)[0].double(), flow, "logit_normal", ge)
    with torch.no_grad():
        ce_learned = torch.nn.functional.cross_entropy(net(x.float()).double(), t).item()
        ce_exact = torch.nn.functional.cross_entropy(exact(x), t).item()
    assert abs(ce_learned / ce_exact - 1) < 0.02, (ce_learned, ce_exact)
    check_time_predictor(net, x[:2].float(), flow.vp_schedule)
    check_time_predictor(exact, x[:2], flow.vp_schedule)
