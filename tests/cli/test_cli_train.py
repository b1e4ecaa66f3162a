"""``tagdiff train`` (tagdiff.cli_train): mnist / folder / hf stream through the DataLoader path, an HF image folder
trains exactly as the folder loader does, the training options reach the config, bad input is one line (exit 2)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from image_helpers import write_class_folders
from tagdiff.cli.main import main

pytest.importorskip("datasets")

TP = ["train", "time-predictor", "--num-train-timesteps", "50", "--batch-size", "8", "--steps", "3", "--quiet",
      "--device", "cpu"]


@pytest.fixture
def pngs(tmp_path):
    return write_class_folders(tmp_path / "pngs", ("a", "b"), range(6), (8, 8), seed=3)


def _weights(out):
    return load_file(out / "model.safetensors")


def test_hf_imagefolder_trains_like_the_folder_dataset(pngs, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    opts = [*TP, "--data-dir", str(pngs), "--hflip", "--condition", "class", "--grad-accum", "2"]
    assert main([*opts, "--dataset", "folder", "--out", str(tmp_path / "f")]) == 0
    assert main([*opts, "--dataset", "hf", "--num-workers", "2", "--out", str(tmp_path / "h")]) == 0
    a, b = _weights(tmp_path / "f"), _weights(tmp_path / "h")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((tmp_path / "h/config.json").read_text())
    assert cfg["train"]["hflip"] and cfg["train"]["grad_accum"] == 2 and cfg["dataset"] == "hf"
    history = [json.loads((tmp_path / f"{k}/history.json").read_text()) for k in "fh"]
    assert history[0] == history[1]


def test_train_commands_hand_train_a_dataset(pngs, tmp_path, monkeypatch):
    """mnist / folder / hf reach train() as a lazy Dataset (labels inside the items), digits as a tensor."""
    import struct

    import tagdiff.training.loop as training
    from tagdiff.data.streaming import MNISTDataset, WithLabels

    def _idx(arr):
        return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()

    seen = {}

    def fake_train(model, loss, data, schedule, config, out, **kw):
        seen.update(data=data, config=config, labels=kw.get("labels"), workers=kw.get("num_workers"))
        raise ValueError("stop here")

    monkeypatch.setattr(training, "train", fake_train)
    mn = tmp_path / "mnist"
    mn.mkdir()
    rng = np.random.default_rng(0)
    for name, arr in (("train-images-idx3-ubyte", rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)),
                      ("train-labels-idx1-ubyte", rng.integers(0, 10, 6, dtype=np.uint8))):
        (mn / name).write_bytes(_idx(arr))
    from tagdiff.data import mnist

    monkeypatch.setattr(mnist, "MNIST_MD5", {k: None for k in mnist.MNIST_MD5})
    monkeypatch.setattr(mnist, "read_idx", lambda p, md5=None: mnist._parse_idx(p.read_bytes(), str(p)))
    assert main([*TP, "--dataset", "mnist", "--data-dir", str(mn), "--out", str(tmp_path / "m"),
                 "--num-workers", "3", "--mixed-precision", "bf16", "--lr-scheduler", "cosine",
                 "--lr-warmup-steps", "1"]) == 2
    assert isinstance(seen["data"], MNISTDataset) and seen["workers"] == 3 and seen["labels"] is None
    c = seen["config"]
    assert (c.mixed_precision, c.lr_scheduler, c.lr_warmup_steps, c.bf16) == ("bf16", "cosine", 1, True)
    assert main([*TP, "--dataset", "folder", "--data-dir", str(pngs), "--condition", "class",
                 "--out", str(tmp_path / "c")]) == 2
    assert isinstance(seen["data"], WithLabels) and seen["data"][7][1] == int(seen["data"].labels[7])
    assert main([*TP, "--dataset", "digits", "--out", str(tmp_path / "d")]) == 2
    assert isinstance(seen["data"], torch.Tensor)


@pytest.mark.parametrize("extra,message", [
    (["--dataset", "hf", "--image-column", "pixels"], "no column 'pixels' (--image-column); columns: image, label"),
    (["--dataset", "hf", "--image-column", "label"], "column 'label' of"),
    (["--dataset", "hf", "--label-column", "y"], "no column 'y' (--label-column)"),
    (["--dataset", "folder", "--mixed-precision", "fp16"], "fp16 needs a CUDA device, but this run is on cpu"),
    (["--dataset", "folder", "--lr-warmup-steps", "3"], "the constant schedule has none"),
    (["--dataset", "folder", "--ema-warmup"], "--ema-warmup needs an EMA"),
    (["--dataset", "folder", "--grad-accum", "9"], "batch size 8 cannot be cut into 9 micro-batch"),
    (["--dataset", "folder", "--bf16", "--mixed-precision", "fp16"], "contradicts"),
])
def test_bad_training_input_is_one_line(pngs, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    assert main([*TP, "--data-dir", str(pngs), "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_missing_datasets_package_is_one_line(pngs, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)
    assert main([*TP, "--dataset", "hf", "--data-dir", str(pngs), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install datasets" in err[0], err


def test_bad_option_values_are_refused_at_parse_time(capsys, tmp_path):
    for extra in (["--grad-accum", "0"], ["--lr-scheduler", "step"], ["--num-workers", "-1"],
                  ["--mixed-precision", "fp8"], ["--lr-warmup-steps", "x"]):
        with pytest.raises(SystemExit) as e:
            main([*TP, "--out", str(tmp_path / "o"), *extra])
        assert e.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("dataset", ["folder", "hf"])
def test_held_out_report_sample_equals_the_whole_split_loader(pngs, tmp_path, monkeypatch, dataset):
    import argparse

    from tagdiff.cli.data import held_out_sample, load_data

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    args = argparse.Namespace(dataset=dataset, data_dir=pngs, image_size=6, channels=3, download=False,
                              image_column=None, label_column=None)
    for n in (1, 500):  # a seeded subset of the 2 held-out images, and all of them
        x = held_out_sample(args, "held_out", 12345, n)
        assert torch.equal(x, load_data(args, "held_out", seed=12345, num_samples=n)[0])
