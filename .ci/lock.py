"""Write ``constraints.txt``: the exact versions of tagdiff's dependency closure in the current environment.

Run ``make lock`` after a set-up whose ``make test`` (and ``.ci/run``) passed; the README's set-up then installs
exactly this set (``pip install -c constraints.txt``). torch is not listed: the set-up pins it separately
(``torch==2.13.0``, the CPU wheel) and keeps a machine's own torch build where one is importable.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

EXTRAS = ("test", "cli", "metrics", "data", "train")
SKIP = {"tagdiff", "tagdiff-bench", "torch"}


def closure(name: str, extras: tuple[str, ...], seen: dict[str, str]) -> None:
    try:
        dist = distribution(name)
    except PackageNotFoundError:
        return
    seen.setdefault(canonicalize_name(name), f"{dist.metadata['Name']}=={dist.version}")
    if canonicalize_name(name) == "torch":   # torch's own dependencies follow whichever torch build is installed
        return
    for line in dist.requires or []:
        req = Requirement(line)
        wanted = req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras))
        if wanted and canonicalize_name(req.name) not in seen:
            closure(req.name, tuple(req.extras), seen)


def main() -> int:
    seen: dict[str, str] = {}
    closure("tagdiff", EXTRAS, seen)
    closure("tagdiff-bench", (), seen)   # the experiments (benchmarks/), installed by the same set-up
    import torch

    pins = sorted(v for k, v in seen.items() if k not in SKIP)
    head = [
        "# The version set `make test` and .ci/run passed with (Python "
        f"{sys.version_info.major}.{sys.version_info.minor}, torch {torch.__version__.split('+')[0]} CPU).",
        "# Installed by the Makefile's set-up: pip install -c constraints.txt -e '.[test]' -e ./benchmarks.",
        "# Regenerate with `make lock` after a passing .ci/run; torch is pinned in the Makefile, not here.",
    ]
    out = Path(__file__).resolve().parents[1] / "constraints.txt"
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(head + pins) + "\n")
    tmp.replace(out)
    print(f"wrote {out} ({len(pins)} pins)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
