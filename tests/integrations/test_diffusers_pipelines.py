"""TAG inside diffusers pipelines (tagdiff.diffusers): TAGCallback in a tiny StableDiffusionPipeline, and
sample_pipeline as the DDIMPipeline / DDPMPipeline equivalent on the shipped digits UNet."""


import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from tagdiff import SimpleCNNTimePredictor, TemporalAlignment, VPSchedule
from tagdiff.integrations.diffusers import TAGCallback, callback_target, sample_pipeline
from tagdiff.integrations.tiny import tiny_tokenizer
from tagdiff.models.assets import assets_dir
from tagdiff.models.checkpoints import load_model

LATENT = 8
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    unet = UNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        latent_channels=4, norm_num_groups=4, sample_size=LATENT).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SD_SCHEDULER, clip_sample=False, set_alpha_to_one=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def latent_predictor():
    torch.manual_seed(1)
    return SimpleCNNTimePredictor(in_channels=4, image_size=LATENT, num_train_timesteps=1000, widths=(8, 16)).eval()


def run_sd(pipe, scheduler_cls, callback=None, steps=4):
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    return pipe(["ab", "cd"], num_inference_steps=steps, guidance_scale=3.0, height=LATENT, width=LATENT,
                generator=torch.Generator().manual_seed(0), output_type="latent",
                callback_on_step_end=callback).images


class Recorder(PipelineCallback):
    """Records the latents it sees and the scheduler state (σ where there is one)."""

    tensor_inputs = ["latents"]

    def __init__(self):
        super().__init__()
        self.seen = []

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        sched = pipeline.scheduler
        sigma = None if getattr(sched, "sigmas", None) is None or sched.step_index is None else \
            float(sched.sigmas[sched.step_index])
        self.seen.append((step_index, callback_kwargs["latents"].clone(), sigma))
        return callback_kwargs


@pytest.mark.parametrize("scheduler_cls, corrected", [
    (DDIMScheduler, [0, 1, 2]), (DPMSolverMultistepScheduler, [0, 1, 2]), (EulerDiscreteScheduler, [0, 1, 2]),
    (HeunDiscreteScheduler, [1, 3, 5])])  # Heun: 7 calls for 4 steps, TAG at the 3 inner step boundaries
def test_sd_pipeline_omega_zero_is_bit_identical_and_omega_changes(sd_pipe, latent_predictor, scheduler_cls,
                                                                   corrected):
    plain = run_sd(sd_pipe, scheduler_cls)
    zero = run_sd(sd_pipe, scheduler_cls, TAGCallback(latent_predictor, omega=0.0))
    assert torch.equal(plain, zero)
    cb = TAGCallback(latent_predictor, omega=50.0)
    tagged = run_sd(sd_pipe, scheduler_cls, cb)
    assert torch.isfinite(tagged).all() and not torch.equal(plain, tagged)
    assert [h[0] for h in cb.history] == corrected  # no target after the last step


def test_sd_euler_correction_is_the_vp_correction_mapped_to_sigma_space(sd_pipe, latent_predictor):
    """Hand computation: x_VP = x_σ / sqrt(1 + σ²), t = nearest training timestep in log σ,
    Δx_σ = sqrt(1 + σ²) · ω_0 (1 - ᾱ_t) ∇ log p(t | x_VP)."""
    omega = 50.0
    before, after = Recorder(), Recorder()
    run_sd(sd_pipe, EulerDiscreteScheduler, MultiPipelineCallbacks([before, TAGCallback(latent_predictor, omega),
                                                                    after]))
    ab_train = sd_pipe.scheduler.alphas_cumprod.double()
    log_sigma_train = ((1 - ab_train) / ab_train).sqrt().log()
    assert before.seen[0][2] > 2.0  # a σ-space state (SD's Euler starts at σ ≈ 14.6)
    for (_, x, sigma), (_, x_out, _) in zip(before.seen[:-1], after.seen[:-1]):
        t = int((log_sigma_train - np.log(sigma)).abs().argmin())
        c = (1 + sigma**2) ** 0.5
        x_vp = (x / c).detach().requires_grad_(True)
        log_p = torch.log_softmax(latent_predictor(x_vp), -1)[:, t].sum()
        (grad,) = torch.autograd.grad(log_p, x_vp)
        expected = x + c * omega * (1 - float(ab_train[t])) * grad
        torch.testing.assert_close(x_out, expected, rtol=1e-5, atol=1e-6)
        assert not torch.equal(x_out, x)
    assert torch.equal(before.seen[-1][1], after.seen[-1][1])  # after the last step: unchanged


