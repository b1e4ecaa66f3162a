"""tagdiff.sampling.flow: diffusers' flow σ grids, Euler / Heun flow steps against FlowMatchEuler / FlowMatchHeun,
the VP view the terms see, and the velocity conversions, on an exact flow mixture (float64).

diffusers keeps its σs in float32 and rounds the sample to float32 inside every ``step``: float64 runs agree with it
to float32 precision (measured max |Δ| ≤ 1.1e-6 over whole runs on states of size ~3, ≤ 2e-7 per step)."""

from __future__ import annotations

import diffusers
import pytest
import torch

from tagdiff import LinearDrift, TemporalAlignment
from tagdiff.data.gmm import GaussianMixture
from tagdiff.data.gmm_flow import FlowGaussianMixture
from tagdiff.guidance import ClassifierGuidance
from tagdiff.sampling.flow import FlowModel, FlowSchedule, flux_mu, sample_flow
from tagdiff.sampling.predictions import eps_and_x0, from_eps
from tagdiff.sampling.terms import StepContext

GMM = GaussianMixture([[2.0, 1.0], [-1.5, -2.0]], stds=[0.5, 0.8], weights=[0.3, 0.7])
FGMM = FlowGaussianMixture(GMM)
CASES = [({}, None), ({"shift": 3.0}, None), ({"use_dynamic_shifting": True}, flux_mu(1024))]


def _noise(n=8, seed=0):
    return torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _diffusers_loop(sched, model, x, generator=None):
    """The loop of diffusers' flow pipelines (SD3, Flux), written out."""
    for t in sched.timesteps:
        kw = {} if generator is None else {"generator": generator}
        x = sched.step(model(x, t.expand(x.shape[0])), t, x, **kw).prev_sample
    return x


@pytest.mark.parametrize("kw,mu", CASES + [({"shift": 3.0, "shift_terminal": 0.1}, None)])
@pytest.mark.parametrize("n", [1, 10, 50])
def test_sigma_grids_are_diffusers_set_timesteps_in_float64(kw, mu, n):
    if kw.get("shift_terminal") and n == 1:  # diffusers: 0 / 0 = NaN; tagdiff refuses
        with pytest.raises(ValueError, match="shift_terminal cannot stretch"):
            FlowSchedule(**kw).sigmas(n, mu)
        return
    ours = FlowSchedule(**kw).sigmas(n, mu)
    ref = diffusers.FlowMatchEulerDiscreteScheduler(**kw)
    ref.set_timesteps(n, mu=mu)
    assert ours.dtype == torch.float64 and torch.equal(ours.float(), ref.sigmas)
    assert torch.allclose(FlowSchedule(**kw).timesteps(n, mu).float(), ref.timesteps, rtol=1e-6, atol=0)
    if not kw.get("use_dynamic_shifting") and not kw.get("shift_terminal"):
        heun = diffusers.FlowMatchHeunDiscreteScheduler(**kw)
        heun.set_timesteps(n)
        assert torch.equal(ours.float(), heun.sigmas.unique_consecutive())


@pytest.mark.parametrize("kw,mu", CASES)
@pytest.mark.parametrize("n", [10, 50])
def test_euler_equals_flow_match_euler_step_for_step(kw, mu, n):
    flow = FlowSchedule(**kw)
    model = FGMM.velocity_model(flow)
    ref = diffusers.FlowMatchEulerDiscreteScheduler(**kw)
    ref.set_timesteps(n, mu=mu)
    x = _noise()
    assert (sample_flow(model, x, flow, n, mu=mu) - _diffusers_loop(ref, model, x.clone())).abs().max() < 2e-6
    ref = diffusers.FlowMatchEulerDiscreteScheduler(**kw)
    ref.set_timesteps(n, mu=mu)
    sig = flow.sigmas(n, mu)
    for i, t in enumerate(ref.timesteps):  # one step each, from diffusers' own state
        ours = sample_flow(model, x, flow, sigmas=sig[i:i + 2])
        x = ref.step(model(x, t.expand(x.shape[0])), t, x).prev_sample
        assert (ours - x).abs().max() < 5e-7


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [10, 50])
def test_heun_equals_flow_match_heun(shift, n):
    flow = FlowSchedule(shift=shift)
    model = FGMM.velocity_model(flow)
    ref = diffusers.FlowMatchHeunDiscreteScheduler(shift=shift)
    ref.set_timesteps(n)
    x = _noise()
    calls = []
    counted = FlowModel(lambda z, t: calls.append(1) or model(z, t))
    out = sample_flow(counted, x, flow, n, method="heun")
    assert len(calls) == len(ref.timesteps) == 2 * n - 1
    assert (out - _diffusers_loop(ref, model, x.clone())).abs().max() < 2e-6


