"""Data-parallel training: the batch shards partition each global batch; a 2-process run resumes bit for bit."""

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tagdiff.training.distributed import shard

needs_accelerate = pytest.mark.skipif(find_spec("accelerate") is None, reason="needs accelerate")


@pytest.mark.parametrize(("batch", "world"), [(16, 2), (17, 2), (7, 3), (64, 8), (5, 5), (1, 1)])
def test_shards_are_disjoint_and_cover_the_batch(batch, world):
    parts = [range(batch)[shard(batch, r, world)] for r in range(world)]
    flat = [i for p in parts for i in p]
    assert flat == list(range(batch))  # disjoint, in order, union = the global batch
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_shard_refuses_bad_arguments():
    for args in [(4, 2, 2), (4, -1, 2), (1, 0, 2), (4, 0, 0)]:
        with pytest.raises(ValueError):
            shard(*args)


def _env():
    src = str(Path(__file__).resolve().parents[2] / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "tagdiff.cli", *args], env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]


TRAIN = ["train", "time-predictor", "--dataset", "digits", "--widths", "8,8", "--num-train-timesteps", "100",
         "--batch-size", "16", "--quiet", "--num-processes", "2"]


def _same_run(a: Path, b: Path) -> None:
    for name in ("train_state.safetensors", "model.safetensors"):
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    assert json.loads((a / "history.json").read_text()) == json.loads((b / "history.json").read_text())


@pytest.mark.slow  # three 2-process CLI runs (about 20 s each on 2 busy cores)
@needs_accelerate
def test_cli_two_process_run_resumed_equals_uninterrupted(tmp_path):
    _cli(*TRAIN, "--steps", "8", "--out", str(tmp_path / "full"))
    _cli(*TRAIN, "--steps", "4", "--out", str(tmp_path / "res"))
    _cli(*TRAIN, "--steps", "8", "--out", str(tmp_path / "res"))
    _same_run(tmp_path / "full", tmp_path / "res")


# Each process records the data rows it trained on; data row i holds the value i, so they are the sample indices.
_WORKER = r"""
import json, os, sys, torch
from tagdiff import MLPTimePredictor, VPSchedule
from tagdiff.training import TrainConfig, time_loss, train
seen = []
def loss(model, x0, t, noise, schedule, c=None):
    seen.append(x0[:, 0].round().long().tolist())
    return time_loss(model, x0, t, noise, schedule, c)
torch.manual_seed(0)
data = torch.arange(40.0)[:, None].repeat(1, 2)
train(MLPTimePredictor(2, 20, hidden=8, num_layers=2), loss, data, VPSchedule.linear(20), TrainConfig(
      steps=3, batch_size=10, seed=5, lr=1e-3), sys.argv[1], progress=False)
with open(f"{sys.argv[1]}/seen{os.environ['RANK']}.json", "w") as f:
    json.dump(seen, f)
"""


@needs_accelerate
def test_two_processes_take_disjoint_shards_of_the_global_batch(tmp_path):
    _launch_script(_WORKER, tmp_path)
    seen = [json.loads((tmp_path / f"seen{r}.json").read_text()) for r in range(2)]
    for step in range(3):
        g = torch.Generator().manual_seed(5 * 1_000_003 + step)
        expected = torch.randint(0, 40, (10,), generator=g).tolist()  # the single-process batch of this step
        assert len(seen[0][step]) == len(seen[1][step]) == 5
        assert seen[0][step] + seen[1][step] == expected  # positions 0-4 and 5-9: disjoint, union = the batch


_RESUME = r"""
import sys, torch
from tagdiff import MLPTimePredictor, VPSchedule
from tagdiff.training import TrainConfig, time_loss, train
data = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
for out, steps in (("full", 8), ("res", 4), ("res", 8)):
    torch.manual_seed(0)
    train(MLPTimePredictor(2, 20, hidden=16, num_layers=3), time_loss, data, VPSchedule.linear(20), TrainConfig(
          steps=steps, batch_size=15, seed=1, lr=1e-2, save_every=3, ema_decay=0.9), f"{sys.argv[1]}/{out}",
          progress=False)
"""


def _launch_script(script, tmp_path):
    from tagdiff.training.distributed import _free_port

    env = {**_env(), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]


@needs_accelerate
def test_two_process_train_resumed_equals_uninterrupted(tmp_path):
    _launch_script(_RESUME, tmp_path)  # batch 15 over 2 processes: shards of 8 and 7 (unequal, loss re-weighted)
    _same_run(tmp_path / "full", tmp_path / "res")
    # the weighted shard losses average to the batch loss: the 1-process run matches up to float rounding
    from tagdiff import MLPTimePredictor, VPSchedule
    from tagdiff.training.loop import TrainConfig, time_loss, train

    data = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    train(MLPTimePredictor(2, 20, hidden=16, num_layers=3), time_loss, data, VPSchedule.linear(20), TrainConfig(
          steps=8, batch_size=15, seed=1, lr=1e-2, save_every=3, ema_decay=0.9), tmp_path / "one", progress=False)
    one, two = load_file(tmp_path / "one/model.safetensors"), load_file(tmp_path / "full/model.safetensors")
    assert all(torch.allclose(one[k], two[k], rtol=0, atol=1e-5) for k in one)
    assert not (tmp_path / "full/.lock").exists()


