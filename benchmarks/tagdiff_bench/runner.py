"""One shape for every image experiment, and the one runner that owns the wiring they share.

An :class:`Experiment` declares what is its own: its settings (a frozen config dataclass), how to check them, what it
compares (:class:`Comparison` records: one ±TAG comparison each, the method and the judge folded into ``run``) or,
when its structure is not a list of ±TAG comparisons, its own ``measure``; its table, its figure, the paper's numbers
and what the config record adds. :func:`run` does the rest, the same way for all: validation, the models
(:func:`~tagdiff_bench.common.load_setup`), the class checks, the run cache (:class:`~tagdiff_bench.common.RunCache`),
the seeds and the ω sweep (:func:`~tagdiff_bench.common.tag_comparison`), the config record, the paper's numbers,
``results.json`` / ``table.md`` (:func:`~tagdiff_bench.common.write_outputs`) and the figure ``<name>.png``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .common import RunCache, Setup, check_classes, load_setup, tag_comparison, write_outputs

__all__ = ["Comparison", "Experiment", "run", "load_config_setup"]

RunFn = Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class Comparison:
    """One comparison without / with TAG (:func:`~tagdiff_bench.common.tag_comparison`).

    Attributes:
        path: where the result goes under ``results[experiment.section]`` (e.g. ``("1.5",)`` or
            ``("sr2", "dps")``).
        key: the run-cache key shared by every run of the comparison (each run adds ω, variant, seed and n).
        run: ``(omega, seed, n) -> metrics`` (``(omega, seed, n, variant)`` with ``variants``): the method and its
            judge in one.
        n / sweep_n: samples per evaluation run / per validation run; omegas: the ω_0 grid (0 is always added);
        variants: settings searched jointly with ω (e.g. TAG placements); metric: minimised by the search.
        line: the progress line of a finished comparison, from its result.
        context: entries written next to the result (in ``results[section][path[:-1]]``) before it, once.
        extra: ``(cache, result) -> entries`` added to the result (e.g. per-step traces read back from the cache).
    """

    path: tuple[str, ...]
    key: dict[str, Any]
    run: RunFn
    n: int
    sweep_n: int
    omegas: Sequence[float]
    variants: Sequence[str] = ()
    metric: str = "fid"
    line: Callable[[dict[str, Any]], str] | None = None
    context: dict[str, Any] = field(default_factory=dict)
    extra: Callable[[RunCache, dict[str, Any]], dict[str, Any]] | None = None


def load_config_setup(cfg: Any) -> Setup:
    """The models and held-out split named by an :class:`~tagdiff_bench.common.ExperimentConfig`."""
    return load_setup(cfg.dataset, cfg.models_dir, cfg.data_dir, cfg.device)


def _no_record(setup: Setup, cfg: Any) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Experiment:
    """An experiment: what it is, what it compares, and how its results read.

    Attributes:
        name: the command (``tagdiff bench <name>``) and the figure's file name (``<name>.png``).
        config: the frozen config dataclass; the command's options are generated from its fields.
        help: one line for ``tagdiff bench --help``.
        validate: ``cfg -> None``; raises ValueError naming the bad value (before any model is loaded).
        table: ``(results, cfg) -> markdown`` of ``table.md``.
        section: the results entry the comparisons fill (``results[section][*path]``).
        comparisons: ``(setup, cfg) -> Comparison...``, run in order through the ω sweep protocol; or
        measure: ``(setup, cfg, cache, progress) -> results`` for an experiment with its own cells; a ``"_figure"``
            entry is handed to ``figure`` and not written.
        paper: the paper's numbers (``results["paper"]``), if it has any to compare with.
        record: ``(setup, cfg) -> entries`` the config record adds to the settings (sampler, η, clipping, …).
        figure: ``(path, results, cfg, setup) -> None`` drawing ``<name>.png``, or None.
        load: ``cfg -> Setup``, the models and data (default: :func:`load_config_setup`).
        check_targets: check ``cfg.targets`` against the evaluation classifier's classes.
        tail: entries of ``measure``'s results written after the config record and the paper's numbers.
    """

    name: str
    config: type
    help: str
    validate: Callable[[Any], None]
    table: Callable[[dict[str, Any], Any], str]
    section: str = "runs"
    comparisons: Callable[[Setup, Any], Iterable[Comparison]] | None = None
    measure: Callable[[Setup, Any, RunCache, bool], dict[str, Any]] | None = None
    paper: dict[str, Any] | None = None
    record: Callable[[Setup, Any], dict[str, Any]] = _no_record
    figure: Callable[[Path, dict[str, Any], Any, Setup], None] | None = None
    load: Callable[[Any], Setup] = load_config_setup
    check_targets: bool = False
    tail: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.comparisons is None) == (self.measure is None):
            raise ValueError(f"experiment {self.name!r} needs exactly one of comparisons and measure")


def run(experiment: Experiment, out_dir: str | Path, cfg: Any, *, progress: bool = True,
        resume: bool = True) -> dict[str, Any]:
    """Run ``experiment`` with settings ``cfg``; write ``results.json``, ``table.md`` and ``<name>.png`` in
    ``out_dir`` (every run cached in ``out_dir/runs/``, reused when ``resume``); return the results.

    Raises:
        ValueError: bad settings (the experiment's ``validate``, an evaluation seed used as the sweep seed, target
            classes the classifiers do not have), an unavailable device. CheckpointError: missing or corrupt models.
    """
    if not isinstance(cfg, experiment.config):
        raise TypeError(f"{experiment.name} takes a {experiment.config.__name__}, got {type(cfg).__name__}")
    experiment.validate(cfg)
    setup = experiment.load(cfg)
    if experiment.check_targets:
        check_classes(cfg.targets, setup)
    cache = RunCache(out_dir, resume)
    if experiment.measure is not None:
        results = experiment.measure(setup, cfg, cache, progress)
    else:
        results = {experiment.section: {}}
        for c in experiment.comparisons(setup, cfg):  # type: ignore[misc]
            parent = results[experiment.section]
            for part in c.path[:-1]:
                parent = parent.setdefault(part, {})
            for k, v in c.context.items():
                parent.setdefault(k, v)
            r = tag_comparison(cache, c.key, c.run, omegas=c.omegas, seeds=cfg.seeds, sweep_seed=cfg.sweep_seed,
                               n=c.n, sweep_n=c.sweep_n, metric=c.metric, variants=c.variants,
                               sweep_seeds=getattr(cfg, "sweep_seeds", ()))
            if c.extra is not None:
                r.update(c.extra(cache, r))
            parent[c.path[-1]] = r
            if progress and c.line is not None:
                print(c.line(r), flush=True)
            if progress and (r["sweep"]["edge"] == "upper" or not r["sweep"]["stable"]):
                print(f"    note: ω_0* = {r['best_omega']:g}" + (" is the grid's largest: widen the ω grid"
                      if r["sweep"]["edge"] == "upper" else "") + ("" if r["sweep"]["stable"] else
                      f"; the validation seeds disagree ({r['sweep']['per_seed_best']})"), flush=True)
    private = results.pop("_figure", None)
    tail = {k: results.pop(k) for k in experiment.tail if k in results}
    config = {**asdict(cfg), "models_dir": setup.models_dir, **experiment.record(setup, cfg)}
    config.setdefault("torch", torch.__version__)
    results["config"] = config
    if experiment.paper is not None:
        results["paper"] = experiment.paper
    results.update(tail)
    write_outputs(out_dir, results, experiment.table(results, cfg))
    if experiment.figure is not None:
        experiment.figure(Path(out_dir) / f"{experiment.name}.png",
                          results if private is None else {**results, "_figure": private}, cfg, setup)
    return results


def stopwatch() -> Callable[[], float]:
    """Seconds since the call (for an experiment that reports its own wall time)."""
    t0 = time.time()
    return lambda: time.time() - t0
