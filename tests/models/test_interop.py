"""diffusers interop and recipes: the UNet wrapper is the UNet, saved folders are real diffusers folders, and tagdiff's
DDPM sampler reproduces diffusers' own DDPMScheduler loop / DDPMPipeline on the same UNet and noise."""

from __future__ import annotations

import json

import pytest
import torch

from tagdiff.cli.recipes import exporter, make_classifier, make_eps_model, make_time_predictor
from tagdiff.data import DatasetInfo, dataset_info
from tagdiff.models.checkpoints import CheckpointError, save_model
from tagdiff.models.classifiers import CleanClassifier, EvalClassifier, NoisyClassifier
from tagdiff.models.load import load_checkpoint
from tagdiff.models.nets import MLPEpsModel
from tagdiff.models.time_predictor import MLPTimePredictor, SimpleCNNTimePredictor
from tagdiff.models.unet import UNetEpsModel, is_diffusers_folder, load_unet, make_unet, save_unet
from tagdiff.sampling.samplers import sample_ddpm
from tagdiff.sampling.schedules import VPSchedule

diffusers = pytest.importorskip("diffusers")


def _unet(seed: int = 0, size: int = 8, channels: int = 1, **kw) -> UNetEpsModel:
    torch.manual_seed(seed)
    unet = make_unet(size, channels, widths=(8, 16), **kw)
    # diffusers zero-initialises conv_out: perturb every weight so that the outputs depend on x and t
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return UNetEpsModel(unet.eval())


