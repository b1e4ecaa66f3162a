"""The reproduction experiments (``tagdiff bench corrupted|strength|fewstep``, label over seeds) and their shared
machinery: the ω sweep, resumable run cache, mean ± std. End-to-end runs use the shipped digits models at tiny
sizes; the statistics are checked against independent computations."""

from __future__ import annotations

import ast
import dataclasses
import json
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tagdiff_bench.common import (
    ExperimentConfig,
    RunCache,
    draw,
    image_grid,
    load_setup,
    mean_std,
    sample_metrics,
    tag_comparison,
)
from tagdiff_bench.corrupted import CorruptedConfig, run_corrupted
from tagdiff_bench.fewstep import FewStepConfig, run_fewstep
from tagdiff_bench.label import ALL_METHODS, LabelConfig, method_terms, run_label_seeds
from tagdiff_bench.multicond import MultiCondConfig
from tagdiff_bench.strength import StrengthConfig, run_strength

from tagdiff.cli.main import main
from tagdiff.guidance import (
    Corruption,
    EpsilonScaling,
    LangevinCorrector,
    TemporalAlignment,
    TFGGuidance,
    TimeCorrection,
    TimeShift,
)

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def setup():
    return load_setup("digits")


def test_mean_std_matches_statistics():
    v = [3.0, 5.5, 4.25]
    r = mean_std(v)
    assert r["mean"] == pytest.approx(statistics.mean(v)) and r["std"] == pytest.approx(statistics.stdev(v))
    assert mean_std([2.0])["std"] == 0.0


def test_run_cache_resumes_and_recomputes_on_new_key(tmp_path):
    calls = []

    def fn():
        calls.append(1)
        return {"fid": float(len(calls))}

    cache = RunCache(tmp_path)
    assert cache.get({"a": 1}, fn) == {"fid": 1.0}
    assert RunCache(tmp_path).get({"a": 1}, fn) == {"fid": 1.0} and len(calls) == 1  # resumed from disk
    assert cache.get({"a": 2}, fn) == {"fid": 2.0}
    assert RunCache(tmp_path, resume=False).get({"a": 1}, fn) == {"fid": 3.0}
    (tmp_path / "runs" / "a=1.json").write_text("{not json")  # a torn file is recomputed, not trusted
    assert cache.get({"a": 1}, fn) == {"fid": 4.0}


def test_tag_comparison_picks_the_validation_minimum_and_reports_eval_seeds(tmp_path):
    def run(w, seed, n, variant):
        shift = 0.0 if variant == "post" else 1.0
        return {"fid": (w - 2.0) ** 2 + shift + (10.0 * seed if seed < 100 else 0.0), "n": float(n)}

    r = tag_comparison(RunCache(tmp_path), {"exp": "unit"}, run, omegas=(1.0, 2.0, 4.0), seeds=(0, 1),
                       sweep_seed=100, n=8, sweep_n=4, variants=("pre", "post"))
    assert r["best_omega"] == 2.0 and r["best_variant"] == "post" and r["sweep"]["best"] == "post:2.0"
    # ω = 0 runs once, without a variant (run gets variant None)
    assert r["sweep"]["grid"]["0.0"]["fid"] == 5.0 and r["sweep"]["grid"]["pre:2.0"]["fid"] == 1.0
    assert r["without"]["fid"]["values"] == [5.0, 15.0] and r["with"]["fid"]["values"] == [0.0, 10.0]
    assert r["with"]["n"]["mean"] == 8.0
    with pytest.raises(ValueError, match=r"validation seed\(s\) \[0\] are also evaluation seeds"):
        tag_comparison(RunCache(tmp_path), {}, run, omegas=(1.0,), seeds=(0,), sweep_seed=0, n=2, sweep_n=2)
    assert r["sweep"]["stable"] and r["sweep"]["edge"] is None and r["sweep"]["per_seed_best"] == {"100": 2.0}


