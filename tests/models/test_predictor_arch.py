"""Paper-sized time predictors (SimpleCNN, UNet encoder), ``--arch``, and save_pretrained / from_pretrained."""

from __future__ import annotations

import json

import pytest
import torch

from tagdiff.cli.main import main
from tagdiff.cli.recipes import make_time_predictor
from tagdiff.data import DatasetInfo
from tagdiff.models.checkpoints import CheckpointError, load_model
from tagdiff.models.classifiers import CleanClassifier, NoisyClassifier
from tagdiff.models.time_predictor import (
    MLPTimePredictor,
    SimpleCNNTimePredictor,
    TimePredictor,
    UNetEncoderTimePredictor,
)
from tagdiff.sampling.schedules import VPSchedule


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------------------------------------- paper size


def test_simplecnn_is_the_papers_1_48_m_at_32x32x3_with_a_64d_class_embedding():
    """docs/notation.md §2.2 reports 1.48 M. Exact count: convs 388 416 + head (1024 + 64)·1000 + 1000 + embedding 11·64
    = 1 478 120; it must round to 1.48 M, i.e. lie within ±5 000 (half the last reported digit) of 1.48e6."""
    m = SimpleCNNTimePredictor(3, 32, 1000, num_classes=10, cond_dim=64)
    n = _n_params(m)
    assert n == 1_478_120
    assert abs(n - 1.48e6) <= 5_000 and round(n / 1e6, 2) == 1.48
    assert m.head.in_features == 2 * 2 * 256 + 64  # flatten, not global pooling


# ---------------------------------------------------------------------------------------------- UNet encoder


@pytest.mark.parametrize("size", [8, 28])
@pytest.mark.parametrize("num_classes", [None, 10])
def test_unet_encoder_shapes_and_log_prob_contract(size, num_classes):
    torch.manual_seed(0)
    m = UNetEncoderTimePredictor(1, size, 50, widths=(8, 16, 16), num_classes=num_classes, cond_dim=8).eval()
    assert isinstance(m, TimePredictor) and m.sample_shape == (1, size, size) and m.num_train_timesteps == 50
    x = torch.randn(4, 1, size, size)
    c = None if num_classes is None else torch.tensor([0, 3, -1, 9])
    logits = m(x, c)
    assert logits.shape == (4, 50) and torch.isfinite(logits).all()
    t = torch.tensor([0, 7, 30, 49])
    lp = m.log_prob(x, t, c)
    assert lp.shape == (4,)
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1)[torch.arange(4), t])
    assert m.predict_t(x, c).shape == (4,)
    with pytest.raises(ValueError, match="outside"):
        m.log_prob(x, torch.full((4,), 50), c)
    with pytest.raises(ValueError, match="expects x of shape"):
        m(torch.randn(4, 1, size + 1, size))
    # no coupling between batch entries
    torch.testing.assert_close(m(x[:1], None if c is None else c[:1]), logits[:1])


def test_unet_encoder_is_diffusers_down_and_mid_blocks_with_attention_option():
    from diffusers.models.unets.unet_2d_blocks import AttnDownBlock2D, DownBlock2D, UNetMidBlock2D

    m = UNetEncoderTimePredictor(3, 32, 1000, widths=(32, 64, 64), attention=True)
    assert [type(b) for b in m.down_blocks] == [DownBlock2D, DownBlock2D, AttnDownBlock2D]
    assert isinstance(m.mid_block, UNetMidBlock2D) and m.head.in_features == 64
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 1000)
    with pytest.raises(ValueError, match="widths"):
        UNetEncoderTimePredictor(1, 8, widths=())


# ---------------------------------------------------------------------------------------------- --arch


