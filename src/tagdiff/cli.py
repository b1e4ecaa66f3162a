"""The ``tagdiff`` command line: train, evaluate, sample and benchmark. Name registries live here only.

Errors in what the user passed (a bad value, a missing or corrupt checkpoint or data folder, a non-finite
gradient) print one line ``tagdiff: error: ...`` on stderr and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from .bench.experiments import EXPERIMENTS, add_experiment_parsers, run_experiment
from .schedules import GRID_SPACINGS

__all__ = ["build_parser", "main"]

DATASETS = ("toy", "digits", "mnist", "folder")


class _Parser(argparse.ArgumentParser):
    """argparse parser whose usage errors are one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _int_tuple(s: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 32,64,64, got {s!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return out


def _add_data_args(p: argparse.ArgumentParser, default: str = "toy") -> None:
    p.add_argument("--dataset", choices=DATASETS, default=default, help=f"data set (default: {default})")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="mnist: folder of the IDX files; folder: image folder or .npz file")
    p.add_argument("--image-size", type=_positive_int, default=None, help="resize images to this size")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None, help="1 (grey) or 3 (RGB)")
    p.add_argument("--download", action="store_true", help="mnist: download missing files into --data-dir")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    _add_data_args(p)
    p.add_argument("--out", required=True, type=Path, help="output folder (checkpoint, training state, history)")
    p.add_argument("--steps", type=_positive_int, default=None, help="optimisation steps (default: per recipe)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="batch size (default: per recipe)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: per recipe)")
    p.add_argument("--seed", type=int, default=0, help="seed of batches, timesteps and noise (default: 0)")
    p.add_argument("--hidden", type=_positive_int, default=256, help="MLP width, vector data (default: 256)")
    p.add_argument("--layers", type=_positive_int, default=None, help="MLP linear layers (default: 3 / 5)")
    p.add_argument("--widths", type=_int_tuple, default=(32, 64, 64), help="UNet channels (default: 32,64,64)")
    p.add_argument("--num-train-timesteps", type=_positive_int, default=1000, help="T (default: 1000)")
    p.add_argument("--schedule", default="linear", help="noise schedule: linear | cosine (default: linear)")
    p.add_argument("--save-every", type=_positive_int, default=1000, help="steps between resumable checkpoints")
    p.add_argument("--ema-decay", type=float, default=None, help="EMA decay of the weights (default: per recipe)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (about 1.8x faster on CPU; default: fp32)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if --out holds a training state")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tagdiff", description="Temporal Alignment Guidance for diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train an ε-model or a time predictor")
    tsub = train.add_subparsers(dest="what", required=True, metavar="WHAT")
    _add_train_args(tsub.add_parser("diffusion", help="ε-prediction model (MLP on vectors, UNet2DModel on images)"))
    tp = tsub.add_parser("time-predictor", help="time predictor p(t | x_t) or p(t | x_t, c) (MLP or SimpleCNN)")
    _add_train_args(tp)
    tp.add_argument("--condition", choices=("none", "class", "class_ink", "class_slant"), default="none",
                    help="c: none; class (y); class_ink / class_slant (2y + attribute above its class median; bench "
                         "multicond)")
    tp.add_argument("--cond-drop", type=float, default=0.1, help="conditional: P(c = null) in training (default 0.1)")
    clf = tsub.add_parser("classifier", help="label classifier: noisy (guidance), clean (DPS) or eval (metrics)")
    _add_train_args(clf)
    clf.add_argument("--kind", choices=("noisy", "clean", "eval"), required=True,
                     help="noisy: p(y|x_t,t) for classifier guidance; clean: p(y|x) for DPS; eval: independent "
                          "evaluation classifier (use another --seed and --split-seed than the guidance models)")
    clf.add_argument("--attribute", choices=("ink", "slant"), default=None,
                     help="label = the attribute's level (above its class median), not the class (bench multicond)")
    clf.add_argument("--split-seed", type=int, default=0,
                     help="seed of the train/held-out split (digits, folder); default 0 as for the other models")

    ev = sub.add_parser("eval", help="evaluate a trained model")
    esub = ev.add_subparsers(dest="what", required=True, metavar="WHAT")
    etp = esub.add_parser("time-predictor", help="accuracy and |argmax - t| per timestep bucket on held-out data")
    etp.add_argument("--checkpoint", required=True, type=Path, help="time-predictor checkpoint folder")
    _add_data_args(etp)
    etp.add_argument("--num-samples", type=_positive_int, default=2000, help="held-out samples (default: 2000)")
    etp.add_argument("--seed", type=int, default=12345, help="noise seed (default: 12345)")
    etp.add_argument("--out", type=Path, default=None,
                     help="write the report as JSON here, and a PNG figure beside it")

    smp = sub.add_parser("sample", help="sample from a checkpoint with optional guidance, corruption and TAG")
    smp.add_argument("--checkpoint", required=True, type=Path, help="ε-model folder (tagdiff MLP or diffusers UNet)")
    smp.add_argument("--out", required=True, type=Path, help="output folder (samples.npz, grid.png, summary.json)")
    smp.add_argument("--num-samples", type=_positive_int, default=64)
    smp.add_argument("--sampler", default="ddim", help="ddim | ddpm (default: ddim)")
    smp.add_argument("--num-steps", type=_positive_int, default=50)
    _add_grid_args(smp, "trailing")
    smp.add_argument("--eta", type=float, default=1.0, help="DDIM η (default: 1)")
    smp.add_argument("--seed", type=int, default=0)
    smp.add_argument("--per-sample-seeds", action="store_true", help="sample i uses seed+i (batch independent)")
    smp.add_argument("--guidance", choices=("none", "cg", "dps"), default="none")
    smp.add_argument("--classifier", type=Path, default=None, help="cg: noisy classifier; dps: clean classifier")
    smp.add_argument("--target", type=int, default=None, help="target class for --guidance")
    smp.add_argument("--guidance-scale", type=float, default=1.0)
    smp.add_argument("--time-predictor", type=Path, default=None, help="records the Time Gap; with --omega: TAG")
    smp.add_argument("--omega", type=float, default=0.0, help="TAG ω_0 (default 0: off)")
    smp.add_argument("--omega-schedule", choices=("one_minus_alpha_bar", "constant", "sqrt_one_minus_alpha_bar"),
                     default="one_minus_alpha_bar")
    smp.add_argument("--placement", choices=("pre", "post"), default="pre")
    smp.add_argument("--corruption-std", type=float, default=0.0, help="corrupted reverse process σ (Alg. 2)")
    smp.add_argument("--clip-x0", type=float, default=None, help="clamp x0_hat (images: 1)")
    smp.add_argument("--bf16", action="store_true", help="bf16 autocast while sampling")
    smp.add_argument("--quiet", action="store_true")

    bench = sub.add_parser("bench", help="reproduce an experiment of the paper")
    bsub = bench.add_subparsers(dest="what", required=True, metavar="WHAT")
    toy = bsub.add_parser("toy", help="two-Gaussian toy with external drift, W1 with/without TAG (TAG.md §9.1)")
    toy.add_argument("--out", required=True, type=Path, help="output folder for results.json and toy.png")
    toy.add_argument("--num-samples", type=_positive_int, default=10_000, help="samples per run (default: 10000)")
    toy.add_argument("--num-steps", type=_positive_int, default=100, help="DDPM steps (default: 100)")
    toy.add_argument("--seed", type=int, default=0)
    toy.add_argument("--omega", type=float, default=None, help="TAG strength ω_0 (default: the toy's default)")
    toy.add_argument("--score-checkpoint", type=Path, default=None, help="default: the shipped toy score model")
    toy.add_argument("--predictor-checkpoint", type=Path, default=None, help="default: the shipped toy predictor")
    toy.add_argument("--quiet", action="store_true")

    speed = bsub.add_parser("speed", help="seconds per sampling step with/without CG, DPS and TAG; training images/s")
    speed.add_argument("--out", required=True, type=Path)
    speed.add_argument("--datasets", default="digits,mnist", help="comma-separated (default: digits,mnist)")
    speed.add_argument("--batch-size", type=_positive_int, default=256)
    speed.add_argument("--num-steps", type=_positive_int, default=5, help="timed steps per configuration")
    speed.add_argument("--quiet", action="store_true")

    add_experiment_parsers(bsub)

    label = bsub.add_parser("label", help="label guidance: unguided / DPS / DPS+TAG / CG / CG+TAG (Table 2 analogue)")
    _add_label_args(label)

    demo = sub.add_parser("demo", help="the main job: label guidance with and without TAG on the bundled digits")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default: runs/demo)")
    demo.add_argument("--quiet", action="store_true")
    return parser