def _x(n: int = 3, shape=(1, 8, 8), seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- the wrapper


def test_wrapper_equals_unet_exactly():
    model = _unet()
    x, t = _x(), torch.tensor([0, 417, 999])
    with torch.no_grad():
        out = model(x, t)
        ref = model.unet(x, t).sample
        # a scalar timestep is broadcast to the batch, exactly as per-sample equal timesteps
        scalar = model(x, torch.tensor(417))
        per_sample = model.unet(x, torch.full((3,), 417)).sample
    assert out.shape == x.shape
    assert torch.equal(out, ref)
    assert torch.equal(scalar, per_sample)
    assert not torch.allclose(out[0], model(x[:1], torch.tensor([999]))[0])  # depends on t


def test_wrapper_class_conditional_passes_labels():
    model = _unet(num_classes=3)
    x, t, y = _x(), torch.tensor([5, 5, 5]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        assert torch.equal(model(x, t, y), model.unet(x, t, class_labels=y).sample)
        assert not torch.allclose(model(x, t, y), model(x, t, torch.tensor([2, 1, 0])))


@pytest.mark.parametrize("shape", [(3, 1, 8, 9), (3, 2, 8, 8), (3, 64), (3, 1, 4, 4)])
def test_wrong_x_shape_names_expected_shape(shape):
    model = _unet()
    with pytest.raises(ValueError, match=r"expects \(B, 1, 8, 8\)"):
        model(torch.zeros(shape), torch.zeros(3, dtype=torch.long))


def test_wrapper_attributes_and_attention_variant():
    model = _unet(size=8, channels=3, attention=True)
    assert model.sample_shape == (3, 8, 8) and model.num_train_timesteps == 1000
    assert "AttnDownBlock2D" in model.config["down_block_types"]
    json.dumps(model.config)  # JSON-able (used as the model config in training states)
    with torch.no_grad():
        out = model(_x(2, (3, 8, 8)), torch.tensor([3, 700]))
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("schedule", [VPSchedule.linear(1000), VPSchedule.cosine(50), VPSchedule.cosine(1000),
                                      VPSchedule.linear(200, 2e-4, 0.03), VPSchedule(torch.linspace(1e-3, 0.2, 30))],
                         ids=["linear", "cosine50", "cosine", "linear-custom", "trained-betas"])
def test_save_load_round_trip(tmp_path, schedule):
    model = _unet()
    model.num_train_timesteps = schedule.num_train_timesteps
    path = save_unet(model, schedule, tmp_path / "m", command="tagdiff test")
    assert is_diffusers_folder(path)
    loaded, sch = load_unet(path)
    assert sch == schedule and sch.num_train_timesteps == schedule.num_train_timesteps
    assert sch.to_dict()["kind"] == schedule.to_dict()["kind"]
    assert loaded.num_train_timesteps == schedule.num_train_timesteps and not loaded.training
    x, t = _x(), torch.tensor([0, 7, schedule.num_train_timesteps - 1])
    with torch.no_grad():
        assert torch.equal(loaded(x, t), model(x, t))
    meta = json.loads((path / "tagdiff.json").read_text())
    assert meta["command"] == "tagdiff test" and VPSchedule.from_dict(meta["schedule"]) == schedule


def test_folder_is_a_diffusers_model_and_pipeline(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    model, schedule = _unet(), VPSchedule.linear(1000)
    save_unet(model, schedule, tmp_path / "m")
    unet = UNet2DModel.from_pretrained(tmp_path / "m")
    scheduler = DDPMScheduler.from_pretrained(tmp_path / "m")
    assert VPSchedule.from_diffusers(scheduler) == schedule
    assert torch.allclose(scheduler.alphas_cumprod.double(), schedule.alpha_bar, atol=1e-6)
    x, t = _x(), torch.tensor([1, 2, 3])
    with torch.no_grad():
        assert torch.equal(unet(x, t).sample, model(x, t))
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    img = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="np").images
    assert img.shape == (2, 8, 8, 1)
    # the same run with tagdiff: same x_T and noise (same generator), grid [500, 0], diffusers' clip_sample=True
    assert scheduler.config.clip_sample and scheduler.config.clip_sample_range == 1.0
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn((2, 1, 8, 8), generator=g)
    with torch.no_grad():
        x0 = sample_ddpm(model, x_T, schedule.timesteps(2, "leading"), schedule, clip_x0=1.0,
                         randn_like=lambda z: torch.randn(z.shape, generator=g, dtype=z.dtype))
    ours = (x0 / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(ours - img).max() < 1e-5


def test_pipeline_layout_is_accepted(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler

    model, schedule = _unet(), VPSchedule.cosine(1000)
    DDPMPipeline(unet=model.unet, scheduler=DDPMScheduler(**schedule.to_diffusers_config())).save_pretrained(
        tmp_path / "pipe")
    assert (tmp_path / "pipe" / "unet" / "config.json").is_file()
    assert (tmp_path / "pipe" / "scheduler" / "scheduler_config.json").is_file()
    loaded, sch = load_unet(tmp_path / "pipe")
    assert sch == schedule
    x, t = _x(), torch.tensor([10, 20, 30])
    with torch.no_grad():
        assert torch.equal(loaded(x, t), model(x, t))
    # load_checkpoint (the CLI's loader) accepts it as well
    via_recipes, sch2 = load_checkpoint(tmp_path / "pipe")
    assert isinstance(via_recipes, UNetEpsModel) and sch2 == schedule


def test_not_a_diffusers_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a diffusers"):
        load_unet(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a diffusers"):
        load_unet(tmp_path / "empty")
    # a tagdiff (non-diffusers) checkpoint
    save_model(MLPEpsModel(2, 1000, 8, 2), tmp_path / "mlp")
    assert not is_diffusers_folder(tmp_path / "mlp")
    with pytest.raises(CheckpointError, match="not a diffusers"):
        load_unet(tmp_path / "mlp")
    # another diffusers class
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(CheckpointError):
        load_unet(tmp_path / "vae")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{not json")
    assert not is_diffusers_folder(tmp_path / "junk")


def test_missing_scheduler_config(tmp_path):
    model = _unet()
    model.unet.save_pretrained(tmp_path / "m")
    assert is_diffusers_folder(tmp_path / "m")
    with pytest.raises(CheckpointError, match="scheduler_config.json"):
        load_unet(tmp_path / "m")
    with pytest.raises(CheckpointError, match="scheduler_config.json"):
        load_checkpoint(tmp_path / "m")


def test_corrupt_weights_and_prediction_types(tmp_path):
    from diffusers import DDPMScheduler

    path = save_unet(_unet(), VPSchedule.linear(1000), tmp_path / "m")
    DDPMScheduler(prediction_type="v_prediction").save_pretrained(tmp_path / "v")
    _unet().unet.save_pretrained(tmp_path / "v")
    assert load_unet(tmp_path / "v")[0].prediction_type == "v_prediction"   # v-models load; the loops convert
    DDPMScheduler(prediction_type="flow").save_pretrained(tmp_path / "v")
    with pytest.raises(CheckpointError, match="'flow'"):
        load_unet(tmp_path / "v")
    (path / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        load_unet(path)


def test_save_over_existing_folder_keeps_siblings_and_no_temp_folders(tmp_path):
    schedule = VPSchedule.linear(1000)
    path = save_unet(_unet(0), schedule, tmp_path / "m")
    (path / "train_state.safetensors").write_bytes(b"state")
    (path / "history.json").write_text("[[1, 0.5]]")
    second = _unet(1)
    save_unet(second, VPSchedule.cosine(1000), path)
    assert (path / "train_state.safetensors").read_bytes() == b"state"
    assert (path / "history.json").read_text() == "[[1, 0.5]]"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no .m.* temp or .old folders
    loaded, sch = load_unet(path)
    assert sch == VPSchedule.cosine(1000)
    x, t = _x(), torch.tensor([1, 2, 3])
    with torch.no_grad():
        assert torch.equal(loaded(x, t), second(x, t))
        assert not torch.equal(loaded(x, t), _unet(0)(x, t))


def test_tagdiff_ddpm_equals_diffusers_scheduler_loop():
    from diffusers import DDPMScheduler

    schedule = VPSchedule.linear(1000)
    model = _unet()
    n = 10
    x_T = _x(4, seed=5)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        ours = sample_ddpm(model, x_T, schedule.timesteps(n, "leading"), schedule, clip_x0=None,
                           randn_like=lambda z: torch.randn(z.shape, generator=g, dtype=z.dtype))
    sched = DDPMScheduler(**schedule.to_diffusers_config(), clip_sample=False)
    sched.set_timesteps(n)
    assert sched.timesteps.tolist() == schedule.timesteps(n, "leading").tolist()
    g = torch.Generator().manual_seed(11)
    x = x_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model.unet(x, t).sample, t, x, generator=g).prev_sample
    assert ours.dtype == torch.float32 and ours.shape == x.shape
    # an untrained UNet's x0_hat is large at high noise (|x| ~ 100 here). The two loops write the same step with
    # other operation orders, and the UNet sees the same inputs: float32 agreement to ~8 roundings (2^-24 each) per
    # step over 10 steps, ≤ 5e-6 relative. Allowed 1e-5 relative + 1e-5 absolute; measured ≤ 6e-7 relative on every
    # kernel set (ATen default/avx2/avx512, MKL AVX2/SSE4.2, 1-2 threads).
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)
    assert (ours - x_T).abs().max() > 0.1  # the loop did something


# ---------------------------------------------------------------------------------------------- recipes


def test_make_models_per_data_kind():
    vec, img = dataset_info("toy"), dataset_info("digits")
    eps = make_eps_model(vec, 100, hidden=16, layers=2)
    assert isinstance(eps, MLPEpsModel) and eps.num_train_timesteps == 100
    assert eps(torch.zeros(3, 2), torch.tensor([0, 1, 99])).shape == (3, 2)
    unet = make_eps_model(img, 50, widths=(8, 16))
    assert isinstance(unet, UNetEpsModel) and unet.sample_shape == (1, 8, 8) and unet.num_train_timesteps == 50
    assert tuple(unet.unet.config.block_out_channels) == (8, 16)
    tp = make_time_predictor(vec, 100, hidden=16, layers=2)
    assert isinstance(tp, MLPTimePredictor) and tp(torch.zeros(3, 2)).shape == (3, 100)
    tp = make_time_predictor(img, 50, num_classes=10)
    assert isinstance(tp, SimpleCNNTimePredictor) and tp.sample_shape == (1, 8, 8)
    assert tp(torch.zeros(2, 1, 8, 8), torch.tensor([0, 9])).shape == (2, 50)


def test_non_square_images_rejected():
    info = DatasetInfo("folder", (1, 8, 12), 2)
    with pytest.raises(ValueError, match="square"):
        make_eps_model(info, 1000)
    with pytest.raises(ValueError, match="square"):
        make_time_predictor(info, 1000)


def test_make_classifier_kinds_and_errors():
    img = dataset_info("digits")
    expected = {"noisy": NoisyClassifier, "clean": CleanClassifier, "eval": EvalClassifier}
    for kind, cls in expected.items():
        clf, loss = make_classifier(kind, img, 50)
        assert isinstance(clf, cls) and clf.num_classes == 10 and callable(loss)
    assert make_classifier("noisy", img, 50)[0].num_train_timesteps == 50
    with pytest.raises(ValueError, match="unknown classifier kind"):
        make_classifier("fuzzy", img, 1000)
    with pytest.raises(ValueError, match="image datasets"):
        make_classifier("clean", dataset_info("toy"), 1000)
    with pytest.raises(ValueError, match="no class labels"):
        make_classifier("clean", DatasetInfo("folder", (1, 8, 8), 1), 1000)


def test_exporter_only_for_unets(tmp_path):
    schedule = VPSchedule.cosine(50)
    assert exporter(MLPEpsModel(2, 50, 8, 2), schedule) is None
    model = _unet()
    model.num_train_timesteps = 50
    export = exporter(model, schedule)
    export(model, tmp_path / "m", schedule=VPSchedule.linear(50).to_dict(), command="x")
    loaded, sch = load_checkpoint(tmp_path / "m")
    assert sch == schedule  # the exporter's schedule, not the "schedule" extra
    assert json.loads((tmp_path / "m" / "tagdiff.json").read_text())["command"] == "x"


def test_load_checkpoint_tagdiff_and_diffusers(tmp_path):
    mlp, schedule = MLPEpsModel(2, 100, 8, 2), VPSchedule.cosine(100)
    save_model(mlp, tmp_path / "mlp", schedule=schedule.to_dict())
    loaded, sch = load_checkpoint(tmp_path / "mlp")
    assert isinstance(loaded, MLPEpsModel) and sch == schedule
    x, t = torch.randn(4, 2), torch.tensor([0, 1, 50, 99])
    with torch.no_grad():
        assert torch.equal(loaded(x, t), mlp(x, t))
    unet = _unet()
    save_unet(unet, VPSchedule.linear(1000), tmp_path / "unet")
    loaded, sch = load_checkpoint(str(tmp_path / "unet"))
    assert isinstance(loaded, UNetEpsModel) and sch == VPSchedule.linear(1000)
    save_model(mlp, tmp_path / "noschedule")
    with pytest.raises(CheckpointError, match="schedule"):
        load_checkpoint(tmp_path / "noschedule")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "nothing")
