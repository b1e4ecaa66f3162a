"""The CFG family as tagdiff terms (tagdiff.guidance.cfg): CFG, rescaled CFG, CFG-Zero*, APG (against diffusers'
guider), guidance intervals, CFG++, and composition with TAG."""

import copy

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from diffusers.guiders import AdaptiveProjectedGuidance as DiffusersAPG
from diffusers.guiders import ClassifierFreeZeroStarGuidance
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer
from diffusers.guiders.guider_utils import rescale_noise_cfg

from tagdiff import (
    AdaptiveProjectedGuidance,
    APGMomentum,
    CFGPlusPlus,
    CFGZeroStar,
    ClassifierFreeGuidance,
    SimpleCNNTimePredictor,
    StepContext,
    TemporalAlignment,
    VPSchedule,
    sample_ddim,
    sample_scheduler,
)
from tagdiff.guidance.cfg import interval_from_sigma
from tagdiff.models.unet import UNetEpsModel, make_unet
from tagdiff.sampling.terms import guided_eps, guided_prediction

K = 10  # classes; label K is the null (dropped) label
NULL = {"y": K}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UNetEpsModel(make_unet(8, 1, widths=(8, 16), num_classes=K + 1), 1000).eval()


@pytest.fixture(scope="module")
def schedule():
    return VPSchedule.linear(1000)


def branches(model, x, t, y):
    with torch.no_grad():
        return model(x, t, y), model(x, t, torch.full_like(y, K))


def setup(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    return x, torch.full((n,), 600), torch.arange(n) % K


def test_cfg_scale_one_is_the_conditional_model_bit_for_bit(model, schedule):
    x, _, y = setup()
    ts = schedule.timesteps(5)
    plain = sample_ddim(model, x, ts, schedule, cond={"y": y})
    for term in (ClassifierFreeGuidance(1.0, NULL), CFGZeroStar(1.0, NULL), AdaptiveProjectedGuidance(1.0, NULL),
                 ClassifierFreeGuidance(1.0, NULL, rescale=0.7)):
        assert torch.equal(sample_ddim(model, x, ts, schedule, terms=[term], cond={"y": y}), plain)
    assert not torch.equal(sample_ddim(model, x, ts, schedule, terms=[ClassifierFreeGuidance(3.0, NULL)],
                                       cond={"y": y}), plain)


@pytest.mark.parametrize("scale", [0.0, 2.5, 7.0])
def test_cfg_eps_is_uncond_plus_scale_times_difference(model, schedule, scale):
    x, t, y = setup()
    eps_c, eps_u = branches(model, x, t, y)
    got = guided_eps(model, schedule, [ClassifierFreeGuidance(scale, NULL)])(x, t, y=y)
    torch.testing.assert_close(got, eps_u + scale * (eps_c - eps_u), rtol=1e-4, atol=1e-5)


def test_rescaled_cfg_and_cfg_zero_star_equal_diffusers(model, schedule):
    x, t, y = setup()
    eps_c, eps_u = branches(model, x, t, y)
    got = guided_eps(model, schedule, [ClassifierFreeGuidance(4.0, NULL, rescale=0.7)])(x, t, y=y)
    torch.testing.assert_close(got, rescale_noise_cfg(eps_u + 4.0 * (eps_c - eps_u), eps_c, 0.7), rtol=1e-4,
                               atol=1e-5)
    guider = ClassifierFreeZeroStarGuidance(guidance_scale=4.0, zero_init_steps=0)
    guider.set_state(step=0, num_inference_steps=10, timestep=t[0])
    got = guided_eps(model, schedule, [CFGZeroStar(4.0, NULL)])(x, t, y=y)
    torch.testing.assert_close(got, guider.forward(eps_c, eps_u).pred, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(parallel_weight=1.0, norm_threshold=15.0),
                                    dict(parallel_weight=0.0, norm_threshold=0.5),
                                    dict(parallel_weight=0.3, norm_threshold=0.0),
                                    dict(parallel_weight=1.0, norm_threshold=0.5)])
def test_apg_equals_diffusers_guider_on_the_same_inputs(model, schedule, kwargs):
    x, t, y = setup()
    eps_c, eps_u = branches(model, x, t, y)
    guider = DiffusersAPG(guidance_scale=5.0, eta=kwargs["parallel_weight"],
                          adaptive_projected_guidance_rescale=kwargs["norm_threshold"])
    guider.set_state(step=0, num_inference_steps=10, timestep=t[0])
    expected = guider.forward(eps_c, eps_u).pred
    got = guided_eps(model, schedule, [AdaptiveProjectedGuidance(5.0, NULL, **kwargs)])(x, t, y=y)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    cfg = eps_u + 5.0 * (eps_c - eps_u)  # APG with eta = 1 and an inactive threshold is CFG
    plain = kwargs["parallel_weight"] == 1.0 and kwargs["norm_threshold"] == 15.0
    assert torch.allclose(got, cfg, atol=1e-4) == plain


