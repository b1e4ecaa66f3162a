"""Feed the ``tagdiff`` CLI bad inputs and count how many fail clearly: exit code 2, one line on stderr naming the bad
value, no traceback.

    PYTHONPATH=src HF_HUB_OFFLINE=1 python benchmarks/fuzz_cli.py [--verbose]

Prints ``N tried, N clear (exit 2, one line), N other`` (and, for each "other", what happened). The commands run in
this process through :func:`tagdiff.cli.main` (an exception escaping ``main`` is what a user would see as a
traceback). Broken checkpoints are made from copies of the shipped models in a temporary folder. ``CASES`` (one
``Case`` per bad input, with the failure class it belongs to) is also used by ``tests/cli/test_cli_errors.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Case:
    """One bad input: the failure class, the argv (``{root}`` is the fixture folder) and a substring the message must
    contain (the named value)."""

    kind: str
    argv: tuple[str, ...]
    expect: str


ASSETS = Path(__file__).resolve().parents[1] / "src" / "tagdiff" / "assets"
TINY_TRAIN = ("--steps", "2", "--batch-size", "8", "--hidden", "16", "--layers", "2", "--quiet")
TOY_TP = ("train", "time-predictor", *TINY_TRAIN)
SAMPLE = ("sample", "--num-samples", "2", "--num-steps", "2", "--quiet")
DIGITS_SAMPLE = (*SAMPLE, "--checkpoint", "digits", "--out", "{root}/s")


# a device this machine lacks: "cuda" without a GPU, else an index past the last GPU
MISSING_DEVICE = "cuda:99" if torch.cuda.is_available() else "cuda"


def _cases() -> list[Case]:
    cases: list[Case] = []
    add = cases.append
    # ---- values: every numeric option rejects what it cannot mean, naming the value
    bad_numbers = {
        ("train", "diffusion", "--out", "{root}/o", "--lr"): ("0", "-1", "nan", "inf", "abc"),
        ("train", "diffusion", "--out", "{root}/o", "--batch-size"): ("0", "-5", "1.5", "x"),
        ("train", "diffusion", "--out", "{root}/o", "--steps"): ("0", "-3", "ten"),
        ("train", "diffusion", "--out", "{root}/o", "--hidden"): ("0", "-1"),
        ("train", "diffusion", "--out", "{root}/o", "--ema-decay"): ("0", "1", "1.5", "nan", "-0.1"),
        ("train", "diffusion", "--out", "{root}/o", "--widths"): ("8,0", "a,b", "-8"),
        ("train", "diffusion", "--out", "{root}/o", "--num-train-timesteps"): ("0", "-5"),
        ("train", "diffusion", "--out", "{root}/o", "--save-every"): ("0",),
        ("train", "time-predictor", "--out", "{root}/o", "--cond-drop"): ("-0.1", "2", "nan"),
        ("sample", "--checkpoint", "digits", "--out", "{root}/s", "--eta"): ("nan", "-1", "inf"),
        ("sample", "--checkpoint", "digits", "--out", "{root}/s", "--corruption-std"): ("-1", "nan", "inf"),
        ("sample", "--checkpoint", "digits", "--out", "{root}/s", "--clip-x0"): ("-1", "nan", "inf", "big"),
        ("sample", "--checkpoint", "digits", "--out", "{root}/s", "--guidance-scale"): ("-2", "nan", "inf"),
        ("sample", "--checkpoint", "digits", "--out", "{root}/s", "--omega"): ("nan", "inf"),
        ("sample", "--checkpoint", "digits", "--out", "{root}/s", "--num-samples"): ("0", "-1"),
        ("sample", "--checkpoint", "digits", "--out", "{root}/s", "--num-steps"): ("0",),
        ("bench", "label", "--out", "{root}/b", "--dps-guidance-scale"): ("nan", "-1"),
        ("bench", "label", "--out", "{root}/b", "--targets"): ("a,b",),
        ("bench", "toy", "--out", "{root}/b", "--omega"): ("nan",),
    }
    for prefix, values in bad_numbers.items():
        for v in values:
            add(Case("value", (*prefix, v), v))
    add(Case("value", ("train", "diffusion", "--out", "{root}/o", "--schedule", "zigzag", *TINY_TRAIN), "zigzag"))
    add(Case("value", ("sample", "--checkpoint", "digits", "--out", "{root}/s", "--sampler", "eulerz"), "eulerz"))
    add(Case("value", (*DIGITS_SAMPLE, "--guidance", "dps", "--classifier", "digits/clf_clean", "--target", "12"),
             "12"))
    add(Case("value", (*DIGITS_SAMPLE, "--omega", "1"), "--time-predictor"))
    add(Case("value", (*DIGITS_SAMPLE, "--guidance", "cg", "--target", "1"), "--classifier"))
    # ---- devices
    for argv in (("train", "diffusion", "--out", "{root}/o", *TINY_TRAIN), ("train", "time-predictor", "--out",
                 "{root}/o", *TINY_TRAIN), ("eval", "time-predictor", "--checkpoint", "toy/time_predictor"),
                 DIGITS_SAMPLE, ("bench", "toy", "--out", "{root}/b"), ("bench", "label", "--out", "{root}/b"),
                 ("bench", "speed", "--out", "{root}/b"), ("demo", "--out", "{root}/b")):
        for dev in (MISSING_DEVICE, "tpu"):
            add(Case("device", (*argv, "--device", dev), dev))
    # ---- outputs: a file, an unwritable place, a folder where a file is wanted
    for argv in (("train", "diffusion", *TINY_TRAIN), ("train", "time-predictor", *TINY_TRAIN), SAMPLE[:1] + (
            "--checkpoint", "digits", *SAMPLE[1:]), ("bench", "toy"), ("bench", "label"), ("bench", "speed"),
            ("demo",), ("bench", "strength")):
        add(Case("output", (*argv, "--out", "{root}/a_file"), "a_file"))
        add(Case("output", (*argv, "--out", "{root}/a_file/sub"), "a_file"))
        add(Case("output", (*argv, "--out", "/sys/tagdiff_cannot_write"), "/sys/tagdiff_cannot_write"))
    add(Case("output", ("eval", "time-predictor", "--checkpoint", "toy/time_predictor", "--out", "{root}"), "{root}"))
    add(Case("output", ("eval", "time-predictor", "--checkpoint", "toy/time_predictor", "--out",
                        "/sys/tagdiff_cannot_write/r.json"), "/sys/tagdiff_cannot_write"))
    # ---- memory
    add(Case("memory", ("train", "diffusion", "--out", "{root}/m1", "--steps", "1", "--batch-size", "100000000000",
                        "--quiet"), "100000000000"))
    add(Case("memory", ("train", "diffusion", "--out", "{root}/m2", "--steps", "1", "--hidden", "10000000",
                        "--quiet"), "10000000"))
    add(Case("memory", ("train", "time-predictor", "--out", "{root}/m3", "--steps", "1", "--hidden", "10000000",
                        "--quiet"), "10000000"))
    add(Case("memory", (*SAMPLE[:1], "--checkpoint", "toy", "--out", "{root}/s", "--num-samples", "100000000000",
                        "--quiet"), "100000000000"))
    # ---- checkpoints: names, wrong kinds, broken files (each message names the file or the value)
    for flag_argv, bad in (((*SAMPLE, "--out", "{root}/s", "--checkpoint"), "digitz"),
                           ((*SAMPLE, "--out", "{root}/s", "--checkpoint"), "{root}/missing"),
                           ((*SAMPLE, "--out", "{root}/s", "--checkpoint"), "{root}/a_file"),
                           (("eval", "time-predictor", "--checkpoint"), "toy/nope"),
                           ((*DIGITS_SAMPLE, "--guidance", "dps", "--target", "1", "--classifier"), "digits/clf"),
                           ((*DIGITS_SAMPLE, "--time-predictor"), "{root}/missing")):
        add(Case("name", (*flag_argv, bad), bad))
    for argv, expect in ((("eval", "time-predictor", "--checkpoint", "digits"), "UNet"),
                         (("eval", "time-predictor", "--checkpoint", "digits/clf_noisy"), "NoisyClassifier"),
                         (("eval", "time-predictor", "--checkpoint", "toy"), "MLPEpsModel"),
                         ((*SAMPLE, "--out", "{root}/s", "--checkpoint", "digits/time_predictor"), "TimePredictor"),
                         ((*SAMPLE, "--out", "{root}/s", "--checkpoint", "toy/time_predictor"), "TimePredictor"),
                         ((*SAMPLE, "--out", "{root}/s", "--checkpoint", "digits/clf_clean"), "CleanClassifier"),
                         ((*DIGITS_SAMPLE, "--time-predictor", "digits/clf_eval"), "EvalClassifier"),
                         ((*DIGITS_SAMPLE, "--time-predictor", "toy/time_predictor"), "toy/time_predictor"),
                         ((*DIGITS_SAMPLE, "--guidance", "cg", "--classifier", "digits/clf_clean", "--target", "1"),
                          "noisy"),
                         ((*DIGITS_SAMPLE, "--guidance", "dps", "--classifier", "digits/clf_noisy", "--target", "1"),
                          "clean"),
                         ((*DIGITS_SAMPLE, "--guidance", "dps", "--classifier", "digits", "--target", "1"),
                          "digits")):
        add(Case("kind", argv, expect))
    for name, expect in (("binary_config", "config.json"), ("schedule_string", "schedule"),
                         ("sample_size_word", "eight"), ("sample_size_nonsquare", "sample_size"),
                         ("negative_T_unet", "num_train_timesteps"), ("pickle_only", "pickle"),
                         ("corrupt_weights", "corrupt"), ("no_config", "config.json")):
        add(Case("broken", (*SAMPLE, "--out", "{root}/s", "--checkpoint", f"{{root}}/{name}"), expect))
    for name, expect in (("tp_negative_T", "config.json"), ("tp_binary_config", "config.json"),
                         ("tp_config_list", "config.json"), ("tp_schedule_string", "schedule")):
        add(Case("broken", ("eval", "time-predictor", "--checkpoint", f"{{root}}/{name}"), expect))
    add(Case("nonfinite", (*DIGITS_SAMPLE, "--time-predictor", "{root}/tp_nan"), "not finite"))
    add(Case("nonfinite", ("eval", "time-predictor", "--checkpoint", "{root}/tp_nan_toy"), "non-finite"))
    # ---- training runs: broken state, another run's folder, a live lock
    add(Case("state", (*TOY_TP, "--out", "{root}/state_no_groups"), "param_groups"))
    add(Case("state", (*TOY_TP, "--out", "{root}/finished", "--seed", "7"), "seed"))
    add(Case("state", (*TOY_TP, "--out", "{root}/finished", "--lr", "0.5"), "lr"))
    add(Case("state", (*TOY_TP, "--out", "{root}/finished", "--batch-size", "16"), "batch_size"))
    add(Case("lock", (*TOY_TP, "--out", "{root}/locked"), "pid"))
    # ---- data
    add(Case("data", ("train", "diffusion", "--dataset", "mnist", "--out", "{root}/o", *TINY_TRAIN), "mnist"))
    add(Case("data", ("train", "diffusion", "--dataset", "folder", "--data-dir", "{root}/missing", "--out",
                      "{root}/o", *TINY_TRAIN), "missing"))
    add(Case("data", ("train", "classifier", "--kind", "clean", "--dataset", "toy", "--out", "{root}/o",
                      *TINY_TRAIN), "toy"))
    return cases


CASES = _cases()


def make_fixtures(root: Path) -> None:
    """The broken checkpoints, training folders and files the cases name, under ``root``."""
    from safetensors.torch import load_file, save_file

    from tagdiff.cli.main import main

    root.mkdir(parents=True, exist_ok=True)
    (root / "a_file").write_text("not a folder\n")
    unet = ASSETS / "digits" / "unet"
    tp = ASSETS / "toy" / "time_predictor"

    def copy(src: Path, name: str) -> Path:
        dst = root / name
        shutil.copytree(src, dst)
        return dst

    def edit(path: Path, **changes: object) -> None:
        cfg = json.loads(path.read_text())
        for key, value in changes.items():
            target = cfg
            *parents, last = key.split("__")
            for p in parents:
                target = target[p]
            target[last] = value
        path.write_text(json.dumps(cfg))

    (copy(unet, "binary_config") / "config.json").write_bytes(bytes(range(256)) * 4)
    edit(copy(unet, "sample_size_word") / "config.json", sample_size="eight")
    edit(copy(unet, "sample_size_nonsquare") / "config.json", sample_size=[8, 6])
    edit(copy(unet, "negative_T_unet") / "scheduler_config.json", num_train_timesteps=-5)
    d = copy(unet, "pickle_only")
    torch.save(load_file(d / "diffusion_pytorch_model.safetensors"), d / "diffusion_pytorch_model.bin")
    (d / "diffusion_pytorch_model.safetensors").unlink()
    (copy(unet, "corrupt_weights") / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage" * 10)
    (copy(unet, "no_config") / "config.json").unlink()
    edit(copy(ASSETS / "toy" / "score", "schedule_string") / "config.json", schedule="linear")
    edit(copy(tp, "tp_negative_T") / "config.json", config__num_train_timesteps=-5)
    (copy(tp, "tp_binary_config") / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    (copy(tp, "tp_config_list") / "config.json").write_text("[1, 2, 3]")
    edit(copy(tp, "tp_schedule_string") / "config.json", schedule="linear")
    for name, src in (("tp_nan", ASSETS / "digits" / "time_predictor"), ("tp_nan_toy", tp)):
        d = copy(src, name)
        w = load_file(d / "model.safetensors")
        save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in w.items()},
                  d / "model.safetensors")
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        for name in ("state_no_groups", "finished"):
            assert main([*TOY_TP, "--out", str(root / name)]) == 0
    state = root / "state_no_groups" / "train_state.safetensors"
    from safetensors import safe_open

    with safe_open(str(state), "pt") as fh:
        meta = json.loads(fh.metadata()["json"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    meta.pop("param_groups")
    save_file(tensors, str(state), metadata={"json": json.dumps(meta)})
    (root / "state_no_groups" / "config.json").unlink()  # an unfinished run: rerunning resumes it
    (root / "locked").mkdir()
    (root / "locked" / ".lock").write_text(f"{os.getppid()}\n")  # a live process (our parent) holds it


def run_case(case: Case, root: Path) -> tuple[bool, str]:
    """Run one case; ``(clear, what happened)``."""
    from tagdiff.cli.main import main

    argv = [a.replace("{root}", str(root)) for a in case.argv]
    expect = case.expect.replace("{root}", str(root))
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as e:
                rc = e.code
    except BaseException as e:  # what a user would see as a traceback
        return False, f"traceback: {type(e).__name__}: {str(e)[:200]}"
    lines = err.getvalue().strip().splitlines()
    lines = [ln for ln in lines if not ln.startswith("tagdiff: note:")]
    if rc != 2:
        return False, f"exit {rc}: {lines[-1:] if lines else '(no stderr)'}"
    if len(lines) != 1 or not lines[0].startswith("tagdiff") or "error:" not in lines[0]:
        return False, f"{len(lines)} stderr lines: {lines[:3]}"
    if expect.lower() not in lines[0].lower():
        return False, f"message does not name {expect!r}: {lines[0]}"
    return True, lines[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--verbose", action="store_true", help="print every message")
    ap.add_argument("--kind", default=None, help="only the cases of this failure class")
    opts = ap.parse_args()
    cases = [c for c in CASES if opts.kind in (None, c.kind)]
    with tempfile.TemporaryDirectory(prefix="tagdiff-fuzz-") as tmp:
        root = Path(tmp)
        make_fixtures(root)
        other = []
        for case in cases:
            ok, what = run_case(case, root)
            if not ok:
                other.append((case, what))
            if opts.verbose:
                print(f"[{'clear' if ok else 'OTHER'}] {case.kind:9s} {' '.join(case.argv)[:90]}\n    {what}")
    for case, what in other:
        print(f"OTHER {case.kind}: tagdiff {' '.join(case.argv)}\n    {what}")
    kinds = sorted({c.kind for c in cases})
    print(f"{len(cases)} tried, {len(cases) - len(other)} clear (exit 2, one line), {len(other)} other "
          f"(classes: {', '.join(kinds)})")
    return 0 if not other else 1


if __name__ == "__main__":
    sys.exit(main())