_LABEL_GRID_ARGS = ("timestep_spacing", "steps_offset", "tfg_clip_x0", "dps_tfg_scale")


def _add_grid_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--timestep-spacing", choices=GRID_SPACINGS, default=default, help=f"grid (default: {default}; "
                   "linspace = the TFG benchmark's space_timesteps: one step is [0])")
    p.add_argument("--steps-offset", type=int, default=0, help="diffusers' steps_offset (leading grid only)")


def _add_label_args(p: argparse.ArgumentParser) -> None:
    from .bench.label import LabelConfig

    d = LabelConfig()
    _add_grid_args(p, d.timestep_spacing)
    p.add_argument("--tfg-clip-x0", type=float, default=d.tfg_clip_x0, help="TFG: clamp x0_hat in the loss (0: off)")
    p.add_argument("--dps-tfg-scale", type=float, default=d.dps_tfg_scale, help="dps_tfg: the benchmark's strength")
    p.add_argument("--out", required=True, type=Path, help="output folder for results.json and label.png")
    p.add_argument("--dataset", choices=("digits", "mnist"), default="digits")
    p.add_argument("--data-dir", type=Path, default=None, help="mnist: folder of the IDX files")
    p.add_argument("--checkpoints", type=Path, default=None,
                   help="folder with unet/, time_predictor/, clf_noisy/, clf_clean/, clf_eval/ (default: shipped)")
    p.add_argument("--targets", type=_int_list, default=d.targets, help="target classes, e.g. 0,3,7 or 'all'")
    p.add_argument("--num-per-target", type=_positive_int, default=d.num_per_target)
    p.add_argument("--num-steps", type=_positive_int, default=d.num_steps, help="DDIM steps")
    p.add_argument("--eta", type=float, default=d.eta, help="DDIM η (default 1, as the TFG benchmark)")
    p.add_argument("--dps-scale", type=float, default=d.dps_scale)
    p.add_argument("--cg-scale", type=float, default=d.cg_scale)
    p.add_argument("--omega", type=float, default=d.omega, help="TAG ω_0")
    p.add_argument("--placement", choices=("pre", "post"), default=d.placement)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--seeds", type=lambda v: _int_list(v, "seeds"), default=None,
                   help="several seeds, e.g. 0,1,2: mean ± std in OUT/results.json, each seed in OUT/seed_<s>/")
    p.add_argument("--methods", default=None, help="comma-separated, or 'all' (DPS/TFG, TAG and the baselines); "
                   "default: unguided,dps,dps+tag,cg,cg+tag")
    p.add_argument("--no-resume", action="store_true", help="with --seeds: recompute seeds already in OUT")
    p.add_argument("--quiet", action="store_true")


