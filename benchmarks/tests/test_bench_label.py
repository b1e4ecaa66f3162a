"""The label-guidance suite (``tagdiff bench label``) on tiny digits checkpoints trained by the CLI."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from tagdiff_bench.label import METHODS, LabelConfig, method_terms, run_label

from tagdiff.cli.main import main
from tagdiff.data import load_dataset
from tagdiff.guidance import (
    ClassifierGuidance,
    DPSGuidance,
    DPSNormalized,
    SelfGuidance,
    TemporalAlignment,
    TFGGuidance,
    TimestepGuidance,
)
from tagdiff.metrics.images import fid
from tagdiff.models.assets import load_label_models
from tagdiff.models.checkpoints import CheckpointError
from tagdiff.sampling.samplers import sample_ddim

pytest.importorskip("diffusers")

TRAIN = ["--dataset", "digits", "--steps", "2", "--batch-size", "8", "--quiet"]
MODELS = {"unet": ["diffusion", "--widths", "8,16"], "time_predictor": ["time-predictor"],
          "clf_noisy": ["classifier", "--kind", "noisy"], "clf_clean": ["classifier", "--kind", "clean"],
          "clf_eval": ["classifier", "--kind", "eval", "--seed", "1", "--split-seed", "0"]}


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    """``root/`` in the layout load_label_models expects, and ``root_tp50/time_predictor`` trained with T=50."""
    root = tmp_path_factory.mktemp("label") / "ck"
    for name, argv in MODELS.items():
        assert main(["train", *argv, "--out", str(root / name), *TRAIN]) == 0
    assert main(["train", "time-predictor", "--num-train-timesteps", "50", "--out",
                 str(root.parent / "tp50"), *TRAIN]) == 0
    return root


def _cfg(ck, **kw) -> LabelConfig:
    return LabelConfig(**{"targets": (0, 1), "num_per_target": 4, "num_steps": 3, "models_dir": str(ck),
                          "device": "cpu", **kw})


def _variant(ck, tmp_path, **replace):
    """A copy of the checkpoint folder with some models replaced (a path) or removed (None)."""
    root = tmp_path / "variant"
    shutil.copytree(ck, root)
    for name, src in replace.items():
        shutil.rmtree(root / name)
        if src is not None:
            shutil.copytree(src, root / name)
    return root


@pytest.fixture(scope="module")
def results(ck, tmp_path_factory):
    """One run with TAG on (default ω) and one with ω = 0."""
    out = tmp_path_factory.mktemp("runs")
    return {omega: (run_label(out / str(omega), _cfg(ck, omega=omega), progress=False), out / str(omega))
            for omega in (1.0, 0.0)}


def test_results_layout_and_files(results, ck):
    res, out = results[1.0]
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["methods"] == res["methods"]
    assert set(on_disk["methods"]) == set(METHODS)
    for m in on_disk["methods"].values():
        assert set(m) == {"fid", "accuracy", "confidence", "is", "time_gap", "seconds"}
        assert math.isfinite(m["fid"]) and m["fid"] >= 0 and m["seconds"] > 0 and m["time_gap"] >= 0
        assert 0 <= m["accuracy"] <= 1 and (m["accuracy"] * 8) == pytest.approx(round(m["accuracy"] * 8))
    cfg = on_disk["config"]
    assert cfg["targets"] == [0, 1] and cfg["num_per_target"] == 4 and cfg["num_steps"] == 3
    assert cfg["models_dir"] == str(ck) and cfg["sampler"] == "ddim" and cfg["omega"] == 1.0
    assert set(cfg["reference_images_per_target"]) == {"0", "1"}
    for method in METHODS:
        assert set(on_disk["per_target"][method]) == {"0", "1"}
        assert len(on_disk["time_gap_per_step"][method]) == 3
    assert (out / "label.png").stat().st_size > 5_000
    assert "| dps+tag |" in (out / "table.md").read_text()
    assert len(list((out / "runs").glob("*.json"))) == len(METHODS)  # one cached run per method


def test_metrics_against_independent_computation(results, ck):
    """Unguided: the samples of DDIM(η=1) over the default (benchmark, linspace) grid from the seed's x_T; accuracy
    and per-target FID of those samples under the evaluation classifier; Time Gap at step 0 measured on x_T at
    t = T-1 (shared by every method)."""
    res, _ = results[1.0]
    models = load_label_models(ck)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn((8, 1, 8, 8), generator=g)
    x0 = sample_ddim(models["eps_model"], x_T, models["schedule"].timesteps(3, "linspace"), models["schedule"], eta=1.0,
                     randn_like=lambda z: torch.randn(z.shape, generator=g, dtype=z.dtype), clip_x0=1.0).clamp(-1, 1)
    target = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    with torch.no_grad():
        pred = models["clf_eval"](x0).argmax(-1)
        gap0 = (models["time_predictor"](x_T).argmax(-1) - 999).abs().float().mean().item()
    assert res["methods"]["unguided"]["accuracy"] == pytest.approx((pred == target).float().mean().item())
    held_x, held_y = load_dataset("digits", "held_out")
    for y in (0, 1):
        ref = fid(held_x[held_y == y], x0[target == y], models["clf_eval"])
        assert res["per_target"]["unguided"][str(y)]["fid"] == pytest.approx(ref, rel=1e-6)
        assert res["config"]["reference_images_per_target"][str(y)] == int((held_y == y).sum())
    for method in METHODS:
        assert res["time_gap_per_step"][method][0] == pytest.approx(gap0)


def test_omega_zero_tag_equals_base(results):
    res, _ = results[0.0]
    for base in ("dps", "cg"):
        assert res["methods"][f"{base}+tag"]["fid"] == res["methods"][base]["fid"]
        assert res["methods"][f"{base}+tag"]["accuracy"] == res["methods"][base]["accuracy"]
        assert res["methods"][f"{base}+tag"]["time_gap"] == res["methods"][base]["time_gap"]
        assert res["time_gap_per_step"][f"{base}+tag"] == res["time_gap_per_step"][base]
        assert res["per_target"][f"{base}+tag"] == res["per_target"][base]
    # guidance changes the samples (else the equalities above would be trivial)
    assert res["methods"]["dps"]["fid"] != res["methods"]["unguided"]["fid"]
    assert res["methods"]["cg"]["fid"] != res["methods"]["unguided"]["fid"]
    # with TAG on, "+tag" differs from its base; the unguided run does not depend on ω at all
    on, _ = results[1.0]
    assert on["methods"]["dps+tag"]["fid"] != on["methods"]["dps"]["fid"]
    assert on["methods"]["cg+tag"]["fid"] != on["methods"]["cg"]["fid"]
    assert on["methods"]["unguided"]["fid"] == res["methods"]["unguided"]["fid"]
    assert on["time_gap_per_step"]["unguided"] == res["time_gap_per_step"]["unguided"]


def test_method_terms(ck):
    models = load_label_models(ck)
    cfg, target = LabelConfig(dps_guidance_scale=2.0, cg_guidance_scale=3.0, omega=0.5), torch.tensor([0, 1])
    kinds = {m: [type(t) for t in method_terms(m, models, target, cfg)] for m in METHODS}
    assert kinds == {"unguided": [], "dps": [DPSGuidance], "dps+tag": [DPSGuidance, TemporalAlignment],
                     "cg": [ClassifierGuidance], "cg+tag": [ClassifierGuidance, TemporalAlignment]}
    cg, tag = method_terms("cg+tag", models, target, cfg)
    assert cg.strength.scale == 3.0 and cg.classifier is models["clf_noisy"] and torch.equal(cg.target, target)
    assert tag.strength.scale == 0.5 and tag.time_predictor is models["time_predictor"]


def test_benchmark_dps_and_clipped_tfg_terms(ck):
    """dps_tfg is the benchmark's DPS (DPSNormalized, strength 1 by default); TFG clips x̂_0 in its loss by default."""
    models = load_label_models(ck)
    target = torch.tensor([0, 1])
    (dps, tag) = method_terms("dps_tfg+tag", models, target, LabelConfig())
    assert isinstance(dps, DPSNormalized) and dps.guidance_scale == 1.0 and isinstance(tag, TemporalAlignment)
    (tfg,) = method_terms("tfg", models, target, LabelConfig())
    assert isinstance(tfg, TFGGuidance) and tfg.clip_x0 == 1.0
    assert method_terms("tfg", models, target, LabelConfig(tfg_clip_x0=0.0))[0].clip_x0 is None
    assert [type(t) for t in method_terms("dps+tsg", models, target, LabelConfig())] == [DPSGuidance, TimestepGuidance]
    assert [type(t) for t in method_terms("dps+sg", models, target, LabelConfig())] == [DPSGuidance, SelfGuidance]


