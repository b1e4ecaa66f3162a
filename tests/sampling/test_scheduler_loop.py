"""tagdiff.scheduler_loop: diffusers schedulers through run_loop, against the plain diffusers loop and exact models."""

from __future__ import annotations

import inspect
import math

import diffusers
import pytest
import torch

from tagdiff import (
    Corrector,
    DPSGuidance,
    LinearDrift,
    StackedRandomGenerator,
    TemporalAlignment,
    TFGGuidance,
    TimeGapRecorder,
    TimeShift,
    VPSchedule,
    sample_ddim,
    sample_scheduler,
    wasserstein1,
)
from tagdiff.data import toy_mixture
from tagdiff.models.checkpoints import load_model
from tagdiff.models.unet import load_unet
from tagdiff.sampling.schedulers import SUPPORTED_SCHEDULERS, check_scheduler

ASSETS = "src/tagdiff/assets/digits"
KARRAS = [e.name for e in diffusers.schedulers.KarrasDiffusionSchedulers]
SCH = VPSchedule.linear(1000)


@pytest.fixture(scope="module")
def unet():
    return load_unet(f"{ASSETS}/unet")


def _plain_loop(scheduler, model, noise, steps, generators=None, **step_kwargs):
    """The loop every diffusers pipeline runs, written out."""
    s = type(scheduler).from_config(scheduler.config)
    s.set_timesteps(steps)
    x = noise * s.init_noise_sigma
    if generators is not None and "generator" in inspect.signature(s.step).parameters:
        step_kwargs["generator"] = generators
    with torch.no_grad():
        for t in s.timesteps:
            x = s.step(model(s.scale_model_input(x, t), t), t, x, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("name", [n for n in KARRAS if n in SUPPORTED_SCHEDULERS and n != "DPMSolverSDEScheduler"])
def test_with_omega_zero_the_loop_is_the_plain_diffusers_loop_bit_for_bit(unet, name):
    """Shipped digits UNet, 20 steps, fixed noise and per-sample generators; TAG present with ω = 0."""
    model, schedule = unet
    scheduler = getattr(diffusers, name)(**schedule.to_diffusers_config())
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    tp = load_model(f"{ASSETS}/time_predictor")
    ts = scheduler.timesteps
    before = (None if ts is None else ts.clone(), getattr(scheduler, "step_index", None))
    ours = sample_scheduler(scheduler, model, noise, num_inference_steps=20, terms=[TemporalAlignment(tp, 0.0)],
                            generator=StackedRandomGenerator(range(3)).generators)
    ref = _plain_loop(scheduler, lambda x, t: model.unet(x, t).sample, noise, 20,
                      StackedRandomGenerator(range(3)).generators)
    assert torch.equal(ours, ref)
    # the user's scheduler object is not mutated
    same = scheduler.timesteps is before[0] is None or torch.equal(scheduler.timesteps, before[0])
    assert same and getattr(scheduler, "step_index", None) == before[1]


def test_ddim_scheduler_equals_sample_ddim_on_the_same_grid(unet):
    """DDIMScheduler (no clipping, set_alpha_to_one, trailing grid) = tagdiff's ddim_step to float32 rounding of
    diffusers' alphas_cumprod (ours are float64)."""
    model, schedule = unet
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    for eta in (0.0, 1.0):
        sched = diffusers.DDIMScheduler(**schedule.to_diffusers_config(), clip_sample=False,
                                        timestep_spacing="trailing")
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        ours = sample_scheduler(sched, model, noise, num_inference_steps=20, step_kwargs={"eta": eta}, generator=g1)
        with torch.no_grad():
            ref = sample_ddim(model, noise, schedule.timesteps(20), schedule, eta=eta,
                              randn_like=lambda z, g=g2: torch.randn(z.shape, generator=g, dtype=z.dtype))
        torch.testing.assert_close(ours, ref, rtol=0, atol=2e-4)


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "DDPMScheduler"])
def test_exact_tag_lowers_the_drifted_toy_w1_with_every_solver(name):
    """docs/notation.md §6.1 toy (two Gaussians at ±(10, 10)), drift x <- x - 0.01 x per step, exact ε and exact TLS,
    25 steps.
    Threshold derived from the exact model itself: TAG must undo at least a quarter of the drift's damage,
    W1(tag) < W1(drift) - (W1(drift) - W1(no drift)) / 4."""
    gmm = toy_mixture()
    model, tp = gmm.eps_model(SCH), gmm.time_posterior(SCH)
    ref, _ = gmm.sample(1000, generator=torch.Generator().manual_seed(17))
    noise = torch.randn(1000, 2, generator=torch.Generator().manual_seed(18))
    extra = {"clip_sample": False, "timestep_spacing": "trailing"} if name == "DDPMScheduler" else {}
    sched = getattr(diffusers, name)(**SCH.to_diffusers_config(), **extra)
    w = {}
    for label, terms in [("clean", []), ("drift", [LinearDrift(-0.01)]),
                         ("tag", [LinearDrift(-0.01), TemporalAlignment(tp, 1.0)])]:
        x = sample_scheduler(sched, model, noise, num_inference_steps=25, terms=terms,
                             generator=torch.Generator().manual_seed(3))
        w[label] = wasserstein1(x, ref)
    assert w["drift"] > w["clean"] + 0.5, w  # the drift hurts
    assert w["tag"] < w["drift"] - (w["drift"] - w["clean"]) / 4, w


