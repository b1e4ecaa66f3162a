"""Command-line wiring of the experiments (``tagdiff bench corrupted|strength|fewstep|inverse|multicond|solvers|cfg``).

Each experiment is a frozen config dataclass plus a ``run_*(out_dir, cfg, progress=, resume=)`` function; its CLI
options are generated from the dataclass fields (``num_samples`` -> ``--num-samples``; tuples take comma-separated
values), so the CLI, the Python API and ``results.json["config"]`` always agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["EXPERIMENTS", "add_experiment_parsers", "run_experiment"]


def _registry() -> dict[str, tuple[type, Callable[..., dict[str, Any]], str]]:
    from .cfg import CFGConfig, run_cfg
    from .corrupted import CorruptedConfig, run_corrupted
    from .fewstep import FewStepConfig, run_fewstep
    from .inverse import InverseConfig, run_inverse
    from .multicond import MultiCondConfig, run_multicond
    from .solvers import SolversConfig, run_solvers
    from .strength import StrengthConfig, run_strength

    return {"corrupted": (CorruptedConfig, run_corrupted, "corrupted reverse process σ × ω (Tables 1, 10-12)"),
            "strength": (StrengthConfig, run_strength, "DPS strength 1-5× with/without TAG (Table 3)"),
            "fewstep": (FewStepConfig, run_fewstep, "1-100 step DDIM/DDPM with/without TAG (Tables 4, 17)"),
            "inverse": (InverseConfig, run_inverse,
                        "SR/deblur/inpainting/denoising with DPS and TFG, with/without TAG (Table 2)"),
            "multicond": (MultiCondConfig, run_multicond,
                          "class + stroke thickness (or slant) guided together; joint/single/unconditional TAG "
                          "(Table 5)"),
            "solvers": (SolversConfig, run_solvers,
                        "label guidance through DDIM / DPM-Solver++ / UniPC / Euler schedulers, with/without TAG"),
            "cfg": (CFGConfig, run_cfg, "classifier-free guidance scale 1-32: CFG, APG, interval, CFG++, with/without "
                                        "TAG (class-conditional UNet)")}


EXPERIMENTS = ("corrupted", "strength", "fewstep", "inverse", "multicond", "solvers", "cfg")


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
    for name, (config_cls, _, help_text) in _registry().items():
        p = bsub.add_parser(name, help=help_text)
        p.add_argument("--out", required=True, type=Path, help="output folder (results.json, table.md, figure)")
        hints = typing.get_type_hints(config_cls)
        for f in dataclasses.fields(config_cls):
            flag = "--" + f.name.replace("_", "-")
            hint = hints[f.name]
            if f.name == "dataset":
                p.add_argument(flag, choices=("digits", "mnist"), default=f.default)
            elif typing.get_origin(hint) is tuple:
                kind = typing.get_args(hint)[0]
                default = ",".join(map(str, f.default)) or "empty: see the docs"
                p.add_argument(flag, type=_tuple_parser(kind), default=f.default,
                               help=f.metadata.get("help", f"comma-separated (default: {default})"))
            elif hint in (int, float):
                p.add_argument(flag, type=hint, default=f.default, help=f"(default: {f.default})")
            else:
                p.add_argument(flag, type=str, default=f.default, choices=f.metadata.get("choices"),
                               help=f.metadata.get("help"))
        p.add_argument("--no-resume", action="store_true", help="recompute runs already cached in OUT/runs")
        p.add_argument("--quiet", action="store_true")


def run_experiment(args: argparse.Namespace) -> dict[str, Any]:
    """Build the config from parsed ``args``, run the experiment and print its table."""
    config_cls, run, _ = _registry()[args.what]
    cfg = config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)})
    res = run(args.out, cfg, progress=not args.quiet, resume=not args.no_resume)
    print()
    print((Path(args.out) / "table.md").read_text())
    print(f"wrote {args.out / 'results.json'}, table.md and the figure")
    return res
