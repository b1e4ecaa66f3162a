"""TAG on your own diffusers model, every route (docs/your-model.md): from configs alone, a pixel DDPM pipeline, a
v-prediction zero-terminal-SNR UNet folder and a tiny Stable-Diffusion pipeline are built; a time predictor is trained
for each with the CLI (a few steps); each is sampled with TAG through the CLI and through TAGCallback /
sample_pipeline for DDIM, DPM-Solver++, Euler and UniPC (corrector off), and ω = 0 is the pipeline's own output bit
for bit."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from diffusers import (  # noqa: E402
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UNet2DModel,
    UniPCMultistepScheduler,
)

from cli_helpers import error_line, run  # noqa: E402
from tagdiff import TemporalAlignment, load  # noqa: E402
from tagdiff.cli.pipeline import pipeline_scheduler  # noqa: E402
from tagdiff.integrations.diffusers import TAGCallback, sample_pipeline  # noqa: E402
from tagdiff.integrations.tiny import PROMPT, image_folder, pixel_pipeline, sd_pipeline, vpred_zero_snr_unet  # noqa: E402

SAMPLERS = ("ddim", "dpmpp2m", "euler", "unipc_p")
STEPS, N = 4, 2


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The three model folders and a latent / pixel time predictor for each, trained by the CLI."""
    root = tmp_path_factory.mktemp("your-model")
    images = image_folder(root / "images")
    models = {"pixel": pixel_pipeline(root / "pixel"), "vpred": vpred_zero_snr_unet(root / "vpred"),
              "sd": sd_pipeline(root / "sd")}
    predictors = {}
    for kind, folder in models.items():
        predictors[kind] = root / f"tp-{kind}"
        run("train", "time-predictor", "--checkpoint", folder, "--dataset", f"folder:{images}", "--out",
            predictors[kind], "--steps", "3", "--batch-size", "8", "--quiet")
    return root, images, models, predictors


def test_the_cli_reads_schedule_shape_and_vae_from_each_folder(folders):
    root, _, models, predictors = folders
    sd = json.loads((predictors["sd"] / "config.json").read_text())
    assert sd["config"]["in_channels"] == 4 and sd["config"]["image_size"] == 8  # the pipeline's latents
    assert sd["schedule"]["kind"] == "scaled_linear" and sd["vae"]["path"] == str((models["sd"] / "vae").resolve())
    assert sd["vae"]["scaling_factor"] == pytest.approx(0.18215)
    vp = json.loads((predictors["vpred"] / "config.json").read_text())
    assert vp["config"]["in_channels"] == 3 and vp["config"]["image_size"] == 8 and "vae" not in vp
    assert vp["schedule"] == {"kind": "scaled_linear", "num_train_timesteps": 1000, "beta_start": 0.00085,
                              "beta_end": 0.012, "rescale_zero_snr": True}
    px = json.loads((predictors["pixel"] / "config.json").read_text())
    assert px["schedule"]["kind"] == "linear" and px["config"]["in_channels"] == 3
    for kind in models:  # the end of training names its figure; no cache inside any model folder
        assert (predictors[kind] / "report.png").is_file()
        assert not list(models[kind].rglob("*latent_cache*")) and not list(models[kind].rglob("*.safetensors.tmp"))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_cli_sampling_with_tag_on_a_stable_diffusion_pipeline(folders, tmp_path, sampler):
    """``tagdiff sample --checkpoint PIPELINE --prompt`` runs the pipeline's own call with TAGCallback: ω = 0 gives the
    pipeline's latents bit for bit, ω > 0 changes them, and the Time Gap is recorded and plotted."""
    _, _, models, predictors = folders
    common = ["sample", "--checkpoint", models["sd"], "--prompt", PROMPT, "--time-predictor", predictors["sd"],
              "--sampler", sampler, "--num-steps", STEPS, "--num-samples", N, "--seed", "3", "--quiet"]
    run(*common, "--omega", "0", "--out", tmp_path / "zero")
    run(*common, "--omega", "5", "--out", tmp_path / "tag")
    zero, tag = (np.load(tmp_path / d / "samples.npz") for d in ("zero", "tag"))
    pipe = DiffusionPipeline.from_pretrained(models["sd"])
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = pipeline_scheduler(sampler, dict(pipe.scheduler.config))
    kwargs = {"eta": 1.0} if sampler == "ddim" else {}
    own = pipe([PROMPT] * N, num_inference_steps=STEPS, height=16, width=16, guidance_scale=7.5, output_type="latent",
               generator=torch.Generator().manual_seed(3), **kwargs).images
    assert np.array_equal(zero["z"], own.numpy())
    assert zero["x"].shape == (N, 3, 16, 16) and np.isfinite(tag["z"]).all() and not np.array_equal(zero["z"], tag["z"])
    summary = json.loads((tmp_path / "tag" / "summary.json").read_text())
    assert len(summary["time_gap_per_step"]) == STEPS - 1 and summary["corrections"]
    assert (tmp_path / "tag" / "time_gap.png").is_file() and (tmp_path / "tag" / "grid.png").is_file()


@pytest.mark.parametrize("scheduler_cls, extra", [(DDIMScheduler, {}), (DPMSolverMultistepScheduler, {}),
                                                  (EulerDiscreteScheduler, {}),
                                                  (UniPCMultistepScheduler, {"disable_corrector": [0, 1, 2, 3]})])
