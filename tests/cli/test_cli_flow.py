"""Flow matching through the command line (issue 24): ``train diffusion --objective flow`` (toy MLP, digits UNet,
class-conditional), ``train time-predictor --checkpoint FLOW`` (σ bins, the flow's density), ``tagdiff sample`` with
flow Euler / Heun, TAG (ω = 0 equals no predictor bit for bit), CFG, DPS and the Time Gap; what is refused; and the
shipped digits flow model with its σ predictor."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli_helpers import error_line, run
from tagdiff.models.checkpoints import shipped_models

FAST = ["--quiet", "--device", "cpu", "--num-train-timesteps", "50"]


def _x(folder):
    return np.load(folder / "samples.npz")["x"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toyflow")
    run("train", "diffusion", "--objective", "flow", "--sigma-density", "uniform", "--steps", "30", "--batch-size",
        "64", "--hidden", "32", "--out", root / "flow", *FAST)
    run("train", "time-predictor", "--checkpoint", root / "flow", "--dataset", "toy", "--steps", "30", "--batch-size",
        "64", "--hidden", "32", "--out", root / "tp", *FAST)
    return root


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digitsflow")
    tiny = ["--dataset", "digits", "--steps", "3", "--batch-size", "8", *FAST]
    run("train", "diffusion", "--objective", "flow", "--widths", "8,16", "--out", root / "unet", *tiny)
    run("train", "diffusion", "--objective", "flow", "--widths", "8,16", "--class-conditional", "--out",
        root / "unet_class", *tiny)
    run("train", "time-predictor", "--checkpoint", root / "unet", "--out", root / "tp", *tiny)
    return root


def test_toy_flow_records_its_objective_and_loads_as_a_flow_model(toy):
    from tagdiff import load
    from tagdiff.models.flow_checkpoint import LoadedFlow
    from tagdiff.sampling.flow import FlowSchedule, sample_flow

    cfg = json.loads((toy / "flow" / "config.json").read_text())
    assert cfg["objective"] == "flow" and cfg["sigma_density"] == "uniform"
    assert cfg["flow"] == {"num_train_timesteps": 50, "shift": 1.0}
    model = load(toy / "flow")
    assert isinstance(model, LoadedFlow) and model.sample_shape == (2,)
    assert model.schedule == FlowSchedule(num_train_timesteps=50) and model.sigma_density == "uniform"
    noise = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    x = sample_flow(model, noise, model.schedule, 4)                # the library's flow sampler takes it as is
    assert x.shape == (5, 2) and torch.isfinite(x).all()
    tp = json.loads((toy / "tp" / "config.json").read_text())
    assert tp["sigma_density"] == "uniform" and tp["flow"] == cfg["flow"]   # the flow model's recorded density
    assert load(toy / "tp").schedule == model.schedule.vp_schedule          # its bins' VP view: what TAG checks


def test_flow_objective_is_the_rectified_flow_loss_at_diffusers_timesteps():
    from tagdiff.training.flow import FlowMatchingLoss

    seen = {}

    def net(x, t):
        seen.update(x=x, t=t)
        return torch.zeros_like(x)

    loss = FlowMatchingLoss("logit_normal", 1000)
    g = torch.Generator().manual_seed(0)
    sigma = loss.draw_t(4096, 1000, g)
    assert 0 < sigma.min() and sigma.max() < 1 and abs(torch.logit(sigma).std().item() - 1) < 0.05
    x0, noise = torch.randn(4, 3), torch.randn(4, 3)
    value = loss(net, x0, sigma[:4], noise, None)
    s = sigma[:4, None]
    assert torch.allclose(seen["x"], (1 - s) * x0 + s * noise) and torch.allclose(seen["t"], 1000 * sigma[:4])
    assert torch.isclose(value, (noise - x0).pow(2).mean())


def test_toy_flow_sampling_with_tag_omega_zero_is_bit_for_bit_the_plain_run(toy, tmp_path):
    common = ["sample", "--checkpoint", toy / "flow", "--num-samples", "16", "--num-steps", "6", "--quiet"]
    run(*common, "--out", tmp_path / "plain")
    run(*common, "--time-predictor", toy / "tp", "--omega", "0", "--out", tmp_path / "zero")
    run(*common, "--time-predictor", toy / "tp", "--omega", "3", "--out", tmp_path / "tag")
    run(*common, "--sampler", "heun", "--shift", "3", "--time-predictor", toy / "tp", "--omega", "3",
        "--out", tmp_path / "heun")
    assert np.array_equal(_x(tmp_path / "plain"), _x(tmp_path / "zero"))
    assert not np.array_equal(_x(tmp_path / "plain"), _x(tmp_path / "tag"))
    summary = json.loads((tmp_path / "tag" / "summary.json").read_text())
    assert summary["sampler"] == "flow euler" and summary["time_gap"] is not None
    assert summary["sigmas"][0] == 1.0 and summary["sigmas"][-1] == 0.0 and len(summary["sigmas"]) == 7
    assert (tmp_path / "tag" / "time_gap.png").is_file()
    heun = json.loads((tmp_path / "heun" / "summary.json").read_text())
    assert heun["flow"]["shift"] == 3.0 and heun["sigmas"][1] > summary["sigmas"][1]   # the shift's grid
    assert np.isfinite(_x(tmp_path / "heun")).all()


def test_digits_flow_unet_is_a_diffusers_flow_folder_with_its_sigma_predictor(digits, tmp_path):
    from tagdiff.models.pipeline import read_diffusers_folder

    sched = json.loads((digits / "unet" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler" and sched["num_train_timesteps"] == 50
    meta = json.loads((digits / "unet" / "tagdiff.json").read_text())
    assert meta["objective"] == "flow" and meta["sigma_density"] == "logit_normal"
    folder = read_diffusers_folder(digits / "unet")
    assert folder.is_flow and folder.schedule.num_train_timesteps == 50 and folder.sample_shape == (1, 8, 8)
    common = ["sample", "--checkpoint", digits / "unet", "--num-samples", "4", "--num-steps", "3", "--quiet"]
    run(*common, "--out", tmp_path / "plain")
    run(*common, "--time-predictor", digits / "tp", "--out", tmp_path / "zero")
    run(*common, "--time-predictor", digits / "tp", "--omega", "20", "--out", tmp_path / "tag")
    assert np.array_equal(_x(tmp_path / "plain"), _x(tmp_path / "zero"))
    assert not np.array_equal(_x(tmp_path / "plain"), _x(tmp_path / "tag"))
    assert (tmp_path / "tag" / "grid.png").is_file()
    run(*common, "--guidance", "dps", "--classifier", "digits/clf_clean", "--target", "3", "--out", tmp_path / "dps")
    dps = json.loads((tmp_path / "dps" / "summary.json").read_text())
    assert dps["sigmas"][0] == 1 - 1 / 50 and np.isfinite(_x(tmp_path / "dps")).all()


def test_class_conditional_flow_takes_a_target_and_cfg_on_the_velocity(digits, tmp_path, capsys):
    common = ["sample", "--checkpoint", digits / "unet_class", "--num-samples", "4", "--num-steps", "3", "--quiet"]
    run(*common, "--target", "3", "--out", tmp_path / "cond")
    run(*common, "--target", "3", "--cfg-scale", "1", "--out", tmp_path / "one")
    run(*common, "--target", "3", "--cfg-scale", "3", "--out", tmp_path / "cfg")
    assert np.array_equal(_x(tmp_path / "cond"), _x(tmp_path / "one"))        # s = 1 is the conditional model
    assert not np.array_equal(_x(tmp_path / "cond"), _x(tmp_path / "cfg"))
    assert "is class-conditional: give --target" in error_line(capsys, *common, "--out", tmp_path / "none")
    assert "needs a class-conditional flow UNet" in error_line(
        capsys, "sample", "--checkpoint", digits / "unet", "--target", "3", "--cfg-scale", "2", "--num-steps", "2",
        "--out", tmp_path / "uncond", "--quiet")


@pytest.mark.parametrize("extra, match", [
    (["--sampler", "ddim"], "is a VP sampler"),
    (["--sampler", "euler", "--eta", "0.5"], "--eta is DDIM's"),
    (["--timestep-spacing", "leading"], "shape VP grids"),
    (["--guidance", "cg", "--classifier", "digits/clf_noisy", "--target", "1"], "σ-aware classifier"),
    (["--guidance", "cg", "--classifier", "digits/clf_clean", "--target", "1"], "--guidance cg needs a noisy"),
    (["--clip-x0", "2"], "--clip-x0 is not applied"),
    (["--time-predictor", "digits/time_predictor"], "σ bins of tagdiff train time-predictor --checkpoint FLOW"),
])
def test_vp_only_options_are_refused_on_flows_in_one_line(digits, capsys, tmp_path, extra, match):
    line = error_line(capsys, "sample", "--checkpoint", digits / "unet", "--num-samples", "2", "--num-steps", "2",
                      "--quiet", "--out", tmp_path / "o", *extra)
    assert match in line, line


def test_flow_options_are_refused_where_there_is_no_flow(capsys, tmp_path):
    assert "--shift shifts a flow model" in error_line(capsys, "sample", "--checkpoint", "digits", "--shift", "3",
                                                       "--num-steps", "2", "--out", tmp_path / "a", "--quiet")
    assert "--sigma-density is for --objective flow" in error_line(
        capsys, "train", "diffusion", "--sigma-density", "uniform", "--steps", "1", "--out", tmp_path / "b", *FAST)
    assert "is a VP noise schedule" in error_line(
        capsys, "train", "diffusion", "--objective", "flow", "--schedule", "cosine", "--steps", "1",
        "--out", tmp_path / "c", *FAST)


def test_classifier_guidance_on_a_flow_with_its_sigma_aware_noisy_classifier(digits, tmp_path, capsys):
    """train classifier --kind noisy --checkpoint FLOW trains on the flow's VP view (its recorded schedule is the
    flow's σ bins), and tagdiff sample --guidance cg takes it on that flow; --checkpoint is for noisy classifiers."""
    from tagdiff import load
    from tagdiff.models.flow_checkpoint import load_flow

    run("train", "classifier", "--kind", "noisy", "--checkpoint", digits / "unet", "--dataset", "digits", "--steps",
        "3", "--batch-size", "8", "--quiet", "--out", tmp_path / "clf")
    clf, flow = load(tmp_path / "clf"), load_flow(digits / "unet")
    assert clf.schedule == flow.schedule.vp_schedule and clf.num_train_timesteps == 50
    assert json.loads((tmp_path / "clf" / "config.json").read_text())["flow"]["num_train_timesteps"] == 50
    common = ["sample", "--checkpoint", digits / "unet", "--num-samples", "4", "--num-steps", "3", "--quiet",
              "--classifier", tmp_path / "clf", "--target", "2"]
    run(*common, "--guidance", "cg", "--guidance-scale", "0", "--out", tmp_path / "zero")
    run(*common, "--guidance", "cg", "--guidance-scale", "50", "--out", tmp_path / "cg")
    summary = json.loads((tmp_path / "cg" / "summary.json").read_text())
    assert summary["sigmas"][0] == pytest.approx(1 - 1 / 50)       # score guidance starts below σ = 1
    assert np.isfinite(_x(tmp_path / "cg")).all() and not np.array_equal(_x(tmp_path / "zero"), _x(tmp_path / "cg"))
    assert "--kind clean classifier sees clean images" in error_line(
        capsys, "train", "classifier", "--kind", "clean", "--checkpoint", digits / "unet", "--dataset", "digits",
        "--steps", "1", "--quiet", "--out", tmp_path / "bad")


