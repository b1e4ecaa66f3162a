"""The reviewers' questions (``tagdiff bench questions``): its measuring parts checked against hand-computed or
independent values, and one end-to-end run on the shipped digits models at a tiny size."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tagdiff_bench.common import load_setup
from tagdiff_bench.experiments import experiment
from tagdiff_bench.questions import (
    EvalCounter,
    EveryKth,
    QuestionsConfig,
    arms,
    spearman_ci,
    vendi_score,
)
from tagdiff_bench.runner import run

from tagdiff.guidance import TemporalAlignment
from tagdiff.sampling.samplers import sample_ddim

pytest.importorskip("diffusers")
pytest.importorskip("prdc")


@pytest.fixture(scope="module")
def setup():
    return load_setup("digits", device="cpu")


def test_vendi_score_hand_computed():
    # two unit vectors at cosine 0.5: K/n = [[1, .5], [.5, 1]] / 2 has eigenvalues 0.75 and 0.25
    f = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]], dtype=torch.float64)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert vendi_score(f) == pytest.approx(math.exp(h), rel=1e-9)  # 1.7548
    assert vendi_score(torch.ones(5, 3)) == pytest.approx(1.0)  # identical rows: one effective sample
    assert vendi_score(torch.eye(4) * 3) == pytest.approx(4.0)  # orthogonal rows: n; the scale does not matter


def test_spearman_ci_matches_scipy_and_is_exact_for_a_monotone_relation():
    from scipy.stats import spearmanr

    x = [0.3, 1.2, 0.7, 2.5, 1.9, 0.1, 3.3]
    y = [1.0, 0.2, 2.0, 4.0, 3.1, 0.5, 2.2]
    r = spearman_ci(x, y)
    assert r["rho"] == pytest.approx(spearmanr(x, y).statistic)
    assert r["lo"] <= r["rho"] <= r["hi"] and r["n"] == 7
    mono = spearman_ci([1, 2, 3, 4, 5], [2, 4, 8, 16, 32])
    assert mono["rho"] == pytest.approx(1.0) and mono["lo"] == pytest.approx(1.0)


def _sample(setup, terms, n=4, steps=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((n, *setup.eps_model.sample_shape), generator=g)
    grid = setup.schedule.timesteps(steps, "linspace")
    return sample_ddim(setup.eps_model, x, grid, setup.schedule, eta=0.0, terms=terms, clip_x0=1.0)


def test_every_kth_acts_on_every_kth_step_and_every_1_is_tag(setup):
    tp = setup.models["time_predictor"]
    for every, expected in ((1, 4), (2, 2), (3, 2), (4, 1)):
        with EvalCounter(time_predictor=tp) as c:
            _sample(setup, [EveryKth(tp, 1.0, every)])
        assert c.per_sample(4)["time_predictor"] == {"forward": expected, "with_grad": expected, "backward": expected}
    assert torch.equal(_sample(setup, [EveryKth(tp, 1.0, 1)]), _sample(setup, [TemporalAlignment(tp, 1.0)]))


def test_eval_counter_counts_forwards_and_backwards(setup):
    from tagdiff_bench.label import method_terms
    from tagdiff_bench.questions import label_config

    target = torch.tensor([0, 3, 7, 0])
    cfg = label_config(QuestionsConfig())
    counts = {}
    for method in ("dps", "cg+tag", "mpgd"):
        with EvalCounter(eps=setup.eps_model, tp=setup.models["time_predictor"]) as c:
            _sample(setup, method_terms(method, setup.models, target, cfg), steps=3)
        counts[method] = c.per_sample(4)
    assert counts["dps"]["eps"] == {"forward": 3, "with_grad": 3, "backward": 3}  # DPS differentiates the ε-model
    assert counts["dps"]["tp"]["forward"] == 0
    assert counts["cg+tag"]["eps"]["backward"] == 0 and counts["cg+tag"]["tp"]["backward"] == 3
    assert counts["mpgd"]["eps"]["backward"] == 0  # MPGD's gradient stops at x̂_0


def test_questions_end_to_end(tmp_path):
    cfg = QuestionsConfig(targets=(3, 7), num_per_target=6, num_steps=4, seeds=(0, 1), nearest_k=2, every=(2,),
                          methods=("dps", "cg"), cost_samples=2, cost_rounds=2, device="cpu")
    exp = experiment("questions")
    res = run(exp, tmp_path, cfg, progress=False)
    names = arms(cfg)
    assert names == ["dps", "dps+tag", "dps+tag/2", "cg", "cg+tag", "cg+tag/2"]
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert set(on_disk["quality"]) == set(names) and (tmp_path / "questions.png").stat().st_size > 0
    for a in names:
        q = on_disk["quality"][a]
        assert q["fid"]["n"] == 2 and 0 <= q["recall"]["mean"] <= 1 and 1 <= q["vendi"]["mean"] <= 6
        cost = on_disk["cost"]["arms"][a]
        assert cost["seconds_per_sample"] > 0 and len(cost["rounds"]) == 2
        assert cost["evals_per_sample"]["eps_model"]["forward"] == 4
    assert on_disk["cost"]["arms"]["dps+tag"]["evals_per_sample"]["time_predictor"]["backward"] == 4
    assert on_disk["cost"]["arms"]["dps+tag/2"]["evals_per_sample"]["time_predictor"]["backward"] == 2
    for m in ("dps", "cg"):
        c = on_disk["conflict"][m]
        assert len(c["t"]) == len(c["cosine"]) == 4 and all(-1 <= v <= 1 for v in c["cosine"])
        assert c["t"] == sorted(c["t"], reverse=True) and len(c["fid_gain"]) == 2
    assert on_disk["time_gap_vs_fid"]["n"] == len(names) * 2
    eff = on_disk["tag_effect"]["dps+tag"]["fid"]
    assert eff["diff"] == pytest.approx(on_disk["quality"]["dps+tag"]["fid"]["mean"]
                                        - on_disk["quality"]["dps"]["fid"]["mean"])
    table = (tmp_path / "table.md").read_text()
    for q in ("1 cost", "2 Time Gap vs FID", "3 diversity", "4 conflict"):
        assert q in table
    again = run(exp, tmp_path, cfg, progress=False)  # every run and the timing block resume from the cache
    assert again["quality"] == res["quality"] and again["cost"] == res["cost"]


@pytest.mark.parametrize("bad", [{"methods": ("dps", "tfg")}, {"every": (1,)}, {"nearest_k": 64}, {"seeds": ()}])
def test_bad_settings_are_refused_before_loading(bad, tmp_path):
    with pytest.raises(ValueError):
        run(experiment("questions"), tmp_path, QuestionsConfig(models_dir=str(tmp_path / "none"), **bad))