def test_grid_options_are_used_and_recorded(ck, tmp_path):
    """The default grid is the benchmark's (linspace: 2 steps = [999, 0]); --timestep-spacing trailing is recorded
    and changes the samples; dps_tfg runs unclipped and stays finite."""
    runs = {sp: run_label(tmp_path / sp, _cfg(ck, targets=(1,), num_per_target=2, num_steps=2, timestep_spacing=sp),
                          progress=False, methods=("unguided", "dps_tfg")) for sp in ("linspace", "trailing")}
    assert LabelConfig().timestep_spacing == "linspace"
    for sp, res in runs.items():
        assert res["config"]["timestep_spacing"] == sp
        assert all(math.isfinite(m["fid"]) for m in res["methods"].values())
    assert runs["linspace"]["methods"]["unguided"]["fid"] != runs["trailing"]["methods"]["unguided"]["fid"]


def test_subset_of_methods(ck, tmp_path):
    res = run_label(tmp_path, _cfg(ck, targets=(2,), num_per_target=2, num_steps=2), progress=False,
                    methods=("unguided", "cg"))
    assert set(res["methods"]) == {"unguided", "cg"} and res["config"]["targets"] == (2,)


@pytest.mark.parametrize("targets", [(0, 10), (-1,), ()])
def test_target_out_of_range(ck, tmp_path, targets):
    with pytest.raises(ValueError, match="out of range"):
        run_label(tmp_path, _cfg(ck, targets=targets), progress=False)
    assert not (tmp_path / "results.json").exists()