def test_tag_callback_on_the_stable_diffusion_pipeline(folders, scheduler_cls, extra):
    """The predictor trained by the CLI plugs into TAGCallback by its path; ω = 0 is the pipeline bit for bit."""
    _, _, models, predictors = folders
    pipe = load(models["sd"])  # the one loader gives the pipeline, with its schedule
    assert pipe.schedule.num_train_timesteps == 1000
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **extra)

    def call(callback=None):
        return pipe([PROMPT] * N, num_inference_steps=STEPS, height=16, width=16, guidance_scale=3.0,
                    output_type="latent", generator=torch.Generator().manual_seed(0),
                    callback_on_step_end=callback).images

    plain, zero = call(), call(TAGCallback(str(predictors["sd"]), omega=0.0))
    cb = TAGCallback(str(predictors["sd"]), omega=5.0)
    tagged = call(cb)
    assert torch.equal(plain, zero) and torch.isfinite(tagged).all() and not torch.equal(plain, tagged)
    assert [h[0] for h in cb.history] == [0, 1, 2]


@pytest.mark.parametrize("kind", ["pixel", "vpred"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_cli_sampling_with_tag_on_unet_folders(folders, tmp_path, kind, sampler):
    """A pixel pipeline folder and a v-prediction zero-SNR UNet folder through ``tagdiff sample``: TAG at ω > 0 changes
    the samples, ω = 0 equals the run without a time predictor bit for bit, the Time Gap is recorded and plotted."""
    _, _, models, predictors = folders
    common = ["sample", "--checkpoint", models[kind], "--sampler", sampler, "--num-steps", STEPS, "--num-samples",
              N, "--quiet"]
    run(*common, "--out", tmp_path / "plain")
    run(*common, "--time-predictor", predictors[kind], "--omega", "0", "--out", tmp_path / "zero")
    run(*common, "--time-predictor", predictors[kind], "--omega", "5", "--out", tmp_path / "tag")
    plain, zero, tag = (np.load(tmp_path / d / "samples.npz")["x"] for d in ("plain", "zero", "tag"))
    assert np.array_equal(plain, zero) and np.isfinite(tag).all() and not np.array_equal(plain, tag)
    summary = json.loads((tmp_path / "tag" / "summary.json").read_text())
    assert summary["time_gap"] is not None and (tmp_path / "tag" / "time_gap.png").is_file()


def _pixel_pipe(folder, scheduler_cls, extra):
    unet_dir = folder / "unet" if (folder / "unet").is_dir() else folder
    sched_dir = folder / "scheduler" if (folder / "scheduler").is_dir() else folder
    unet = UNet2DModel.from_pretrained(unet_dir).eval()
    scheduler = scheduler_cls.from_pretrained(sched_dir, **extra)
    pipe = (DDIMPipeline if scheduler_cls is DDIMScheduler else DDPMPipeline)(unet, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind", ["pixel", "vpred"])
@pytest.mark.parametrize("scheduler_cls, extra, own_call", [
    (DDIMScheduler, {}, True), (DPMSolverMultistepScheduler, {}, True), (DDPMScheduler, {}, True),
    (EulerDiscreteScheduler, {}, False), (UniPCMultistepScheduler, {"disable_corrector": [0, 1, 2, 3]}, False)])
def test_sample_pipeline_on_unet_folders(folders, kind, scheduler_cls, extra, own_call):
    """sample_pipeline with TAG at ω = 0 is the pipeline's own call bit for bit where the pipeline can run the
    scheduler (DDIMPipeline: DDIM; DDPMPipeline: DDPM, DPM-Solver++); DDPMPipeline cannot run Euler (it skips
    scale_model_input) or UniPC (its step takes no generator), so there ω = 0 is compared with the diffusers loop
    (``sample_pipeline`` without terms, the plain loop by construction)."""
    _, _, models, predictors = folders
    pipe = _pixel_pipe(models[kind], scheduler_cls, extra)
    common = dict(batch_size=N, num_inference_steps=STEPS, output_type="np")

    def ours(omega=None):
        terms = [] if omega is None else [TemporalAlignment(str(predictors[kind]), omega, placement="post")]
        return sample_pipeline(pipe, terms=terms, generator=torch.Generator().manual_seed(0), **common).images

    reference = pipe(generator=torch.Generator().manual_seed(0), **common).images if own_call else ours()
    assert np.array_equal(reference, ours(0.0))
    tagged = ours(5.0)
    assert np.isfinite(tagged).all() and not np.array_equal(reference, tagged)


def test_mistakes_get_one_line_refusals(folders, tmp_path, capsys):
    root, images, models, predictors = folders
    line = error_line(capsys, "train", "time-predictor", "--checkpoint", models["sd"], "--out", tmp_path / "x")
    assert "--dataset" in line and not (tmp_path / "x").exists()
    line = error_line(capsys, "sample", "--checkpoint", models["sd"], "--out", tmp_path / "y", "--quiet")
    assert "--prompt" in line and not (tmp_path / "y").exists()  # no empty output folder after a failed run
    line = error_line(capsys, "sample", "--checkpoint", models["sd"], "--prompt", PROMPT, "--time-predictor",
                      predictors["sd"], "--omega", "1", "--sampler", "unipc", "--num-steps", "3", "--out",
                      tmp_path / "z", "--quiet")
    assert "unipc_p" in line and not (tmp_path / "z").exists()
    line = error_line(capsys, "sample", "--checkpoint", models["pixel"], "--prompt", PROMPT, "--out", tmp_path / "w")
    assert "text-conditional" in line
    pipe = load(models["sd"])
    with pytest.raises(ValueError, match="TAGCallback"):
        sample_pipeline(pipe, terms=[TemporalAlignment(str(predictors["sd"]), 1.0)])
    with pytest.raises(ValueError, match="omega"):
        TAGCallback(str(predictors["sd"]), omega=-1.0)
