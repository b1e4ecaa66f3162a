"""``tagdiff sample`` / :func:`tagdiff.generate.generate` end to end on tiny digits checkpoints trained by the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tagdiff.cli.main import main
from tagdiff.cli.sample import SampleConfig, generate, save_grid
from tagdiff.models.checkpoints import load_model
from tagdiff.models.load import load_checkpoint
from tagdiff.models.unet import UNetEpsModel

pytest.importorskip("diffusers")

TOY = Path(__file__).resolve().parents[2] / "src" / "tagdiff" / "assets" / "toy"
TRAIN = ["--dataset", "digits", "--steps", "2", "--batch-size", "8", "--quiet"]


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    """Tiny digits models: UNet (T=1000), time predictors (T=1000 and T=50), noisy and clean classifiers."""
    root = tmp_path_factory.mktemp("ck")
    runs = {"unet": ["diffusion", "--widths", "8,16"], "tp": ["time-predictor"],
            "tp50": ["time-predictor", "--num-train-timesteps", "50"],
            "noisy": ["classifier", "--kind", "noisy"], "clean": ["classifier", "--kind", "clean"]}
    for name, argv in runs.items():
        assert main(["train", *argv, "--out", str(root / name), *TRAIN]) == 0
    return root


def _sample(ck, out, *extra, n=4, steps=3):
    return main(["sample", "--checkpoint", str(ck / "unet"), "--out", str(out), "--num-samples", str(n),
                 "--num-steps", str(steps), "--quiet", *extra])


def _x(out) -> np.ndarray:
    return np.load(Path(out) / "samples.npz")["x"]


def _one_line_error(capsys, rc) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("tagdiff: error:") and "Traceback" not in err[0], err
    return err[0]


# ---------------------------------------------------------------------------------------------- outputs


def test_sample_writes_outputs(ck, tmp_path, capsys):
    assert _sample(ck, tmp_path / "a", n=5) == 0
    assert "wrote 5 samples" in capsys.readouterr().out
    with np.load(tmp_path / "a" / "samples.npz") as z:
        assert set(z.files) == {"x"}
        x = z["x"]
    assert x.shape == (5, 1, 8, 8) and x.dtype == np.float32 and np.isfinite(x).all()
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["num_samples"] == 5 and summary["time_gap"] is None and summary["seconds"] > 0
    assert summary["config"]["checkpoint"] == str(ck / "unet") and summary["config"]["sampler"] == "ddim"
    from PIL import Image

    with Image.open(tmp_path / "a" / "grid.png") as img:
        # 5 images: 3 columns x 2 rows of 8 x 8 tiles with 1-pixel borders (28 x 19), upscaled by 256 // 28 = 9
        assert img.size == (28 * 9, 19 * 9)
    # same seed: identical; another seed: different
    assert _sample(ck, tmp_path / "b", n=5) == 0
    assert np.array_equal(_x(tmp_path / "b"), x)
    assert _sample(ck, tmp_path / "c", "--seed", "1", n=5) == 0
    assert not np.allclose(_x(tmp_path / "c"), x)


def test_samples_follow_the_library_sampler(ck, tmp_path):
    """The command's samples are the library's DDPM sampler on the checkpoint with x_T and noise of one generator."""
    from tagdiff.sampling.samplers import sample_ddpm

    assert _sample(ck, tmp_path / "a", "--sampler", "ddpm", "--clip-x0", "1", "--seed", "7", n=3, steps=4) == 0
    model, schedule = load_checkpoint(ck / "unet")
    g = torch.Generator().manual_seed(7)
    x_T = torch.randn((3, 1, 8, 8), generator=g)
    with torch.no_grad():
        ref = sample_ddpm(model, x_T, schedule.timesteps(4), schedule, clip_x0=1.0,
                          randn_like=lambda z: torch.randn(z.shape, generator=g, dtype=z.dtype))
    assert np.array_equal(_x(tmp_path / "a"), ref.numpy())


def test_vector_checkpoint_has_no_grid(tmp_path):
    summary = generate(SampleConfig(checkpoint=str(TOY / "score"), num_samples=6, num_steps=3,
                                    time_predictor=str(TOY / "time_predictor")), tmp_path, progress=False)
    assert _x(tmp_path).shape == (6, 2)
    assert not (tmp_path / "grid.png").exists()
    assert summary["time_gap"] >= 0 and len(summary["time_gap_per_step"]) == 3


def test_save_grid_pixels(tmp_path):
    from PIL import Image

    x = torch.linspace(-1, 1, 3 * 8 * 8).reshape(3, 1, 8, 8)
    save_grid(x, tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as img:
        arr = np.asarray(img)
    # 2 x 2 grid of 8 x 8 tiles with 1-pixel borders = 19 x 19, upscaled by 256 // 19 = 13
    assert arr.shape == (19 * 13, 19 * 13)
    small = arr[::13, ::13].astype(int)
    expect = ((x + 1) * 127.5).round().numpy().astype(int)
    for i, (r, q) in enumerate([(0, 0), (0, 1), (1, 0)]):
        assert np.array_equal(small[1 + 9 * r:9 + 9 * r, 1 + 9 * q:9 + 9 * q], expect[i, 0])
    assert (small[10:18, 10:18] == 0).all() and (small[0] == 0).all()  # empty cell and borders: -1 -> black


# ---------------------------------------------------------------------------------------------- TAG and seeds


def test_omega_zero_predictor_only_records_time_gap(ck, tmp_path):
    assert _sample(ck, tmp_path / "plain") == 0
    assert _sample(ck, tmp_path / "tp", "--time-predictor", str(ck / "tp")) == 0
    assert np.array_equal(_x(tmp_path / "tp"), _x(tmp_path / "plain"))
    summary = json.loads((tmp_path / "tp" / "summary.json").read_text())
    per_step = summary["time_gap_per_step"]
    assert len(per_step) == 3 and summary["time_gap"] == pytest.approx(np.mean(per_step))
    # step 0 is measured on x_T at t = T-1 ("trailing" grid)
    predictor = load_model(ck / "tp")
    x_T = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gap0 = (predictor(x_T).argmax(-1) - 999).abs().float().mean().item()
    assert per_step[0] == pytest.approx(gap0)
    # omega > 0 turns TAG on and changes the samples
    assert _sample(ck, tmp_path / "tag", "--time-predictor", str(ck / "tp"), "--omega", "5") == 0
    assert not np.allclose(_x(tmp_path / "tag"), _x(tmp_path / "plain"))
    assert json.loads((tmp_path / "tag" / "summary.json").read_text())["config"]["omega"] == 5.0


def test_per_sample_seeds_are_batch_independent(ck, tmp_path):
    # clip x0_hat so that the untrained UNet's samples stay O(1): float rounding then stays far below the tolerance
    run = ["--clip-x0", "1", "--seed", "3"]
    assert _sample(ck, tmp_path / "five", "--per-sample-seeds", *run, n=5) == 0
    assert _sample(ck, tmp_path / "two", "--per-sample-seeds", *run, n=2) == 0
    assert _sample(ck, tmp_path / "one", "--per-sample-seeds", "--clip-x0", "1", "--seed", "4", n=1) == 0
    five = _x(tmp_path / "five")
    # equal up to float rounding: the UNet's CPU convolutions sum in another order for another batch size (and CPU).
    # Measured ≤ 3e-6 across kernel sets and thread counts; allowed 1e-4 (30×), against > 1e-2 for another noise
    np.testing.assert_allclose(_x(tmp_path / "two"), five[:2], rtol=0, atol=1e-4)
    np.testing.assert_allclose(_x(tmp_path / "one")[0], five[1], rtol=0, atol=1e-4)  # sample i uses seed + i
    # without per-sample seeds the noise of later steps depends on the batch size
    assert _sample(ck, tmp_path / "b5", *run, n=5) == 0
    assert _sample(ck, tmp_path / "b2", *run, n=2) == 0
    assert np.abs(_x(tmp_path / "b2") - _x(tmp_path / "b5")[:2]).max() > 1e-2


@pytest.mark.parametrize("guidance, clf", [("cg", "noisy"), ("dps", "clean")])
def test_guidance_runs_and_changes_samples(ck, tmp_path, guidance, clf):
    assert _sample(ck, tmp_path / "plain") == 0
    args = ["--guidance", guidance, "--classifier", str(ck / clf), "--target", "3"]
    assert _sample(ck, tmp_path / "g", *args, "--guidance-scale", "20") == 0
    with np.load(tmp_path / "g" / "samples.npz") as z:
        x, target = z["x"], z["target"]
    assert x.shape == (4, 1, 8, 8) and np.isfinite(x).all()
    assert target.tolist() == [3, 3, 3, 3]
    assert not np.allclose(x, _x(tmp_path / "plain"), atol=1e-4)
    # scale 0: the guidance term adds nothing
    assert _sample(ck, tmp_path / "zero", *args, "--guidance-scale", "0") == 0
    assert np.allclose(_x(tmp_path / "zero"), _x(tmp_path / "plain"), atol=1e-6)
    # with TAG on top
    assert _sample(ck, tmp_path / "tag", *args, "--time-predictor", str(ck / "tp"), "--omega", "1") == 0
    assert json.loads((tmp_path / "tag" / "summary.json").read_text())["time_gap"] >= 0


@pytest.mark.parametrize("guidance, clf", [("cg", "noisy"), ("dps", "clean")])
def test_guidance_adds_the_classifier_gradient(ck, tmp_path, guidance, clf):
    """One deterministic DDIM step from t = T-1 to clean data returns x0_hat of the guided ε, so the guided minus the
    unguided sample is (1 - ᾱ) / sqrt(ᾱ) · s · ∇_x log p(y | ·): ∇ log p(y | x_t, t) for cg, ∇ log p(y | x0_hat(x_t))
    (through the UNet) for dps. The gradient is computed here with autograd, independently of tagdiff's terms."""
    one = ["--num-steps", "1", "--eta", "0", "--seed", "5", "--clip-x0", "none"]  # x0_hat unclamped
    assert _sample(ck, tmp_path / "plain", *one, n=3) == 0
    assert _sample(ck, tmp_path / "g", *one, "--guidance", guidance, "--classifier", str(ck / clf), "--target", "7",
                   "--guidance-scale", "3", n=3) == 0
    model, schedule = load_checkpoint(ck / "unet")
    classifier = load_model(ck / clf)
    x = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    t = torch.full((3,), 999)
    ab = float(schedule.alpha_bar[999])
    if guidance == "cg":
        logits = classifier(x, t)
    else:
        logits = classifier((x - (1 - ab) ** 0.5 * model(x, t)) / ab**0.5)
    (grad,) = torch.autograd.grad(torch.log_softmax(logits, -1)[:, 7].sum(), x)
    expect = (1 - ab) / ab**0.5 * 3 * grad.numpy()
    diff = _x(tmp_path / "g") - _x(tmp_path / "plain")
    assert np.abs(expect).max() > 1e-2  # a visible effect
    scale = np.abs(_x(tmp_path / "plain")).max()
    np.testing.assert_allclose(diff, expect, rtol=1e-3, atol=1e-5 * scale)


