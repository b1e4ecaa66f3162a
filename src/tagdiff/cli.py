"""The ``tagdiff`` command line: train, evaluate and benchmark. Name registries live here only.

Errors in what the user passed (a bad value, a missing or corrupt checkpoint, a non-finite gradient) print one
line ``tagdiff: error: ...`` on stderr and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

DATASETS = ("toy",)


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _add_train_args(p: argparse.ArgumentParser, steps: int, hidden: int, layers: int, lr: float) -> None:
    p.add_argument("--dataset", choices=DATASETS, default="toy", help="training data (default: toy)")
    p.add_argument("--out", required=True, type=Path, help="output folder (checkpoint, training state, history)")
    p.add_argument("--steps", type=_positive_int, default=steps, help=f"optimisation steps (default: {steps})")
    p.add_argument("--batch-size", type=_positive_int, default=1024, help="batch size (default: 1024)")
    p.add_argument("--lr", type=float, default=lr, help=f"Adam learning rate (default: {lr})")
    p.add_argument("--seed", type=int, default=0, help="seed of data, batches, timesteps and noise (default: 0)")
    p.add_argument("--hidden", type=_positive_int, default=hidden, help=f"MLP width (default: {hidden})")
    p.add_argument("--layers", type=_positive_int, default=layers, help=f"MLP linear layers (default: {layers})")
    p.add_argument("--num-train-timesteps", type=_positive_int, default=1000, help="T (default: 1000)")
    p.add_argument("--schedule", default="linear", help="noise schedule: linear | cosine (default: linear)")
    p.add_argument("--save-every", type=_positive_int, default=1000, help="steps between resumable checkpoints")
    p.add_argument("--ema-decay", type=float, default=None, help="EMA decay of the weights (default: off)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (faster on CPU; default: fp32)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if --out holds a training state")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


class _Parser(argparse.ArgumentParser):
    """argparse parser whose usage errors are one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tagdiff", description="Temporal Alignment Guidance for diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train an ε-model or a time predictor")
    tsub = train.add_subparsers(dest="what", required=True, metavar="WHAT")
    _add_train_args(tsub.add_parser("diffusion", help="train an ε-prediction diffusion model (MLP on vectors)"),
                    steps=20_000, hidden=256, layers=3, lr=1e-3)
    _add_train_args(tsub.add_parser("time-predictor", help="train a time predictor p(t | x_t) (MLP on vectors)"),
                    steps=20_000, hidden=256, layers=5, lr=1e-3)

    ev = sub.add_parser("eval", help="evaluate a trained model")
    esub = ev.add_subparsers(dest="what", required=True, metavar="WHAT")
    etp = esub.add_parser("time-predictor", help="accuracy and |argmax - t| per timestep bucket on held-out data")
    etp.add_argument("--checkpoint", required=True, type=Path, help="time-predictor checkpoint folder")
    etp.add_argument("--dataset", choices=DATASETS, default="toy")
    etp.add_argument("--num-samples", type=_positive_int, default=2000, help="held-out samples (default: 2000)")
    etp.add_argument("--seed", type=int, default=12345, help="held-out seed (default: 12345, unlike training's)")
    etp.add_argument("--out", type=Path, default=None, help="write the report as JSON here")

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

    demo = sub.add_parser("demo", help="the main job on the embedded default (currently: bench toy)")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default: runs/demo)")
    return parser


def _train(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    from .data import load_dataset
    from .nets import MLPEpsModel
    from .schedules import VPSchedule
    from .time_predictor import MLPTimePredictor
    from .training import TrainConfig, eps_loss, time_loss, train

    schedule = VPSchedule.from_name(args.schedule, args.num_train_timesteps)
    data, _ = load_dataset(args.dataset, seed=args.seed)
    dim = int(data.shape[1])
    if args.what == "diffusion":
        model, loss = MLPEpsModel(dim, args.num_train_timesteps, args.hidden, args.layers), eps_loss
    else:
        model, loss = MLPTimePredictor(dim, args.num_train_timesteps, args.hidden, args.layers), time_loss
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         save_every=args.save_every, ema_decay=args.ema_decay, bf16=args.bf16)
    command = "tagdiff " + " ".join(shlex.quote(a) for a in argv)
    result = train(model, loss, data, schedule, config, args.out, resume=not args.no_resume,
                   progress=not args.quiet, export_extra={"dataset": args.dataset, "command": command})
    print(f"saved {args.what} to {args.out} (final loss {result['final_loss']:.4f}, {result['seconds']:.0f} s)")
    return result


def _eval_time_predictor(args: argparse.Namespace) -> dict[str, Any]:
    from .checkpoints import load_model, read_config
    from .data import load_dataset
    from .metrics import evaluate_time_predictor
    from .schedules import VPSchedule

    config = read_config(args.checkpoint)
    predictor = load_model(args.checkpoint)
    schedule = VPSchedule.from_dict(config.get("schedule", {"kind": "linear", "num_train_timesteps": 1000}))
    held_out, _ = load_dataset(args.dataset, num_samples=args.num_samples, seed=args.seed)
    report = evaluate_time_predictor(predictor, held_out, schedule)
    print(f"{'timesteps':>12s} {'accuracy':>9s} {'|argmax-t|':>11s} {'CE (nats)':>10s}")
    for b in report["buckets"]:
        print(f"{b['t_min']:5d}-{b['t_max']:<6d} {b['accuracy']:9.3f} {b['mean_abs_error']:11.1f} "
              f"{b['cross_entropy']:10.3f}")
    print(f"{'all':>12s} {report['accuracy']:9.3f} {report['mean_abs_error']:11.1f} {report['cross_entropy']:10.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


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
        elif args.command == "bench":
            _bench_toy(args.out, args)
        elif args.command == "demo":
            _bench_toy(args.out)
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