class _AddVP(Corrector):
    """Adds a constant in VP space and records the (VP) states and timesteps it sees."""

    def __init__(self, c: float, placement: str = "pre"):
        self.c, self.placement, self.seen = c, placement, []

    def correct(self, x, t, ctx):
        self.seen.append((x.clone(), int(t[0])))
        return x + self.c if int(t[0]) >= 0 else x


def test_euler_correction_is_the_vp_correction_mapped_to_sigma_space():
    """Zero ε-model: Euler's step leaves x_σ unchanged (x̂_0 = x), so a VP-space shift c before each step adds
    exactly sqrt(1 + σ_i²) c to x_σ: x_0 = init_sigma · noise + c Σ_i sqrt(1 + σ_i²)."""
    sched = diffusers.EulerDiscreteScheduler(**SCH.to_diffusers_config())
    noise = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    term = _AddVP(0.25)
    out = sample_scheduler(sched, lambda x, t: torch.zeros_like(x), noise, num_inference_steps=3, terms=[term])
    ref = sched.__class__.from_config(sched.config)
    ref.set_timesteps(3)
    sig = ref.sigmas[:-1].double()
    expected = noise * ref.init_noise_sigma + 0.25 * (1 + sig**2).sqrt().sum()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    x_vp0, t0 = term.seen[0]
    torch.testing.assert_close(x_vp0, noise * ref.init_noise_sigma / (1 + sig[0] ** 2).sqrt(), rtol=1e-6, atol=1e-6)
    # the predictor's class is the nearest training timestep in log σ
    assert [t for _, t in term.seen] == [int(SCH.t_from_sigma(s)) for s in sig] == [999, 500, 0]


def test_second_order_scheduler_corrects_once_per_step_and_guides_every_call(unet):
    model, schedule = unet
    sched = diffusers.HeunDiscreteScheduler(**schedule.to_diffusers_config())
    pre, post = _AddVP(0.0), _AddVP(0.0, "post")
    calls = []

    def loss(x0):
        calls.append(1)
        return (x0**2).flatten(1).sum(-1)

    rec = TimeGapRecorder(load_model(f"{ASSETS}/time_predictor"))
    sample_scheduler(sched, model, torch.randn(2, 1, 8, 8), num_inference_steps=5,
                     terms=[pre, DPSGuidance(loss, 0.1), post], callback=rec, clip_x0=1.0)
    assert len(pre.seen) == len(post.seen) == len(rec.timesteps) == 5
    assert len(calls) == 9  # Heun: 2N - 1 model calls, each guided
    assert post.seen[-1][1] == -1  # after the last step the state is clean


def test_multistep_solvers_with_tag_run_and_tag_acts(unet):
    """A TAG correction between steps leaves DPM-Solver++'s history in place; sampling stays finite and TAG moves
    the result (by far less than the samples' scale)."""
    model, schedule = unet
    tp = load_model(f"{ASSETS}/time_predictor")
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    for sched in (diffusers.DPMSolverMultistepScheduler(**schedule.to_diffusers_config()),
                  diffusers.UniPCMultistepScheduler(**schedule.to_diffusers_config(),
                                                    disable_corrector=list(range(10)))):
        plain = sample_scheduler(sched, model, noise, num_inference_steps=10)
        tag = sample_scheduler(sched, model, noise, num_inference_steps=10, terms=[TemporalAlignment(tp, 1.0)])
        assert torch.isfinite(tag).all()
        assert 1e-4 < (tag - plain).abs().max() < 1.0