def test_tag_comparison_on_several_validation_seeds_records_the_spread_and_the_edge(tmp_path):
    """ω chosen on the mean over validation seeds; each seed's own choice is kept; a choice at the grid's top is
    flagged ("widen the grid")."""
    best_of = {100: 2.0, 101: 4.0, 102: 4.0}

    def run(w, seed, n):
        return {"fid": (w - best_of.get(seed, 2.0)) ** 2}

    r = tag_comparison(RunCache(tmp_path), {"exp": "spread"}, run, omegas=(1.0, 2.0, 4.0), seeds=(0,), sweep_seed=100,
                       sweep_seeds=(101, 102), n=2, sweep_n=2)
    assert r["sweep"]["per_seed_best"] == {"100": 2.0, "101": 4.0, "102": 4.0} and not r["sweep"]["stable"]
    # mean over the three seeds of (w-2)², (w-4)², (w-4)²: 4/3 at w = 4, 8/3 at w = 2
    assert r["best_omega"] == 4.0 and r["sweep"]["edge"] == "upper"
    assert r["sweep"]["grid"]["4.0"]["fid"] == pytest.approx(4 / 3)
    with pytest.raises(ValueError, match=r"\[0\]"):
        tag_comparison(RunCache(tmp_path), {}, run, omegas=(1.0,), seeds=(0,), sweep_seed=100, sweep_seeds=(0,), n=2,
                       sweep_n=2)


def test_sample_metrics_is_analogue_and_accuracy(setup):
    real = setup.held_x[:200]
    m = sample_metrics(setup, real, target=setup.held_y[:200])
    assert m["accuracy"] > 0.9 and 0.9 < m["confidence"] <= 1.0
    assert 7.0 < m["is"] <= 10.0 + 1e-6  # IS analogue is bounded by the number of classes; real data is near it
    one_class = setup.held_x[setup.held_y == 3][:30]
    assert sample_metrics(setup, one_class)["is"] < 1.5  # a single class has IS ≈ 1


