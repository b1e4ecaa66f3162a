"""The latent pipeline on the command line (tagdiff.cli_latent): train vae -> train diffusion --vae ->
train time-predictor --vae -> sample --vae (TAG in latent space, DPS through the decoder), and the refusals."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import error_line, run
from tagdiff.data import load_dataset
from tagdiff.models.latent import LatentSpace, posterior_means, scaling_factor, vae_hash

VAE = ["--dataset", "digits", "--widths", "8,16", "--steps", "20", "--batch-size", "16", "--quiet"]


@pytest.fixture(scope="module")
def latent(tmp_path_factory):
    """A tiny digits VAE, a class-conditional latent UNet and a latent time predictor (a few steps each)."""
    root = tmp_path_factory.mktemp("latent")
    run("train", "vae", *VAE, "--out", root / "vae")
    run("train", "diffusion", "--dataset", "digits", "--vae", root / "vae", "--class-conditional", "--widths", "8,16",
        "--steps", "3", "--batch-size", "8", "--out", root / "unet", "--quiet")
    run("train", "time-predictor", "--dataset", "digits", "--vae", root / "vae", "--checkpoint", root / "unet",
        "--steps", "3", "--batch-size", "8", "--out", root / "tp", "--quiet")
    return root


def test_train_vae_writes_a_loadable_diffusers_folder_with_the_sd_scaling_factor(latent, tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(latent / "vae")
    meta = json.loads((latent / "vae" / "tagdiff.json").read_text())
    x = load_dataset("digits", "train")[0]
    assert meta["scaling_factor_samples"] == x.shape[0] == 1438
    assert vae.config.scaling_factor == meta["scaling_factor"] != 1.0
    assert meta["scaling_factor"] == pytest.approx(scaling_factor(posterior_means(vae, x)), rel=1e-6)
    assert meta["latent_shape"] == [4, 4, 4] and meta["image_shape"] == [1, 8, 8] and meta["kl_weight"] == 1e-6
    assert meta["command"].startswith("tagdiff train vae --dataset digits")
    ho = meta["held_out"]
    assert ho["num_samples"] == 359 and 0 < ho["mse"] < 4
    assert ho["psnr_db"] == pytest.approx(10 * np.log10(4 / ho["mse"]))
    # the same command twice gives the same bits (initialisation, batches and reparameterisation noise are seeded)
    run("train", "vae", *VAE, "--out", tmp_path / "again")
    assert vae_hash(tmp_path / "again") == vae_hash(latent / "vae")
    run("train", "vae", *VAE, "--seed", "1", "--out", tmp_path / "seed1")
    assert vae_hash(tmp_path / "seed1") != vae_hash(latent / "vae")


def test_latent_models_record_their_vae_and_have_the_latent_shape(latent):
    h = vae_hash(latent / "vae")
    unet_cfg = json.loads((latent / "unet" / "config.json").read_text())
    assert unet_cfg["sample_size"] == 4 and unet_cfg["in_channels"] == 4 and unet_cfg["num_class_embeds"] == 11
    unet_meta = json.loads((latent / "unet" / "tagdiff.json").read_text())
    assert unet_meta["vae"]["hash"] == h and unet_meta["vae"]["latent_shape"] == [4, 4, 4]
    tp = json.loads((latent / "tp" / "config.json").read_text())
    assert tp["class"] == "SimpleCNNTimePredictor" and tp["config"]["in_channels"] == 4
    assert tp["config"]["image_size"] == 4 and tp["vae"]["hash"] == h
    assert not (latent / "vae" / "latent_cache").exists()  # never inside a model folder: the user cache
    cache = sorted(p.name for p in (Path(os.environ["TAGDIFF_CACHE"]) / "latents").iterdir())
    assert any(n.startswith(f"digits-train-{h[:16]}") for n in cache)
    assert any(n.startswith(f"digits-held_out-{h[:16]}") for n in cache)  # the predictor's held-out report


def test_sample_with_tag_and_cfg_decodes_images_and_is_seeded(latent, tmp_path):
    plain = ["sample", "--checkpoint", latent / "unet", "--vae", latent / "vae", "--target", "3", "--cfg-scale", "2",
             "--num-samples", "4", "--num-steps", "3", "--quiet"]
    argv = [*plain, "--time-predictor", latent / "tp", "--omega", "1"]
    run(*argv, "--out", tmp_path / "a")
    run(*argv, "--out", tmp_path / "b")
    a, b = np.load(tmp_path / "a" / "samples.npz"), np.load(tmp_path / "b" / "samples.npz")
    assert a["x"].shape == (4, 1, 8, 8) and a["z"].shape == (4, 4, 4, 4)
    assert np.array_equal(a["x"], b["x"]) and np.array_equal(a["z"], b["z"])
    space = LatentSpace.from_pretrained(latent / "vae")
    assert np.array_equal(a["x"], space.decode_batched(torch.from_numpy(a["z"])).clamp(-1, 1).numpy())
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["vae"]["hash"] == space.hash and summary["clip_x0"] is None and summary["time_gap"] is not None
    assert (tmp_path / "a" / "grid.png").is_file()
    run(*plain, "--out", tmp_path / "plain")  # without TAG: other latents
    assert not np.array_equal(np.load(tmp_path / "plain" / "samples.npz")["z"], a["z"])


def test_dps_through_the_decoder_with_a_clean_image_classifier(latent, tmp_path):
    base = ["sample", "--checkpoint", latent / "unet", "--vae", latent / "vae", "--target", "3", "--cfg-scale", "1",
            "--num-samples", "3", "--num-steps", "3", "--quiet"]
    run(*base, "--out", tmp_path / "plain")
    run(*base, "--guidance", "dps", "--classifier", "digits/clf_clean", "--out", tmp_path / "dps")
    plain, dps = (np.load(tmp_path / d / "samples.npz") for d in ("plain", "dps"))
    assert dps["x"].shape == (3, 1, 8, 8) and np.isfinite(dps["z"]).all()
    assert not np.array_equal(plain["z"], dps["z"])


def test_eval_time_predictor_on_latents(latent, tmp_path, capsys):
    run("eval", "time-predictor", "--checkpoint", latent / "tp", "--dataset", "digits", "--vae", latent / "vae",
        "--num-samples", "20", "--out", tmp_path / "rep.json")
    assert json.loads((tmp_path / "rep.json").read_text())["accuracy"] >= 0
    # without --vae: the VAE the predictor recorded (its folder is still there), the same report
    run("eval", "time-predictor", "--checkpoint", latent / "tp", "--dataset", "digits", "--num-samples", "20",
        "--out", tmp_path / "rep2.json")
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("rep.json", "rep2.json"))
    assert a["accuracy"] == b["accuracy"] and a["mean_abs_error"] == b["mean_abs_error"]  # argmax: identical
    assert b["cross_entropy"] == pytest.approx(a["cross_entropy"], rel=1e-9)  # float sums: measured 4e-12


@pytest.fixture(scope="module")
def other_vaes(latent):
    """A VAE with 2 latent channels (another latent shape) and one of the same shape from another seed."""
    run("train", "vae", *VAE, "--latent-channels", "2", "--out", latent / "vae2")
    run("train", "vae", *VAE, "--seed", "5", "--steps", "1", "--out", latent / "vae_other")
    return latent / "vae2", latent / "vae_other"


def test_refusals_name_both_sides(latent, other_vaes, tmp_path, capsys):
    vae2, other = other_vaes
    unet, vae, tp = latent / "unet", latent / "vae", latent / "tp"
    smp = ["sample", "--out", tmp_path / "s", "--num-samples", "2", "--num-steps", "2", "--target", "3", "--quiet"]
    msg = error_line(capsys, *smp, "--checkpoint", unet)
    assert f"--checkpoint {unet} is a latent model" in msg and f"pass --vae {vae}" in msg
    msg = error_line(capsys, *smp, "--checkpoint", unet, "--vae", vae2)
    assert f"--vae {vae2} makes latents of shape (2, 4, 4) but --checkpoint {unet} samples shape (4, 4, 4)" in msg
    msg = error_line(capsys, *smp, "--checkpoint", unet, "--vae", other)
    assert f"--vae {other} (content hash" in msg and f"is not the VAE --checkpoint {unet} was trained on" in msg
    msg = error_line(capsys, *smp, "--checkpoint", unet, "--vae", vae, "--time-predictor", "digits/time_predictor")
    assert "time predictor digits/time_predictor works on x of shape (1, 8, 8)" in msg
    assert f"--checkpoint {unet} samples latents of shape (4, 4, 4)" in msg
    msg = error_line(capsys, *smp, "--checkpoint", "digits", "--vae", vae)
    assert "makes latents of shape (4, 4, 4) but --checkpoint digits samples shape (1, 8, 8)" in msg
    msg = error_line(capsys, *smp, "--checkpoint", "digits", "--time-predictor", tp)
    assert f"time predictor {tp} was trained on the latents of the VAE {vae}" in msg
    msg = error_line(capsys, *smp, "--checkpoint", unet, "--vae", vae, "--guidance", "cg", "--classifier",
                     "digits/clf_noisy")
    assert "--guidance cg needs a noisy classifier on latents" in msg
    tpa = ["train", "time-predictor", "--dataset", "digits", "--steps", "1", "--out", tmp_path / "t", "--quiet"]
    msg = error_line(capsys, *tpa, "--checkpoint", unet)
    assert f"--checkpoint {unet} is a latent model" in msg
    msg = error_line(capsys, *tpa, "--checkpoint", unet, "--vae", other)
    assert "is not the VAE --checkpoint" in msg
    msg = error_line(capsys, *tpa, "--vae", vae, "--condition", "class_ink")
    assert "--condition class_ink is defined on images" in msg
    msg = error_line(capsys, "train", "vae", "--dataset", "toy", "--out", tmp_path / "v", "--quiet")
    assert "a VAE is for image datasets" in msg
    msg = error_line(capsys, *smp, "--checkpoint", "digits", "--vae", tmp_path)
    assert "is not an AutoencoderKL folder" in msg


def test_latent_flow_model_trains_samples_with_tag_and_cfg_and_decodes(latent, tmp_path, capsys):
    """A latent flow model (issue 24: flows on latents, as SD3 / Flux): train diffusion --objective flow --vae, its σ
    predictor on the same latents, tagdiff sample --vae with TAG and CFG on the velocity; ω = 0 is the run without a
    predictor bit for bit, the samples are the decoded latents, and a pixel predictor is refused."""
    tiny = ["--dataset", "digits", "--vae", latent / "vae", "--widths", "8,16", "--steps", "3", "--batch-size", "8",
            "--quiet"]
    run("train", "diffusion", "--objective", "flow", "--class-conditional", "--out", tmp_path / "flow", *tiny)
    run("train", "time-predictor", "--checkpoint", tmp_path / "flow", "--out", tmp_path / "tp", *tiny)
    meta = json.loads((tmp_path / "flow" / "tagdiff.json").read_text())
    assert meta["objective"] == "flow" and meta["vae"]["hash"] == vae_hash(latent / "vae")
    tp = json.loads((tmp_path / "tp" / "config.json").read_text())
    assert tp["config"]["in_channels"] == 4 and tp["vae"]["hash"] == meta["vae"]["hash"] and "flow" in tp
    base = ["sample", "--checkpoint", tmp_path / "flow", "--vae", latent / "vae", "--sampler", "euler", "--target", "3",
            "--cfg-scale", "2", "--num-samples", "4", "--num-steps", "3", "--quiet"]
    run(*base, "--out", tmp_path / "plain")
    run(*base, "--time-predictor", tmp_path / "tp", "--omega", "0", "--out", tmp_path / "zero")
    run(*base, "--time-predictor", tmp_path / "tp", "--omega", "1", "--out", tmp_path / "tag")
    plain, zero, tag = (np.load(tmp_path / d / "samples.npz") for d in ("plain", "zero", "tag"))
    assert plain["x"].shape == (4, 1, 8, 8) and plain["z"].shape == (4, 4, 4, 4)
    assert np.array_equal(plain["z"], zero["z"]) and not np.array_equal(plain["z"], tag["z"])
    space = LatentSpace.from_pretrained(latent / "vae")
    assert np.array_equal(tag["x"], space.decode_batched(torch.from_numpy(tag["z"])).clamp(-1, 1).numpy())
    summary = json.loads((tmp_path / "tag" / "summary.json").read_text())
    assert summary["sampler"] == "flow euler" and summary["time_gap"] is not None
    line = error_line(capsys, *base, "--time-predictor", "digits_flow/time_predictor", "--omega", "1", "--out",
                      tmp_path / "bad")
    assert "time predictor" in line and "latents" in line
