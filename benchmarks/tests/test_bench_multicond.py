"""Multi-condition guidance bench (``tagdiff bench multicond``, docs/notation.md §7.3 Table 5 analogue): the ink-mass
loss
against its closed form, the joint condition index, the ω = 0 identity with DPS, a tiny end-to-end run on the shipped
digits models checked against an independent recomputation, the CLI's bad-input errors, and conditional
time-predictor training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tagdiff_bench.common import draw, load_setup
from tagdiff_bench.multicond import (
    INK_LEVELS,
    MultiCondConfig,
    ink_bins,
    ink_loss,
    ink_mass,
    ink_quantiles,
    joint_condition,
    load_predictors,
    make_targets,
    multicond_terms,
    parse_targets,
    resolve_targets,
    run_multicond,
)

from tagdiff.cli.main import main
from tagdiff.cli.recipes import condition_labels
from tagdiff.data import dataset_info, load_dataset
from tagdiff.data.attributes import attribute_quantiles, slant
from tagdiff.guidance import DPSGuidance, combined_loss, label_loss
from tagdiff.models.checkpoints import load_model, read_config

pytest.importorskip("diffusers")

F64 = torch.float64


@pytest.fixture(scope="module")
def setup():
    return load_setup("digits")


def test_ink_mass_loss_and_gradient_match_the_closed_form():
    x = torch.rand(5, 1, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    target, s, D = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=F64), 0.025, 64
    m = ((x + 1) / 2).sum((1, 2, 3)) / D
    assert torch.allclose(ink_mass(x), m)
    assert torch.equal(ink_mass(-torch.ones(2, 1, 8, 8)), torch.zeros(2))
    assert torch.equal(ink_mass(torch.ones(2, 1, 8, 8)), torch.ones(2))
    loss_fn = ink_loss(target, s)
    x_in = x.clone().requires_grad_(True)
    loss = loss_fn(x_in)
    assert loss.shape == (5,) and torch.allclose(loss, (m - target) ** 2 / s**2)
    (grad,) = torch.autograd.grad(loss.sum(), x_in)
    # ∂/∂x_i (m − t)²/s² = 2 (m − t)/s² · 1/(2D): the same for every pixel of a sample
    expected = ((m - target) / (s**2 * D)).reshape(-1, 1, 1, 1).expand_as(x)
    assert torch.allclose(grad, expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(ink_loss(0.4, 0.1)(x), (m - 0.4) ** 2 / 0.01)  # a scalar target broadcasts
    with pytest.raises(ValueError, match="ink_scale"):
        ink_loss(0.5, 0.0)


def test_joint_condition_index_and_target_parsing():
    classes, bins = torch.tensor([0, 0, 3, 9]), torch.tensor([0, 1, 1, 0])
    assert joint_condition(classes, bins).tolist() == [0, 1, 7, 18]
    c, b = parse_targets(("7:thick", "1:thin"), 10)
    assert c.tolist() == [7, 1] and b.tolist() == [1, 0] and INK_LEVELS[1] == "thick"
    c, b = parse_targets(("all",), 10)  # every class × {thin, thick}, in joint-index order
    assert joint_condition(c, b).tolist() == list(range(20))
    for bad, msg in (("10:thick", "out of range"), ("3:bold", "thin"), ("x:thin", "CLASS")):
        with pytest.raises(ValueError, match=msg):
            parse_targets((bad,), 10)
    # the class_ink training labels: 2y + (ink above the class median of the training split)
    x, y = load_dataset("digits", "train")
    labels, meta = condition_labels("class_ink", x, y, dataset_info("digits"))
    med = ink_quantiles(x, y, 10, (0.5,))[:, 0]
    m = ink_mass(x.double())
    assert torch.equal(labels, 2 * y + (m > med[y]).long()) and meta["num_conditions"] == 20
    assert torch.equal(ink_bins(x, y, 10), labels % 2)
    frac = torch.stack([(labels[y == k] % 2).float().mean() for k in range(10)])
    assert ((frac > 0.4) & (frac <= 0.5)).all()  # a median split: about half of each class is "thick"
    assert torch.equal(condition_labels("class", x, y, dataset_info("digits"))[0], y)
    assert condition_labels("none", x, y, dataset_info("digits"))[0] is None


def test_terms_of_each_variant(setup):
    cfg = MultiCondConfig(targets=("3:thick", "5:thin"))
    preds = load_predictors(setup, cfg)
    tg, stats = make_targets(setup, cfg, 2)
    assert tg.classes.tolist() == [3, 3, 5, 5] and tg.bins.tolist() == [1, 1, 0, 0]
    assert tg.value[0] > tg.median[0] and tg.value[2] < tg.median[2]  # thick above, thin below the median
    assert stats["3"]["thin_target"] < stats["3"]["median"] < stats["3"]["thick_target"]
    joint = multicond_terms("joint", setup, preds, tg, cfg, 1.0)
    assert joint[0].variant == "joint" and joint[0].condition.tolist() == [7, 7, 10, 10]
    single = multicond_terms("single", setup, preds, tg, cfg, 1.0, 2.0)
    assert single[0].variant == "single" and single[0].condition.tolist() == [3, 3, 5, 5]
    assert len(single[0].losses) == 1 and single[0].reparam_scale == 2.0 and single[0].time_predictor.num_classes == 10
    unc = multicond_terms("unconditional", setup, preds, tg, cfg, 1.0, 2.0)
    assert unc[0].condition is None and len(unc[0].losses) == 2 and unc[0].time_predictor.num_classes is None
    assert len(multicond_terms("dps", setup, preds, tg, cfg)) == 1
    assert all(isinstance(t[-1], DPSGuidance) for t in (joint, single, unc))


def test_omega_zero_reproduces_the_dps_run_exactly(setup):
    cfg = MultiCondConfig(targets=("0:thick", "8:thin"))
    preds = load_predictors(setup, cfg)
    tg, _ = make_targets(setup, cfg, 3)
    dps = draw(setup, multicond_terms("dps", setup, preds, tg, cfg), n=6, seed=5, num_steps=4)["x0"]
    for method in ("joint", "single", "unconditional"):
        x0 = draw(setup, multicond_terms(method, setup, preds, tg, cfg, 0.0, 2.0), n=6, seed=5, num_steps=4)["x0"]
        assert torch.equal(x0, dps), method
    tagged = draw(setup, multicond_terms("single", setup, preds, tg, cfg, 2.0, 2.0), n=6, seed=5, num_steps=4)["x0"]
    assert not torch.equal(tagged, dps)


def test_tiny_run_writes_outputs_and_matches_an_independent_recomputation(tmp_path, setup):
    cfg = MultiCondConfig(targets=("1:thick", "7:thin"), num_per_target=3, sweep_per_target=2, num_steps=3,
                          omegas=(1.0,), reparam_scales=(0.0, 2.0), seeds=(0,), device="cpu")
    res = run_multicond(tmp_path, cfg, progress=False)
    for name in ("results.json", "table.md", "multicond.png"):
        assert (tmp_path / name).exists()
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in on_disk["rows"]] == ["dps", "joint", "single", "single", "unconditional",
                                                      "unconditional"]
    assert sum(r["chosen"] for r in on_disk["rows"]) == 4 and on_disk["paper"]["accuracy"]["dps"] == [80.5, 92.1]
    assert set(on_disk["sweep"]["grid"]) == {"dps", "joint:ω=1.0", "single:reparam=0.0:ω=1.0",
                                             "single:reparam=2.0:ω=1.0", "unconditional:reparam=0.0:ω=1.0",
                                             "unconditional:reparam=2.0:ω=1.0"}
    assert [r["reparam_scale"] for r in on_disk["rows"]] == [None, None, 0.0, 2.0, 0.0, 2.0]
    assert "eta" not in on_disk["rows"][0] and set(on_disk["sweep"]["best"]["single"]) == {"omega", "reparam_scale"}
    # independent recomputation of the DPS row (seed 0): the same guidance built by hand, the same judges
    tg_cls = torch.tensor([1, 1, 1, 7, 7, 7])
    thick = torch.tensor([True] * 3 + [False] * 3)
    q = ink_quantiles(setup.held_x, setup.held_y, 10, (0.25, 0.5, 0.75))
    target_ink = torch.where(thick, q[tg_cls, 2], q[tg_cls, 0]).float()
    loss = combined_loss(label_loss(setup.models["clf_clean"], tg_cls), ink_loss(target_ink, cfg.ink_scale))
    x0 = draw(setup, [DPSGuidance(loss, cfg.dps_guidance_scale)], n=6, seed=0, num_steps=3)["x0"]
    m = ((x0 + 1) / 2).mean((1, 2, 3))
    ink_ok = torch.where(thick, m > q[tg_cls, 1].float(), m < q[tg_cls, 1].float())
    class_ok = setup.models["clf_eval"](x0).argmax(-1) == tg_cls
    dps = res["rows"][0]["metrics"]
    assert dps["ink_success"]["mean"] == pytest.approx(float(ink_ok.float().mean()))
    assert dps["class_accuracy"]["mean"] == pytest.approx(float(class_ok.float().mean()))
    assert dps["joint_success"]["mean"] == pytest.approx(float((ink_ok & class_ok).float().mean()))
    table = (tmp_path / "table.md").read_text()
    assert "DPS (baseline)" in table and "80.5 / 92.1" in table and "single:reparam=2.0:ω=1.0" in table
    # resume: a second call reads every run from the cache
    assert run_multicond(tmp_path, cfg, progress=False)["rows"] == res["rows"]


def test_cli_rejects_bad_target_class_and_negative_reparam_scale(tmp_path, capsys):
    assert main(["bench", "multicond", "--out", str(tmp_path / "a"), "--targets", "12:thick", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "12" in err[0] and "0..9" in err[0]
    assert main(["bench", "multicond", "--out", str(tmp_path / "b"), "--reparam-scales=-1,1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reparam_scales must be >= 0" in err[0]
    assert main(["bench", "multicond", "--out", str(tmp_path / "c"), "--ddim-eta=-0.5", "--quiet"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_train_class_conditional_time_predictor(tmp_path, capsys):
    out = tmp_path / "tp"
    rc = main(["train", "time-predictor", "--dataset", "digits", "--condition", "class", "--out", str(out),
               "--steps", "2", "--batch-size", "8", "--quiet"])
    assert rc == 0
    cfg = read_config(out)
    assert cfg["config"]["num_classes"] == 10 and cfg["condition"] == "class" and cfg["train"]["cond_drop"] == 0.1
    assert "--condition class" in cfg["command"]
    model = load_model(out)
    x = torch.zeros(2, 1, 8, 8)
    assert model(x, torch.tensor([3, -1])).shape == (2, 1000)  # a class and the null embedding
    report = json.loads((out / "report_conditional.json").read_text())
    assert set(report) >= {"conditional", "null"} and report["num_held_out"] == 359
    with pytest.raises(SystemExit) as e:  # argparse usage error: one line, exit 2
        main(["train", "time-predictor", "--dataset", "digits", "--condition", "rainbow", "--out", str(tmp_path)])
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_slant_attribute_is_guided_by_its_classifier_and_judged_by_the_measured_slant(tmp_path, setup):
    cfg = MultiCondConfig(attribute="slant", targets=("1:right", "7:left"), num_per_target=3, sweep_per_target=2,
                          num_steps=3, omegas=(1.0,), reparam_scales=(0.0,), seeds=(0,), device="cpu")
    preds = load_predictors(setup, cfg)
    assert preds["joint"].num_classes == 20 and preds["attribute"].num_classes == 2
    tg, stats = make_targets(setup, cfg, 3)
    assert tg.bins.tolist() == [1, 1, 1, 0, 0, 0] and stats["1"]["left_target"] < stats["1"]["right_target"]
    single = multicond_terms("single", setup, preds, tg, cfg, 1.0, 0.5)
    x = setup.held_x[:6]
    expected = label_loss(preds["attribute"], tg.bins)(x)  # x′ is built from the slant classifier's loss
    assert torch.allclose(single[0].losses[0](x), expected)
    res = run_multicond(tmp_path, cfg, progress=False)
    # independent recomputation of the DPS row: class + slant-classifier losses; success by the measured slant
    cls, right = torch.tensor([1, 1, 1, 7, 7, 7]), torch.tensor([True] * 3 + [False] * 3)
    loss = combined_loss(label_loss(setup.models["clf_clean"], cls), label_loss(preds["attribute"], right.long()))
    x0 = draw(setup, [DPSGuidance(loss, cfg.dps_guidance_scale)], n=6, seed=0, num_steps=3)["x0"]
    med = attribute_quantiles("slant", setup.held_x, setup.held_y, 10, (0.5,))[:, 0].float()[cls]
    ok = torch.where(right, slant(x0) > med, slant(x0) < med)
    dps = res["rows"][0]["metrics"]
    assert dps["slant_success"]["mean"] == pytest.approx(float(ok.float().mean()))
    assert "slant success % ↑" in (tmp_path / "table.md").read_text()
    assert res["config"]["targets"] == ["1:right", "7:left"] and "clf_slant" in res["config"]["losses"]
    # a classifier trained for something else, and ink levels for the slant attribute, are refused
    with pytest.raises(ValueError, match="not a slant classifier"):
        load_predictors(setup, MultiCondConfig(attribute="slant",
                                               attribute_classifier=str(Path(setup.models_dir) / "clf_clean")))
    with pytest.raises(ValueError, match="'left' or 'right'"):
        run_multicond(tmp_path / "bad", MultiCondConfig(attribute="slant", targets=("0:thick",)), progress=False)
    assert MultiCondConfig(attribute="slant").targets == () and resolve_targets(MultiCondConfig(attribute="slant"))[0] \
        == "0:right"


def test_train_slant_attribute_classifier(tmp_path, capsys):
    out = tmp_path / "clf"
    assert main(["train", "classifier", "--kind", "clean", "--attribute", "slant", "--dataset", "digits", "--out",
                 str(out), "--steps", "2", "--batch-size", "8", "--quiet"]) == 0
    cfg = read_config(out)
    assert cfg["config"]["num_classes"] == 2 and cfg["attribute"] == "slant" and len(cfg["slant_medians"]) == 10
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["accuracy"] <= 1 and metrics["num_held_out"] == 359
    assert main(["bench", "multicond", "--out", str(tmp_path / "m"), "--attribute", "slant", "--targets", "3:thick",
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'left' or 'right'" in err[-1]
