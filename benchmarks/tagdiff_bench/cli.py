"""The experiments' commands, added to the ``tagdiff`` command line through the ``tagdiff.commands`` entry point
(``benchmarks/pyproject.toml``): ``tagdiff bench toy|speed|label|<experiment>`` and ``tagdiff demo``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tagdiff.cli.args import (
    add_device_arg,
    add_grid_args,
    finite_float,
    int_list,
    nonneg_float,
    positive_int,
    with_device,
)

from .experiments import EXPERIMENTS, add_experiment_parsers, run_experiment
from .label import ALL_METHODS, METHODS, LabelConfig, run_label, run_label_seeds
from .speed import run_speed
from .toy import DEFAULT_OMEGA, run_toy

__all__ = ["LABEL_GRID_ARGS", "add_label_args", "register"]

# options of the label suite that map one to one onto LabelConfig fields (the grid and the benchmark's TFG / DPS)
LABEL_GRID_ARGS = ("timestep_spacing", "steps_offset", "tfg_clip_x0", "dps_tfg_scale", "dps_step_scale", "mpgd_scale",
                   "dsg_guidance_rate")


def add_label_args(p: argparse.ArgumentParser) -> None:
    d = LabelConfig()
    add_grid_args(p, d.timestep_spacing)
    p.add_argument("--tfg-clip-x0", type=nonneg_float, default=d.tfg_clip_x0,
                   help="TFG: clamp x0_hat in its loss, as the benchmark (0: off; default: 1)")
    p.add_argument("--dps-tfg-scale", type=finite_float, default=d.dps_tfg_scale,
                   help="dps_tfg: the benchmark's DPS strength (default: 1)")
    p.add_argument("--dps-step-scale", type=nonneg_float, default=d.dps_step_scale,
                   help=f"dps_step: DPS as its Alg. 1, the guidance after the clipped step (score-equivalent scale; "
                        f"default: {d.dps_step_scale:g})")
    p.add_argument("--mpgd-scale", type=nonneg_float, default=d.mpgd_scale,
                   help=f"mpgd: the x̂_0-space step size (default: {d.mpgd_scale:g})")
    p.add_argument("--dsg-guidance-rate", type=nonneg_float, default=d.dsg_guidance_rate,
                   help=f"dsg: the guidance rate in [0, 1] (default: {d.dsg_guidance_rate:g})")
    p.add_argument("--out", required=True, type=Path, help="output folder for results.json and label.png")
    p.add_argument("--dataset", choices=("digits", "mnist"), default="digits")
    p.add_argument("--data-dir", type=Path, default=None, help="mnist: folder of the IDX files")
    p.add_argument("--models-dir", type=Path, default=None,
                   help="folder with unet/, time_predictor/, clf_noisy/, clf_clean/, clf_eval/ (default: the shipped "
                        "assets/<dataset>)")
    p.add_argument("--checkpoints", dest="models_dir", type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--targets", type=int_list, default=d.targets, help="target classes, e.g. 0,3,7 or 'all'")
    p.add_argument("--num-per-target", type=positive_int, default=d.num_per_target)
    p.add_argument("--num-steps", type=positive_int, default=d.num_steps, help="DDIM steps")
    p.add_argument("--eta", type=nonneg_float, default=d.eta, help="DDIM η (default 1, as the TFG benchmark)")
    p.add_argument("--dps-guidance-scale", type=nonneg_float, default=d.dps_guidance_scale,
                   help=f"DPS's guidance scale (default: {d.dps_guidance_scale:g})")
    p.add_argument("--cg-guidance-scale", type=nonneg_float, default=d.cg_guidance_scale,
                   help=f"classifier guidance's scale (default: {d.cg_guidance_scale:g})")
    for old, dest in (("--dps-scale", "dps_guidance_scale"), ("--cg-scale", "cg_guidance_scale")):  # former names
        p.add_argument(old, dest=dest, type=nonneg_float, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--omega", type=nonneg_float, default=d.omega, help="TAG ω_0 (>= 0)")
    p.add_argument("--placement", choices=("pre", "post"), default=d.placement)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--seeds", type=lambda v: int_list(v, "seeds"), default=None,
                   help="several seeds, e.g. 0,1,2: mean ± std in OUT/results.json, each seed in OUT/seed_<s>/")
    p.add_argument("--methods", default=None, help="comma-separated, or 'all' (DPS/TFG, TAG and the baselines); "
                   "default: unguided,dps,dps+tag,cg,cg+tag")
    p.add_argument("--no-resume", action="store_true", help="recompute runs already cached in OUT/runs")
    add_device_arg(p)
    p.add_argument("--quiet", action="store_true")


def register(sub: Any) -> dict[str, Any]:
    """Add ``bench`` and ``demo`` to the ``tagdiff`` sub-parsers; return their handlers."""
    bench = sub.add_parser("bench", help="reproduce an experiment of the paper")
    bsub = bench.add_subparsers(dest="what", required=True, metavar="WHAT")
    toy = bsub.add_parser("toy", help="two-Gaussian toy with external drift, W1 with/without TAG "
                                           "(docs/notation.md §6.1)")
    toy.add_argument("--out", required=True, type=Path, help="output folder for results.json and toy.png")
    toy.add_argument("--num-samples", type=positive_int, default=10_000, help="samples per run (default: 10000)")
    toy.add_argument("--num-steps", type=positive_int, default=100, help="DDPM steps (default: 100)")
    toy.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    toy.add_argument("--omega", type=nonneg_float, default=None, help="TAG strength ω_0 (default: the toy's default)")
    toy.add_argument("--checkpoint", "--score-checkpoint", dest="score_checkpoint", type=Path, default=None,
                     help="the toy ε-model, as in `tagdiff sample` (default: the shipped toy/score)")
    toy.add_argument("--time-predictor", "--predictor-checkpoint", dest="predictor_checkpoint", type=Path,
                     default=None, help="the toy time predictor (default: the shipped toy/time_predictor)")
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
    return {"bench": _bench, "demo": _bench_label}


def _bench(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    if args.what == "toy":
        return _bench_toy(args.out, args)
    if args.what == "speed":
        return _bench_speed(args)
    if args.what in {e.name for e in EXPERIMENTS}:
        return run_experiment(args)
    return _bench_label(args)


def _bench_toy(out: Path, args: argparse.Namespace | None = None) -> dict[str, Any]:
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


def _bench_speed(args: argparse.Namespace) -> dict[str, Any]:
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


def _bench_label(args: argparse.Namespace, argv: list[str] | None = None) -> dict[str, Any]:
    if args.command == "demo":  # the demo's published numbers (README, RESULTS §2) ran on the trailing grid
        cfg = LabelConfig(device=args.device, timestep_spacing="trailing", tfg_clip_x0=0.0)
    else:
        cfg = LabelConfig(dataset=args.dataset, targets=args.targets, num_per_target=args.num_per_target,
                          num_steps=args.num_steps, eta=args.eta, dps_guidance_scale=args.dps_guidance_scale,
                          cg_guidance_scale=args.cg_guidance_scale,
                          omega=args.omega, placement=args.placement, seed=args.seed, device=args.device,
                          **{k: getattr(args, k) for k in LABEL_GRID_ARGS},
                          data_dir=None if args.data_dir is None else str(args.data_dir),
                          models_dir=None if args.models_dir is None else str(args.models_dir))

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
