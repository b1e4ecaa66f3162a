"""``tagdiff bench cfg --vae`` (tagdiff.bench.cfg in latent mode): a tiny digits VAE, a tiny class-conditional latent
UNet and a tiny latent time predictor (a few CLI training steps each) run the bench end to end; samples are decoded
before every metric, x̂_0 is not clamped, TAG at ω = 0 is its base method bit for bit, and mismatched pairs are
refused in one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tagdiff_bench.cfg import CFGConfig, cfg_terms, load_cfg_setup, load_decoder
from tagdiff_bench.common import draw, preview

from cli_helpers import error_line, run
from tagdiff.guidance.cfg import interval_from_sigma
from tagdiff.models.assets import assets_dir

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def latent(tmp_path_factory):
    """``root/vae`` and ``root/ckpt/{unet_class, time_predictor}`` (no clf_eval: the shipped pixel one is used)."""
    root = tmp_path_factory.mktemp("latent_cfg")
    run("train", "vae", "--dataset", "digits", "--widths", "8,16", "--steps", "20", "--batch-size", "16", "--quiet",
        "--out", root / "vae")
    run("train", "diffusion", "--dataset", "digits", "--vae", root / "vae", "--class-conditional", "--cond-drop",
        "0.1", "--widths", "8,16", "--steps", "3", "--batch-size", "8", "--out", root / "ckpt" / "unet_class",
        "--quiet")
    run("train", "time-predictor", "--dataset", "digits", "--vae", root / "vae", "--checkpoint",
        root / "ckpt" / "unet_class", "--steps", "3", "--batch-size", "8", "--out", root / "ckpt" / "time_predictor",
        "--quiet")
    return root


def _cfg(latent, **kw):
    base = dict(scales=(1.0, 4.0), methods=("cfg", "cfg+tag", "apg", "interval"), omegas=(1.0,), num_per_target=2,
                sweep_per_target=2, num_steps=2, seeds=(0, 1), device="cpu", models_dir=str(latent / "ckpt"),
                vae=str(latent / "vae"))
    return CFGConfig(**{**base, **kw})


def test_latent_config_turns_clamping_off():
    cfg = CFGConfig(vae="some/vae", clip_x0=1.0, cfgpp_clip_x0=1.0)
    assert cfg.clip_x0 == 0.0 and cfg.cfgpp_clip_x0 == 0.0
    assert CFGConfig().clip_x0 == 1.0 and CFGConfig().cfgpp_clip_x0 == 1.0


def test_bench_cfg_vae_end_to_end_decodes_before_every_metric(latent, tmp_path):
    out = tmp_path / "bench"
    run("bench", "cfg", "--out", out, "--models-dir", latent / "ckpt", "--vae", latent / "vae", "--scales", "1,4",
        "--methods", "cfg,cfg+tag,apg", "--omegas", "1", "--num-per-target", "2", "--sweep-per-target", "2",
        "--num-steps", "2", "--seeds", "0,1", "--device", "cpu", "--quiet")
    res = json.loads((out / "results.json").read_text())
    assert set(res["runs"]) == {"cfg/1", "cfg/4", "apg/1", "apg/4"}
    conf = res["config"]
    assert conf["clip_x0"] == 0.0 and conf["latent"]["latent_shape"] == [4, 4, 4]
    assert conf["latent"]["image_shape"] == [1, 8, 8] and conf["vae"] == str(latent / "vae")
    keys = [json.loads(p.read_text())["key"] for p in (out / "runs").glob("*.json")]
    assert keys and all(len(k["vae"]) == 64 for k in keys)  # latent runs never share a cache entry with pixel runs
    # the s = 1 row is the conditional latent model's samples, decoded: 8x8 images in [-1, 1], not 4x4x4 latents
    setup = load_cfg_setup(_cfg(latent))
    assert tuple(setup.eps_model.sample_shape) == (4, 4, 4) and tuple(setup.held_x.shape[1:]) == (1, 8, 8)
    y = torch.arange(10).repeat_interleave(2)
    z = draw(setup, [], n=20, seed=0, num_steps=2, eta=0.0, clip_x0=None, cond={"y": y}, clamp=False)["x0"]
    x = load_decoder(latent / "vae", space=setup.models["latent_space"])(z)
    assert z.shape == (20, 4, 4, 4) and x.shape == (20, 1, 8, 8)
    assert x.abs().max() <= 1.0 and z.abs().max() > 1.0  # latents are not clamped; images are
    prev = res["runs"]["cfg/1"]["preview"]["without"]
    assert prev == preview(x) and len(prev[0]) == 64
    assert res["runs"]["cfg/1"]["without"]["fid"]["mean"] > 0
    assert "decoded and clamped to [-1, 1] before every metric" in (out / "table.md").read_text()


@pytest.mark.parametrize("method", ["cfg", "apg", "interval"])
def test_latent_tag_at_omega_zero_is_the_base_method_bit_for_bit(latent, method):
    cfg = _cfg(latent)
    setup = load_cfg_setup(cfg)
    window = interval_from_sigma(setup.schedule, *cfg.interval_sigma)
    y = torch.arange(10).repeat_interleave(2)

    def z(m, w):
        return draw(setup, cfg_terms(m, 4.0, w, setup, cfg, window), n=20, seed=0, num_steps=2, eta=0.0,
                    clip_x0=None, cond={"y": y}, clamp=False)["x0"]

    base = z(method, 0.0)
    assert torch.equal(base, z(method + "+tag", 0.0)) and not torch.equal(base, z(method + "+tag", 1.0))


def test_mismatched_vae_model_and_predictor_are_refused_in_one_line(latent, tmp_path, capsys):
    common = ["bench", "cfg", "--out", tmp_path / "o", "--quiet", "--device", "cpu"]
    # a pixel time predictor with the latent model
    mixed = tmp_path / "mixed"
    shutil.copytree(latent / "ckpt" / "unet_class", mixed / "unet_class")
    shutil.copytree(assets_dir("digits") / "time_predictor", mixed / "time_predictor")
    line = error_line(capsys, *common, "--models-dir", mixed, "--vae", latent / "vae")
    assert "time predictor" in line and "latents of shape (4, 4, 4)" in line
    # the latent model without its VAE
    line = error_line(capsys, *common, "--models-dir", latent / "ckpt")
    assert "is a latent model" in line and str(latent / "vae") in line
    # a pixel model (the shipped digits UNet) with a VAE
    line = error_line(capsys, *common, "--vae", latent / "vae")
    assert "makes latents of shape (4, 4, 4)" in line and "samples shape (1, 8, 8)" in line
    # another VAE than the one the model was trained on
    run("train", "vae", "--dataset", "digits", "--widths", "8,16", "--steps", "20", "--batch-size", "16", "--seed",
        "1", "--quiet", "--out", tmp_path / "vae1")
    line = error_line(capsys, *common, "--models-dir", latent / "ckpt", "--vae", tmp_path / "vae1")
    assert "is not the VAE" in line and "vae1" in line
