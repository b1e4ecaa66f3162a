"""``tagdiff bench cfg`` (tagdiff.bench.cfg): a tiny end-to-end run on the shipped class-conditional digits UNet,
the identities the table rests on, the saturation measure and the CLI's errors. That CFG at s = 1 is the conditional
sampler bit for bit is tested on a toy UNet in
``tests/guidance/test_cfg.py::test_cfg_scale_one_is_the_conditional_model_bit_
for_bit``; here the bench's s = 1 row is checked against the conditional sampling path of the bench itself."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from tagdiff_bench.cfg import CFGConfig, cfg_terms, load_cfg_setup, run_cfg, saturation
from tagdiff_bench.common import draw, preview

from tagdiff.cli.main import main
from tagdiff.guidance.cfg import interval_from_sigma

pytest.importorskip("diffusers")

TINY = CFGConfig(scales=(1.0, 4.0), cfgpp_lambdas=(0.6,), methods=("cfg", "cfg+tag", "apg", "interval", "cfg++"),
                 omegas=(1.0,), num_per_target=2, sweep_per_target=2, num_steps=2, seeds=(0, 1), device="cpu")


@pytest.fixture(scope="module")
def setup():
    return load_cfg_setup(TINY)


@pytest.fixture(scope="module")
def ctag_setup():
    return load_cfg_setup(replace(TINY, methods=("cfg+ctag",)))


def _draw(setup, terms, cfg=TINY, seed=0, clip=1.0):
    y = torch.arange(10).repeat_interleave(cfg.num_per_target)
    return draw(setup, terms, n=y.numel(), seed=seed, num_steps=cfg.num_steps, eta=0.0, clip_x0=clip,
                timestep_spacing=cfg.timestep_spacing, cond={"y": y})["x0"]


def test_bench_cfg_end_to_end_structure_identities_and_resume(setup, tmp_path):
    res = run_cfg(tmp_path, TINY, progress=False)
    assert set(res["runs"]) == {"cfg/1", "cfg/4", "apg/1", "apg/4", "interval/1", "interval/4", "cfg++/0.6"}
    cell = res["runs"]["cfg/4"]
    assert {"fid", "accuracy", "time_gap", "saturation", "intensity_w1"} <= set(cell["without"])
    assert cell["best_omega"] in (0.0, 1.0) and "with" in cell and "with" not in res["runs"]["apg/4"]
    assert len(cell["without"]["fid"]["values"]) == 2
    # s = 1: the bench's row is the conditional model's samples (no CFG term), shared by every family
    plain = preview(_draw(setup, []))
    assert res["runs"]["cfg/1"]["preview"]["without"] == plain
    assert res["runs"]["apg/1"]["without"] == res["runs"]["cfg/1"]["without"]
    assert res["runs"]["cfg/4"]["preview"]["without"] != plain
    # the validation seed is never an evaluation seed: seed 100 only appears in the ω sweep
    keys = [json.loads(p.read_text())["key"] for p in (tmp_path / "runs").glob("*.json")]
    assert {k["seed"] for k in keys} == {0, 1, 100}
    assert all(k["n"] == 20 for k in keys) and TINY.sweep_seed not in TINY.seeds
    assert res["config"]["omega_choice"].startswith("per (family, scale)")
    assert (tmp_path / "cfg.png").stat().st_size > 0 and "| CFG | 4 |" in (tmp_path / "table.md").read_text()
    # resume: a second run reads every run from the cache
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*.json")}
    again = run_cfg(tmp_path, TINY, progress=False)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps and again["runs"] == res["runs"]
    with pytest.raises(ValueError, match=r"validation seed\(s\) \[100\]"):
        replace(TINY, seeds=(0, 100))


@pytest.mark.parametrize("method", ["cfg", "apg", "interval", "cfg++"])
def test_tag_at_omega_zero_is_the_base_method_bit_for_bit(setup, ctag_setup, method):
    window = interval_from_sigma(setup.schedule, *TINY.interval_sigma)
    scale = 0.6 if method == "cfg++" else 4.0
    clip = None if method == "cfg++" else 1.0
    base = _draw(setup, cfg_terms(method, scale, 0.0, setup, TINY, window), clip=clip)
    zero = _draw(setup, cfg_terms(method + "+tag", scale, 0.0, setup, TINY, window), clip=clip)
    one = _draw(setup, cfg_terms(method + "+tag", scale, 1.0, setup, TINY, window), clip=clip)
    assert torch.equal(base, zero) and not torch.equal(base, one)
    y = torch.arange(10).repeat_interleave(TINY.num_per_target)
    czero = _draw(ctag_setup, cfg_terms(method + "+ctag", scale, 0.0, ctag_setup, TINY, window, y), clip=clip)
    cone = _draw(ctag_setup, cfg_terms(method + "+ctag", scale, 1.0, ctag_setup, TINY, window, y), clip=clip)
    assert torch.equal(base, czero) and not torch.equal(cone, base) and not torch.equal(cone, one)


def test_saturation_and_intensity_w1():
    ones, minus = torch.ones(4, 1, 8, 8), -torch.ones(4, 1, 8, 8)
    assert saturation(ones, minus) == {"saturation": 1.0, "intensity_w1": pytest.approx(2.0)}
    x = torch.rand(50, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.8 - 0.9
    r = saturation(x, x)
    assert r["saturation"] == 0.0 and r["intensity_w1"] == pytest.approx(0.0, abs=1e-12)
    assert saturation(x, (x + 0.05).clamp(max=0.95))["intensity_w1"] == pytest.approx(0.05, rel=0.02)


@pytest.mark.parametrize("argv, needle", [(["--scales", "0,2"], "scales"), (["--methods", "cfg,foo"], "foo"),
                                          (["--seeds", "0,100"], "validation seed(s) [100]"),
                                          (["--num-per-target", "1"], "num_per_target"),
                                          (["--cfgpp-lambdas", "-1"], "cfgpp_lambdas"),
                                          (["--vae", "runs/no_such_vae"], "no_such_vae")])
def test_cli_rejects_bad_values_in_one_line(tmp_path, capsys, argv, needle):
    assert main(["bench", "cfg", "--out", str(tmp_path), "--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tagdiff: error:") and needle in err[0]


def test_cli_mnist_without_models_names_the_missing_folder(tmp_path, capsys):
    assert main(["bench", "cfg", "--out", str(tmp_path), "--dataset", "mnist", "--models-dir",
                 str(tmp_path / "nope"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]


@pytest.fixture(scope="module")
def flow_models(tmp_path_factory):
    """A models folder for a flow model: a small random class-conditional flow UNet (null class 10) saved as
    ``train diffusion --objective flow`` saves it, the shipped σ predictor of the digits flow model and the digits
    evaluation classifier."""
    import shutil

    from tagdiff.models.assets import assets_dir
    from tagdiff.models.unet import UNetEpsModel, make_unet, save_unet
    from tagdiff.sampling.flow_path import FlowSchedule

    root = tmp_path_factory.mktemp("flow_models")
    torch.manual_seed(0)
    net = UNetEpsModel(make_unet(8, 1, widths=(8, 16), num_classes=11), 1000, null_class=10)
    flow = FlowSchedule()
    save_unet(net, flow.vp_schedule, root / "unet_class", flow_schedule=flow, null_class=10,
              sigma_density="logit_normal")
    shutil.copytree(assets_dir("digits_flow") / "time_predictor", root / "time_predictor")
    shutil.copytree(assets_dir("digits") / "clf_eval", root / "clf_eval")
    return root


def test_bench_cfg_on_a_flow_model_is_flow_euler_with_the_terms(flow_models, tmp_path):
    """A flow model runs the suite through sample_flow: the bench's CFG run is the flow Euler loop with CFG on the
    velocity (σ grid from 1 − 1/T; ground truth written out here), CFG-Zero* gets its zero-init, and the
    VP-only CFG++ and a VP time predictor are refused."""
    import shutil

    from tagdiff.models.assets import assets_dir
    from tagdiff.sampling.flow import FlowSchedule

    cfg = replace(TINY, models_dir=str(flow_models), methods=("cfg", "cfg+tag", "cfgzero", "cfgzero+tag"),
                  scales=(1.0, 3.0))
    setup = load_cfg_setup(cfg)
    assert "flow" in setup.models
    y = torch.arange(10).repeat_interleave(cfg.num_per_target)
    got = draw(setup, cfg_terms("cfg", 3.0, 0.0, setup, cfg, (0, 999), y), n=y.numel(), seed=0,
               num_steps=cfg.num_steps, sampler="euler", cond={"y": y})
    net = setup.eps_model.model
    sig = FlowSchedule().sigmas(cfg.num_steps)
    sig[0] = 1 - 1 / 1000
    x = torch.randn((y.numel(), 1, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for s, s_next in zip(sig[:-1], sig[1:], strict=True):
            t = torch.full((y.numel(),), float(1000 * s))
            v_c, v_u = net(x, t, y=y), net(x, t, y=torch.full_like(y, -1))
            x = x + (s_next - s) * (v_u + 3.0 * (v_c - v_u))
    # float32: at σ_0 = 0.999 the guided v̂ = ε̂ − x̂_0 takes x̂_0 = (x − √(1 − ᾱ) ε̂) / √ᾱ with √ᾱ ≈ 1e-3, so a rounding
    # of ε̂ (≈ 2e-7 · |x| ≤ 1e-6) grows to ≈ 1e-3 in v̂, times the step Δσ ≈ 0.5: a tolerance of 2e-3
    torch.testing.assert_close(got["x0"], x.clamp(-1, 1), rtol=0, atol=2e-3)
    plain = draw(setup, cfg_terms("cfg", 1.0, 0.0, setup, cfg, (0, 999), y), n=y.numel(), seed=0,
                 num_steps=cfg.num_steps, sampler="euler", cond={"y": y})["x0"]  # s = 1, same grid
    assert (plain - got["x0"]).abs().max() > 0.02  # the check tells CFG at s = 3 from the conditional model
    assert got["timesteps"] == pytest.approx((sig[:-1] * 1000).tolist())
    res = run_cfg(tmp_path / "out", cfg, progress=False)
    assert set(res["runs"]) == {"cfg/1", "cfg/3", "cfgzero/1", "cfgzero/3"}
    # zero-init makes CFG-Zero* at s = 1 another run than the conditional model
    assert res["runs"]["cfgzero/1"]["without"] != res["runs"]["cfg/1"]["without"]
    assert res["config"]["sampler"] == "flow euler" and "| CFG-Zero* | 3 |" in (tmp_path / "out/table.md").read_text()
    with pytest.raises(ValueError, match="CFG\\+\\+"):
        load_cfg_setup(replace(cfg, methods=("cfg++",)))
    shutil.rmtree(flow_models / "time_predictor")
    shutil.copytree(assets_dir("digits") / "time_predictor", flow_models / "time_predictor")
    with pytest.raises(ValueError, match="σ predictor"):
        load_cfg_setup(cfg)
