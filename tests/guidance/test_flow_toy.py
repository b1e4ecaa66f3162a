"""The paper's toy drift experiment (docs/notation.md §6.1) on the flow path: the two-Gaussian mixture sampled by
flow Euler (100 steps, the exact velocity), the drift -0.01 x before every step, TAG with the exact σ posterior."""

from __future__ import annotations

import pytest
import torch

from tagdiff import LinearDrift, TemporalAlignment, wasserstein1
from tagdiff.data.gmm import toy_mixture
from tagdiff.data.gmm_flow import FlowGaussianMixture
from tagdiff.sampling.flow import FlowSchedule, sample_flow


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_tag_with_the_exact_sigma_posterior_at_least_halves_the_drifts_w1(shift):
    """ω_0 = 10 was chosen on another seed (x_T seed 0, data seed 1; ω_0 ∈ {1, 2, 5, 10, 20, 50}). Measured here
    (500 samples, x_T seed 2, data seed 3): shift 1: no drift 1.12, drift 6.97, drift + TAG 2.66; shift 3: 1.09, 5.23,
    1.50 (the no-drift W1 is the 500-sample noise floor)."""
    gmm = toy_mixture()
    fgmm = FlowGaussianMixture(gmm)
    flow = FlowSchedule(shift=shift)
    model = fgmm.velocity_model(flow)
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(2))
    ref, _ = gmm.sample(500, torch.Generator().manual_seed(3))
    clean = wasserstein1(sample_flow(model, x, flow, 100), ref)
    drift = wasserstein1(sample_flow(model, x, flow, 100, terms=[LinearDrift(-0.01)]), ref)
    tag = wasserstein1(sample_flow(model, x, flow, 100,
                                   terms=[LinearDrift(-0.01), TemporalAlignment(fgmm.time_posterior(flow), 10.0)]),
                       ref)
    assert clean < 1.5 < 4.0 < drift and tag < drift / 2, (clean, drift, tag)


@pytest.mark.parametrize("y", [0, 1])
def test_classifier_guidance_on_a_flow_with_the_exact_sigma_aware_classifier_samples_the_class(y):
    """Classifier guidance on a flow with the exact classifier of its VP view (what a σ-aware noisy classifier
    learns) at scale 1 turns the mixture's flow into the flow of component y: ∇ log p(x) + ∇ log p(y | x) =
    ∇ log p(x | y). On a grid of σ bins the guided Euler run equals the component's own flow run (float64)."""
    from tagdiff import ClassifierGuidance, GaussianMixture

    gmm = toy_mixture()
    flow = FlowSchedule()
    ts = torch.tensor([998, 899, 699, 499, 299, 149, 49, 9])
    sigmas = torch.cat([(ts + 1).double() / 1000, torch.zeros(1, dtype=torch.float64)])
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    clf = gmm.classifier(flow.vp_schedule)
    target = torch.full((64,), y)
    with torch.enable_grad():
        got = sample_flow(FlowGaussianMixture(gmm).velocity_model(flow), x, flow, sigmas=sigmas,
                          terms=[ClassifierGuidance(clf, target, 1.0)])
    component = GaussianMixture(gmm.means[y:y + 1], stds=gmm.stds[y:y + 1])
    want = sample_flow(FlowGaussianMixture(component).velocity_model(flow), x, flow, sigmas=sigmas)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    unguided = sample_flow(FlowGaussianMixture(gmm).velocity_model(flow), x, flow, sigmas=sigmas)
    assert (unguided - want).abs().max() > 1.0