def test_callback_targets_per_scheduler(sd_pipe):
    schedule = VPSchedule.from_diffusers(sd_pipe.scheduler)
    ddim = DDIMScheduler.from_config(sd_pipe.scheduler.config)
    ddim.set_timesteps(4)
    assert [callback_target(ddim, i, schedule) for i in range(4)] == [(int(t), 1.0) for t in ddim.timesteps[1:]] + \
        [None]
    heun = HeunDiscreteScheduler.from_config(sd_pipe.scheduler.config)
    heun.set_timesteps(2)
    x = torch.zeros(1, 4, LATENT, LATENT)
    targets = []
    for i, t in enumerate(heun.timesteps):
        heun.scale_model_input(x, t)
        x = heun.step(torch.zeros_like(x), t, x).prev_sample
        targets.append(callback_target(heun, i, schedule))
    assert targets[0] is None and targets[1] is not None and targets[-1] is None  # step boundaries only
    t_prev, scale = targets[1]
    assert scale > 1.0 and 0 <= t_prev < 1000


def test_callback_refuses_mismatched_predictor(sd_pipe):
    wrong = SimpleCNNTimePredictor(in_channels=4, image_size=LATENT, num_train_timesteps=500, widths=(8, 16)).eval()
    with pytest.raises(ValueError, match="T=500"):
        run_sd(sd_pipe, DDIMScheduler, TAGCallback(wrong, omega=1.0), steps=2)


# --------------------------------------------------------------------------- DDIMPipeline / DDPMPipeline


@pytest.fixture(scope="module")
def digits():
    path = assets_dir("digits")
    unet = UNet2DModel.from_pretrained(path / "unet").eval()
    return unet, path / "unet", load_model(path / "time_predictor")


@pytest.mark.parametrize("pipeline_cls, scheduler_cls, kwargs", [
    (DDIMPipeline, DDIMScheduler, {"eta": 0.0}), (DDIMPipeline, DDIMScheduler, {"eta": 1.0}),
    (DDPMPipeline, DDPMScheduler, {})])
def test_sample_pipeline_equals_the_pipeline_and_tag_changes_it(digits, pipeline_cls, scheduler_cls, kwargs):
    unet, path, predictor = digits
    pipe = pipeline_cls(unet, scheduler_cls.from_pretrained(path))
    pipe.set_progress_bar_config(disable=True)
    common = dict(batch_size=3, num_inference_steps=8, output_type="np", **kwargs)
    own = pipe(generator=torch.Generator().manual_seed(0), **common).images
    ours = sample_pipeline(pipe, generator=torch.Generator().manual_seed(0), **common).images
    zero = sample_pipeline(pipe, terms=[TemporalAlignment(predictor, omega=0.0)],
                           generator=torch.Generator().manual_seed(0), **common).images
    assert np.array_equal(own, ours) and np.array_equal(own, zero)
    tagged = sample_pipeline(pipe, terms=[TemporalAlignment(predictor, omega=0.5, placement="post")],
                             generator=torch.Generator().manual_seed(0), **common).images
    assert tagged.shape == own.shape and np.isfinite(tagged).all() and not np.array_equal(own, tagged)