def test_apg_momentum_and_step_window_equal_diffusers_over_a_run(model, schedule):
    """Momentum (an explicit APGMomentum buffer) and start/stop fractions, step by step as the guider runs."""
    N = 8
    guider = DiffusersAPG(guidance_scale=4.0, adaptive_projected_guidance_momentum=-0.5, start=0.25, stop=0.75)
    buf = APGMomentum(-0.5)
    term = AdaptiveProjectedGuidance(4.0, NULL, momentum=buf, step_fractions=(0.25, 0.75))
    for run in range(2):  # the second run resets the buffer at step 0, as the guider does
        guider.momentum_buffer = MomentumBuffer(-0.5)
        grid = torch.arange(N)  # a sampling run's grid: a new object per run
        for i in range(N):
            x, t, y = setup(seed=10 * run + i)
            eps_c, eps_u = branches(model, x, t, y)
            guider.set_state(step=i, num_inference_steps=N, timestep=t[0])
            ctx = StepContext(schedule=schedule, eps_model=model, cond={"y": y}, t=t, i=i, num_steps=N,
                              timesteps=grid)
            got = guided_prediction(x, t, ctx, [term]).eps_hat
            torch.testing.assert_close(got, guider.forward(eps_c, eps_u).pred, rtol=1e-4, atol=1e-5)
            assert torch.equal(got, eps_c) == (not 2 <= i < 6)


def test_apg_x0_space_is_the_projection_of_x0_predictions(model, schedule):
    x, t, y = setup()
    eps_c, eps_u = branches(model, x, t, y)
    ab = schedule.alpha_bar_at(t, x)
    x0_c, x0_u = [(x - (1 - ab).sqrt() * e) / ab.sqrt() for e in (eps_c, eps_u)]
    term = AdaptiveProjectedGuidance(5.0, NULL, parallel_weight=0.0, norm_threshold=2.0, space="x0")
    x0_hat = term.project(x0_c, x0_u)
    got = guided_eps(model, schedule, [term])(x, t, y=y)
    torch.testing.assert_close(got, (x - ab.sqrt() * x0_hat) / (1 - ab).sqrt(), rtol=1e-4, atol=1e-4)


def test_guidance_interval_in_timesteps_and_step_fractions(model, schedule):
    x, _, y = setup()
    ts = schedule.timesteps(6)  # 999, 832, 666, 499, 333, 166 (trailing)
    on = ClassifierFreeGuidance(3.0, NULL)

    def eps_per_step(term):
        out = []
        for i, t in enumerate(ts.tolist()):
            tt = torch.full((x.shape[0],), t)
            ctx = StepContext(schedule=schedule, eps_model=model, cond={"y": y}, t=tt, i=i, num_steps=len(ts))
            out.append(guided_prediction(x, tt, ctx, [term]).eps_hat)
        return out

    full, cond = eps_per_step(on), eps_per_step(ClassifierFreeGuidance(1.0, NULL))
    by_t = eps_per_step(ClassifierFreeGuidance(3.0, NULL, window=(300, 700)))
    by_step = eps_per_step(ClassifierFreeGuidance(3.0, NULL, step_fractions=(0.5, 1.0)))
    for i, t in enumerate(ts.tolist()):
        assert torch.equal(by_t[i], full[i] if 300 <= t <= 700 else cond[i])
        assert torch.equal(by_step[i], full[i] if i >= 3 else cond[i])
    lo, hi = interval_from_sigma(schedule, 0.28, 5.42)
    sig = schedule.sigma(torch.arange(1000))
    assert sig[lo] > 0.28 >= sig[lo - 1] and sig[hi] <= 5.42 < sig[hi + 1]


def test_cfg_errors(model, schedule):
    with pytest.raises(ValueError, match="null_cond"):
        ClassifierFreeGuidance(2.0, {})
    with pytest.raises(ValueError, match="step_fractions"):
        ClassifierFreeGuidance(2.0, NULL, step_fractions=(0.8, 0.2))
    with pytest.raises(ValueError, match="rescale"):
        ClassifierFreeGuidance(2.0, NULL, rescale=2.0)
    with pytest.raises(ValueError, match="space"):
        AdaptiveProjectedGuidance(2.0, NULL, space="v")
    with pytest.raises(ValueError, match="scale"):
        CFGPlusPlus(-1.0, NULL)
    x, t, y = setup()
    with pytest.raises(ValueError, match="sampler loop"):
        guided_eps(model, schedule, [ClassifierFreeGuidance(2.0, NULL, step_fractions=(0.0, 0.5))])(x, t, y=y)