COMMITTED = "digits_flow/time_predictor" in shipped_models()


@pytest.mark.skipif(not COMMITTED, reason="the shipped digits flow model is not in this checkout")
def test_shipped_digits_flow_samples_with_its_time_predictor(tmp_path):
    """The issue's must-show: ``tagdiff sample --checkpoint digits_flow --time-predictor ... --omega``."""
    common = ["sample", "--checkpoint", "digits_flow", "--num-samples", "8", "--num-steps", "10", "--quiet",
              "--time-predictor", "digits_flow/time_predictor"]
    run(*common, "--out", tmp_path / "plain")
    run(*common, "--omega", "0.3", "--out", tmp_path / "tag")
    plain = json.loads((tmp_path / "plain" / "summary.json").read_text())
    tag = json.loads((tmp_path / "tag" / "summary.json").read_text())
    assert plain["sampler"] == "flow euler" and plain["time_gap"] is not None and tag["time_gap"] is not None
    assert not np.array_equal(_x(tmp_path / "plain"), _x(tmp_path / "tag"))
    assert np.abs(_x(tmp_path / "tag")).max() < 10


@pytest.mark.skipif(not COMMITTED, reason="the shipped digits flow model is not in this checkout")
def test_shipped_digits_flow_folders_record_the_commands_of_their_readme_and_keep_the_size_rule():
    models = shipped_models()
    readme = (models["digits_flow/unet"].parent / "README.md").read_text()
    for name, meta in (("digits_flow/unet", "tagdiff.json"), ("digits_flow/unet_class", "tagdiff.json"),
                       ("digits_flow/time_predictor", "config.json")):
        folder = models[name]
        command = json.loads((folder / meta).read_text())["command"].removesuffix(" --quiet")
        assert f"`{command}`" in readme, command
        assert (folder / "heldout.json").is_file() and not (folder / "train_state.safetensors").exists()
        assert all(f.stat().st_size <= 10 * 2**20 for f in folder.iterdir())
    assert json.loads((models["digits_flow/unet"] / "tagdiff.json").read_text())["objective"] == "flow"