def test_sample_pipeline_output_types_and_errors(digits):
    unet, path, _ = digits
    pipe = DDIMPipeline(unet, DDIMScheduler.from_pretrained(path))
    pipe.set_progress_bar_config(disable=True)
    pil = sample_pipeline(pipe, batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert len(pil.images) == 2 and pil.images[0].size == (8, 8)
    (pt,) = sample_pipeline(pipe, batch_size=2, num_inference_steps=2, output_type="pt", return_dict=False)
    assert pt.shape == (2, 1, 8, 8) and float(pt.min()) >= 0 and float(pt.max()) <= 1
    with pytest.raises(ValueError, match="output_type"):
        sample_pipeline(pipe, output_type="latent")
    with pytest.raises(ValueError, match="generators"):
        sample_pipeline(pipe, batch_size=2, generator=[torch.Generator()])


def test_callback_keeps_the_pipelines_dtype_and_skips_outside_window(latent_predictor):
    from types import SimpleNamespace

    sched = DDIMScheduler(**SD_SCHEDULER)
    sched.set_timesteps(4)
    pipe = SimpleNamespace(scheduler=sched)
    latents = torch.randn(2, 4, LATENT, LATENT).to(torch.bfloat16)
    out = TAGCallback(latent_predictor, omega=50.0)(pipe, 0, sched.timesteps[0], {"latents": latents})["latents"]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all() and not torch.equal(out, latents)
    t_next = int(sched.timesteps[1])
    outside = TAGCallback(latent_predictor, omega=50.0, window=(0, t_next - 1))
    assert outside(pipe, 0, sched.timesteps[0], {"latents": latents})["latents"] is latents


# --------------------------------------------------------------------------- the shipped class-conditional UNet


def test_shipped_class_conditional_unet_with_cfg_and_tag_in_ddim_pipeline(digits):
    """unet_class (label dropout, null class 10 = y -1): CFG scale 1 is the conditional model bit for bit, CFG makes
    the requested digits, and CFG + TAG composes in the DDIMPipeline equivalent."""
    from tagdiff import ClassifierFreeGuidance
    from tagdiff.models.unet import load_unet

    path = assets_dir("digits") / "unet_class"
    model, _ = load_unet(path)
    assert model.null_class == 10
    pipe = DDIMPipeline(model.unet, DDIMScheduler.from_pretrained(path))
    pipe.set_progress_bar_config(disable=True)
    y = torch.arange(10).repeat(2)
    run = dict(batch_size=20, num_inference_steps=10, output_type="pt", cond={"y": y}, null_class=10)
    cond = sample_pipeline(pipe, generator=torch.Generator().manual_seed(0), **run).images
    one = sample_pipeline(pipe, terms=[ClassifierFreeGuidance(1.0, {"y": -1})],
                          generator=torch.Generator().manual_seed(0), **run).images
    assert torch.equal(cond, one)
    cfg = sample_pipeline(pipe, terms=[ClassifierFreeGuidance(3.0, {"y": -1})],
                          generator=torch.Generator().manual_seed(0), **run).images
    clf = load_model(assets_dir("digits") / "clf_eval")
    with torch.no_grad():
        acc = float((clf(cfg * 2 - 1).argmax(-1) == y).float().mean())
    assert acc >= 0.8, acc
    _, _, predictor = digits
    both = sample_pipeline(pipe, terms=[ClassifierFreeGuidance(3.0, {"y": -1}), TemporalAlignment(predictor, 0.5)],
                           generator=torch.Generator().manual_seed(0), **run).images
    assert torch.isfinite(both).all() and not torch.equal(both, cfg)


def test_callback_refuses_unipc_with_its_corrector_at_the_first_call(sd_pipe, latent_predictor):
    """UniPC's corrector rebuilds each sample from its history and drops most of a correction made between steps: the
    callback refuses it at its first call (after step 0, before any correction), naming the fix; with the corrector
    disabled on every step it corrects, and at ω = 0 it is the pipeline's own output bit for bit."""
    from diffusers import UniPCMultistepScheduler

    fix = r"UniPCMultistepScheduler's corrector .* disable_corrector=list\(range\(4\)\)"
    with pytest.raises(ValueError, match=fix):
        run_sd(sd_pipe, UniPCMultistepScheduler, TAGCallback(latent_predictor, omega=50.0))
    sd_pipe.scheduler = UniPCMultistepScheduler.from_config(sd_pipe.scheduler.config, disable_corrector=[0, 1, 2, 3])

    def run(callback=None):
        return sd_pipe(["ab", "cd"], num_inference_steps=4, guidance_scale=3.0, height=LATENT, width=LATENT,
                       generator=torch.Generator().manual_seed(0), output_type="latent",
                       callback_on_step_end=callback).images

    plain, zero = run(), run(TAGCallback(latent_predictor, omega=0.0))
    cb = TAGCallback(latent_predictor, omega=50.0)
    tagged = run(cb)
    assert torch.equal(plain, zero) and not torch.equal(plain, tagged) and [h[0] for h in cb.history] == [0, 1, 2]


def test_unsupported_flow_schedulers_are_refused_naming_what_is_not_supported(latent_predictor):
    """Flow-matching schedulers tagdiff does not drive (tests/integrations/test_flow_pipelines.py has the supported
    ones) are refused as such, by ``sample_scheduler`` before any step and by ``TAGCallback`` at its first call, before
    it corrects anything: not with a message about unknown config fields or betas."""
    from types import SimpleNamespace

    from diffusers import DEISMultistepScheduler, FlowMatchLCMScheduler

    from tagdiff import sample_scheduler

    flows = {FlowMatchLCMScheduler(): "FlowMatchLCMScheduler is not supported",
             DEISMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction"): "ends at .* σ > 0",
             DPMSolverMultistepScheduler(use_flow_sigmas=True): "needs prediction_type='flow_prediction'"}
    for sched, match in flows.items():
        sched.set_timesteps(4)
        latents = torch.randn(1, 4, LATENT, LATENT)
        with pytest.raises(ValueError, match=match) as e:
            TAGCallback(latent_predictor, omega=1.0)(SimpleNamespace(scheduler=sched), 0, sched.timesteps[0],
                                                     {"latents": latents})
        assert "betas" not in str(e.value) and "not understood" not in str(e.value)
        with pytest.raises(ValueError, match=match):
            sample_scheduler(sched, lambda x, t: torch.zeros_like(x), latents, num_inference_steps=4)


def test_sample_pipeline_shows_a_progress_bar_as_the_pipeline_does(digits, capsys):
    """Like the pipeline's own call: a bar unless ``set_progress_bar_config(disable=True)``; ``progress=`` overrides."""
    unet, path, _ = digits
    pipe = DDIMPipeline(unet, DDIMScheduler.from_pretrained(path))
    capsys.readouterr()
    sample_pipeline(pipe, batch_size=1, num_inference_steps=3, output_type="np")
    assert "0/3" in capsys.readouterr().err
    sample_pipeline(pipe, batch_size=1, num_inference_steps=3, output_type="np", progress=False)
    assert "0/3" not in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    sample_pipeline(pipe, batch_size=1, num_inference_steps=3, output_type="np")
    assert "0/3" not in capsys.readouterr().err


def test_singlestep_dpm_solver_of_higher_order_is_refused_and_order_one_corrects(sd_pipe, latent_predictor):
    """DPM-Solver single-step computes each step of an order-2 group from the sample saved at the group's start, so a
    correction made inside a group changes nothing downstream (measured by benchmarks/callback_table.py: the pixel
    run with TAG at ω = 5 was the plain run bit for bit). Refused at the first call; order 1 keeps corrections."""
    from diffusers import DPMSolverSinglestepScheduler

    with pytest.raises(ValueError, match=r"DPMSolverSinglestepScheduler \(solver_order 2\).*solver_order=1"):
        run_sd(sd_pipe, DPMSolverSinglestepScheduler, TAGCallback(latent_predictor, omega=50.0))
    sd_pipe.scheduler = DPMSolverSinglestepScheduler.from_config(sd_pipe.scheduler.config, solver_order=1)

    def run(callback=None):
        return sd_pipe(["ab", "cd"], num_inference_steps=4, guidance_scale=3.0, height=LATENT, width=LATENT,
                       generator=torch.Generator().manual_seed(0), output_type="latent",
                       callback_on_step_end=callback).images

    plain, zero, tagged = run(), run(TAGCallback(latent_predictor, omega=0.0)), run(TAGCallback(latent_predictor, 50.0))
    assert torch.equal(plain, zero) and not torch.equal(plain, tagged)