def test_sample_metrics_fid_from_the_cached_reference_is_the_direct_fid(setup):
    from tagdiff.metrics.images import fid

    x = torch.randn(200, *setup.held_x.shape[1:], generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    y = torch.arange(200) % 10
    clf = setup.models["clf_eval"]
    first, again = sample_metrics(setup, x)["fid"], sample_metrics(setup, x)["fid"]
    assert first == again == fid(setup.held_x, x, clf)
    per = sample_metrics(setup, x, target=y)["per_target"]
    assert [per[str(k)]["fid"] for k in range(10)] == [fid(setup.held_x[setup.held_y == k], x[y == k], clf)
                                                      for k in range(10)]


def test_corrupted_omega_zero_run_is_the_plain_corrupted_sampler(setup, tmp_path):
    cfg = CorruptedConfig(corruption_stds=(0.0, 0.3), omegas=(2.0,), num_samples=8, sweep_samples=8, num_steps=3,
                          seeds=(0, 1), device="cpu")
    res = run_corrupted(tmp_path, cfg, progress=False)
    for name in ("results.json", "table.md", "corrupted.png"):
        assert (tmp_path / name).exists()
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert set(on_disk["corruption_std"]) == {"0.0", "0.3"} and "sigma" not in on_disk
    assert on_disk["paper"]["fid"]["0.2"] == [351.318, 230.899] and on_disk["config"]["corruption_stds"] == [0.0, 0.3]
    ref = draw(setup, [Corruption(0.3)], n=8, seed=1, num_steps=3)
    fid = sample_metrics(setup, ref["x0"])["fid"]
    assert res["corruption_std"]["0.3"]["runs"]["without"][1]["fid"] == pytest.approx(fid)
    tag = [Corruption(0.3), TemporalAlignment(setup.models["time_predictor"], 2.0, placement="post")]
    ref = draw(setup, tag, n=8, seed=100, num_steps=3)
    assert res["corruption_std"]["0.3"]["sweep"]["grid"]["2.0"]["time_gap"] == pytest.approx(ref["time_gap"])
    assert "| 0.3 |" in (tmp_path / "table.md").read_text()


def test_fewstep_and_strength_write_tables(tmp_path):
    res = run_fewstep(tmp_path / "fs", FewStepConfig(samplers=("ddpm",), steps=(1, 2), omegas=(1.0,), device="cpu",
                                                     num_samples=8, sweep_samples=8, seeds=(0,)), progress=False)
    assert set(res["runs"]) == {"ddpm/1", "ddpm/2"}
    assert res["runs"]["ddpm/1"]["sweep"]["grid"].keys() == {"0.0", "pre:1.0", "post:1.0"}
    # one step: Alg. 2 has nothing to target after the final step, so "post" is exactly the uncorrected sampler
    grid = res["runs"]["ddpm/1"]["sweep"]["grid"]
    assert grid["post:1.0"]["fid"] == grid["0.0"]["fid"]
    res = run_strength(tmp_path / "st", StrengthConfig(strengths=(1.0, 5.0), omegas=(1.0,), targets=(0, 1),
                                                       num_per_target=4, sweep_per_target=2, num_steps=3, seeds=(0,)),
                       progress=False)
    assert set(res["strength"]) == {"1.0", "5.0"} and (tmp_path / "st" / "strength.png").exists()
    assert "DPS scale" in (tmp_path / "st" / "table.md").read_text()


def test_every_label_method_builds_its_terms(setup):
    cfg = LabelConfig()
    target = torch.tensor([0, 1])
    kinds = {m: [type(t) for t in method_terms(m, setup.models, target, cfg)] for m in ALL_METHODS}
    assert kinds["tfg+tag"] == [TFGGuidance, TemporalAlignment]
    assert kinds["dps+tcs"][1] is TimeCorrection and kinds["dps+es"][1] is EpsilonScaling
    assert kinds["dps+langevin"][1] is LangevinCorrector and kinds["dps+timeshift"][1] is TimeShift
    assert method_terms("tfg", setup.models, target, cfg)[0].num_recur == cfg.tfg_recur


def test_label_over_seeds_aggregates_and_resumes(tmp_path):
    cfg = LabelConfig(targets=(0, 1), num_per_target=2, num_steps=2, device="cpu")
    res = run_label_seeds(tmp_path, cfg, (0, 1), methods=("unguided", "dps", "dps+tag"), progress=False)
    per_seed = [json.loads((tmp_path / f"seed_{s}" / "results.json").read_text()) for s in (0, 1)]
    assert res["methods"]["dps"]["fid"]["values"] == [r["methods"]["dps"]["fid"] for r in per_seed]
    runs = sorted((tmp_path / "seed_0" / "runs").glob("*.json"))
    assert len(runs) == 3
    stamps = [p.stat().st_mtime_ns for p in runs]
    again = run_label_seeds(tmp_path, cfg, (0, 1), methods=("unguided", "dps", "dps+tag"), progress=False)
    assert [p.stat().st_mtime_ns for p in runs] == stamps  # resumed from the run cache, not recomputed
    assert again["methods"] == res["methods"]
    other = run_label_seeds(tmp_path, replace(cfg, dps_guidance_scale=1.0), (0,), methods=("dps",), progress=False)
    assert other["methods"]["dps"]["fid"]["values"] != res["methods"]["dps"]["fid"]["values"][:1]  # new settings


def test_cli_experiments_run_and_reject_bad_values(tmp_path, capsys):
    assert main(["bench", "fewstep", "--out", str(tmp_path), "--samplers", "ddim", "--steps", "1", "--omegas", "1",
                 "--num-samples", "4", "--sweep-samples", "4", "--seeds", "0", "--quiet"]) == 0
    assert "| ddim | 1 |" in capsys.readouterr().out
    assert main(["bench", "corrupted", "--out", str(tmp_path / "c"), "--corruption-stds", "-0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "-0.1" in err[0] and "corruption_stds" in err[0]
    assert main(["bench", "fewstep", "--out", str(tmp_path / "f"), "--samplers", "euler"]) == 2
    assert "euler" in capsys.readouterr().err
    assert main(["bench", "strength", "--out", str(tmp_path / "s"), "--seeds", "0,100"]) == 2
    assert "validation seed(s) [100]" in capsys.readouterr().err


def _intra_package_imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """Modules of ``modules`` that ``module`` (file ``path``) imports anywhere (top level or inside functions),
    except under ``if TYPE_CHECKING:`` (annotations only, never executed)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for child in node.body for n in ast.walk(child)}
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            out |= {m for m in (name, *(f"{name}.{a.name}" for a in node.names)) if m in modules}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
    return out


def test_bench_modules_have_no_import_cycle():
    """No chain of imports (lazy ones included) leads from a ``tagdiff.bench`` module or ``tagdiff.assets`` back to
    itself; the library never imports the bench package."""
    import tagdiff

    root = Path(tagdiff.__file__).parent
    files = {".".join(("tagdiff", *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__"): p
             for p in root.rglob("*.py")}
    graph = {m: _intra_package_imports(p, m, set(files)) for m, p in files.items()}
    for start in [m for m in graph if m.startswith("tagdiff.bench") or m == "tagdiff.assets"]:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            assert m != start, f"import cycle through {start}"
            if m not in seen:
                seen.add(m)
                todo += graph[m]
    library = [m for m in graph if not m.startswith(("tagdiff.bench", "tagdiff.cli"))]
    assert not [m for m in library if any(d.startswith("tagdiff.bench") for d in graph[m])]


def test_image_grid_separates_tiles():
    x = -torch.ones(6, 1, 4, 4)  # black tiles
    g = image_grid(x, 2, 3, pad=1)
    assert g.shape == (2 * 6, 3 * 6)
    assert (g[0, :] == 1).all() and (g[:, 5] == 1).all() and (g[1:5, 1:5] == 0).all()  # white borders, black tiles
    assert image_grid(x, 2, 3).shape == (8, 12) and (image_grid(x, 2, 3) == 0).all()  # pad=0: tiles touch


def test_toy_axis_label_follows_the_grid():
    from tagdiff_bench.toy import time_gap_axis_label

    from tagdiff.sampling.schedules import VPSchedule

    schedule = VPSchedule.linear(1000)
    assert time_gap_axis_label(schedule.timesteps(100)) == "reverse step i (t from 999 down to 9)"
    assert time_gap_axis_label(schedule.timesteps(10)) == "reverse step i (t from 999 down to 99)"


@pytest.mark.parametrize("argv", [["corrupted", "--sigmas", "0.1"], ["multicond", "--etas", "0,1"],
                                  ["strength", "--base-scale", "16"]])
def test_old_flag_names_are_rejected(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", argv[0], "--out", str(tmp_path), *argv[1:]])
    assert e.value.code == 2 and argv[1] in capsys.readouterr().err


def test_renamed_fields_and_device_flag(tmp_path, capsys, monkeypatch):
    assert {"corruption_stds", "device"} <= set(dataclasses.asdict(CorruptedConfig()))
    assert "sigmas" not in dataclasses.asdict(CorruptedConfig()) and StrengthConfig().dps_guidance_scale == 16.0
    assert MultiCondConfig().reparam_scales == (0.0, 1.0, 2.0, 4.0) and not hasattr(MultiCondConfig(), "etas")
    assert ExperimentConfig().device == "auto" and LabelConfig().device == "auto"
    assert main(["bench", "corrupted", "--out", str(tmp_path / "ok"), "--corruption-stds", "0.2", "--omegas", "1",
                 "--num-samples", "4", "--sweep-samples", "4", "--num-steps", "2", "--seeds", "0", "--device", "cpu",
                 "--quiet"]) == 0
    res = json.loads((tmp_path / "ok" / "results.json").read_text())
    assert list(res["corruption_std"]) == ["0.2"] and res["config"]["device"] == "cpu"
    capsys.readouterr()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for what in ("fewstep", "label"):
        assert main(["bench", what, "--out", str(tmp_path / what), "--device", "cuda", "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("tagdiff: error:") and "'cuda'" in err[0]
    assert main(["bench", "fewstep", "--out", str(tmp_path / "x"), "--device", "tpu", "--quiet"]) == 2
    assert "'tpu'" in capsys.readouterr().err
@pytest.mark.parametrize("what, old, new, field, value", [
    ("strength", "--checkpoints", "--models-dir", "models_dir", "DIR"),
    ("strength", "--dps-scale", "--dps-guidance-scale", "dps_guidance_scale", 2.0),
    ("solvers", "--cg-scale", "--cg-guidance-scale", "cg_guidance_scale", 2.0),
    ("cfg", "--steps", "--num-steps", "num_steps", 3),
    ("label", "--dps-scale", "--dps-guidance-scale", "dps_guidance_scale", 2.0),
    ("label", "--checkpoints", "--models-dir", "models_dir", Path("DIR"))])
def test_former_flag_names_are_hidden_aliases(what, old, new, field, value):
    """A renamed option's former flag still sets the new field, and only the new flag is listed in --help."""
    import argparse

    from tagdiff_bench.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    argv = ["bench", what, "--out", "o"]
    assert getattr(parser.parse_args([*argv, old, str(value)]), field) == value
    assert getattr(parser.parse_args([*argv, new, str(value)]), field) == value
    assert getattr(parser.parse_args(argv), field) != value
    sub = parser._subparsers._group_actions[0].choices["bench"]._subparsers._group_actions[0].choices[what]
    assert new in sub.format_help() and f"{old} " not in sub.format_help() and f"{old}\n" not in sub.format_help()


def test_paired_ci_gives_the_student_t_interval_of_the_paired_differences():
    from scipy import stats
    from tagdiff_bench.common import fmt_ci, paired_ci

    before, after = [10.0, 12.0, 11.0, 9.0, 13.0], [8.0, 11.5, 9.0, 8.5, 10.0]
    d = [b - a for a, b in zip(before, after)]
    ci = paired_ci(before, after)
    m = sum(d) / 5
    half = stats.t.ppf(0.975, 4) * stats.tstd(d) / 5**0.5
    assert ci["diff"] == pytest.approx(m)
    assert ci["t_lo"] == pytest.approx(m - half) and ci["t_hi"] == pytest.approx(m + half)
    assert ci["rel"] == pytest.approx(m / 11.0) and not ci["inside_noise"] and "noise" not in fmt_ci(ci)
    assert paired_ci([1.0, 2.0], [2.0, 1.0])["inside_noise"] and "(noise)" in fmt_ci(paired_ci([1.0, 2.0], [2.0, 1.0]))
    assert fmt_ci(paired_ci([2.0], [1.0])) == "-50.0%" and paired_ci([2.0], [1.0])["inside_noise"]
    t_text = fmt_ci(ci, "t")
    assert t_text == f"{100 * m / 11:+.1f}% [{100 * (m - half) / 11:+.1f}, {100 * (m + half) / 11:+.1f}]"
    assert fmt_ci(ci) == f"{100 * m / 11:+.1f}% [{100 * ci['lo'] / 11:+.1f}, {100 * ci['hi'] / 11:+.1f}]"
    with pytest.raises(ValueError, match="interval"):
        fmt_ci(ci, "percentile")


def test_paired_bootstrap_interval_matches_its_exact_distribution():
    from tagdiff_bench.common import paired_ci

    # Two seeds: a resampled mean is d1 (prob 1/4), (d1 + d2)/2 (1/2) or d2 (1/4), so its 2.5 % and 97.5 %
    # quantiles are d1 and d2 exactly.
    ci = paired_ci([10.0, 10.0], [9.0, 7.0])
    assert (ci["lo"], ci["hi"]) == (-3.0, -1.0) and ci["diff"] == -2.0
    # Three seeds d = -1 + 3u (u in {-1, 0, 1}): the resampled mean is -1 + (u1 + u2 + u3), whose extremes -4 and 2
    # each have probability 1/27 = 3.7 % > 2.5 %, so they are the interval's ends exactly (the t interval is wider).
    d = [-4.0, -1.0, 2.0]
    ci3 = paired_ci([1.0] * 3, [1.0 + x for x in d], num_resamples=20_000)
    assert (ci3["lo"], ci3["hi"]) == (-4.0, 2.0) and ci3["t_lo"] < -4.0 and ci3["t_hi"] > 2.0 and ci3["inside_noise"]
    # Seeded: the same inputs give the same bits; another seed moves the ends at most by one atom.
    assert paired_ci([1.0] * 3, [1.0 + x for x in d], num_resamples=20_000) == ci3
    # A constant difference has a zero-width bootstrap interval at it, and the t interval then too.
    c = paired_ci([5.0, 6.0, 7.0], [4.0, 5.0, 6.0])
    assert c["lo"] == c["hi"] == -1.0 and c["t_lo"] == pytest.approx(-1.0) and not c["inside_noise"]
    # Large n from a normal: the bootstrap and t intervals agree to a few percent of their width.
    g = torch.Generator().manual_seed(0)
    before = torch.randn(400, generator=g).tolist()
    after = [b + 0.3 + 0.5 * e for b, e in zip(before, torch.randn(400, generator=g).tolist())]
    big = paired_ci(before, after)
    width = big["t_hi"] - big["t_lo"]
    assert abs(big["lo"] - big["t_lo"]) < 0.05 * width and abs(big["hi"] - big["t_hi"]) < 0.05 * width
    with pytest.raises(ValueError, match="level"):
        paired_ci([1.0, 2.0], [1.0, 2.0], level=95)


def test_bench_solvers_runs_tag_through_diffusers_schedulers(tmp_path):
    """A tiny run of ``bench solvers``: every (guidance, solver, steps) cell has its ω sweep, and the ω = 0 runs of
    DDIM (η = 0) and Euler coincide closely (Euler's σ-space step is the DDIM ODE step)."""
    from tagdiff_bench.solvers import SolversConfig, run_solvers, solver_scheduler

    cfg = SolversConfig(solvers=("ddim", "euler"), steps=(3,), guidances=("cg",), omegas=(1.0,), targets=(0, 1),
                        num_per_target=3, sweep_per_target=2, seeds=(0,), device="cpu")
    res = run_solvers(tmp_path, cfg, progress=False)
    assert set(res["runs"]) == {"cg/ddim/3", "cg/euler/3"}
    a, b = (res["runs"][f"cg/{s}/3"]["without"]["fid"]["mean"] for s in ("ddim", "euler"))
    assert abs(a - b) <= 0.05 * max(a, b) + 0.05, (a, b)
    assert "| cg | ddim | 3 |" in (tmp_path / "table.md").read_text()
    with pytest.raises(ValueError, match="unknown solver 'heun'"):
        solver_scheduler("heun", {}, 3)
