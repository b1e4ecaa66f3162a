"""The ``tagdiff`` command line: train, evaluate and sample. Name registries live here only.

Other packages add commands through the ``tagdiff.commands`` entry-point group: each entry point is a function
``register(subparsers) -> {command: handler}`` that adds its sub-parsers and returns ``handler(args, argv)`` per
command. The experiments (``tagdiff bench ...``, ``tagdiff demo``) come that way from ``tagdiff_bench``
(``benchmarks/`` in the repository, installed by the README's set-up); the library knows nothing of them.

Errors in what the user passed (a bad value, a missing or corrupt checkpoint or data folder, a non-finite
gradient) print one line ``tagdiff: error: ...`` on stderr and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from .args import (
    OnDevice,
    Parser,
    add_data_args,
    add_device_arg,
    add_sample_args,
    add_train_args,
    error_message,
    interrupted,
    positive_int,
    print_models,
    unit_interval,
)
from .latent import add_vae_arg, add_vae_parser, train_vae

__all__ = ["build_parser", "main"]

Handler = Callable[[argparse.Namespace, list[str]], "dict[str, Any] | None"]


def plugin_commands(sub: Any) -> dict[str, Handler]:
    """The commands that installed packages register (entry-point group ``tagdiff.commands``)."""
    handlers: dict[str, Handler] = {}
    for ep in entry_points(group="tagdiff.commands"):
        handlers.update(ep.load()(sub))
    return handlers


def build_parser(handlers: dict[str, Handler] | None = None) -> argparse.ArgumentParser:
    """The parser of every command; ``handlers`` (if given) receives the plugin commands' handlers."""
    from .. import __version__

    parser = Parser(prog="tagdiff", description="Temporal Alignment Guidance for diffusion models.")
    parser.add_argument("--version", action="version", version=f"tagdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train an ε-model, a time predictor, a classifier or a VAE")
    tsub = train.add_subparsers(dest="what", required=True, metavar="WHAT")
    dif = tsub.add_parser("diffusion", help="ε-prediction model (MLP on vectors, UNet2DModel on images), or a "
                                            "flow-matching velocity model (--objective flow)")
    add_train_args(dif)
    dif.add_argument("--objective", choices=("eps", "flow"), default="eps",
                     help="eps: ε-prediction on the VP --schedule; flow: rectified flow, x_σ = (1 - σ) x0 + σ ε, "
                          "velocity target ε - x0 at timestep 1000σ (diffusers' FlowMatchEulerDiscreteScheduler) "
                          "(default: eps)")
    add_sigma_density_arg(dif, "σ density of --objective flow: logit_normal (SD3's, mean 0, std 1) or uniform "
                               "(default: logit_normal)")
    dif.add_argument("--class-conditional", action="store_true",
                     help="a class-conditional UNet with a 'no label' class, for --cfg-scale (CFG)")
    dif.add_argument("--cond-drop", type=unit_interval, default=0.1,
                     help="with --class-conditional: P(label dropped) in training (default 0.1)")
    add_vae_arg(dif, "a latent model on its latents (sample shape = latent shape)")
    tp = tsub.add_parser("time-predictor",
                         help="time predictor p(t | x_t) or p(t | x_t, c) (MLP, SimpleCNN or UNet encoder)")
    add_train_args(tp, dataset_default=None)
    tp.add_argument("--arch", choices=("simplecnn", "unet-encoder", "mlp"), default=None,
                    help="simplecnn: the paper's SimpleCNN (images); unet-encoder: the encoder half of a diffusers "
                         "UNet (channels --widths) + linear head (images); mlp: vector data (default: mlp for "
                         "vectors, simplecnn for images)")
    tp.add_argument("--checkpoint", default=None,
                    help="the diffusion model the predictor serves: a tagdiff or diffusers model folder, a diffusers "
                         "pipeline folder (model_index.json; a latent pipeline's vae/ encodes the images), or a "
                         "shipped name; its schedule replaces --schedule / --num-train-timesteps, and its sample "
                         "shape must match the data (--image-size / --channels default to the model's)")
    tp.add_argument("--condition", choices=("none", "class", "class_ink", "class_slant"), default="none",
                    help="c: none; class (y); class_ink / class_slant (2y + attribute above its class median; bench "
                         "multicond)")
    tp.add_argument("--cond-drop", type=unit_interval, default=0.1,
                    help="conditional: P(c = null) in training (default 0.1)")
    add_vae_arg(tp, "a predictor on its latents (with --checkpoint: the VAE of that latent model)")
    add_sigma_density_arg(tp, "with a flow-matching --checkpoint: the σ density of the training draws (default: the "
                              "one the flow model recorded, else logit_normal)")
    clf = tsub.add_parser("classifier", help="label classifier: noisy (guidance), clean (DPS) or eval (metrics)")
    add_train_args(clf)
    clf.add_argument("--kind", choices=("noisy", "clean", "eval"), required=True,
                     help="noisy: p(y|x_t,t) for classifier guidance; clean: p(y|x) for DPS; eval: independent "
                          "evaluation classifier (use another --seed and --split-seed than the guidance models)")
    clf.add_argument("--checkpoint", default=None,
                     help="--kind noisy: the diffusion model the classifier guides; its schedule replaces --schedule. "
                          "A flow-matching model gives a σ-aware classifier on its VP view x_σ / r(σ) at the σ bins, "
                          "the classifier --guidance cg on that flow needs")
    clf.add_argument("--attribute", choices=("ink", "slant"), default=None,
                     help="label = the attribute's level (above its class median), not the class (bench multicond)")
    clf.add_argument("--split-seed", type=int, default=0,
                     help="seed of the train/held-out split (digits, folder); default 0 as for the other models")
    add_vae_parser(tsub)

    ev = sub.add_parser("eval", help="evaluate a trained model")
    esub = ev.add_subparsers(dest="what", required=True, metavar="WHAT")
    etp = esub.add_parser("time-predictor", help="accuracy and |argmax - t| per timestep bucket on held-out data")
    etp.add_argument("--checkpoint", required=True,
                     help="time predictor: a folder or a shipped name, e.g. digits/time_predictor (tagdiff models)")
    add_data_args(etp)
    etp.add_argument("--num-samples", type=positive_int, default=2000, help="held-out samples (default: 2000)")
    etp.add_argument("--seed", type=int, default=12345, help="noise seed (default: 12345)")
    etp.add_argument("--out", type=Path, default=None,
                     help="write the report as JSON to this file, and a PNG figure beside it")
    add_vae_arg(etp, "the VAE of a latent time predictor")
    add_device_arg(etp)

    add_sample_args(smp := sub.add_parser("sample", help="sample from a checkpoint with optional guidance, "
                                                         "corruption and TAG"))
    add_vae_arg(smp, "the VAE of a latent --checkpoint; samples are decoded at the end")
    sub.add_parser("models", help="list the shipped models and the names --checkpoint accepts for them")
    found = plugin_commands(sub)
    if handlers is not None:
        handlers.update(found)

    return parser