def cfgpp_by_hand(model, schedule, x, ts, y, lam, clip=None):
    ts = ts.tolist()
    for i, t in enumerate(ts):
        tt = torch.full((x.shape[0],), t)
        eps_c, eps_u = branches(model, x, tt, y)
        ab = float(schedule.alpha_bar[t])
        ab_prev = float(schedule.alpha_bar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        eps_lam = eps_u + lam * (eps_c - eps_u)
        x0 = (x - (1 - ab) ** 0.5 * eps_lam) / ab**0.5
        x0 = x0 if clip is None else x0.clamp(-clip, clip)
        x = ab_prev**0.5 * x0 + (1 - ab_prev) ** 0.5 * eps_u
    return x


@pytest.fixture(scope="module")
def model64(model):
    """The same UNet in float64: the by-hand loop evaluates the two branches as two batches and tagdiff as one, so in
    float32 their last bits differ by CPU; in float64 the comparison is tight on any machine."""
    return copy.deepcopy(model).double()


def test_cfgpp_equals_the_papers_ddim_update_on_tagdiff_and_diffusers_ddim(model64, schedule):
    model = model64
    x, _, y = setup()
    x = x.double()
    ts = schedule.timesteps(5, "leading")
    expected = cfgpp_by_hand(model, schedule, x, ts, y, 0.6)
    got = sample_ddim(model, x, ts, schedule, terms=[CFGPlusPlus(0.6, NULL)], cond={"y": y})
    # float64 rounding, amplified by 1/√ᾱ_t (≈ 160 at t = 999) along the steps: measured 4e-11 natively and up to
    # 8e-9 with MKL at AVX2 on the clipped variant below; allowed 1e-6 (CFG would differ by > 1e-3, asserted below)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    ddim = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True)
    got_d = sample_scheduler(ddim, model, x, num_inference_steps=5, terms=[CFGPlusPlus(0.6, NULL)], cond={"y": y})
    # diffusers keeps alphas_cumprod in float32 (relative error ≤ 6e-8 per ᾱ, amplified by 1/√ᾱ ≤ 60 over 5 steps):
    # measured 1.2e-6; allowed 1e-4
    torch.testing.assert_close(got_d, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, sample_ddim(model, x, ts, schedule, terms=[ClassifierFreeGuidance(0.6, NULL)],
                                               cond={"y": y}), atol=1e-3)


def test_cfgpp_with_its_own_x0_clipping(model64, schedule):
    model = model64
    x, _, y = setup()
    x = 3 * x.double()  # large states: the clamp is active
    ts = schedule.timesteps(4)
    expected = cfgpp_by_hand(model, schedule, x, ts, y, 0.8, clip=1.0)
    got = sample_ddim(model, x, ts, schedule, terms=[CFGPlusPlus(0.8, NULL, clip_x0=1.0)], cond={"y": y})
    # float64 rounding amplified by 1/√ᾱ_t: measured 3e-13 natively, 8.2e-9 with generic ATen kernels and MKL at
    # AVX2 (the batch of two branches is blocked differently); allowed 1e-6, far below the unclipped run's > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, cfgpp_by_hand(model, schedule, x, ts, y, 0.8), atol=1e-2)


def test_cfgpp_refuses_updates_it_cannot_express(model, schedule):
    x, _, y = setup()
    ts = schedule.timesteps(3)
    with pytest.raises(ValueError, match="deterministic DDIM"):
        sample_ddim(model, x, ts, schedule, eta=1.0, terms=[CFGPlusPlus(0.6, NULL)], cond={"y": y})
    with pytest.raises(ValueError, match="deterministic DDIM"):
        sample_ddim(model, x, ts, schedule, terms=[CFGPlusPlus(0.6, NULL)], cond={"y": y}, clip_x0=1.0)
    with pytest.raises(ValueError, match="deterministic DDIM"):
        sample_scheduler(EulerDiscreteScheduler(num_train_timesteps=1000), model, x, num_inference_steps=3,
                         terms=[CFGPlusPlus(0.6, NULL)], cond={"y": y})


def test_cfg_family_composes_with_tag_and_each_other(model, schedule):
    x, _, y = setup()
    ts = schedule.timesteps(4)
    torch.manual_seed(3)
    tp = SimpleCNNTimePredictor(1, 8, 1000, widths=(8, 16)).eval()
    cfg = ClassifierFreeGuidance(3.0, NULL)
    base = sample_ddim(model, x, ts, schedule, terms=[cfg], cond={"y": y})
    zero = sample_ddim(model, x, ts, schedule, terms=[cfg, TemporalAlignment(tp, omega=0.0)], cond={"y": y})
    assert torch.equal(base, zero)
    for terms in ([cfg, TemporalAlignment(tp, omega=5.0)], [AdaptiveProjectedGuidance(3.0, NULL),
                                                            TemporalAlignment(tp, omega=5.0, placement="post")],
                  [CFGPlusPlus(0.6, NULL), TemporalAlignment(tp, omega=5.0)],
                  [ClassifierFreeGuidance(2.0, NULL, window=(500, 999)), CFGZeroStar(2.0, NULL, window=(0, 499))]):
        out = sample_ddim(model, x, ts, schedule, terms=terms, cond={"y": y})
        assert torch.isfinite(out).all() and not torch.equal(out, base)


def test_null_class_label_minus_one_and_its_round_trip(tmp_path, schedule):
    """y = -1 (training's dropped label) selects the UNet's null class; the folder records it for load_unet."""
    from tagdiff.models.unet import load_unet, save_unet

    torch.manual_seed(0)
    unet = make_unet(8, 1, widths=(8, 16), num_classes=K + 1)
    m = UNetEpsModel(unet, 1000, null_class=K).eval()
    x, t, y = setup()
    with torch.no_grad():
        assert torch.equal(m(x, t, torch.full_like(y, -1)), m(x, t, torch.full_like(y, K)))
    x0 = sample_ddim(m, x, schedule.timesteps(3), schedule, cond={"y": y},
                     terms=[ClassifierFreeGuidance(3.0, {"y": -1})])
    assert torch.equal(x0, sample_ddim(m, x, schedule.timesteps(3), schedule, cond={"y": y},
                                       terms=[ClassifierFreeGuidance(3.0, NULL)]))
    save_unet(m, schedule, tmp_path / "u", null_class=K)
    loaded, _ = load_unet(tmp_path / "u")
    assert loaded.null_class == K
    with pytest.raises(ValueError, match="null_class"):
        UNetEpsModel(unet, 1000)(x, t, torch.full_like(y, -1))
    with pytest.raises(ValueError, match="null_class=11"):
        UNetEpsModel(unet, 1000, null_class=K + 1)


@pytest.mark.parametrize("zero_init_steps", [0, 1, 2])
def test_cfg_zero_star_on_a_flow_model_is_diffusers_guider_on_velocities_step_for_step(model, zero_init_steps):
    """CFG-Zero* on a flow model (the paper's Alg. 1): α* and the guidance act on the velocities, the first
    ``zero_init_steps`` steps have zero velocity; ground truth: a float64 Euler loop that feeds both velocity
    branches to diffusers' ``ClassifierFreeZeroStarGuidance`` (the conversions VP view ↔ flow state are exact up to
    rounding: 1e-10)."""
    from tagdiff.sampling.flow import FlowSchedule, sample_flow

    net = UNetEpsModel(make_unet(8, 1, widths=(8, 16), num_classes=K + 1), 1000).double().eval()
    torch.manual_seed(0)
    for p in net.parameters():  # a random init's velocities are tiny; make the branches differ visibly
        p.data.normal_(0, 0.2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.tensor([1, 2, 3, 4])
    sigmas = FlowSchedule().sigmas(6).to(torch.float64)
    sigmas[0] = 0.999  # score terms need σ < 1
    got = sample_flow(net, x, sigmas=sigmas, terms=[CFGZeroStar(3.0, NULL, zero_init_steps=zero_init_steps)],
                      cond={"y": y})
    guider = ClassifierFreeZeroStarGuidance(guidance_scale=3.0, zero_init_steps=zero_init_steps)
    ref = x.clone()
    with torch.no_grad():
        for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:], strict=True)):
            ts = torch.full((4,), float(1000 * s), dtype=torch.float64)
            v_c, v_u = net(ref, ts, y=y), net(ref, ts, y=torch.full_like(y, K))
            guider.set_state(step=i, num_inference_steps=len(sigmas) - 1, timestep=ts[0])
            ref = ref + (s_next - s) * guider.forward(v_c, v_u).pred
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    if zero_init_steps:  # a zero velocity has no VP-model meaning: refused on an ε-model
        with pytest.raises(ValueError, match="flow-matching"):
            guided_eps(model, VPSchedule.linear(1000), [CFGZeroStar(3.0, NULL, zero_init_steps=1)])(
                x.float(), torch.tensor([500] * 4), y=y)