def test_make_time_predictor_default_is_unchanged():
    img, vec = DatasetInfo("digits", (1, 8, 8), 10), DatasetInfo("toy", (2,), 0)
    torch.manual_seed(0)
    default = make_time_predictor(img, 1000)
    torch.manual_seed(0)
    explicit = make_time_predictor(img, 1000, arch="simplecnn")
    assert type(default) is SimpleCNNTimePredictor and default.config == explicit.config
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), explicit.state_dict().values()))
    assert type(make_time_predictor(vec, 1000)) is MLPTimePredictor
    assert type(make_time_predictor(img, 1000, arch="unet-encoder")) is UNetEncoderTimePredictor
    with pytest.raises(ValueError, match="--arch mlp is for vector data"):
        make_time_predictor(img, 1000, arch="mlp")
    with pytest.raises(ValueError, match="--arch unet-encoder is for images"):
        make_time_predictor(vec, 1000, arch="unet-encoder")
    with pytest.raises(ValueError, match="unknown time predictor architecture"):
        make_time_predictor(img, 1000, arch="resnet")


def test_cli_arch_unet_encoder_on_digits(tmp_path, capsys):
    out = tmp_path / "tp"
    assert main(["train", "time-predictor", "--dataset", "digits", "--arch", "unet-encoder", "--widths", "8,16",
                 "--out", str(out), "--steps", "2", "--batch-size", "8", "--quiet"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["class"] == "UNetEncoderTimePredictor" and cfg["config"]["widths"] == [8, 16]
    m = UNetEncoderTimePredictor.from_pretrained(out)
    assert m.schedule.num_train_timesteps == 1000 and m(torch.randn(2, 1, 8, 8)).shape == (2, 1000)
    capsys.readouterr()
    assert main(["train", "time-predictor", "--dataset", "digits", "--arch", "mlp", "--out", str(tmp_path / "x"),
                 "--steps", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--arch mlp is for vector data" in err[0]


# ---------------------------------------------------------------------------------------------- hub round trips


@pytest.mark.parametrize("make", [
    lambda: SimpleCNNTimePredictor(1, 8, 50, widths=(8, 8, 16, 16), num_classes=3, cond_dim=4),
    lambda: UNetEncoderTimePredictor(1, 8, 50, widths=(8, 16), num_classes=3, cond_dim=4),
    lambda: MLPTimePredictor(2, 50, hidden=16, num_layers=3),
])
def test_time_predictor_save_from_pretrained_round_trip(tmp_path, make):
    torch.manual_seed(0)
    m = make().eval()
    m.schedule = VPSchedule.linear(50)
    folder = m.save_pretrained(tmp_path / "p", note="hi")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["class"] == type(m).__name__ and cfg["note"] == "hi" and cfg["schedule"]["num_train_timesteps"] == 50
    back = type(m).from_pretrained(str(folder))
    assert type(back) is type(m) and not back.training and back.schedule.to_dict() == m.schedule.to_dict()
    x = torch.randn(3, *m.sample_shape)
    torch.testing.assert_close(back(x), m(x), rtol=0, atol=0)
    assert type(TimePredictor.from_pretrained(folder)) is type(m)  # the base class loads any predictor
    assert type(load_model(folder)) is type(m)                      # same layout as save_model


def test_classifier_round_trip_and_class_check(tmp_path):
    torch.manual_seed(0)
    clf = CleanClassifier(1, 8, 10).eval()
    folder = clf.save_pretrained(tmp_path / "clf")
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(CleanClassifier.from_pretrained(folder)(x), clf(x), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="holds a CleanClassifier, not a NoisyClassifier"):
        NoisyClassifier.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="not a TimePredictor"):
        TimePredictor.from_pretrained(folder)


def test_from_pretrained_reads_shipped_checkpoints():
    m = SimpleCNNTimePredictor.from_pretrained("digits/time_predictor")
    assert m.sample_shape == (1, 8, 8) and m.schedule.num_train_timesteps == 1000
    assert NoisyClassifier.from_pretrained("digits/clf_noisy").num_classes == 10


def test_unknown_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="'nobody-xyz/no-such-predictor' is neither a local checkpoint folder.*"
                       "Hugging Face Hub ID failed"):
        SimpleCNNTimePredictor.from_pretrained("nobody-xyz/no-such-predictor", cache_dir=tmp_path / "cache")
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):  # not an ID: the local error
        SimpleCNNTimePredictor.from_pretrained(str(tmp_path / "a" / "b" / "c"))
