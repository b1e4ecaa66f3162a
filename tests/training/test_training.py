"""Training: the losses learn, resumed runs equal uninterrupted ones bit for bit, bad input is refused."""

import pytest
import torch

from tagdiff import GaussianMixture, MLPEpsModel, MLPTimePredictor, VPSchedule
from tagdiff.models.checkpoints import CheckpointError, load_model, read_config
from tagdiff.training.loop import TrainConfig, eps_loss, time_loss, train

SCHED = VPSchedule.linear(50, beta_start=2e-3, beta_end=0.4)
GMM = GaussianMixture([[2.0, 2.0], [-2.0, -2.0]], stds=0.5)
DATA, LABELS = GMM.sample(2000, torch.Generator().manual_seed(0))


def _cfg(**kw):
    base = dict(steps=20, batch_size=64, lr=3e-3, save_every=5, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_time_predictor_learns(tmp_path):
    tp = MLPTimePredictor(2, 50, hidden=64, num_layers=3)
    x0 = DATA[:256]
    t = torch.arange(50).repeat_interleave(6)[:256]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    before = time_loss(tp, x0, t, noise, SCHED).item()
    train(tp, time_loss, DATA, SCHED, _cfg(steps=300, batch_size=256), tmp_path, progress=False)
    after = time_loss(tp.eval(), x0, t, noise, SCHED).item()
    bayes = time_loss(GMM.time_posterior(SCHED), x0, t, noise, SCHED).item()  # exact posterior: the floor
    assert before > bayes + 0.3  # untrained is near chance, log(50) = 3.9
    assert bayes - 0.05 < after < bayes + 0.1


def test_eps_model_learns_and_exports(tmp_path):
    m = MLPEpsModel(2, 50, hidden=64, num_layers=3)
    res = train(m, eps_loss, DATA, SCHED, _cfg(steps=200, ema_decay=0.9), tmp_path, progress=False)
    assert res["final_loss"] < 0.6
    loaded = load_model(tmp_path)
    cfg = read_config(tmp_path)
    assert VPSchedule.from_dict(cfg["schedule"]) == SCHED and cfg["train"]["ema_decay"] == 0.9
    assert torch.equal(loaded.net[0].weight, m.net[0].weight)  # exported weights are the EMA now loaded in m


@pytest.mark.parametrize("ema", [None, 0.9])
def test_resume_equals_uninterrupted(tmp_path, ema):
    torch.manual_seed(0)
    ref = MLPTimePredictor(2, 50, hidden=16, num_layers=2)
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    train(ref, time_loss, DATA, SCHED, _cfg(ema_decay=ema), tmp_path / "a", progress=False)

    part = MLPTimePredictor(2, 50, hidden=16, num_layers=2)
    part.load_state_dict(init)
    train(part, time_loss, DATA, SCHED, _cfg(steps=10, ema_decay=ema), tmp_path / "b", progress=False)
    fresh = MLPTimePredictor(2, 50, hidden=16, num_layers=2)  # new process: weights come from the state file
    train(fresh, time_loss, DATA, SCHED, _cfg(ema_decay=ema), tmp_path / "b", progress=False)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k


def test_rerunning_a_finished_run_keeps_its_weights_and_reports_its_loss(tmp_path):
    first = train(MLPTimePredictor(2, 50, hidden=16, num_layers=2), time_loss, DATA, SCHED, _cfg(), tmp_path,
                  progress=False)
    weights = load_model(tmp_path).state_dict()
    again = train(MLPTimePredictor(2, 50, hidden=16, num_layers=2), time_loss, DATA, SCHED, _cfg(), tmp_path,
                  progress=False)  # nothing left to train: the recorded loss, the same exported weights
    assert again["final_loss"] == first["final_loss"] and again["history"] == first["history"]
    for k, v in load_model(tmp_path).state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_keyboard_interrupt_saves_state_and_resumes(tmp_path):
    torch.manual_seed(0)
    ref = MLPTimePredictor(2, 50, hidden=16, num_layers=2)
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    train(ref, time_loss, DATA, SCHED, _cfg(), tmp_path / "a", progress=False)

    calls = {"n": 0}

    def flaky(model, x0, t, noise, schedule, c):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return time_loss(model, x0, t, noise, schedule, c)

    m = MLPTimePredictor(2, 50, hidden=16, num_layers=2)
    m.load_state_dict(init)
    with pytest.raises(KeyboardInterrupt):
        train(m, flaky, DATA, SCHED, _cfg(), tmp_path / "b", progress=False)
    m2 = MLPTimePredictor(2, 50, hidden=16, num_layers=2)
    train(m2, time_loss, DATA, SCHED, _cfg(), tmp_path / "b", progress=False)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


def test_resume_refuses_a_different_model(tmp_path):
    train(MLPTimePredictor(2, 50, 16, 2), time_loss, DATA, SCHED, _cfg(steps=5), tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="different model"):
        train(MLPTimePredictor(2, 50, 32, 2), time_loss, DATA, SCHED, _cfg(steps=10), tmp_path, progress=False)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="T=1000"):
        train(MLPTimePredictor(2, 1000, 8, 2), time_loss, DATA, SCHED, _cfg(), tmp_path, progress=False)
    with pytest.raises(ValueError, match="labels"):
        train(MLPTimePredictor(2, 50, 8, 2), time_loss, DATA, SCHED, _cfg(), tmp_path, labels=LABELS[:5],
              progress=False)
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=-1.0)


def test_conditional_predictor_trains_with_labels(tmp_path):
    tp = MLPTimePredictor(2, 50, hidden=16, num_layers=2, num_classes=2)
    train(tp, time_loss, DATA, SCHED, _cfg(cond_drop=0.2), tmp_path, labels=LABELS, progress=False)
    out = tp(DATA[:4], LABELS[:4])
    assert out.shape == (4, 50) and torch.isfinite(out).all()
