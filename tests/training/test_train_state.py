"""Training options (tagdiff.train_state + train()): LR schedules are diffusers' get_scheduler, EMA warm-up is
EMAModel's decay, gradient accumulation gives the whole batch's update, flips are seeded, resume stays exact."""

import pytest
import torch

from tagdiff import MLPTimePredictor, SimpleCNNTimePredictor, VPSchedule
from tagdiff.models.checkpoints import CheckpointError, load_model, load_tensors, save_tensors
from tagdiff.training.loop import TrainConfig, _batch_indices, time_loss, train
from tagdiff.training.state import LR_SCHEDULERS, Precision, ema_decay_at

SCHED = VPSchedule.linear(50, beta_start=2e-3, beta_end=0.4)
DATA = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
IMGS = torch.rand(40, 1, 6, 6, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _cfg(**kw):
    return TrainConfig(**{"steps": 8, "batch_size": 24, "lr": 1e-2, "save_every": 3, "seed": 2, **kw})


def _mlp():
    torch.manual_seed(0)
    return MLPTimePredictor(2, 50, hidden=16, num_layers=3)


def _params(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _record_lrs(monkeypatch):
    seen = []
    step = Precision.step

    def spy(self, opt):
        seen.append(opt.param_groups[0]["lr"])
        step(self, opt)

    monkeypatch.setattr(Precision, "step", spy)
    return seen


@pytest.mark.parametrize("name", ["cosine", "linear", "constant_with_warmup", "polynomial", "constant"])
def test_lr_per_update_equals_diffusers_get_scheduler(tmp_path, monkeypatch, name):
    from diffusers.optimization import get_scheduler

    warm = 0 if name == "constant" else 3
    seen = _record_lrs(monkeypatch)
    train(_mlp(), time_loss, DATA, SCHED, _cfg(lr_scheduler=name, lr_warmup_steps=warm), tmp_path / "a",
          progress=False)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    ref = get_scheduler(name, opt, num_warmup_steps=warm, num_training_steps=8)
    expected = []
    for _ in range(8):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert seen == expected
    assert name == "constant" or len(set(seen)) > 2  # the schedule moved


def test_scheduler_names_match_the_cli():
    from tagdiff.cli.args import LR_SCHEDULER_NAMES

    assert LR_SCHEDULER_NAMES == LR_SCHEDULERS


def test_ema_warmup_decay_equals_diffusers_emamodel():
    from diffusers.training_utils import EMAModel

    for power, inv_gamma in ((2 / 3, 1.0), (0.75, 3.0)):
        ema = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=0.995, use_ema_warmup=True, inv_gamma=inv_gamma,
                       power=power)
        for k in (1, 2, 3, 10, 100, 5000):
            assert ema_decay_at(k, 0.995, True, inv_gamma, power) == ema.get_decay(k), (k, power)
    assert ema_decay_at(7, 0.9, False) == 0.9


def test_ema_warmup_first_update_copies_the_weights(tmp_path):
    """Decay 0 at the first update: the exported EMA equals the trained weights after one step (not so without)."""
    for warm in (True, False):
        out = tmp_path / str(warm)
        train(_mlp(), time_loss, DATA, SCHED, _cfg(steps=1, ema_decay=0.99, ema_warmup=warm), out, progress=False)
        tensors, _ = load_tensors(out / "train_state.safetensors")
        weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        assert _equal(_params(load_model(out)), weights) == warm


def _resume_pair(tmp_path, data, steps_cut=4, **kw):
    cfg = dict(steps=8, lr_decay_steps=8, **kw)
    full = _mlp() if data.ndim == 2 else _cnn()
    train(full, time_loss, data, SCHED, _cfg(**cfg), tmp_path / "full", progress=False)
    train(_mlp() if data.ndim == 2 else _cnn(), time_loss, data, SCHED, _cfg(**{**cfg, "steps": steps_cut}),
          tmp_path / "res", progress=False)
    torch.manual_seed(9)
    fresh = MLPTimePredictor(2, 50, hidden=16, num_layers=3) if data.ndim == 2 else _cnn(9)
    train(fresh, time_loss, data, SCHED, _cfg(**cfg), tmp_path / "res", progress=False)
    a, b = (load_tensors(tmp_path / f"{k}/train_state.safetensors") for k in ("full", "res"))
    assert _equal(a[0], b[0])  # weights, EMA and Adam moments
    assert a[1]["lr_scheduler"] == b[1]["lr_scheduler"] and a[1]["history"] == b[1]["history"]
    assert _equal(_params(full), _params(fresh))  # the exported (EMA) weights


def _cnn(seed=0):
    torch.manual_seed(seed)
    return SimpleCNNTimePredictor(1, 6, 50, widths=(4, 8))


def test_resume_with_grad_accum_cosine_warmup_and_ema_warmup_is_exact(tmp_path):
    _resume_pair(tmp_path, DATA, grad_accum=3, lr_scheduler="cosine", lr_warmup_steps=3, ema_decay=0.99,
                 ema_warmup=True)


def test_resume_with_hflip_and_grad_accum_on_images_is_exact(tmp_path):
    _resume_pair(tmp_path, IMGS, steps_cut=5, grad_accum=2, hflip=True, lr_scheduler="linear", lr_warmup_steps=2,
                 ema_decay=0.9, ema_warmup=True)


def test_cosine_run_cannot_grow_its_steps_without_lr_decay_steps(tmp_path):
    train(_mlp(), time_loss, DATA, SCHED, _cfg(steps=4, lr_scheduler="cosine"), tmp_path, progress=False)
    with pytest.raises(CheckpointError, match=r"steps 4 -> 8.*--lr-decay-steps"):
        train(_mlp(), time_loss, DATA, SCHED, _cfg(steps=8, lr_scheduler="cosine"), tmp_path, progress=False)
    with pytest.raises(CheckpointError, match=r"grad_accum 1 -> 2"):
        train(_mlp(), time_loss, DATA, SCHED, _cfg(steps=4, lr_scheduler="cosine", grad_accum=2), tmp_path,
              progress=False)


def test_a_state_written_before_these_options_resumes(tmp_path):
    """A state whose train_config lacks the new fields (and has no scheduler state) resumes exactly."""
    full = _mlp()
    train(full, time_loss, DATA, SCHED, _cfg(), tmp_path / "full", progress=False)
    train(_mlp(), time_loss, DATA, SCHED, _cfg(steps=4), tmp_path / "res", progress=False)
    path = tmp_path / "res/train_state.safetensors"
    tensors, meta = load_tensors(path)
    old = ("mixed_precision", "grad_accum", "lr_scheduler", "lr_warmup_steps", "lr_decay_steps", "ema_warmup",
           "ema_inv_gamma", "ema_power", "hflip")
    meta["train_config"] = {k: v for k, v in meta["train_config"].items() if k not in old}
    meta.pop("lr_scheduler")
    meta["param_groups"] = [{k: v for k, v in g.items() if k != "initial_lr"} for g in meta["param_groups"]]
    save_tensors(path, tensors, meta)
    fresh = _mlp()
    train(fresh, time_loss, DATA, SCHED, _cfg(), tmp_path / "res", progress=False)
    assert _equal(_params(full), _params(fresh))


def test_grad_accum_gives_the_whole_batch_update(tmp_path):
    """Micro-batch losses weighted by their share: the summed gradient is the batch's, so the weights match the
    unaccumulated run to float rounding (and differ clearly from a run on a quarter of the batch)."""
    runs = {}
    for name, kw in (("one", {}), ("accum4", {"grad_accum": 4}), ("accum5", {"grad_accum": 5}),
                     ("small", {"batch_size": 6})):
        m = _mlp()
        r = train(m, time_loss, DATA, SCHED, _cfg(grad_clip=None, **kw), tmp_path / name, progress=False)
        runs[name] = (_params(m), r["history"])
    one = runs["one"][0]
    for name in ("accum4", "accum5"):  # 24 = 4 x 6, and 5 unequal parts (5, 5, 5, 5, 4)
        assert all(torch.allclose(one[k], runs[name][0][k], rtol=0, atol=2e-6) for k in one), name
        assert [h[1] for h in runs[name][1]] == pytest.approx([h[1] for h in runs["one"][1]], abs=1e-5)
    assert max((one[k] - runs["small"][0][k]).abs().max() for k in one) > 1e-3


def test_hflip_flips_the_seeded_images_and_ignores_workers(tmp_path):
    seen = []

    def spy(model, x0, t, noise, schedule, c=None):
        seen.append(x0.clone())
        return time_loss(model, x0, t, noise, schedule, c)

    cfg = _cfg(steps=3, batch_size=8, hflip=True, grad_accum=2)
    train(_cnn(), spy, IMGS, SCHED, cfg, tmp_path / "t", progress=False)
    for step in range(3):
        g, idx = _batch_indices(cfg, IMGS.shape[0], step)
        torch.randint(0, 50, (8,), generator=g)
        torch.randn((8, 1, 6, 6), generator=g)
        flip = torch.rand(8, generator=g) < 0.5
        expected = torch.where(flip.view(-1, 1, 1, 1), IMGS[idx].flip(-1), IMGS[idx])
        assert torch.equal(torch.cat(seen[2 * step:2 * step + 2]), expected)
    assert 0 < int(flip.sum()) < 8
    # a Dataset with and without workers, and the tensor: the same weights bit for bit
    ds = torch.utils.data.TensorDataset(IMGS)

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            return ds[i][0]

    ref = _cnn()
    train(ref, time_loss, IMGS, SCHED, cfg, tmp_path / "a", progress=False)
    for w in (0, 2):
        m = _cnn()
        train(m, time_loss, Items(), SCHED, cfg, tmp_path / f"w{w}", progress=False, num_workers=w)
        assert _equal(_params(ref), _params(m))
    unflipped = _cnn()
    train(unflipped, time_loss, IMGS, SCHED, _cfg(steps=3, batch_size=8, grad_accum=2), tmp_path / "u",
          progress=False)
    assert not _equal(_params(ref), _params(unflipped))


def test_precision_options(tmp_path):
    assert TrainConfig(bf16=True).mixed_precision == "bf16" and TrainConfig(mixed_precision="bf16").bf16
    with pytest.raises(ValueError, match="needs a CUDA device, but this run is on cpu"):
        train(_mlp(), time_loss, DATA, SCHED, _cfg(mixed_precision="fp16"), tmp_path / "f", progress=False)
    a, b = _mlp(), _mlp()
    train(a, time_loss, DATA, SCHED, _cfg(steps=3, bf16=True), tmp_path / "a", progress=False)
    train(b, time_loss, DATA, SCHED, _cfg(steps=3, mixed_precision="bf16"), tmp_path / "b", progress=False)
    assert _equal(_params(a), _params(b))
    c = _mlp()
    train(c, time_loss, DATA, SCHED, _cfg(steps=3), tmp_path / "c", progress=False)
    assert not _equal(_params(a), _params(c))  # bf16 autocast did round


@pytest.mark.parametrize("kw,match", [
    ({"grad_accum": 0}, "grad_accum must be a positive integer"),
    ({"mixed_precision": "fp8"}, "mixed_precision must be one of no, bf16, fp16"),
    ({"bf16": True, "mixed_precision": "fp16"}, "contradicts"),
    ({"lr_scheduler": "cosine_annealing"}, "unknown lr_scheduler 'cosine_annealing'"),
    ({"lr_warmup_steps": 5}, "the constant schedule has none"),
    ({"lr_warmup_steps": -1, "lr_scheduler": "cosine"}, "lr_warmup_steps must be an integer >= 0"),
    ({"ema_power": 0.0}, "ema_power must be a positive number"),
])
def test_config_refusals(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_train_refusals(tmp_path):
    with pytest.raises(ValueError, match="batch size 4 cannot be cut into 5 micro-batch"):
        train(_mlp(), time_loss, DATA, SCHED, _cfg(batch_size=4, grad_accum=5), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match=r"hflip \(--hflip\) flips images"):
        train(_mlp(), time_loss, DATA, SCHED, _cfg(hflip=True), tmp_path / "b", progress=False)


def test_accumulated_gradient_equals_the_batch_gradient(tmp_path, monkeypatch):
    grads = []
    clip = Precision.clip

    def spy(self, opt, params, max_norm):
        params = list(params)
        grads.append(torch.cat([p.grad.flatten() for p in params]))
        clip(self, opt, params, max_norm)

    monkeypatch.setattr(Precision, "clip", spy)
    for accum in (1, 4):
        train(_mlp(), time_loss, DATA, SCHED, _cfg(steps=1, grad_accum=accum), tmp_path / str(accum), progress=False)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7) and grads[0].abs().max() > 1e-2


def test_fp16_grad_scaler_state_resumes_exactly(tmp_path, monkeypatch):
    """The fp16 path (autocast + GradScaler) run on the CPU with the CUDA-only check lifted: the scaler's state is
    saved and restored, so the resumed run equals the uninterrupted one bit for bit."""
    import tagdiff.training.loop as tr
    import tagdiff.training.state as ts

    monkeypatch.setattr(ts, "check_precision", lambda mode, device: None)
    monkeypatch.setattr(tr, "check_precision", lambda mode, device: None)
    cfg = dict(mixed_precision="fp16", lr_decay_steps=6, batch_size=16)
    full = _mlp()
    train(full, time_loss, DATA, SCHED, _cfg(steps=6, **cfg), tmp_path / "a", progress=False)
    train(_mlp(), time_loss, DATA, SCHED, _cfg(steps=4, **cfg), tmp_path / "b", progress=False)
    fresh = _mlp()
    train(fresh, time_loss, DATA, SCHED, _cfg(steps=6, **cfg), tmp_path / "b", progress=False)
    assert _equal(_params(full), _params(fresh))
    meta = load_tensors(tmp_path / "a/train_state.safetensors")[1]
    assert meta["grad_scaler"]["scale"] == 65536.0 and meta["grad_scaler"]["_growth_tracker"] == 6
