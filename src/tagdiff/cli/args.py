"""Argument types, shared option groups and error translation of the ``tagdiff`` command line (see :mod:`tagdiff.cli`).

Every value type here rejects bad input at parse time with one line naming the value and what was expected;
:func:`error_message` turns the exceptions a command may raise into the one-line ``tagdiff: error: ...`` message.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from ..sampling.schedules import GRID_SPACINGS, SCHEDULE_KINDS

__all__ = ["DATASETS", "OnDevice", "Parser", "add_data_args", "add_device_arg", "add_grid_args",
           "add_sample_args",
           "add_train_args", "check_model_memory", "clip_value", "error_message", "finite_float", "int_list",
           "int_tuple", "interrupted", "nonneg_float", "positive_float", "positive_int", "print_models",
           "unit_interval", "with_device"]

DATASETS = ("toy", "digits", "mnist", "folder", "hf")
LR_SCHEDULER_NAMES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


class Parser(argparse.ArgumentParser):
    """argparse parser whose usage errors are one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _int_at_least(s: str, lo: int, expected: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}") from None
    if v < lo:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}")
    return v


def positive_int(s: str) -> int:
    return _int_at_least(s, 1, "a positive integer")


def _float(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None


def nonneg_int(s: str) -> int:
    return _int_at_least(s, 0, "an integer >= 0")


def finite_float(s: str) -> float:
    v = _float(s)
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


def nonneg_float(s: str) -> float:
    v = _float(s)
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {s!r}")
    return v


def positive_float(s: str) -> float:
    v = _float(s)
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {s!r}")
    return v


def unit_interval(s: str) -> float:
    v = _float(s)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {s!r}")
    return v


def open_unit_interval(s: str) -> float:
    v = _float(s)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {s!r}")
    return v


def clip_value(s: str) -> float | str | None:
    """``--clip-x0``: ``auto`` (1 for images, none for vectors), ``none`` or ``0`` (off), or a number > 0."""
    if s.strip().lower() in ("auto", "none", "off"):
        return None if s.strip().lower() != "auto" else "auto"
    v = _float(s)
    if v == 0:
        return None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0, 'auto' or 'none', got {s!r}")
    return v


def int_tuple(s: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 32,64,64, got {s!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return out


def int_list(s: str, what: str = "class indices") -> tuple[int, ...]:
    if s == "all" and what == "class indices":
        return tuple(range(10))
    try:
        return tuple(int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {s!r}") from None


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda|mps",
                   help="where models run: auto = cuda if available, else mps, else cpu (default: auto)")


class DatasetAction(argparse.Action):
    """``--dataset NAME`` or ``--dataset NAME:DIR`` (``folder:images/``, ``mnist:data/mnist``): the second form also
    sets ``--data-dir DIR``."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        name, sep, where = str(values).partition(":")
        if name not in DATASETS or (sep and (name in ("toy", "digits") or not where)):
            raise argparse.ArgumentError(self, f"expected one of {', '.join(DATASETS)}, or mnist:DIR, folder:DIR, "
                                               f"hf:DIR; got {values!r}")
        setattr(namespace, self.dest, name)
        if sep:
            namespace.data_dir = Path(where)


def add_data_args(p: argparse.ArgumentParser, default: str | None = "toy") -> None:
    shown = "none: required with --checkpoint, else toy" if default is None else default
    p.add_argument("--dataset", action=DatasetAction, default=default, metavar="{" + ",".join(DATASETS) + "}[:DIR]",
                   help=f"data set; NAME:DIR also sets --data-dir (e.g. folder:my_images) (default: {shown})")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="mnist: folder of the IDX files; folder: image folder or .npz file; hf: a Hugging Face "
                        "datasets folder (save_to_disk, an image folder, or one load_dataset reads)")
    p.add_argument("--image-size", type=positive_int, default=None, help="resize images to this size")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None, help="1 (grey) or 3 (RGB)")
    p.add_argument("--download", action="store_true", help="mnist: download missing files into --data-dir")
    p.add_argument("--image-column", default=None,
                   help="hf: the image column (default: the first Image feature, else 'image' or 'img')")
    p.add_argument("--label-column", default=None,
                   help="hf: the integer label column (default: 'label' if present, else unlabelled)")


def add_train_args(p: argparse.ArgumentParser, dataset_default: str | None = "toy") -> None:
    add_data_args(p, dataset_default)
    p.add_argument("--out", required=True, type=Path, help="output folder (checkpoint, training state, history)")
    p.add_argument("--steps", type=positive_int, default=None, help="optimisation steps (default: per recipe)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="batch size (default: per recipe)")
    p.add_argument("--lr", type=positive_float, default=None, help="Adam learning rate > 0 (default: per recipe)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the model initialisation, batches, timesteps and noise (default: 0)")
    p.add_argument("--hidden", type=positive_int, default=256, help="MLP width, vector data (default: 256)")
    p.add_argument("--layers", type=positive_int, default=None, help="MLP linear layers (default: 3 / 5)")
    p.add_argument("--widths", type=int_tuple, default=(32, 64, 64),
                   help="UNet channels, also of --arch unet-encoder (default: 32,64,64)")
    p.add_argument("--num-train-timesteps", type=positive_int, default=1000, help="T (default: 1000)")
    p.add_argument("--schedule", default="linear", choices=SCHEDULE_KINDS,
                   help="noise schedule (default: linear; scaled_linear is Stable Diffusion's)")
    p.add_argument("--save-every", type=positive_int, default=1000,
                   help="steps between resumable checkpoints (default: 1000)")
    p.add_argument("--ema-decay", type=open_unit_interval, default=None,
                   help="EMA decay of the weights, in (0, 1) (default: per recipe)")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                   help="autocast through accelerate's recipe: bf16 (CPU or GPU, about 1.8x faster on CPU) or fp16 "
                        "(CUDA only, with a GradScaler) (default: no = fp32)")
    p.add_argument("--bf16", action="store_true", help="the same as --mixed-precision bf16")
    p.add_argument("--grad-accum", type=positive_int, default=1,
                   help="micro-batches per update: --batch-size stays the effective batch of an update (over all "
                        "processes), each process computing batch / (N x processes) samples at a time (default: 1)")
    p.add_argument("--lr-scheduler", choices=LR_SCHEDULER_NAMES, default="constant",
                   help="diffusers.optimization.get_scheduler name (default: constant = the fixed --lr)")
    p.add_argument("--lr-warmup-steps", type=nonneg_int, default=0,
                   help="LR warm-up updates (not with constant; default: 0)")
    p.add_argument("--lr-decay-steps", type=positive_int, default=None,
                   help="length of a decaying schedule (default: --steps; set it to stop early and extend later)")
    p.add_argument("--ema-warmup", action="store_true",
                   help="EMA decay min(--ema-decay, 1 - (1 + k)^-power) at update k + 1 (diffusers EMAModel's "
                        "use_ema_warmup; needs --ema-decay)")
    p.add_argument("--ema-power", type=positive_float, default=2 / 3,
                   help="the EMA warm-up's power (default: 2/3, diffusers'; 3/4 for short runs)")
    p.add_argument("--hflip", action="store_true",
                   help="random horizontal flips (p = 0.5, seeded by --seed and the step: resume-exact)")
    p.add_argument("--num-workers", type=nonneg_int, default=0,
                   help="DataLoader processes decoding images (mnist, folder, hf; default: 0 = in this process)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if --out holds a training state")
    add_device_arg(p)
    p.add_argument("--num-processes", type=positive_int, default=1,
                   help="data-parallel processes on this machine, through Hugging Face accelerate (gloo on CPU, "
                        "one GPU each with --device cuda); each takes its shard of every batch (default: 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_sample_args(smp: argparse.ArgumentParser) -> None:
    smp.add_argument("--checkpoint", required=True,
                     help="the model: a tagdiff folder, a diffusers UNet folder, a diffusers pipeline folder "
                          "(model_index.json; a latent one decodes with its vae/, a text-conditional one needs "
                          "--prompt), or a shipped name, e.g. digits or toy (tagdiff models lists them)")
    smp.add_argument("--out", required=True, type=Path, help="output folder (samples.npz, grid.png, summary.json)")
    smp.add_argument("--num-samples", type=positive_int, default=64, help="samples to draw (default: 64)")
    add_grid_args(smp, "trailing")
    smp.add_argument("--sampler", default=None,
                     help="ddim | ddpm (tagdiff's steps), or a diffusers scheduler: dpmpp2m | unipc | unipc_p (UniPC "
                          "with its corrector off: keeps TAG's corrections) | euler | euler_a | heun | pndm | lms | "
                          "deis | any supported class name (default: ddim); flow-matching checkpoints: euler | heun "
                          "(flow Euler / Heun on the σ grid; default: euler)")
    smp.add_argument("--shift", type=positive_float, default=None,
                     help="flow-matching checkpoints: shift of the σ grid, σ' = sσ / (1 + (s - 1)σ) (SD3: 3; "
                          "default: the scheduler config's)")
    smp.add_argument("--prompt", default=None,
                     help="text-conditional pipeline folders (Stable Diffusion style): the prompt; the pipeline runs "
                          "its own call with CFG at --cfg-scale (default 7.5) and TAG as TAGCallback")
    smp.add_argument("--num-steps", type=positive_int, default=50, help="sampling steps (default: 50)")
    smp.add_argument("--eta", type=nonneg_float, default=1.0, help="DDIM η >= 0 (default: 1)")
    smp.add_argument("--seed", type=int, default=0, help="seed of x_T and the sampling noise (default: 0)")
    smp.add_argument("--per-sample-seeds", action="store_true",
                     help="sample i uses seed+i: its noise does not depend on the batch (see the README)")
    smp.add_argument("--num-processes", type=positive_int, default=1,
                     help="with --per-sample-seeds: split the samples over N processes (accelerate; gathered on "
                          "the main one, which writes the outputs) (default: 1)")
    smp.add_argument("--guidance", choices=("none", "cg", "dps"), default="none",
                     help="none, cg (classifier guidance) or dps (default: none)")
    smp.add_argument("--classifier", default=None,
                     help="cg: noisy classifier (e.g. digits/clf_noisy); dps: clean classifier (digits/clf_clean)")
    smp.add_argument("--target", type=int, default=None, help="target class for --guidance")
    smp.add_argument("--guidance-scale", type=nonneg_float, default=None,
                     help="guidance strength (default: the demo's, 16 for dps, 4 for cg)")
    smp.add_argument("--time-predictor", default=None,
                     help="records the Time Gap; with --omega: TAG (e.g. digits/time_predictor)")
    smp.add_argument("--omega", type=nonneg_float, default=0.0, help="TAG ω_0 (default 0: off; the demo uses 1)")
    smp.add_argument("--omega-schedule", choices=("one_minus_alpha_bar", "constant", "sqrt_one_minus_alpha_bar"),
                     default="one_minus_alpha_bar", help="ω_t over t (default: one_minus_alpha_bar, ω_0 (1 − ᾱ_t))")
    smp.add_argument("--placement", choices=("pre", "post"), default="pre",
                     help="TAG before (pre, Alg. 1) or after (post, Alg. 2) the step (default: pre)")
    smp.add_argument("--corruption-std", type=nonneg_float, default=0.0,
                     help="corrupted reverse process σ >= 0 (Alg. 2; default: 0)")
    smp.add_argument("--clip-x0", type=clip_value, default="auto",
                     help="clamp x0_hat to [-v, v]: a number > 0, none (or 0) to disable, auto = 1 for image models "
                          "and none for vectors (default: auto, the demo's setting). Unclipped DPS on images "
                          "diverges (|x| ~ 1e5) and its float32 result then changes by tens with the batch size")
    smp.add_argument("--bf16", action="store_true", help="bf16 autocast while sampling")
    smp.add_argument("--cfg-scale", type=nonneg_float, default=None,
                     help="classifier-free guidance scale for a class-conditional UNet (e.g. --checkpoint "
                          "digits/unet_class --target 3 --cfg-scale 2); 1 = the conditional model (default: off)")
    smp.add_argument("--compile", action="store_true",
                     help="torch.compile the ε-model (faster steps after a one-off compilation; default: off)")
    smp.add_argument("--allow-pickle", action="store_true",
                     help="let a diffusers folder with only pickle .bin weights load (runs code from the file)")
    add_device_arg(smp)
    smp.add_argument("--quiet", action="store_true", help="no progress bar")


def add_grid_args(p: argparse.ArgumentParser, default: str) -> None:
    """``--timestep-spacing`` and ``--steps-offset`` (VPSchedule.timesteps)."""
    p.add_argument("--timestep-spacing", choices=GRID_SPACINGS, default=default, help=f"grid (default: {default}; "
                   "linspace = the TFG benchmark's space_timesteps: one step is [0])")
    p.add_argument("--steps-offset", type=int, default=0, help="diffusers' steps_offset (leading grid only)")


def print_models() -> dict[str, Any]:
    """``tagdiff models``: the shipped checkpoint names, their kinds and folders."""
    from ..models.checkpoints import SHIPPED_DEFAULTS, model_kind, shipped_models

    models = shipped_models()
    print(f"{'name':34s} {'kind':24s} path")
    for name, path in models.items():
        alias = f" (= {name}/{SHIPPED_DEFAULTS[name]})" if name in SHIPPED_DEFAULTS else ""
        print(f"{name + alias:34s} {model_kind(path):24s} {path}")
    return {name: str(path) for name, path in models.items()}


def check_model_memory(args: argparse.Namespace, sample_shape: tuple[int, ...]) -> None:
    """Refuse model sizes whose weights alone (with gradients and Adam moments) exceed this machine's memory,
    before allocating them (a 10^7-wide MLP would otherwise fill the memory for minutes before failing).

    Raises:
        ValueError: naming ``--hidden`` or ``--widths`` and the memory needed.
    """
    import os

    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if len(sample_shape) == 1:
        h, n = args.hidden, max(2, args.layers or 5)
        params, option = h * (sample_shape[0] + 64 + 1000) + h * h * (n - 2), f"--hidden {args.hidden}"
    else:
        params, option = 50 * sum(w * w for w in args.widths), f"--widths {','.join(map(str, args.widths))}"
    need = 16 * params  # fp32 weights, gradients and two Adam moments
    if need > ram:
        raise ValueError(f"out of memory: {option} needs about {need / 2**30:.0f} GiB for the weights and Adam "
                         f"state, more than this machine's {ram / 2**30:.0f} GiB; lower {option.split()[0]}")


_SIZE_OPTIONS = ("batch_size", "hidden", "num_samples", "widths", "num_per_target", "image_size")


def error_message(e: BaseException, args: argparse.Namespace | None = None) -> str | None:
    """The one-line message for an exception a command raised, or ``None`` if it is a bug (re-raise it)."""
    import torch

    from .._utils import NonFiniteError
    from ..data.streaming import MissingDependencyError
    from ..models.checkpoints import CheckpointError

    text = (str(e).splitlines() or [type(e).__name__])[0]
    low = str(e).lower()
    oom = isinstance(e, MemoryError | torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and any(
        k in low for k in ("can't allocate memory", "out of memory", "not enough memory", "allocate")))
    if oom:
        sizes = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in _SIZE_OPTIONS
                 if args is not None and getattr(args, k, None) is not None]
        sizes = [s.replace("(", "").replace(")", "").replace(", ", ",") for s in sizes]
        return (f"out of memory ({text[:120]}); lower {' or '.join(sizes) if sizes else 'the sizes you passed'}")
    if isinstance(e, ValueError | CheckpointError | NonFiniteError | FloatingPointError | MissingDependencyError):
        return text
    if isinstance(e, OSError):  # e.g. a file that cannot be written, a full disk
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        return f"{e.strerror or text}{where}"
    return None


class OnDevice:
    """A time predictor on ``device`` called with CPU tensors: inputs are moved there, logits come back."""

    def __init__(self, model: Any, device: Any):
        self.model, self.device = model, device

    def __call__(self, x: Any, c: Any = None) -> Any:
        return self.model(x.to(self.device), None if c is None else c.to(self.device)).cpu()

    def check_input(self, x: Any) -> Any:
        return self.model.check_input(x)

    def eval(self) -> OnDevice:
        self.model.eval()
        return self


def with_device(fn: Any, args: argparse.Namespace | None, *a: Any, **kw: Any) -> Any:
    """Call a bench runner, passing ``device=`` if it takes one (else it runs where it runs: the CPU)."""
    import inspect

    from .._utils import resolve_device

    device = resolve_device(getattr(args, "device", "cpu") or "cpu")
    if "device" in inspect.signature(fn).parameters:
        kw["device"] = device
    elif device.type != "cpu" and getattr(args, "device", "auto") != "auto":
        print(f"tagdiff: note: this command runs on the CPU (--device {args.device} is not supported by it yet)",
              file=sys.stderr)
    return fn(*a, **kw)


def interrupted(e: KeyboardInterrupt) -> int:
    from ..training.loop import TrainingInterrupted

    if isinstance(e, TrainingInterrupted) and e.finished:
        msg = f"interrupted after training finished; the model and its state are saved in {e.path.parent}"
    elif isinstance(e, TrainingInterrupted) and e.saved:
        msg = f"interrupted; training state at step {e.step} saved to {e.path}; rerun the same command to resume"
    elif isinstance(e, TrainingInterrupted) and e.path.exists():
        msg = f"interrupted; the training state at step {e.step} in {e.path} is kept; rerun the same command to resume"
    else:
        msg = "interrupted; nothing was saved"
    print(f"tagdiff: {msg}", file=sys.stderr)
    return 130