def test_stochastic_euler_equals_stochastic_sampling_with_the_same_noise():
    flow = FlowSchedule(shift=3.0)
    model = FGMM.velocity_model(flow)
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    ref.set_timesteps(10)
    x = _noise()
    expected = _diffusers_loop(ref, model, x.clone(), torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    ours = sample_flow(model, x, flow, 10, stochastic=True,
                       randn_like=lambda a: torch.randn(a.shape, generator=g, dtype=torch.float32).to(a.dtype))
    assert (ours - expected).abs().max() < 1e-6


def test_no_term_run_is_the_plain_float64_euler_loop_and_tag_at_omega_zero_is_bit_identical():
    flow = FlowSchedule(shift=3.0)
    model = FGMM.velocity_model(flow)
    x = _noise()
    sig = flow.sigmas(20)
    y = x.clone()
    for s, s_next in zip(sig[:-1].tolist(), sig[1:].tolist(), strict=True):
        y = y + (s_next - s) * model(y, torch.full((8,), 1000 * s, dtype=torch.float64))
    plain = sample_flow(model, x, flow, 20)
    assert (plain - y).abs().max() < 1e-13
    tag0 = sample_flow(model, x, flow, 20, terms=[TemporalAlignment(FGMM.time_posterior(flow), omega=0.0)])
    assert torch.equal(plain, tag0)


def test_terms_see_the_vp_view_and_a_correction_moves_the_flow_state_by_r():
    """One Euler step from σ = 0.6 with TAG (Alg. 1): TAG corrects the VP view x / r with the exact σ posterior's TLS
    at the class of σ, with ω = ω_0 (1 - ᾱ_t); the flow state moves by r times that."""
    flow = FlowSchedule()
    model, tp = FGMM.velocity_model(flow), FGMM.time_posterior(flow)
    x, s, omega = _noise(), 0.6, 3.0
    seen = []
    out = sample_flow(model, x, flow, sigmas=[s, 0.0], terms=[TemporalAlignment(tp, omega)],
                      callback=lambda info: seen.append(info))
    r = float(flow.r(torch.tensor(s, dtype=torch.float64)))
    assert seen[0].timestep == 599 and torch.allclose(seen[0].x, x / r, rtol=1e-14, atol=0)
    ab = float(flow.vp_schedule.alpha_bar[599])
    assert ab == pytest.approx(float(flow.alpha_bar(torch.tensor(s, dtype=torch.float64))), rel=1e-12)
    tls = FGMM.sigma_tls(x / r, torch.full((8,), 599), flow)
    x1 = x + r * omega * (1 - ab) * tls
    expected = x1 - s * model(x1, torch.full((8,), 600.0, dtype=torch.float64))
    assert (out - expected).abs().max() < 1e-12


def test_drift_and_tag_compose_on_flows():
    flow = FlowSchedule(shift=3.0)
    model, tp = FGMM.velocity_model(flow), FGMM.time_posterior(flow)
    x = _noise(64)
    plain = sample_flow(model, x, flow, 10)
    drifted = sample_flow(model, x, flow, 10, terms=[LinearDrift(-0.05)])
    tagged = sample_flow(model, x, flow, 10, terms=[LinearDrift(-0.05), TemporalAlignment(tp, 1.0)])
    assert not torch.equal(plain, drifted) and not torch.equal(drifted, tagged) and torch.isfinite(tagged).all()


def test_velocity_conversions_in_flow_space_and_in_the_vp_view():
    """ε = x + (1 - σ) v, x̂_0 = x - σ v, score = -(x + (1 - σ) v) / σ against the mixture's own closed forms; the
    loop's "flow_prediction" conversion of the VP view gives the same (ε̂, x̂_0), and from_eps inverts it."""
    x, sigma = _noise(16), torch.linspace(0.05, 1.0, 16, dtype=torch.float64)
    s = sigma[:, None]
    v = FGMM.velocity(x, sigma)
    eps, x0 = FGMM.eps_hat(x, sigma), FGMM.x0_hat(x, sigma)
    assert torch.allclose(x + (1 - s) * v, eps, atol=1e-12)
    assert torch.allclose(x - s * v, x0, atol=1e-12)
    assert torch.allclose(-(x + (1 - s) * v) / s, FGMM.score(x, sigma), atol=1e-12)
    r, ab = FlowSchedule.r(s), FlowSchedule.alpha_bar(s)
    e2, x02 = eps_and_x0(v, x / r, ab, "flow_prediction")
    assert torch.allclose(e2, eps, atol=1e-12) and torch.allclose(x02, x0, atol=1e-12)
    keep = sigma < 1  # from ε̂ alone x̂_0 needs ᾱ > 0
    assert torch.allclose(from_eps(eps, x / r, ab, "flow_prediction")[keep], v[keep], atol=1e-10)


def test_flow_model_wraps_a_diffusers_convention_model_into_the_vp_view():
    flow = FlowSchedule()
    model = FGMM.velocity_model(flow)
    wrapped = FlowModel(model)
    x = _noise()
    s = torch.tensor(0.3, dtype=torch.float64)
    r = FlowSchedule.r(s)
    t = torch.full((8,), 300.0, dtype=torch.float64)
    assert torch.allclose(wrapped(x / r, t), model(x, t), atol=1e-12)
    # an integer class t stands for σ = (t + 1) / T: the same call as the float timestep t + 1
    assert torch.allclose(wrapped(x / r, torch.full((8,), 299)), wrapped(x / r, torch.full((8,), 300.0)), atol=1e-6)


def test_flow_schedule_vp_view_classes_and_priors():
    flow = FlowSchedule(num_train_timesteps=10)
    sig = flow.train_sigmas
    assert torch.allclose(flow.vp_schedule.alpha_bar, flow.alpha_bar(sig), atol=1e-15)
    assert float(flow.vp_schedule.alpha_bar[-1]) == 0.0
    assert flow.class_of(torch.tensor([0.0, 0.01, 0.1, 0.149, 0.151, 1.0])).tolist() == [-1, 0, 0, 0, 1, 9]
    for density in ("uniform", "logit_normal"):
        p = flow.sigma_prior(density)
        assert p.shape == (10,) and abs(float(p.sum()) - 1) < 1e-12 and (p > 0).all()
        draws = flow.class_of(flow.sample_sigma(200_000, density, torch.Generator().manual_seed(0)))
        assert torch.allclose(torch.bincount(draws, minlength=10).double() / 200_000, p, atol=4e-3)
    assert FlowSchedule.from_diffusers(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)) == FlowSchedule(shift=3.0)


