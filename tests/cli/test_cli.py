"""CLI: the commands run end to end; bad input is one line on stderr and exit code 2."""

import importlib.util
import json

import pytest

from tagdiff.cli.main import main


def _one_line_error(capsys, code, rc=2):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == rc
    assert len(err) == 1 and err[0].startswith("tagdiff") and "error:" in err[0], err
    assert "Traceback" not in err[0]
    return err[0]


def test_train_then_eval_time_predictor(tmp_path, capsys):
    out = tmp_path / "tp"
    rc = main(["train", "time-predictor", "--out", str(out), "--steps", "3", "--hidden", "16", "--layers", "2",
               "--batch-size", "32", "--quiet"])
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["class"] == "MLPTimePredictor" and cfg["command"].startswith("tagdiff train time-predictor")
    assert cfg["schedule"]["kind"] == "linear" and cfg["dataset"] == "toy"
    report = json.loads((out / "report.json").read_text())  # training ends with a held-out report + figure
    assert len(report["accuracy_per_t"]) == len(report["timesteps"]) == 100
    assert (out / "report.png").stat().st_size > 5_000
    rc = main(["eval", "time-predictor", "--checkpoint", str(out), "--num-samples", "20", "--out",
               str(tmp_path / "rep.json")])
    assert rc == 0
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert len(rep["buckets"]) == 10 and 0 <= rep["accuracy"] <= 1
    assert (tmp_path / "rep.png").is_file()


def test_missing_checkpoint(tmp_path, capsys):
    msg = _one_line_error(capsys, main(["eval", "time-predictor", "--checkpoint", str(tmp_path / "none")]))
    assert str(tmp_path / "none") in msg


def test_corrupt_checkpoint(tmp_path, capsys):
    out = tmp_path / "tp"
    main(["train", "time-predictor", "--out", str(out), "--steps", "1", "--hidden", "8", "--layers", "2", "--quiet"])
    capsys.readouterr()
    (out / "model.safetensors").write_bytes(b"garbage")
    msg = _one_line_error(capsys, main(["eval", "time-predictor", "--checkpoint", str(out)]))
    assert "corrupt" in msg


@pytest.mark.parametrize("argv", [
    ["bogus"],
    ["train", "diffusion", "--out", "x", "--steps", "-3"],
    ["train", "diffusion", "--out", "x", "--dataset", "imagenet"],
    ["bench", "toy"],
])
def test_usage_errors_are_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    _one_line_error(capsys, e.value.code)


