"""TAGCallback on diffusers' flow pipelines, built tiny from configs (no weights, no text encoders: prompt embeddings
are given as tensors): StableDiffusion3Pipeline (latents (B, C, H, W)) and FluxPipeline (packed latents
(B, H/2 · W/2, 4C)), with a σ-bin time predictor trained here on the pipelines' latent shape with flow_time_loss.

After ``scheduler.step`` the latents are x_σ at σ = ``scheduler.sigmas[scheduler.step_index]``: the predictor sees
x / r(σ), the target is the nearest σ bin, the correction is r · ω_t · TLS; at ω = 0 the pipeline's latents come back
bit for bit."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    FlowMatchLCMScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    UniPCMultistepScheduler,
)

from tagdiff import SimpleCNNTimePredictor, VPSchedule, tls  # noqa: E402
from tagdiff.integrations.diffusers import TAGCallback, callback_target, pack_latents, unpack_latents  # noqa: E402
from tagdiff.models.time_predictor import flow_time_loss  # noqa: E402
from tagdiff.sampling.flow_path import FlowSchedule  # noqa: E402

C, LATENT, PIXELS = 4, 8, 16   # latents (B, 4, 8, 8); the tiny VAE halves the resolution
FLOW = FlowSchedule()


def _vae():
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8], layers_per_block=1,
                         latent_channels=C, norm_num_groups=4, shift_factor=0.0609, scaling_factor=1.5035,
                         use_quant_conv=False, use_post_quant_conv=False)


@pytest.fixture(scope="module")
def sd3():
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=LATENT, patch_size=2, in_channels=C, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                        caption_projection_dim=16, pooled_projection_dim=16, out_channels=C,
                                        pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=_vae(), text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux():
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4 * C, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=16, guidance_embeds=False, axes_dims_rope=(2, 2, 4))
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256)
    pipe = FluxPipeline(transformer=transformer, scheduler=sched, vae=_vae(), text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def predictor():
    """A σ-bin predictor on (4, 8, 8) latents, trained here (seeded, 60 Adam steps on a two-pattern latent set with
    SD3's logit-normal σ density); it records its schedule, FlowSchedule().vp_schedule, as tagdiff's checkpoints do."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    patterns = torch.randn(2, C, LATENT, LATENT, generator=g)
    net = SimpleCNNTimePredictor(C, LATENT, FLOW.num_train_timesteps, widths=(16, 32))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(60):
        x0 = patterns[torch.randint(0, 2, (64,), generator=g)] + 0.3 * torch.randn(64, C, LATENT, LATENT, generator=g)
        loss = flow_time_loss(net, x0, FLOW, "logit_normal", g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.schedule = FLOW.vp_schedule
    return net.eval()


def _embeds(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_embeds=torch.randn(batch, 5, 16, generator=g),
                pooled_prompt_embeds=torch.randn(batch, 16, generator=g))


def run_sd3(pipe, callback=None, steps=4, guidance_scale=3.0):
    neg = {f"negative_{k}": v for k, v in _embeds(seed=1).items()}
    return pipe(**_embeds(), **neg, guidance_scale=guidance_scale, num_inference_steps=steps, height=PIXELS,
                width=PIXELS, output_type="latent", generator=torch.Generator().manual_seed(0),
                callback_on_step_end=callback).images


SD3_SCHEDULERS = [
    (FlowMatchEulerDiscreteScheduler, {"shift": 3.0}, [0, 1, 2]),
    (FlowMatchHeunDiscreteScheduler, {"shift": 3.0}, [1, 3, 5]),     # 7 calls; TAG after each full step
    (DPMSolverMultistepScheduler, {"use_flow_sigmas": True, "prediction_type": "flow_prediction",
                                   "flow_shift": 3.0}, [0, 1, 2]),
]


@pytest.mark.parametrize("cls,kw,corrected", SD3_SCHEDULERS, ids=lambda v: getattr(v, "__name__", ""))
def test_sd3_with_cfg_omega_zero_is_bit_for_bit_and_omega_corrects_at_every_step_with_a_target(
        sd3, predictor, cls, kw, corrected):
    sd3.scheduler = cls(**kw)
    plain = run_sd3(sd3)
    assert torch.equal(plain, run_sd3(sd3, TAGCallback(predictor, omega=0.0)))
    cb = TAGCallback(predictor, omega=5.0)
    tagged = run_sd3(sd3, cb)
    assert torch.isfinite(tagged).all() and (tagged - plain).abs().max() > 1e-3
    assert [h[0] for h in cb.history] == corrected          # after the last step σ = 0: no target
    ref = cls(**kw)
    ref.set_timesteps(4)
    sigmas = ref.sigmas.double()
    assert [h[1] for h in cb.history] == [int(FLOW.class_of(sigmas[i + 1])) for i in corrected]


def test_the_correction_is_r_times_omega_t_times_the_tls_of_the_vp_view(predictor):
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(4)
    latents = torch.randn(2, C, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    sched.step(torch.zeros_like(latents), sched.timesteps[0], latents)     # now at σ = sigmas[1]
    sigma = sched.sigmas[1].double()
    t_prev, r = callback_target(sched, 0, FLOW.vp_schedule)
    assert t_prev == int(FLOW.class_of(sigma)) and r == pytest.approx(float(FLOW.r(sigma)), rel=1e-12)
    out = TAGCallback(predictor, omega=2.0)(SimpleNamespace(scheduler=sched), 0, sched.timesteps[0],
                                            {"latents": latents})["latents"]
    t = torch.full((2,), t_prev)
    omega_t = 2.0 * (1 - float(FLOW.vp_schedule.alpha_bar[t_prev]))
    expected = latents + r * omega_t * tls(predictor, latents / r, t)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6) and not torch.equal(out, latents)


def run_flux(pipe, callback=None, steps=4):
    return pipe(**_embeds(), num_inference_steps=steps, height=PIXELS, width=PIXELS, output_type="latent",
                generator=torch.Generator().manual_seed(0), callback_on_step_end=callback).images


def test_flux_packed_latents_are_unpacked_for_the_predictor_and_the_correction_repacked(flux, predictor):
    """FluxPipeline (dynamic shifting: the pipeline passes mu) hands the callback packed latents (B, seq, 4C):
    tagdiff unpacks them as FluxPipeline._unpack_latents does, and packs the correction back."""
    x = torch.randn(2, C, LATENT, LATENT)
    assert torch.equal(pack_latents(x), FluxPipeline._pack_latents(x, 2, C, LATENT, LATENT))
    assert torch.equal(unpack_latents(pack_latents(x), (C, LATENT, LATENT)), x)
    assert torch.equal(FluxPipeline._unpack_latents(pack_latents(x), PIXELS, PIXELS, 2), x)
    plain = run_flux(flux)
    assert plain.shape == (2, LATENT * LATENT // 4, 4 * C)
    assert torch.equal(plain, run_flux(flux, TAGCallback(predictor, omega=0.0)))
    cb = TAGCallback(predictor, omega=5.0, record_time_gap=True)
    tagged = run_flux(flux, cb)
    assert torch.isfinite(tagged).all() and (tagged - plain).abs().max() > 1e-3
    assert [h[0] for h in cb.history] == [0, 1, 2] and [g[0] for g in cb.time_gaps] == [0, 1, 2]
    with pytest.raises(ValueError, match="not packed"):
        unpack_latents(torch.randn(2, 15, 4 * C), (C, LATENT, LATENT))


def test_unsupported_flow_schedulers_and_vp_predictors_are_refused_before_any_correction(sd3, predictor):
    """Refused at the first call (after step 0, before correcting): DEIS's flow σs (its grid ends at σ > 0),
    FlowMatchLCM (not checked), UniPC's corrector (it discards the corrections); a predictor trained on a VP
    schedule names both schedules."""
    cases = [(DEISMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction"), "σ > 0"),
             (FlowMatchLCMScheduler(), "FlowMatchLCMScheduler is not supported"),
             (UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction"),
              "UniPCMultistepScheduler's corrector")]
    latents = torch.randn(2, C, LATENT, LATENT)
    for sched, match in cases:
        sched.set_timesteps(4)
        cb = TAGCallback(predictor, omega=1.0)
        with pytest.raises(ValueError, match=match):
            cb(SimpleNamespace(scheduler=sched), 0, sched.timesteps[0], {"latents": latents})
        assert cb.history == []
    vp = SimpleCNNTimePredictor(C, LATENT, 1000, widths=(8,)).eval()
    vp.schedule = VPSchedule.linear(1000)
    sd3.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    with pytest.raises(ValueError, match="was trained on schedule"):
        run_sd3(sd3, TAGCallback(vp, omega=1.0))


def test_a_predictor_trained_by_the_cli_on_an_sd3_pipelines_latents_plugs_into_tag_callback(tmp_path):
    """``tagdiff train time-predictor --checkpoint SD3_PIPELINE --dataset folder:IMAGES``: the images are encoded by the
    pipeline's VAE ((mean − shift_factor) · scaling_factor), the σ bins follow its FlowMatch scheduler, and the
    predictor, given by its folder, corrects the pipeline's own call (ω = 0: its latents bit for bit)."""
    import json

    from cli_helpers import run
    from tagdiff import load
    from tagdiff.integrations.tiny import image_folder, sd3_pipeline

    folder, images = sd3_pipeline(tmp_path / "sd3"), image_folder(tmp_path / "images")
    run("train", "time-predictor", "--checkpoint", folder, "--dataset", f"folder:{images}", "--out", tmp_path / "tp",
        "--steps", "3", "--batch-size", "8", "--quiet")
    cfg = json.loads((tmp_path / "tp" / "config.json").read_text())
    assert cfg["vae"]["shift_factor"] == pytest.approx(0.0609) and cfg["vae"]["latent_shape"] == [C, LATENT, LATENT]
    assert cfg["config"]["in_channels"] == C and "flow" in cfg
    pipe = load(folder)  # the pipeline (its text encoders were saved absent: they load as None), with .schedule
    assert isinstance(pipe.schedule, FlowSchedule)
    pipe.set_progress_bar_config(disable=True)
    plain, zero = run_sd3(pipe), run_sd3(pipe, TAGCallback(str(tmp_path / "tp"), omega=0.0))
    cb = TAGCallback(str(tmp_path / "tp"), omega=5.0)
    tagged = run_sd3(pipe, cb)
    assert torch.equal(plain, zero) and torch.isfinite(tagged).all() and not torch.equal(plain, tagged)
    assert [h[0] for h in cb.history] == [0, 1, 2]
