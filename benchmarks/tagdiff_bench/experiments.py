"""Command-line wiring of the experiments
(``tagdiff bench corrupted|strength|fewstep|inverse|multicond|solvers|cfg|questions``).

Each experiment is an :class:`~tagdiff_bench.runner.Experiment` run by :func:`tagdiff_bench.runner.run`; its CLI
options are generated from the fields of its config dataclass (``num_samples`` -> ``--num-samples``; tuples take
comma-separated values), so the CLI, the Python API and ``results.json["config"]`` always agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import cfg, corrupted, fewstep, inverse, multicond, questions, solvers, strength
from .runner import Experiment, run

__all__ = ["EXPERIMENTS", "add_experiment_parsers", "experiment", "run_experiment"]

EXPERIMENTS: tuple[Experiment, ...] = (corrupted.EXPERIMENT, strength.EXPERIMENT, fewstep.EXPERIMENT,
                                       inverse.EXPERIMENT, multicond.EXPERIMENT, solvers.EXPERIMENT, cfg.EXPERIMENT,
                                       questions.EXPERIMENT)


def experiment(name: str) -> Experiment:
    """The experiment called ``name``. Raises KeyError for another name."""
    return {e.name: e for e in EXPERIMENTS}[name]


def _tuple_parser(kind: type) -> Callable[[str], tuple]:
    def parse(s: str) -> tuple:
        if kind is int and s == "all":
            return tuple(range(10))
        try:
            return tuple(kind(v) for v in s.split(",") if v != "")
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {s!r}") from None

    return parse


def add_experiment_parsers(bsub: Any) -> None:
    """Add one sub-command per experiment to the ``bench`` sub-parsers."""
    for exp in EXPERIMENTS:
        config_cls = exp.config
        p = bsub.add_parser(exp.name, help=exp.help)
        p.add_argument("--out", required=True, type=Path, help="output folder (results.json, table.md, figure)")
        hints = typing.get_type_hints(config_cls)
        for f in dataclasses.fields(config_cls):
            flag = "--" + f.name.replace("_", "-")
            hint = hints[f.name]
            if f.name == "dataset":
                kw: dict[str, Any] = {"choices": ("digits", "mnist")}
            elif typing.get_origin(hint) is tuple:
                default = ",".join(map(str, f.default)) or "empty: see the docs"
                kw = {"type": _tuple_parser(typing.get_args(hint)[0]),
                      "help": f.metadata.get("help", f"comma-separated (default: {default})")}
            elif hint in (int, float):
                kw = {"type": hint, "help": f.metadata.get("help", f"(default: {f.default})")}
            else:
                kw = {"type": str, "choices": f.metadata.get("choices"), "help": f.metadata.get("help")}
            p.add_argument(flag, default=f.default, **kw)
            for old in f.metadata.get("aliases", ()):  # a former name, still accepted, not listed
                p.add_argument(old, dest=f.name, default=argparse.SUPPRESS, **{**kw, "help": argparse.SUPPRESS})
        p.add_argument("--no-resume", action="store_true", help="recompute runs already cached in OUT/runs")
        p.add_argument("--quiet", action="store_true")


def run_experiment(args: argparse.Namespace) -> dict[str, Any]:
    """Build the config from parsed ``args``, run the experiment and print its table."""
    exp = experiment(args.what)
    settings = exp.config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(exp.config)})
    res = run(exp, args.out, settings, progress=not args.quiet, resume=not args.no_resume)
    print()
    print((Path(args.out) / "table.md").read_text())
    print(f"wrote {args.out / 'results.json'}, table.md and the figure")
    return res
