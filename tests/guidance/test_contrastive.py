"""Timestep Guidance (Sadat et al. 2024) and Self-Guidance (Li et al. 2024b): ε̂ = ε + w (ε(x, t) - ε(x, t̃))."""

from __future__ import annotations

import pytest
import torch

from tagdiff import VPSchedule, sample_ddim
from tagdiff.data.gmm import GaussianMixture
from tagdiff.guidance import SelfGuidance, TimestepGuidance, guided_eps

F64 = torch.float64
SCH = VPSchedule.linear(1000)
MIX = GaussianMixture([[2.0, 0.0], [-2.0, 1.5]], stds=[0.5, 0.8], weights=[0.6, 0.4])
MODEL = MIX.eps_model(SCH)


def _x(n=5, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("t_int", [0, 400, 990])
def test_self_guidance_is_the_contrast_with_a_noisier_time_input(t_int):
    x, t, w, d = _x(), torch.full((5,), t_int), 0.7, 20
    got = guided_eps(MODEL, SCH, [SelfGuidance(w, d)])(x, t)
    eps, eps_tilde = MODEL(x, t), MODEL(x, (t + d).clamp(max=999))
    torch.testing.assert_close(got, eps + w * (eps - eps_tilde), rtol=1e-10, atol=1e-10)


def test_timestep_guidance_draws_its_own_perturbations():
    """t̃ = clamp(round(t + δ n)) with n from the term's generator (seeded): reproducible, and the sampler's noise
    stream is untouched (DDIM η = 0 with w = 0 equals the plain sampler)."""
    x, t, w, d = _x(), torch.full((5,), 500), 1.3, 50.0
    n = torch.randn(5, generator=torch.Generator().manual_seed(3), dtype=F64)
    t_tilde = (500 + d * n).round().clamp(0, 999).long()
    got = guided_eps(MODEL, SCH, [TimestepGuidance(w, d, seed=3)])(x, t)
    eps = MODEL(x, t)
    torch.testing.assert_close(got, eps + w * (eps - MODEL(x, t_tilde)), rtol=1e-10, atol=1e-10)
    grid = SCH.timesteps(10)
    plain = sample_ddim(MODEL, _x(), grid, SCH)
    assert torch.equal(sample_ddim(MODEL, _x(), grid, SCH, terms=[TimestepGuidance(0.0, d)]), plain)
    a = sample_ddim(MODEL, _x(), grid, SCH, terms=[TimestepGuidance(w, d, seed=1)])
    b = sample_ddim(MODEL, _x(), grid, SCH, terms=[TimestepGuidance(w, d, seed=1)])
    assert torch.equal(a, b) and (a - plain).abs().max() > 1e-3


@pytest.mark.parametrize("cls", [TimestepGuidance, SelfGuidance])
def test_bad_arguments_raise(cls):
    with pytest.raises(ValueError, match="delta"):
        cls(1.0, -1.0)
    with pytest.raises(ValueError, match="scale"):
        cls(float("nan"), 1.0)