def _sample(out, n, *extra, check=True):
    r = subprocess.run([sys.executable, "-m", "tagdiff.cli", "sample", "--num-samples", "7", "--num-steps", "5",
                        "--seed", "3", "--quiet", "--out", str(out), "--num-processes", str(n), *extra],
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert not check or r.returncode == 0, r.stderr[-3000:]
    return r


@needs_accelerate
def test_two_process_sampling_equals_one_process_up_to_float_rounding(tmp_path):
    """4 + 3 toy samples in two processes equal 7 in one, to float32 rounding (not bit for bit).

    A sample's arithmetic depends on its batch: the MLP's matrix products block and vectorise rows differently for a
    batch of 7 than of 4, so a row's last bits depend on the CPU (bit-identical on some, ~3e-8 apart per call on an
    AMD EPYC). Measured over 5 DDPM steps: max |diff| 5e-6 at |x| ≈ 10 (ATen default / avx2 / avx512 kernels, MKL at
    AVX2 / SSE4.2 / native, 1 and 2 threads). Allowed: 1e-4, 20× that, and 100× below the distance between any two
    seeds' samples (asserted below, so the tolerance cannot hide a shard that drew the wrong seeds)."""
    args = ("--checkpoint", "toy", "--per-sample-seeds", "--sampler", "ddpm", "--time-predictor", "toy/time_predictor")
    _sample(tmp_path / "one", 1, *args)
    _sample(tmp_path / "two", 2, *args)
    a, b = np.load(tmp_path / "one/samples.npz")["x"], np.load(tmp_path / "two/samples.npz")["x"]
    assert a.shape == b.shape == (7, 2)
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-4)
    # seeds give distinct samples (two in the same mode of the mixture can be close: measured min 0.36)
    assert np.abs(a[:, None] - a[None]).max(-1)[~np.eye(7, dtype=bool)].min() > 1e-2
    s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    # the Time Gap is a mean of argmax timesteps: a flip needs two logits within rounding; allow 1e-3 of T
    np.testing.assert_allclose(s2["time_gap_per_step"], s1["time_gap_per_step"], rtol=0, atol=1.0)
    assert s2["num_samples"] == 7


@pytest.mark.slow  # a UNet in two processes (about 12 s on 2 busy cores)
@needs_accelerate
def test_two_process_unet_sampling_matches_up_to_rounding(tmp_path):
    # convolutions round differently for batch 4 and 7: measured max |diff| 2.1e-6 (5 DDIM steps, clipped x0)
    _sample(tmp_path / "one", 1, "--checkpoint", "digits", "--per-sample-seeds")
    _sample(tmp_path / "two", 2, "--checkpoint", "digits", "--per-sample-seeds")
    a, b = np.load(tmp_path / "one/samples.npz")["x"], np.load(tmp_path / "two/samples.npz")["x"]
    assert a.shape == (7, 1, 8, 8) and np.allclose(a, b, rtol=0, atol=1e-4)


def test_sharded_sampling_needs_per_sample_seeds(tmp_path):
    r = _sample(tmp_path / "x", 2, "--checkpoint", "toy", check=False)
    assert r.returncode == 2 and "--per-sample-seeds" in r.stderr


_RESUME_OPTIONS = r"""
import sys, torch
from tagdiff import SimpleCNNTimePredictor, VPSchedule
from tagdiff.training import TrainConfig, time_loss, train
data = torch.rand(60, 1, 6, 6, generator=torch.Generator().manual_seed(0)) * 2 - 1
for out, steps in (("full", 8), ("res", 5), ("res", 8)):
    torch.manual_seed(0)
    train(SimpleCNNTimePredictor(1, 6, 20, widths=(4, 8)), time_loss, data, VPSchedule.linear(20), TrainConfig(
          steps=steps, batch_size=14, seed=1, lr=1e-2, save_every=3, ema_decay=0.9, ema_warmup=True, grad_accum=3,
          lr_scheduler="cosine", lr_warmup_steps=2, lr_decay_steps=8, hflip=True), f"{sys.argv[1]}/{out}",
          progress=False)
"""


@pytest.mark.slow  # one 2-process run of three trainings (about 30 s on 2 busy cores)
@needs_accelerate
def test_two_process_resume_with_grad_accum_cosine_ema_warmup_and_hflip(tmp_path):
    _launch_script(_RESUME_OPTIONS, tmp_path)  # 14 = micro-batches 5, 5, 4, each cut over 2 processes
    _same_run(tmp_path / "full", tmp_path / "res")
