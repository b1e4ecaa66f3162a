"""sample_scheduler on diffusers' flow-matching schedulers (tagdiff.sampling.flow_schedulers), on an exact flow
mixture: with no term the plain diffusers loop bit for bit, tagdiff's own flow sampler (sample_flow, float64) to the
float32 bound with and without TAG, terms that act, ω = 0 bit for bit, and the refusals.

Measured (64 float32 states of size ~3-4, 12 steps, shift 3): |sample_scheduler - sample_flow| ≤ 8.6e-7 (Euler),
1.7e-6 (Heun) without terms; with TAG (exact σ posterior) ≤ 3e-6 at ω_0 = 0.5, where TAG moves the samples by
~3.5; the gap grows with ω_0 (3e-5 at ω_0 = 2, 3e-4 at 8: float32 rounding of a sharp TLS carried along the run; over
two steps it stays ~2e-6 of the correction's size). The bound asserted is 1e-5, at ω_0 ∈ {0, 0.5}."""

from __future__ import annotations

import diffusers
import pytest
import torch

from tagdiff import LinearDrift, TemporalAlignment
from tagdiff.data.gmm import GaussianMixture
from tagdiff.data.gmm_flow import FlowGaussianMixture
from tagdiff.guidance import ClassifierGuidance
from tagdiff.sampling.flow import FlowSchedule, flux_mu, sample_flow
from tagdiff.sampling.schedulers import check_scheduler, sample_scheduler, state_alpha_bar, vp_scale

GMM = GaussianMixture([[2.0, 1.0], [-1.5, -2.0]], stds=[0.5, 0.8], weights=[0.3, 0.7])
FGMM = FlowGaussianMixture(GMM)
EXACT = FGMM.velocity_model(FlowSchedule())
BOUND = 1e-5


def model(x, t):
    """The exact velocity in the state's dtype (a float32 network's contract)."""
    return EXACT(x, t).to(x.dtype)


def _noise(n=16, seed=0, dtype=torch.float32):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _plain(sched, x, n, generator=None, **set_kw):
    """The loop of diffusers' flow pipelines: ``v = model(x, t); x = scheduler.step(v, t, x).prev_sample``."""
    sched = type(sched).from_config(sched.config)
    sched.set_timesteps(n, **set_kw)
    for t in sched.timesteps:
        kw = {} if generator is None else {"generator": generator}
        x = sched.step(model(x, t.expand(x.shape[0])), t, x, **kw).prev_sample
    return x


def _flow_kw(**kw):
    return dict(prediction_type="flow_prediction", use_flow_sigmas=True, **kw)


SCHEDULERS = [
    (diffusers.FlowMatchEulerDiscreteScheduler(), {}),
    (diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), {}),
    (diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), {"mu": flux_mu(1024)}),
    (diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, shift_terminal=0.1), {}),
    (diffusers.FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True), {}),
    (diffusers.FlowMatchHeunDiscreteScheduler(shift=3.0), {}),
    (diffusers.DPMSolverMultistepScheduler(**_flow_kw(flow_shift=3.0)), {}),
    (diffusers.DPMSolverMultistepScheduler(**_flow_kw(algorithm_type="dpmsolver++", solver_order=3)), {}),
    (diffusers.UniPCMultistepScheduler(**_flow_kw(flow_shift=3.0)), {}),
]


@pytest.mark.parametrize("sched,kw", SCHEDULERS, ids=lambda v: type(v).__name__ if not isinstance(v, dict) else "")
def test_no_term_run_is_the_plain_diffusers_loop_bit_for_bit(sched, kw):
    x = _noise()
    ours = sample_scheduler(sched, model, x, num_inference_steps=8, **kw)
    assert torch.equal(ours, _plain(sched, x, 8, **kw))
    tag0 = sample_scheduler(sched, model, x, num_inference_steps=8, **kw,
                            terms=[TemporalAlignment(FGMM.time_posterior(FlowSchedule()), omega=0.0)])
    assert torch.equal(ours, tag0)