def add_sigma_density_arg(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument("--sigma-density", choices=("logit_normal", "uniform"), default=None, help=text)


def _eval_time_predictor(args: argparse.Namespace) -> dict[str, Any]:
    from .._io import ensure_output_file
    from .._utils import resolve_device
    from ..models.load import load_checkpoint
    from ..models.time_predictor import TimePredictor
    from .train import time_predictor_report

    device = resolve_device(args.device)
    if args.out is not None:
        ensure_output_file(args.out)
    predictor, schedule = load_checkpoint(args.checkpoint, device)
    if not isinstance(predictor, TimePredictor):
        raise ValueError(f"--checkpoint {args.checkpoint} holds a {type(predictor).__name__}, not a time predictor "
                         "(e.g. --checkpoint digits/time_predictor or toy/time_predictor)")
    if not all(bool(p.isfinite().all()) for p in predictor.parameters()):
        raise ValueError(f"--checkpoint {args.checkpoint} has non-finite (NaN/Inf) weights")
    _defaults_from_predictor(args, predictor)
    if device.type != "cpu":  # the held-out data and the noise stay on the CPU; the network runs on the device
        predictor = OnDevice(predictor, device)
    return time_predictor_report(predictor, schedule, args, args.out, num_samples=args.num_samples, seed=args.seed)


def _defaults_from_predictor(args: argparse.Namespace, predictor: Any) -> None:
    """What the predictor recorded fills what the command left open: the VAE of a latent predictor (if its folder is
    still there), and the image size and channels of folder / hf images (the VAE's image shape, else the
    predictor's input shape)."""
    from ..models.latent import recorded_vae

    rec = recorded_vae(args.checkpoint) or {}
    if args.vae is None and rec.get("path") and Path(rec["path"]).is_dir():
        args.vae = rec["path"]
    shape = rec.get("image_shape") or tuple(getattr(predictor, "sample_shape", ()) or ())
    if args.dataset in ("folder", "hf") and len(shape) == 3:
        if args.image_size is None and shape[1] == shape[2]:
            args.image_size = int(shape[1])
        if args.channels is None and shape[0] in (1, 3):
            args.channels = int(shape[0])


def _sample(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    from .sample import SampleConfig, generate

    opt = {k: getattr(args, k) for k in ("num_samples", "sampler", "num_steps", "eta", "seed", "guidance", "target",
                                         "guidance_scale", "omega", "omega_schedule", "placement", "corruption_std",
                                         "clip_x0", "bf16", "per_sample_seeds", "compile", "cfg_scale",
                                         "device", "allow_pickle", "timestep_spacing", "steps_offset", "vae",
                                         "checkpoint", "classifier", "time_predictor", "prompt", "shift")}
    if opt["sampler"] is None:  # flow-matching checkpoints default to flow Euler, the others to DDIM
        from ..models.checkpoints import resolve_checkpoint
        from ..models.flow_checkpoint import is_flow_checkpoint

        opt["sampler"] = "euler" if is_flow_checkpoint(resolve_checkpoint(args.checkpoint)) else "ddim"
    from ..training.distributed import launch, world_size

    if args.num_processes > 1 and not args.per_sample_seeds:
        raise ValueError("--num-processes > 1 needs --per-sample-seeds (each sample its own seed)")
    if args.num_processes > 1 and world_size() == 1:  # start the sampling in N processes (each runs this command)
        return {"exit_code": launch(argv, args.num_processes)}
    summary = generate(SampleConfig(**opt), args.out, progress=not args.quiet)
    if not summary:  # a data-parallel process other than the main one
        return summary
    tg = "" if summary["time_gap"] is None else f", time gap {summary['time_gap']:.1f}"
    scale = f", guidance scale {summary['guidance_scale']:g}" if args.guidance != "none" else ""
    clip = f", clip_x0 {summary['clip_x0']}" if "clip_x0" in summary else f", {summary.get('scheduler')}"
    print(f"wrote {args.num_samples} samples to {args.out} ({summary['seconds']:.1f} s{tg}{scale}{clip})")
    return summary


def _check_out(args: argparse.Namespace) -> None:
    """Check output folders before any work (a file, or a folder that cannot be written, fails at once)."""
    from .._io import ensure_output_dir

    if args.command not in ("train", "eval", "models") and getattr(args, "out", None) is not None:
        ensure_output_dir(args.out)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        handlers: dict[str, Handler] = {}
        args = build_parser(handlers).parse_args(argv)
    except KeyboardInterrupt as e:
        return interrupted(e)
    out = getattr(args, "out", None)
    fresh_out = out is not None and not Path(out).exists()  # removed again if the run fails before writing to it
    try:
        _check_out(args)
        if args.command == "models":
            print_models()
        elif args.command == "train":
            from .train import train_command

            code = (train_vae if args.what == "vae" else train_command)(args, argv).get("exit_code", 0)
            if code:
                return code
        elif args.command == "eval":
            _eval_time_predictor(args)
        elif args.command == "sample":
            code = _sample(args, argv).get("exit_code", 0)
            if code:
                return code
        elif args.command in handlers:
            code = (handlers[args.command](args, argv) or {}).get("exit_code", 0)
            if code:
                return code
    except KeyboardInterrupt as e:
        _drop_if_empty(out, fresh_out)
        return interrupted(e)
    except Exception as e:
        _drop_if_empty(out, fresh_out)
        msg = error_message(e, args)
        if msg is None:
            raise
        print(f"tagdiff: error: {msg}", file=sys.stderr)
        return 2
    return 0


def _drop_if_empty(out: Any, fresh: bool) -> None:
    """Remove the ``--out`` folder a failed run created if it holds no file (a run that wrote something, e.g. a
    resumable training state, keeps it)."""
    import shutil

    if fresh and out is not None and Path(out).is_dir() and not any(p.is_file() for p in Path(out).rglob("*")):
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