def test_v_prediction_models_are_converted():
    """An exact v-model (v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x0) under a v_prediction scheduler, with DPS guidance, gives the
    ε-model's samples under the ε scheduler (to rounding)."""
    gmm = toy_mixture()
    eps_model = gmm.eps_model(SCH)

    class VModel:
        prediction_type = "v_prediction"

        def __call__(self, x, t):
            ab = SCH.alpha_bar_at(t, x)
            eps = eps_model(x, t)
            x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
            return ab.sqrt() * eps - (1 - ab).sqrt() * x0

    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dps = DPSGuidance(lambda x0: ((x0 - 10) ** 2).sum(-1), 0.05)
    kw = dict(num_inference_steps=10, terms=[dps], step_kwargs={"eta": 0.0})
    cfg = {**SCH.to_diffusers_config(), "clip_sample": False}
    a = sample_scheduler(diffusers.DDIMScheduler(**cfg), eps_model, noise, **kw)
    b = sample_scheduler(diffusers.DDIMScheduler(**{**cfg, "prediction_type": "v_prediction"}), VModel(), noise, **kw)
    # diffusers converts v with float32 alphas (relative error ≤ 6e-8 each): measured ≤ 4e-6; allowed 1e-4
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_zero_terminal_snr():
    """ᾱ_{T-1} = 0: an ε-model cannot start at t = T-1 (refused); a v-model can (x0 = -v there)."""
    sched = diffusers.DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False)
    schedule = VPSchedule.from_diffusers(sched)
    assert float(schedule.alpha_bar[-1]) == 0.0
    gmm = toy_mixture()
    with pytest.raises(ValueError, match="zero terminal SNR"):
        sample_scheduler(sched, gmm.eps_model(schedule), torch.randn(4, 2), num_inference_steps=5)

    class VModel:
        prediction_type = "v_prediction"

        def __call__(self, x, t):
            return -torch.ones_like(x)  # x0 = -v = 1 everywhere at ᾱ = 0

    v_sched = diffusers.DDIMScheduler.from_config(sched.config, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="zero terminal SNR"):  # a v-model under an epsilon scheduler: refused too
        sample_scheduler(sched, VModel(), torch.randn(4, 2), num_inference_steps=5)
    out = sample_scheduler(v_sched, VModel(), torch.randn(4, 2), num_inference_steps=5)
    assert torch.isfinite(out).all()


def test_refusals_name_what_is_wrong(unet):
    model, schedule = unet
    noise = torch.randn(1, 1, 8, 8)
    cfg = schedule.to_diffusers_config()
    with pytest.raises(ValueError, match="EDMEulerScheduler is not supported"):
        check_scheduler(diffusers.EDMEulerScheduler())
    assert check_scheduler(diffusers.FlowMatchEulerDiscreteScheduler()) == "FlowMatchEulerDiscreteScheduler"
    with pytest.raises(ValueError, match="FlowMatchLCMScheduler is not supported"):
        check_scheduler(diffusers.FlowMatchLCMScheduler())
    dpm = diffusers.DPMSolverMultistepScheduler(**cfg)
    with pytest.raises(ValueError, match="recurrence"):
        sample_scheduler(dpm, model, noise, num_inference_steps=4,
                         terms=[TFGGuidance(lambda x0: x0.flatten(1).sum(-1), rho=1.0, num_recur=2)])
    with pytest.raises(ValueError, match="TimeShift"):
        sample_scheduler(dpm, model, noise, num_inference_steps=4, terms=[TimeShift()])
    with pytest.raises(ValueError, match="does not take etaa"):
        sample_scheduler(dpm, model, noise, num_inference_steps=4, step_kwargs={"etaa": 1.0})
    with pytest.raises(ValueError, match="UniPC.*disable_corrector"):
        sample_scheduler(diffusers.UniPCMultistepScheduler(**cfg), model, noise, num_inference_steps=4,
                         terms=[LinearDrift(-0.01)])
    cosine_tp = toy_mixture().time_posterior(VPSchedule.cosine(1000))
    with pytest.raises(ValueError, match=r"trained on schedule cosine.*uses linear\(T=1000"):
        sample_scheduler(dpm, toy_mixture().eps_model(SCH), torch.randn(2, 2), num_inference_steps=4,
                         terms=[TemporalAlignment(cosine_tp, 1.0)])
    assert math.isfinite(float(sample_scheduler(dpm, model, noise, num_inference_steps=2).sum()))


def test_pndm_refuses_correctors_but_guides(unet):
    model, schedule = unet
    pndm = diffusers.PNDMScheduler(**schedule.to_diffusers_config())
    with pytest.raises(ValueError, match="PNDMScheduler restarts"):
        sample_scheduler(pndm, model, torch.randn(1, 1, 8, 8), num_inference_steps=5, terms=[LinearDrift(-0.01)])
    out = sample_scheduler(pndm, model, torch.randn(2, 1, 8, 8), num_inference_steps=5, clip_x0=1.0,
                           terms=[DPSGuidance(lambda x0: (x0**2).flatten(1).sum(-1), 0.1)])
    assert torch.isfinite(out).all()