def _int_list(s: str, what: str = "class indices") -> tuple[int, ...]:
    if s == "all" and what == "class indices":
        return tuple(range(10))
    try:
        return tuple(int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {s!r}") from None


def _load_data(args: argparse.Namespace, split: str, **kw: Any) -> tuple[Any, Any, Any]:
    from .data import dataset_info, load_dataset

    opts = {"data_dir": args.data_dir, "image_size": args.image_size, "channels": args.channels}
    if getattr(args, "split_seed", None) is not None and args.dataset != "mnist":
        kw["split_seed"] = args.split_seed
    info = dataset_info(args.dataset, **opts)
    x, y = load_dataset(args.dataset, split, download=args.download, **opts, **kw)
    return x, y, info


def _train(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    from . import recipes as rc
    from .schedules import VPSchedule
    from .training import TrainConfig, eps_loss, time_loss, train

    schedule = VPSchedule.from_name(args.schedule, args.num_train_timesteps)
    data, labels, info = _load_data(args, "train", seed=args.seed)
    T = args.num_train_timesteps
    key, cond, meta = args.what, (labels if args.what == "classifier" else None), {}
    if args.what == "classifier":
        if args.attribute:
            cond, info, meta = rc.attribute_labels(args.attribute, data, labels, info)
        model, loss = rc.make_classifier(args.kind, info, T)
        key = f"classifier-{args.kind}"
    elif args.what == "diffusion":
        model = rc.make_eps_model(info, T, hidden=args.hidden, layers=args.layers or 3, widths=args.widths)
        loss = eps_loss
    else:
        cond, meta = rc.condition_labels(args.condition, data, labels, info)
        model, loss = rc.make_time_predictor(info, T, hidden=args.hidden, layers=args.layers or 5,
                                             num_classes=meta["num_conditions"]), time_loss
    recipe = rc.recipe_for(key, info)
    config = TrainConfig(steps=args.steps or recipe.steps, batch_size=args.batch_size or recipe.batch_size,
                         lr=args.lr or recipe.lr, seed=args.seed, save_every=args.save_every,
                         ema_decay=args.ema_decay if args.ema_decay is not None else recipe.ema_decay, bf16=args.bf16,
                         cond_drop=args.cond_drop if meta.get("num_conditions") else 0.0)
    command = "tagdiff " + " ".join(shlex.quote(a) for a in argv)
    result = train(model, loss, data, schedule, config, args.out, resume=not args.no_resume, progress=not args.quiet,
                   labels=cond, export_extra={"dataset": args.dataset, "command": command, **meta},
                   export=rc.exporter(model, schedule))
    print(f"saved {args.what} to {args.out} (final loss {result['final_loss']:.4f}, {result['seconds']:.0f} s)")
    if args.what == "classifier":
        result["held_out"] = _classifier_report(model, args, meta)
    elif args.what == "time-predictor":
        result["held_out"] = _time_predictor_report(model, schedule, args, args.out / "report.json")
        if meta.get("num_conditions"):  # with the true and with the null condition, on the whole held-out split
            hx, hy, _ = _load_data(args, "held_out")
            result["held_out_conditional"] = rc.conditional_report(model, schedule, args.condition, meta, hx, hy,
                                                                   info, args.out / "report_conditional.json")
    return result


def _time_predictor_report(predictor: Any, schedule: Any, args: argparse.Namespace, out: Path | None,
                           num_samples: int = 500, seed: int = 12345) -> dict[str, Any]:
    """Evaluate on held-out, forward-noised data; print per-bucket table; write ``out`` (JSON) and a PNG beside."""
    from .recipes import time_predictor_report

    split = "train" if args.dataset == "toy" else "held_out"  # toy: fresh draws (another seed) are held out
    held_out, _, _ = _load_data(args, split, seed=seed, num_samples=num_samples)
    return time_predictor_report(predictor, schedule, held_out, out, f"{args.dataset} time predictor", seed)


def _classifier_report(model: Any, args: argparse.Namespace, meta: dict[str, Any]) -> dict[str, Any]:
    """Held-out accuracy (attribute classifiers: against the held-out levels with the training split's medians)."""
    import torch

    from .recipes import attribute_labels, classifier_report

    x, y, info = _load_data(args, "held_out")
    if args.attribute:
        medians = torch.tensor(meta[f"{args.attribute}_medians"], dtype=torch.float64)
        y = attribute_labels(args.attribute, x, y, info, medians)[0]
    return classifier_report(model, args.kind, x, y, args.out)


def _eval_time_predictor(args: argparse.Namespace) -> dict[str, Any]:
    from .recipes import load_checkpoint

    predictor, schedule = load_checkpoint(args.checkpoint)
    return _time_predictor_report(predictor, schedule, args, args.out, num_samples=args.num_samples, seed=args.seed)


def _bench_toy(out: Path, args: argparse.Namespace | None = None) -> dict[str, Any]:
    from .bench.toy import DEFAULT_OMEGA, run_toy

    kw: dict[str, Any] = {}
    if args is not None:
        kw = {"num_samples": args.num_samples, "num_steps": args.num_steps, "seed": args.seed,
              "omega": DEFAULT_OMEGA if args.omega is None else args.omega,
              "score_checkpoint": args.score_checkpoint, "predictor_checkpoint": args.predictor_checkpoint,
              "progress": not args.quiet}
    res = run_toy(out, **kw)
    print(f"\n{'run':20s} {'W1 (learned score)':>19s} {'W1 (exact score)':>17s} {'time gap':>9s}")
    for run in res["w1"]:
        print(f"{run:20s} {res['w1'][run]:19.3f} {res['w1_exact_score'][run]:17.3f} {res['time_gap'][run]:9.1f}")
    p = res["predictor"]
    print(f"\npredictor cross-entropy: learned {p['cross_entropy_learned']:.3f} vs exact {p['cross_entropy_exact']:.3f}"
          f" nats; TLS cosine(learned, exact) along trajectories: {p['tls_cosine_mean']:.3f}")
    print(f"wrote {out / 'results.json'} and {out / 'toy.png'} ({res['seconds']:.0f} s)")
    return res


def _sample(args: argparse.Namespace) -> dict[str, Any]:
    from .generate import SampleConfig, generate

    opt = {k: getattr(args, k) for k in ("num_samples", "sampler", "num_steps", "eta", "seed", "guidance", "target",
                                         "guidance_scale", "omega", "omega_schedule", "placement", "corruption_std",
                                         "clip_x0", "bf16", "per_sample_seeds", "timestep_spacing", "steps_offset")}
    cfg = SampleConfig(checkpoint=str(args.checkpoint), classifier=None if args.classifier is None else
                       str(args.classifier), time_predictor=None if args.time_predictor is None else
                       str(args.time_predictor), **opt)
    summary = generate(cfg, args.out, progress=not args.quiet)
    tg = "" if summary["time_gap"] is None else f", time gap {summary['time_gap']:.1f}"
    print(f"wrote {cfg.num_samples} samples to {args.out} ({summary['seconds']:.1f} s{tg})")
    return summary


def _bench_speed(args: argparse.Namespace) -> dict[str, Any]:
    from .bench.speed import run_speed

    names = tuple(d for d in args.datasets.split(",") if d)
    bad = [d for d in names if d not in ("digits", "mnist")]
    if bad:
        raise ValueError(f"bench speed supports the image datasets digits and mnist, got {bad}")
    res = run_speed(args.out, datasets=names, batch_size=args.batch_size, num_steps=args.num_steps,
                    progress=not args.quiet)
    print(f"\n{'dataset':8s} {'config':12s} {'ms/step':>9s} {'TAG overhead':>13s}")
    for name, per in res["seconds_per_step"].items():
        for config, sec in per.items():
            base = config.replace("+tag", "")
            over = f"{res['tag_overhead'][name][base]:+.1%}" if config.endswith("+tag") else ""
            print(f"{name:8s} {config:12s} {sec * 1e3:9.1f} {over:>13s}")
        tput = res["time_predictor_train_images_per_s"][name]
        print(f"{name:8s} time-predictor training: {tput['fp32']:.0f} images/s fp32, {tput['bf16']:.0f} bf16")
    print(f"wrote {args.out / 'results.json'}")
    return res


def _bench_label(args: argparse.Namespace) -> dict[str, Any]:
    from .bench.label import ALL_METHODS, METHODS, LabelConfig, run_label, run_label_seeds

    if args.command == "demo":  # the demo's published numbers (README, RESULTS §2) ran on the trailing grid
        cfg = LabelConfig(timestep_spacing="trailing", tfg_clip_x0=0.0)
    else:
        cfg = LabelConfig(dataset=args.dataset, targets=args.targets, num_per_target=args.num_per_target,
                          num_steps=args.num_steps, eta=args.eta, dps_scale=args.dps_scale, cg_scale=args.cg_scale,
                          omega=args.omega, placement=args.placement, seed=args.seed,
                          **{k: getattr(args, k) for k in _LABEL_GRID_ARGS},
                          data_dir=None if args.data_dir is None else str(args.data_dir),
                          checkpoints=None if args.checkpoints is None else str(args.checkpoints))

    methods = METHODS if args.command == "demo" or not args.methods else (
        ALL_METHODS if args.methods == "all" else tuple(args.methods.split(",")))
    if args.command == "bench" and args.seeds:
        res = run_label_seeds(args.out, cfg, args.seeds, methods=methods, progress=not args.quiet,
                              resume=not args.no_resume)
        print("\n" + (args.out / "table.md").read_text())
        return res
    res = run_label(args.out, cfg, progress=not args.quiet, methods=methods)
    print(f"\n{'method':10s} {'FID':>8s} {'accuracy':>9s} {'time gap':>9s} {'seconds':>8s}")
    for method, m in res["methods"].items():
        print(f"{method:10s} {m['fid']:8.2f} {m['accuracy']:9.3f} {m['time_gap']:9.1f} {m['seconds']:8.1f}")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'label.png'} ({res['seconds']:.0f} s)")
    return res


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from ._utils import NonFiniteError
    from .checkpoints import CheckpointError

    try:
        if args.command == "train":
            _train(args, argv)
        elif args.command == "eval":
            _eval_time_predictor(args)
        elif args.command == "sample":
            _sample(args)
        elif args.command == "bench" and args.what == "toy":
            _bench_toy(args.out, args)
        elif args.command == "bench" and args.what == "speed":
            _bench_speed(args)
        elif args.command == "bench" and args.what in EXPERIMENTS:
            run_experiment(args)
        elif args.command in ("bench", "demo"):
            _bench_label(args)
    except (ValueError, CheckpointError, NonFiniteError, FileNotFoundError, FloatingPointError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"tagdiff: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tagdiff: interrupted (training state saved; rerun the same command to resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