def test_refusals_name_what_is_wrong():
    flow = FlowSchedule()
    model = FGMM.velocity_model(flow)
    with pytest.raises(ValueError, match="give mu"):
        FlowSchedule(use_dynamic_shifting=True).sigmas(10)
    with pytest.raises(ValueError, match="use_dynamic_shifting=True only"):
        flow.sigmas(10, mu=1.0)
    with pytest.raises(ValueError, match="use_karras_sigmas are not supported"):
        FlowSchedule.from_diffusers(diffusers.FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True))
    with pytest.raises(ValueError, match="decrease strictly"):
        sample_flow(model, _noise(), flow, sigmas=[0.5, 0.7, 0.0])
    with pytest.raises(ValueError, match="unknown flow method"):
        sample_flow(model, _noise(), flow, 4, method="rk4")
    cg = ClassifierGuidance(GMM.classifier(flow.vp_schedule), 0, guidance_scale=1.0)
    with pytest.raises(ValueError, match="sigma = 1"):
        sample_flow(model, _noise(), flow, 4, terms=[cg])
    out = sample_flow(model, _noise(), flow, sigmas=[0.9, 0.5, 0.0], terms=[cg])  # below σ = 1 guidance works
    assert torch.isfinite(out).all()
    assert isinstance(StepContext(flow.vp_schedule, model), StepContext)


def test_flow_euler_with_an_x0_clip_is_ddim_with_that_clip_on_the_vp_view():
    """clip_x0 on the flow Euler step (not a diffusers option) equals DDIM(η = 0, clip_x0, use_clipped_model_output)
    run on the VP view of the same model, on the σ grid of the VP classes, with and without a DPS term; and a clip
    that binds changes the result."""
    from tagdiff import DPSGuidance, sample_ddim

    flow = FlowSchedule()
    model = FGMM.velocity_model(flow)
    x = 3 * _noise(16, 2)                                    # a wide start so that x̂_0 leaves [-1, 1]
    ts = torch.tensor([998, 799, 599, 399, 199, 49])          # σ_0 = 0.999: DPS needs σ < 1
    sigmas = torch.cat([(ts + 1).double() / 1000, torch.zeros(1, dtype=torch.float64)])
    for terms in ([], [DPSGuidance(lambda x0: ((x0 - 0.5) ** 2).sum(-1), 0.3)]):
        with torch.enable_grad():
            got = sample_flow(model, x, flow, sigmas=sigmas, clip_x0=1.0, terms=terms)
            r0 = float(((1 - sigmas[0]) ** 2 + sigmas[0] ** 2).sqrt())  # the VP view starts at x / r(σ_0)
            ref = sample_ddim(FlowModel(model), x / r0, ts, flow.vp_schedule, eta=0.0, clip_x0=1.0, terms=terms)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
        assert (got - sample_flow(model, x, flow, sigmas=sigmas, terms=terms)).abs().max() > 1e-2
    with pytest.raises(ValueError, match="clip_x0"):
        sample_flow(model, x, flow, 5, method="heun", clip_x0=1.0)