def test_unknown_method(ck, tmp_path):
    with pytest.raises(ValueError, match="tag"):
        run_label(tmp_path, _cfg(ck), progress=False, methods=("unguided", "tag"))


@pytest.mark.parametrize("missing", ["unet", "time_predictor", "clf_eval"])
def test_missing_model(ck, tmp_path, missing):
    root = _variant(ck, tmp_path, **{missing: None})
    with pytest.raises(CheckpointError, match=missing):
        run_label(tmp_path / "out", _cfg(root), progress=False)


def test_time_predictor_with_another_T(ck, tmp_path):
    root = _variant(ck, tmp_path, time_predictor=ck.parent / "tp50")
    with pytest.raises(ValueError, match="T=50"):
        load_label_models(root)
    with pytest.raises(ValueError, match="T=1000"):
        run_label(tmp_path / "out", _cfg(root), progress=False)


@pytest.mark.parametrize("slot, other", [("clf_clean", "clf_noisy"), ("clf_noisy", "clf_clean"),
                                         ("clf_eval", "time_predictor"), ("time_predictor", "clf_eval")])
def test_model_of_the_wrong_kind(ck, tmp_path, slot, other):
    root = _variant(ck, tmp_path, **{slot: ck / other})
    with pytest.raises(ValueError, match=slot):
        load_label_models(root)


def test_cli_bench_label(ck, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["bench", "label", "--models-dir", str(ck), "--targets", "0,1", "--num-per-target", "4",
               "--num-steps", "2", "--out", str(out), "--quiet"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert all(m in stdout for m in METHODS) and "results.json" in stdout
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == set(METHODS) and res["config"]["num_steps"] == 2
    assert (out / "label.png").is_file()


def test_cli_bench_label_errors(ck, tmp_path, capsys):
    # --checkpoints: the former name of --models-dir, still accepted
    rc = main(["bench", "label", "--checkpoints", str(ck), "--targets", "0,12", "--num-per-target", "2",
               "--num-steps", "2", "--out", str(tmp_path / "a"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("tagdiff: error:") and "12" in err[0]
    rc = main(["bench", "label", "--models-dir", str(tmp_path / "none"), "--out", str(tmp_path / "b"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "none" in err[0]