# ---------------------------------------------------------------------------------------------- bad input


def test_unknown_target_class(ck, tmp_path, capsys):
    for target in ("10", "-1"):
        msg = _one_line_error(capsys, _sample(ck, tmp_path, "--guidance", "cg", "--classifier", str(ck / "noisy"),
                                              "--target", target))
        assert target in msg and "0..9" in msg


@pytest.mark.parametrize("omega", ["0", "1"])
def test_predictor_for_another_shape(ck, tmp_path, capsys, omega):
    msg = _one_line_error(capsys, _sample(ck, tmp_path, "--time-predictor", str(TOY / "time_predictor"),
                                          "--omega", omega))
    assert "shape" in msg and "(B, 2)" in msg


@pytest.mark.parametrize("omega", ["0", "1"])
def test_predictor_with_another_T(ck, tmp_path, capsys, omega):
    msg = _one_line_error(capsys, _sample(ck, tmp_path, "--time-predictor", str(ck / "tp50"), "--omega", omega))
    assert "T=50" in msg and "T=1000" in msg


def test_option_errors(ck, tmp_path, capsys):
    assert "--time-predictor" in _one_line_error(capsys, _sample(ck, tmp_path, "--omega", "1"))
    assert "--classifier" in _one_line_error(capsys, _sample(ck, tmp_path, "--guidance", "cg", "--target", "1"))
    assert "--target" in _one_line_error(capsys, _sample(ck, tmp_path, "--guidance", "dps", "--classifier",
                                                          str(ck / "clean")))
    # tagdiff's own steps or a diffusers scheduler; anything else is a one-line error naming it
    assert "unknown scheduler 'eulerz'" in _one_line_error(capsys, _sample(ck, tmp_path, "--sampler", "eulerz"))
    assert "missing" in _one_line_error(capsys, main(["sample", "--checkpoint", str(tmp_path / "missing"),
                                                      "--out", str(tmp_path / "o")]))
    assert not (tmp_path / "samples.npz").exists()