def test_unknown_schedule_name(tmp_path, capsys):
    """Refused by the parser (``--schedule`` lists its choices), in one line, exit 2, before any work."""
    with pytest.raises(SystemExit) as e:
        main(["train", "diffusion", "--out", str(tmp_path / "o"), "--schedule", "zigzag", "--steps", "1", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "zigzag" in err and "scaled_linear" in err and not (tmp_path / "o").exists()


def test_bench_toy_small(tmp_path, capsys):
    rc = main(["bench", "toy", "--out", str(tmp_path), "--num-samples", "200", "--num-steps", "10", "--quiet"])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    keys = {"no_drift", "drift", "drift_tag_learned", "drift_tag_exact"}
    for section in ("w1", "w1_exact_score", "time_gap"):
        assert set(res[section]) == keys
        assert all(v >= 0 for v in res[section].values())
    assert res["config"]["num_samples"] == 200 and res["seconds"] > 0
    assert (tmp_path / "toy.png").stat().st_size > 10_000


def test_unet_training_resumes_across_processes(tmp_path):
    """diffusers configs carry private keys whose order depends on the hash seed; resume must not trip on them."""
    import os
    import subprocess
    import sys

    out = tmp_path / "unet"
    base = [sys.executable, "-m", "tagdiff.cli", "train", "diffusion", "--dataset", "digits", "--out", str(out),
            "--widths", "8,16", "--save-every", "1", "--quiet"]
    for steps, hash_seed in (("1", "1"), ("2", "2")):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([*base, "--steps", steps], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "history.json").read_text()) is not None
    assert (out / "diffusion_pytorch_model.safetensors").is_file() and (out / "scheduler_config.json").is_file()


def test_a_time_predictor_is_tied_to_its_diffusion_model(tmp_path, capsys):
    """``train time-predictor --checkpoint DIR`` takes the model's schedule (here cosine, against the default linear
    flag) and shape; sampling refuses a predictor whose ᾱ differs from the model's, naming both schedules."""
    from tagdiff.models.unet import load_unet, save_unet
    from tagdiff.sampling.schedules import VPSchedule

    unet, _ = load_unet("src/tagdiff/assets/digits/unet")
    save_unet(unet, VPSchedule.cosine(1000), tmp_path / "cosine_unet")
    out = tmp_path / "tp"
    assert main(["train", "time-predictor", "--dataset", "digits", "--checkpoint", str(tmp_path / "cosine_unet"),
                 "--out", str(out), "--steps", "2", "--batch-size", "8", "--quiet"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["schedule"]["kind"] == "cosine"
    capsys.readouterr()
    code = main(["sample", "--checkpoint", "digits", "--time-predictor", str(out), "--out", str(tmp_path / "s"),
                 "--num-samples", "2", "--num-steps", "2", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "trained on schedule cosine(T=1000" in err[0] and "uses linear(T=1000, beta 0.0001..0.02)" in err[0]
    # a model of another sample shape is refused before training
    assert main(["train", "time-predictor", "--dataset", "toy", "--checkpoint", "digits", "--out", str(tmp_path / "x"),
                 "--steps", "1", "--quiet"]) == 2
    assert "makes samples of shape (1, 8, 8) but the data has (2,)" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["--sampler", "EDMEulerScheduler"], "EDMEulerScheduler is not supported"),
    (["--sampler", "fancy"], "unknown scheduler 'fancy'"),
    *([(["--sampler", "DPMSolverSDEScheduler"], "needs a package that is not installed")]
      if importlib.util.find_spec("torchsde") is None else []),  # with torchsde it samples
    (["--sampler", "unipc", "--time-predictor", "digits/time_predictor", "--omega", "1"], "UniPCMultistepScheduler"),
])
def test_sample_with_a_diffusers_scheduler_refuses_bad_ones_in_one_line(tmp_path, capsys, argv, needle):
    code = main(["sample", "--checkpoint", "digits", "--out", str(tmp_path / "s"), "--num-samples", "2",
                 "--num-steps", "3", "--quiet", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err


def test_sample_through_diffusers_schedulers(tmp_path, capsys):
    for sampler in ("dpmpp2m", "euler"):
        assert main(["sample", "--checkpoint", "digits", "--out", str(tmp_path / sampler), "--num-samples", "4",
                     "--num-steps", "5", "--sampler", sampler, "--time-predictor", "digits/time_predictor",
                     "--omega", "0.5", "--per-sample-seeds", "--quiet"]) == 0
        summary = json.loads((tmp_path / sampler / "summary.json").read_text())
        assert summary["time_gap"] is not None and len(summary["time_gap_per_step"]) == 5


def test_a_model_of_an_unsupported_prediction_type_is_refused(tmp_path, capsys):
    from diffusers import DDPMScheduler

    from tagdiff.models.unet import load_unet

    unet, _ = load_unet("src/tagdiff/assets/digits/unet")
    unet.unet.save_pretrained(tmp_path / "m")
    DDPMScheduler(prediction_type="flow").save_pretrained(tmp_path / "m")
    assert main(["sample", "--checkpoint", str(tmp_path / "m"), "--out", str(tmp_path / "s"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prediction_type 'flow' is not supported" in err[0]


def test_sample_with_classifier_free_guidance_on_the_class_conditional_unet(tmp_path, capsys):
    """``--cfg-scale`` on the shipped class-conditional UNet gives digits of the target class (evaluation
    classifier); CFG on an unconditional model, or a class-conditional model without --target, is refused."""
    import numpy as np
    import torch

    from tagdiff.models.checkpoints import load_model

    out = tmp_path / "cfg"
    assert main(["sample", "--checkpoint", "digits/unet_class", "--target", "3", "--cfg-scale", "2",
                 "--out", str(out), "--num-samples", "32", "--num-steps", "20", "--quiet"]) == 0
    x = torch.from_numpy(np.load(out / "samples.npz")["x"])
    acc = float((load_model("digits/clf_eval")(x).argmax(-1) == 3).float().mean())
    assert acc > 0.8, acc
    for argv, needle in ((["--checkpoint", "digits", "--target", "3", "--cfg-scale", "2"], "class-conditional UNet"),
                         (["--checkpoint", "digits/unet_class"], "give --target")):
        capsys.readouterr()
        assert main(["sample", *argv, "--out", str(tmp_path / "bad"), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_train_a_class_conditional_unet_and_sample_it_with_cfg(tmp_path, capsys):
    """``train diffusion --class-conditional`` makes a UNet with a 'no label' class recorded in tagdiff.json, which
    ``sample --target --cfg-scale`` then uses; vector data has no such model."""
    out = tmp_path / "cc"
    assert main(["train", "diffusion", "--dataset", "digits", "--class-conditional", "--out", str(out),
                 "--steps", "2", "--batch-size", "8", "--quiet"]) == 0
    meta = json.loads((out / "tagdiff.json").read_text())
    assert meta["null_class"] == 10 and json.loads((out / "config.json").read_text())["num_class_embeds"] == 11
    assert main(["sample", "--checkpoint", str(out), "--target", "2", "--cfg-scale", "3", "--out",
                 str(tmp_path / "s"), "--num-samples", "2", "--num-steps", "2", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train", "diffusion", "--dataset", "toy", "--class-conditional", "--out", str(tmp_path / "v"),
                 "--steps", "1", "--quiet"]) == 2
    assert "class" in capsys.readouterr().err