def test_stochastic_sampling_draws_its_noise_from_the_generator_as_the_pipeline_does():
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    x = _noise()
    ours = sample_scheduler(sched, model, x, num_inference_steps=8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours, _plain(sched, x, 8, generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("method,cls", [("euler", diffusers.FlowMatchEulerDiscreteScheduler),
                                        ("heun", diffusers.FlowMatchHeunDiscreteScheduler)])
@pytest.mark.parametrize("omega", [0.0, 0.5])
def test_equals_sample_flow_to_float32_precision_with_and_without_tag(method, cls, omega):
    """Same σs, same update, same TAG (the VP view, the class of σ, Δx_σ = r Δ): diffusers' float32 step against
    tagdiff's float64 flow sampler."""
    flow = FlowSchedule(shift=3.0)
    x = _noise(64)
    terms = [TemporalAlignment(FGMM.time_posterior(flow), omega=omega, placement="post")]
    ours = sample_scheduler(cls(shift=3.0), model, x, num_inference_steps=12, terms=terms)
    ref = sample_flow(EXACT, x.double(), flow, 12, method=method, terms=terms)
    err = (ours.double() - ref).abs().max().item()
    assert err < BOUND, err
    if omega:
        plain = sample_scheduler(cls(shift=3.0), model, x, num_inference_steps=12)
        assert (ours - plain).abs().max() > 1.0


@pytest.mark.parametrize("sched", [diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
                                   diffusers.FlowMatchHeunDiscreteScheduler(shift=3.0),
                                   diffusers.DPMSolverMultistepScheduler(**_flow_kw(flow_shift=3.0)),
                                   diffusers.UniPCMultistepScheduler(**_flow_kw(disable_corrector=list(range(8))))],
                         ids=lambda s: type(s).__name__)
def test_terms_change_the_result_finitely(sched):
    """TAG (both placements), a drift and classifier guidance act; guidance needs a grid below σ = 1 (ᾱ = 0)."""
    flow = FlowSchedule()
    x, tp = _noise(32), FGMM.time_posterior(flow)
    plain = sample_scheduler(sched, model, x, num_inference_steps=8)
    for terms in ([TemporalAlignment(tp, 2.0)], [TemporalAlignment(tp, 2.0, placement="post")],
                  [LinearDrift(-0.05), TemporalAlignment(tp, 2.0)]):
        out = sample_scheduler(sched, model, x, num_inference_steps=8, terms=terms)
        assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-4
    clf = ClassifierGuidance(lambda z, t: torch.stack([-z.sum(-1), z.sum(-1)], -1), target=1, guidance_scale=1.0)
    if type(sched).__name__.startswith("FlowMatch"):   # their grids start at σ = 1
        with pytest.raises(ValueError, match="sigma = 1"):
            sample_scheduler(sched, model, x, num_inference_steps=8, terms=[clf])
        if "Heun" in type(sched).__name__:   # its set_timesteps takes no custom σs
            return
        sig = [0.9, 0.7, 0.5, 0.3, 0.1]
        base = sample_scheduler(sched, model, x, sigmas=sig)
        guided = sample_scheduler(sched, model, x, sigmas=sig, terms=[clf])
    else:  # DPM-Solver / UniPC flow grids start at 1 - 1/T (UniPC: 1 - 1e-6)
        base, guided = plain, sample_scheduler(sched, model, x, num_inference_steps=8, terms=[clf])
    assert torch.isfinite(guided).all() and guided.sum(-1).mean() > base.sum(-1).mean() + 0.1


def test_terms_see_the_vp_view_at_the_class_of_sigma():
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref = type(sched).from_config(sched.config)
    ref.set_timesteps(6)
    seen = []
    x = _noise()
    sample_scheduler(sched, model, x, num_inference_steps=6, callback=seen.append)
    flow = FlowSchedule()
    assert [s.timestep for s in seen] == [int(flow.class_of(s)) for s in ref.sigmas[:-1].double()]
    assert torch.equal(seen[0].x, x)   # σ = 1: r = 1
    ref.step(model(x, ref.timesteps[:1].expand(16)), ref.timesteps[0], x)
    assert vp_scale(ref) == pytest.approx(float(flow.r(ref.sigmas[1].double())), rel=1e-12)
    assert state_alpha_bar(ref) == pytest.approx(float(flow.alpha_bar(ref.sigmas[1].double())), rel=1e-12)


def test_refusals_name_what_is_not_supported():
    x = _noise()
    refused = {
        diffusers.FlowMatchLCMScheduler(): "FlowMatchLCMScheduler is not supported",
        diffusers.FlowMatchEulerDiscreteScheduler(invert_sigmas=True): "invert_sigmas",
        diffusers.DEISMultistepScheduler(**_flow_kw()): "DEISMultistepScheduler with use_flow_sigmas .* σ > 0",
        diffusers.DPMSolverMultistepScheduler(**_flow_kw(final_sigmas_type="sigma_min")): "final_sigmas_type",
        diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True): "needs prediction_type='flow_prediction'",
        diffusers.DPMSolverSinglestepScheduler(**_flow_kw()): "Singlestep.* with use_flow_sigmas is not supported",
    }
    for sched, match in refused.items():
        with pytest.raises(ValueError, match=match):
            check_scheduler(sched)
        with pytest.raises(ValueError, match=match):
            sample_scheduler(sched, model, x, num_inference_steps=4)
    heun = diffusers.FlowMatchHeunDiscreteScheduler()
    with pytest.raises(ValueError, match="s_churn > 0 .* off the flow path"):
        sample_scheduler(heun, model, x, num_inference_steps=4, step_kwargs={"s_churn": 1.0})
    euler = diffusers.FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="per_token_timesteps"):
        sample_scheduler(euler, model, x, num_inference_steps=4, step_kwargs={"per_token_timesteps": torch.ones(2)})
    from tagdiff import TimeShift

    with pytest.raises(ValueError, match=r"step terms \(TimeShift\) .*sample_flow"):
        sample_scheduler(euler, model, x, num_inference_steps=4, terms=[TimeShift()])
    with pytest.raises(ValueError, match="UniPCMultistepScheduler's corrector"):
        sample_scheduler(diffusers.UniPCMultistepScheduler(**_flow_kw()), model, x, num_inference_steps=4,
                         terms=[TemporalAlignment(FGMM.time_posterior(FlowSchedule()), 1.0)])
    with pytest.raises(ValueError, match="sigmas and mu apply to flow-matching"):
        sample_scheduler(diffusers.DDIMScheduler(), model, x, num_inference_steps=4, mu=0.5)
