"""The ``tagdiff`` command line: train, evaluate, sample and benchmark. Name registries live here only.

Errors in what the user passed (a bad value, a missing or corrupt checkpoint or data folder, a non-finite
gradient) print one line ``tagdiff: error: ...`` on stderr and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .bench.experiments import EXPERIMENTS, add_experiment_parsers, run_experiment
from .cli_args import (
    LABEL_GRID_ARGS,
    OnDevice,
    Parser,
    add_data_args,
    add_device_arg,
    add_label_args,
    add_sample_args,
    add_train_args,
    error_message,
    finite_float,
    interrupted,
    positive_int,
    print_models,
    unit_interval,
    with_device,
)
from .cli_latent import add_vae_arg, add_vae_parser, train_vae

__all__ = ["build_parser", "main"]

def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = Parser(prog="tagdiff", description="Temporal Alignment Guidance for diffusion models.")
    parser.add_argument("--version", action="version", version=f"tagdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train an ε-model or a time predictor")
    tsub = train.add_subparsers(dest="what", required=True, metavar="WHAT")
    dif = tsub.add_parser("diffusion", help="ε-prediction model (MLP on vectors, UNet2DModel on images)")
    add_train_args(dif)
    dif.add_argument("--class-conditional", action="store_true",
                     help="a class-conditional UNet with a 'no label' class, for --cfg-scale (CFG)")
    dif.add_argument("--cond-drop", type=unit_interval, default=0.1,
                     help="with --class-conditional: P(label dropped) in training (default 0.1)")
    add_vae_arg(dif, "a latent model on its latents (sample shape = latent shape)")
    tp = tsub.add_parser("time-predictor",
                         help="time predictor p(t | x_t) or p(t | x_t, c) (MLP, SimpleCNN or UNet encoder)")
    add_train_args(tp)
    tp.add_argument("--arch", choices=("simplecnn", "unet-encoder", "mlp"), default=None,
                    help="simplecnn: the paper's SimpleCNN (images); unet-encoder: the encoder half of a diffusers "
                         "UNet (channels --widths) + linear head (images); mlp: vector data (default: mlp for "
                         "vectors, simplecnn for images)")
    tp.add_argument("--checkpoint", default=None,
                    help="the diffusion model the predictor serves (folder or shipped name): its schedule replaces "
                         "--schedule / --num-train-timesteps, and its sample shape must match the data")
    tp.add_argument("--condition", choices=("none", "class", "class_ink", "class_slant"), default="none",
                    help="c: none; class (y); class_ink / class_slant (2y + attribute above its class median; bench "
                         "multicond)")
    tp.add_argument("--cond-drop", type=unit_interval, default=0.1,
                    help="conditional: P(c = null) in training (default 0.1)")
    add_vae_arg(tp, "a predictor on its latents (with --checkpoint: the VAE of that latent model)")
    clf = tsub.add_parser("classifier", help="label classifier: noisy (guidance), clean (DPS) or eval (metrics)")
    add_train_args(clf)
    clf.add_argument("--kind", choices=("noisy", "clean", "eval"), required=True,
                     help="noisy: p(y|x_t,t) for classifier guidance; clean: p(y|x) for DPS; eval: independent "
                          "evaluation classifier (use another --seed and --split-seed than the guidance models)")
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

    bench = sub.add_parser("bench", help="reproduce an experiment of the paper")
    bsub = bench.add_subparsers(dest="what", required=True, metavar="WHAT")
    toy = bsub.add_parser("toy", help="two-Gaussian toy with external drift, W1 with/without TAG (TAG.md §9.1)")
    toy.add_argument("--out", required=True, type=Path, help="output folder for results.json and toy.png")
    toy.add_argument("--num-samples", type=positive_int, default=10_000, help="samples per run (default: 10000)")
    toy.add_argument("--num-steps", type=positive_int, default=100, help="DDPM steps (default: 100)")
    toy.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    toy.add_argument("--omega", type=finite_float, default=None, help="TAG strength ω_0 (default: the toy's default)")
    toy.add_argument("--score-checkpoint", type=Path, default=None, help="default: the shipped toy score model")
    toy.add_argument("--predictor-checkpoint", type=Path, default=None, help="default: the shipped toy predictor")
    add_device_arg(toy)
    toy.add_argument("--quiet", action="store_true")

    speed = bsub.add_parser("speed", help="seconds per sampling step with/without CG, DPS and TAG; training images/s")
    speed.add_argument("--out", required=True, type=Path)
    speed.add_argument("--datasets", default="digits,mnist", help="comma-separated (default: digits,mnist)")
    speed.add_argument("--batch-size", type=positive_int, default=256)
    speed.add_argument("--num-steps", type=positive_int, default=5, help="timed steps per configuration")
    add_device_arg(speed)
    speed.add_argument("--quiet", action="store_true")

    add_experiment_parsers(bsub)

    label = bsub.add_parser("label", help="label guidance: unguided / DPS / DPS+TAG / CG / CG+TAG (Table 2 analogue)")
    add_label_args(label)

    demo = sub.add_parser("demo", help="the main job: label guidance with and without TAG on the bundled digits")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default: runs/demo)")
    add_device_arg(demo)
    demo.add_argument("--quiet", action="store_true")
    return parser


def _eval_time_predictor(args: argparse.Namespace) -> dict[str, Any]:
    from ._utils import ensure_output_file, resolve_device
    from .cli_train import time_predictor_report
    from .recipes import load_checkpoint
    from .time_predictor import TimePredictor

    device = resolve_device(args.device)
    if args.out is not None:
        ensure_output_file(args.out)
    predictor, schedule = load_checkpoint(args.checkpoint, device)
    if not isinstance(predictor, TimePredictor):
        raise ValueError(f"--checkpoint {args.checkpoint} holds a {type(predictor).__name__}, not a time predictor "
                         "(e.g. --checkpoint digits/time_predictor or toy/time_predictor)")
    if not all(bool(p.isfinite().all()) for p in predictor.parameters()):
        raise ValueError(f"--checkpoint {args.checkpoint} has non-finite (NaN/Inf) weights")
    if device.type != "cpu":  # the held-out data and the noise stay on the CPU; the network runs on the device
        predictor = OnDevice(predictor, device)
    return time_predictor_report(predictor, schedule, args, args.out, num_samples=args.num_samples, seed=args.seed)


def _bench_toy(out: Path, args: argparse.Namespace | None = None) -> dict[str, Any]:
    from .bench.toy import DEFAULT_OMEGA, run_toy

    kw: dict[str, Any] = {}
    if args is not None:
        kw = {"num_samples": args.num_samples, "num_steps": args.num_steps, "seed": args.seed,
              "omega": DEFAULT_OMEGA if args.omega is None else args.omega,
              "score_checkpoint": args.score_checkpoint, "predictor_checkpoint": args.predictor_checkpoint,
              "progress": not args.quiet}
    res = with_device(run_toy, args, out, **kw)
    print(f"\n{'run':20s} {'W1 (learned score)':>19s} {'W1 (exact score)':>17s} {'time gap':>9s}")
    for run in res["w1"]:
        print(f"{run:20s} {res['w1'][run]:19.3f} {res['w1_exact_score'][run]:17.3f} {res['time_gap'][run]:9.1f}")
    p = res["predictor"]
    print(f"\npredictor cross-entropy: learned {p['cross_entropy_learned']:.3f} vs exact {p['cross_entropy_exact']:.3f}"
          f" nats; TLS cosine(learned, exact) along trajectories: {p['tls_cosine_mean']:.3f}")
    print(f"wrote {out / 'results.json'} and {out / 'toy.png'} ({res['seconds']:.0f} s)")
    return res


def _sample(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    from .generate import SampleConfig, generate

    opt = {k: getattr(args, k) for k in ("num_samples", "sampler", "num_steps", "eta", "seed", "guidance", "target",
                                         "guidance_scale", "omega", "omega_schedule", "placement", "corruption_std",
                                         "clip_x0", "bf16", "per_sample_seeds", "compile", "cfg_scale",
                                         "device", "allow_pickle", "timestep_spacing", "steps_offset", "vae",
                                         "checkpoint", "classifier", "time_predictor")}
    from .distributed import launch, world_size

    if args.num_processes > 1 and not args.per_sample_seeds:
        raise ValueError("--num-processes > 1 needs --per-sample-seeds (each sample its own seed)")
    if args.num_processes > 1 and world_size() == 1:  # start the sampling in N processes (each runs this command)
        return {"exit_code": launch(argv, args.num_processes)}
    summary = generate(SampleConfig(**opt), args.out, progress=not args.quiet)
    if not summary:  # a data-parallel process other than the main one
        return summary
    tg = "" if summary["time_gap"] is None else f", time gap {summary['time_gap']:.1f}"
    scale = f", guidance scale {summary['guidance_scale']:g}" if args.guidance != "none" else ""
    print(f"wrote {args.num_samples} samples to {args.out} ({summary['seconds']:.1f} s{tg}{scale}, "
          f"clip_x0 {summary['clip_x0']})")
    return summary


def _bench_speed(args: argparse.Namespace) -> dict[str, Any]:
    from .bench.speed import run_speed

    names = tuple(d for d in args.datasets.split(",") if d)
    bad = [d for d in names if d not in ("digits", "mnist")]
    if bad:
        raise ValueError(f"bench speed supports the image datasets digits and mnist, got {bad}")
    res = with_device(run_speed, args, args.out, datasets=names, batch_size=args.batch_size,
                       num_steps=args.num_steps, progress=not args.quiet)
    print(f"\n{'dataset':8s} {'config':12s} {'ms/step':>9s} {'TAG overhead':>13s}")
    for name, per in res["seconds_per_step"].items():
        for config, sec in per.items():
            base = config.replace("+tag", "")
            over = f"{res['tag_overhead'][name][base]:+.1%}" if config.endswith("+tag") else ""
            print(f"{name:8s} {config:12s} {sec * 1e3:9.1f} {over:>13s}")
        tput = res["time_predictor_train_images_per_s"][name]
        print(f"{name:8s} time-predictor training: {tput['fp32']:.0f} images/s fp32, {tput['bf16']:.0f} bf16")
        ov = res["overheads"][name]
        loops = ", ".join(f"{k.replace('Scheduler', '')} {v:.3f}x" for k, v in ov["loop_vs_diffusers"].items())
        print(f"{name:8s} tagdiff loop / plain diffusers loop (no terms): {loops}")
        print(f"{name:8s} DPS+TAG step with the Time-Gap recorder / (DPS step + one predictor forward+backward): "
              f"{ov['tag_vs_floor']:.3f}x ({ov['tag_vs_floor_without_sharing']:.3f}x without sharing the logits)")
    print(f"wrote {args.out / 'results.json'}")
    return res


def _bench_label(args: argparse.Namespace) -> dict[str, Any]:
    from .bench.label import ALL_METHODS, METHODS, LabelConfig, run_label, run_label_seeds

    if args.command == "demo":  # the demo's published numbers (README, RESULTS §2) ran on the trailing grid
        cfg = LabelConfig(device=args.device, timestep_spacing="trailing", tfg_clip_x0=0.0)
    else:
        cfg = LabelConfig(dataset=args.dataset, targets=args.targets, num_per_target=args.num_per_target,
                          num_steps=args.num_steps, eta=args.eta, dps_scale=args.dps_scale, cg_scale=args.cg_scale,
                          omega=args.omega, placement=args.placement, seed=args.seed, device=args.device,
                          **{k: getattr(args, k) for k in LABEL_GRID_ARGS},
                          data_dir=None if args.data_dir is None else str(args.data_dir),
                          checkpoints=None if args.checkpoints is None else str(args.checkpoints))

    methods = METHODS if args.command == "demo" or not args.methods else (
        ALL_METHODS if args.methods == "all" else tuple(args.methods.split(",")))
    if args.command == "bench" and args.seeds:
        res = run_label_seeds(args.out, cfg, args.seeds, methods=methods, progress=not args.quiet,
                              resume=not args.no_resume)
        print("\n" + (args.out / "table.md").read_text())
        return res
    res = run_label(args.out, cfg, progress=not args.quiet, methods=methods, resume=not getattr(args, "no_resume", 0))
    print(f"\n{'method':10s} {'FID':>8s} {'accuracy':>9s} {'time gap':>9s} {'seconds':>8s}")
    for method, m in res["methods"].items():
        print(f"{method:10s} {m['fid']:8.2f} {m['accuracy']:9.3f} {m['time_gap']:9.1f} {m['seconds']:8.1f}")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'label.png'} ({res['seconds']:.0f} s)")
    return res


def _check_out(args: argparse.Namespace) -> None:
    """Check output folders before any work (a file, or a folder that cannot be written, fails at once)."""
    from ._utils import ensure_output_dir

    if args.command in ("sample", "bench", "demo") and getattr(args, "out", None) is not None:
        ensure_output_dir(args.out)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt as e:
        return interrupted(e)
    try:
        _check_out(args)
        if args.command == "models":
            print_models()
        elif args.command == "train":
            from .cli_train import train_command

            code = (train_vae if args.what == "vae" else train_command)(args, argv).get("exit_code", 0)
            if code:
                return code
        elif args.command == "eval":
            _eval_time_predictor(args)
        elif args.command == "sample":
            code = _sample(args, argv).get("exit_code", 0)
            if code:
                return code
        elif args.command == "bench" and args.what == "toy":
            _bench_toy(args.out, args)
        elif args.command == "bench" and args.what == "speed":
            _bench_speed(args)
        elif args.command == "bench" and args.what in EXPERIMENTS:
            run_experiment(args)
        elif args.command in ("bench", "demo"):
            _bench_label(args)
    except KeyboardInterrupt as e:
        return interrupted(e)
    except Exception as e:
        msg = error_message(e, args)
        if msg is None:
            raise
        print(f"tagdiff: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