@pytest.mark.parametrize("guidance, clf, needs", [("cg", "clean", "noisy"), ("dps", "noisy", "clean")])
def test_wrong_classifier_kind(ck, tmp_path, capsys, guidance, clf, needs):
    msg = _one_line_error(capsys, _sample(ck, tmp_path, "--guidance", guidance, "--classifier", str(ck / clf),
                                          "--target", "1"))
    assert needs in msg


def test_generate_library_errors(ck, tmp_path):
    with pytest.raises(ValueError, match="unknown guidance"):
        generate(SampleConfig(checkpoint=str(ck / "unet"), num_samples=2, num_steps=2, guidance="tag"), tmp_path,
                 progress=False)
    model, _ = load_checkpoint(ck / "unet")
    assert isinstance(model, UNetEpsModel)


@pytest.fixture(scope="module")
def vz_folder(tmp_path_factory):
    """A tiny v-prediction UNet on Stable Diffusion's schedule rescaled to zero terminal SNR, built from configs."""
    from diffusers import DDPMScheduler, UNet2DModel

    path = tmp_path_factory.mktemp("vz")
    torch.manual_seed(0)
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=4).save_pretrained(path)
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True,
                  prediction_type="v_prediction", timestep_spacing="trailing").save_pretrained(path)
    return path


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp2m", "unipc", "euler"])
def test_sample_runs_a_zero_terminal_snr_v_prediction_folder(vz_folder, tmp_path, sampler):
    """The first step starts at ᾱ = 0, where ε̂ cannot give x̂_0: tagdiff's own steps take the v-model's x̂_0 = -v
    there, and the diffusers schedulers are built for the model's prediction type (x̂_0 clipped at 1, the default)."""
    from tagdiff import load

    out = tmp_path / sampler
    assert main(["sample", "--checkpoint", str(vz_folder), "--sampler", sampler, "--num-samples", "2",
                 "--num-steps", "5", "--out", str(out), "--quiet"]) == 0
    x = _x(out)
    assert x.shape == (2, 1, 8, 8) and np.isfinite(x).all()
    model = load(vz_folder)
    assert float(model.schedule.alpha_bar[-1]) == 0.0
    assert model.schedule.to_diffusers_config(prediction_type="v_prediction")["prediction_type"] == "v_prediction"
