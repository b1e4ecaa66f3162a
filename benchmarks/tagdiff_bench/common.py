"""Shared machinery of the image experiments: one seeded sampling run, its metrics, cached (resumable) runs,
the ω grid search, mean ± std over seeds, and markdown tables.

Every image experiment is the same pipeline: :func:`load_setup` (the models of :mod:`tagdiff.assets` and the
held-out split, on a device) → the method's guidance terms → :func:`draw` → :func:`sample_metrics` (or an
experiment's own judges on top of it) → each run cached by :class:`RunCache` (and :func:`tag_comparison` for the ω
sweep) → :func:`write_outputs` (``results.json``, ``table.md``) and a figure (:func:`image_grid`).

Protocol used by every experiment (``tagdiff bench corrupted|strength|fewstep|inverse|multicond``; the label suite's
defaults were chosen the same way, by ``benchmarks/label_sweep.py``): ω_0 (and any other knob) is chosen by grid
search on a *validation* seed (``sweep_seed``, default 100) that is never reported; the reported
numbers are the mean ± std over the evaluation seeds (default 0, 1, 2) at the chosen setting. Every run of a
configuration shares x_T and the sampling noise across methods (common random numbers).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tagdiff._io import atomic_write_bytes
from tagdiff._utils import DEVICES, resolve_device
from tagdiff.data import load_dataset
from tagdiff.guidance import Term
from tagdiff.metrics.images import FIDReference, fid
from tagdiff.metrics.time_gap import TimeGapRecorder
from tagdiff.models.assets import assets_dir, load_label_models
from tagdiff.sampling.flow import sample_flow
from tagdiff.sampling.samplers import get_sampler
from tagdiff.sampling.schedulers import sample_scheduler
from tagdiff.sampling.schedules import GRID_SPACINGS
from tagdiff.sampling.terms import ScoreTerm

from .stats import fmt_ci, mean_std, paired_ci

__all__ = ["ExperimentConfig", "Setup", "grid_key", "load_setup", "check_classes", "draw", "sample_metrics", "RunCache",
           "mean_std", "markdown_table", "fmt_ms", "paired_ci", "fmt_ci", "write_outputs", "image_grid",
           "tag_comparison", "preview", "relative_change", "short_hash"]


@dataclass(frozen=True)
class ExperimentConfig:
    """Fields every experiment shares: the dataset and its models folder and data, the evaluation seeds (reported as
    mean ± std), the validation seed on which ω_0 and other knobs are chosen (never reported), the sampling grid
    (``VPSchedule.timesteps(num_steps, timestep_spacing, steps_offset)``) and the device the models run on
    (``auto``: CUDA, else MPS, else CPU; the noise is drawn on the CPU either way, so a CPU run is the same bit for
    bit whatever device it is later compared with; the run cache does not record the device). The default grid is the
    TFG benchmark's ``space_timesteps`` (``"linspace"``), which the paper's experiments ran on; ``"trailing"`` starts
    the first step at t = T − 1."""

    dataset: str = "digits"
    seeds: tuple[int, ...] = (0, 1, 2)
    sweep_seed: int = 100
    sweep_seeds: tuple[int, ...] = field(default=(), metadata={"help": (
        "further validation seeds: ω is chosen on the mean over sweep_seed and these, and each one's own choice is "
        "recorded (the selection's spread) (default: none)")})
    models_dir: str | None = field(default=None, metadata={"aliases": ("--checkpoints",), "help": (
        "folder of the dataset's models: unet/, time_predictor/, clf_noisy/, clf_clean/, clf_eval/ (default: the "
        "shipped assets/<dataset>)")})
    data_dir: str | None = None
    device: str = field(default="auto", metadata={"help": f"{' | '.join(DEVICES)} (default: auto)"})
    timestep_spacing: str = field(default="linspace", metadata={"choices": GRID_SPACINGS, "help": (
        "sampling grid (default: linspace, the TFG benchmark's space_timesteps at the paper's step counts; "
        "trailing: the first step at T - 1)")})
    steps_offset: int = 0

    def __post_init__(self) -> None:
        if self.timestep_spacing not in GRID_SPACINGS:
            raise ValueError(f"unknown timestep_spacing {self.timestep_spacing!r}; expected one of "
                             f"{', '.join(GRID_SPACINGS)}")
        if {self.sweep_seed, *self.sweep_seeds} & set(self.seeds):
            raise ValueError(f"validation seed(s) {sorted({self.sweep_seed, *self.sweep_seeds} & set(self.seeds))} "
                             "are also evaluation seeds; choose settings on seeds that are not reported")


@dataclass
class Setup:
    """Models and held-out data of one dataset, all on ``device`` (see :func:`load_setup`)."""

    dataset: str
    models: dict[str, Any]
    held_x: Tensor
    held_y: Tensor
    models_dir: str
    device: torch.device = torch.device("cpu")
    fid_refs: dict[Any, FIDReference] = field(default_factory=dict, repr=False, compare=False)

    def fid_reference(self, y: int | None = None) -> FIDReference:
        """The held-out images' FID reference (all of them, or class ``y``) under ``clf_eval``, computed on first
        use and kept: the same numbers as ``fid(held_x[...], x0, clf_eval)``, without recomputing the real side."""
        if y not in self.fid_refs:
            real = self.held_x if y is None else self.held_x[self.held_y == y]
            self.fid_refs[y] = FIDReference(real, self.models["clf_eval"])
        return self.fid_refs[y]

    @property
    def schedule(self) -> Any:
        return self.models["schedule"]

    @property
    def eps_model(self) -> Any:
        return self.models["eps_model"]


def load_setup(dataset: str, models_dir: str | Path | None = None, data_dir: str | None = None,
               device: str | torch.device = "cpu") -> Setup:
    """Load the five models of the folder ``models_dir`` (default: the shipped assets of ``dataset``, see
    :mod:`tagdiff.assets`) and the held-out split (images ``(N, C, H, W)`` in [-1, 1], labels ``(N,)``), on ``device``
    (``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"``: :func:`tagdiff._utils.resolve_device`).

    Raises:
        CheckpointError / ValueError: missing, corrupt or mismatched checkpoints; ValueError for an unavailable
            device; DatasetError for missing data.
    """
    dev = resolve_device(device)
    root = Path(models_dir) if models_dir else assets_dir(dataset)
    models = load_label_models(root, dev)
    held_x, held_y = load_dataset(dataset, "held_out", data_dir=data_dir)
    return Setup(dataset, models, held_x.to(dev), held_y.to(dev), str(root), dev)


def check_classes(targets: Sequence[int], setup: Setup) -> None:
    """Raise ValueError unless ``targets`` is a non-empty sequence of classes of the evaluation classifier."""
    K = setup.models["clf_eval"].num_classes
    if not targets or min(targets) < 0 or max(targets) >= K:
        raise ValueError(f"target classes {list(targets)} out of range; the classifiers have classes 0..{K - 1}")


def grid_key(cfg: Any) -> dict[str, Any]:
    """The grid's part of a run-cache key: empty for the trailing grid without offset (so runs cached on that grid
    keep their keys), else ``{"spacing": ..., ["offset": ...]}``."""
    spacing, offset = getattr(cfg, "timestep_spacing", "trailing"), getattr(cfg, "steps_offset", 0)
    if spacing == "trailing" and not offset:
        return {}
    return {"spacing": spacing, **({"offset": offset} if offset else {})}


def draw(setup: Setup, terms: Sequence[Term], *, n: int, seed: int, num_steps: int, sampler: str = "ddim",
         eta: float = 1.0, clip_x0: float | None = 1.0, timestep_spacing: str = "linspace", steps_offset: int = 0,
         scheduler: tuple[Any, dict[str, Any]] | None = None, cond: dict[str, Any] | None = None,
         clamp: bool = True, progress: bool = False, extra_callbacks: Sequence[Any] | None = None) -> dict[str, Any]:
    """One seeded sampling run on ``setup.device``: x_T and the step noise come from one CPU generator seeded with
    ``seed`` (then moved to the device), so every method of a seed shares them (common random numbers), over the
    grid ``schedule.timesteps(num_steps, timestep_spacing, steps_offset)``; or, with ``scheduler = (a diffusers
    scheduler, its step keywords)``, through :func:`tagdiff.sample_scheduler` on that scheduler's own grid; or, for a
    flow-matching model (``setup.models["flow"]``, its :class:`~tagdiff.sampling.flow_path.FlowSchedule`), through
    :func:`tagdiff.sample_flow` with ``sampler`` ``"euler"`` / ``"heun"`` on the model's σ grid of ``num_steps`` steps
    (the first σ lowered to 1 − 1/T when a score term needs ᾱ > 0; ``eta``, ``clip_x0`` and the grid options do not
    apply; the returned ``timesteps`` are T σ).
    ``cond``: the model's keyword conditioning (e.g. ``{"y": (n,) labels}`` for a class-conditional UNet);
    ``clamp``: clamp the result to [-1, 1] (pixel models; a latent model's x0 is returned as it is).

    Returns:
        ``{"x0": (n, C, H, W) in [-1, 1] (``clamp``) on the device, "time_gap": mean Time Gap,
        "time_gap_per_step": list,
        "tls_norm_per_step": list (mean ‖ω_t·TLS‖ of the TAG corrections per step; 0 where TAG did not act),
        "timesteps": the grid, "seconds": float}``.
    Raises:
        ValueError: an unknown sampler; NonFiniteError: a non-finite guidance step.
    """
    g = torch.Generator().manual_seed(seed)  # a CPU generator on every device: CPU results stay bit for bit
    x_T = torch.randn((n, *setup.eps_model.sample_shape), generator=g).to(setup.device)
    recorder = TimeGapRecorder(setup.models["time_predictor"])
    callbacks = [recorder, *(extra_callbacks or [])]  # e.g. another predictor's TimeGapRecorder
    kwargs: dict[str, Any] = {"eta": eta} if sampler == "ddim" else {}
    t0 = time.time()
    randn_like = lambda z: torch.randn(z.shape, generator=g, dtype=z.dtype).to(z.device)  # noqa: E731
    if "flow" in setup.models:
        flow = setup.models["flow"]
        sigmas = flow.sigmas(num_steps)
        if sigmas[0] == 1.0 and any(isinstance(term, ScoreTerm) for term in terms):
            sigmas[0] = 1.0 - 1.0 / flow.num_train_timesteps
        x0 = sample_flow(setup.eps_model, x_T, flow, sigmas=sigmas, method=sampler, terms=list(terms),
                         callback=callbacks, randn_like=randn_like, cond=cond, progress=progress)
        grid = sigmas[:-1] * flow.num_train_timesteps
    elif scheduler is not None:
        x0 = sample_scheduler(scheduler[0], setup.eps_model, x_T, num_inference_steps=num_steps, terms=list(terms),
                              step_kwargs=scheduler[1], clip_x0=clip_x0, callback=callbacks, randn_like=randn_like,
                              cond=cond, progress=progress)
        grid = torch.tensor(recorder.timesteps)
    else:
        grid = setup.schedule.timesteps(num_steps, timestep_spacing, steps_offset)
        x0 = get_sampler(sampler)(setup.eps_model, x_T, grid, setup.schedule, terms=list(terms), callback=callbacks,
                                  clip_x0=clip_x0, randn_like=randn_like, cond=cond, progress=progress, **kwargs)
    return {"x0": x0.clamp(-1, 1) if clamp else x0, "time_gap": recorder.mean,
            "time_gap_per_step": recorder.per_step.tolist(),
            "tls_norm_per_step": recorder.tls_norm_per_step.tolist(), "timesteps": grid.tolist(),
            "seconds": time.time() - t0}


def sample_metrics(setup: Setup, x0: Tensor, target: Tensor | None = None) -> dict[str, Any]:
    """Metrics of samples ``x0`` ``(B, C, H, W)`` under the independent evaluation classifier (never used for
    guidance); ``target`` ``(B,)`` holds per-sample target classes, if any.

    * ``fid``: against all held-out images (``target=None``), else the mean over target classes of the FID against
      that class's held-out images (as the TFG benchmark does), both in the evaluation classifier's feature space.
    * ``confidence``: mean max-softmax probability; ``is``: the Inception-Score analogue exp(E_x KL(p(y|x) ‖ p(y)))
      with the evaluation classifier in place of Inception (Table 1's IS column).
    * ``accuracy`` (with ``target``): fraction classified as the target; ``per_target``: ``{str(y): {"fid",
      "accuracy"}}`` per target class, in increasing class order.
    """
    clf = setup.models["clf_eval"]
    with torch.no_grad():
        logits = torch.cat([clf(b) for b in x0.split(512)])
    p = torch.softmax(logits, -1)
    p_mean = p.mean(0, keepdim=True)
    kl = (p * (p.clamp_min(1e-12).log() - p_mean.clamp_min(1e-12).log())).sum(-1).mean()
    out: dict[str, Any] = {"confidence": float(p.max(-1).values.mean()), "is": float(kl.exp())}
    if target is None:
        out["fid"] = fid(setup.fid_reference(), x0)
    else:
        pred, target = logits.argmax(-1), target.to(logits.device)
        per = {str(y): {"fid": fid(setup.fid_reference(y), x0[target == y]),
                        "accuracy": float((pred[target == y] == y).float().mean())} for y in target.unique().tolist()}
        out["fid"] = sum(v["fid"] for v in per.values()) / len(per)
        out["accuracy"] = float((pred == target).float().mean())
        out["per_target"] = per
    return out


class RunCache:
    """Results of finished runs, one JSON file per run under ``out_dir/runs/``: an interrupted experiment resumes
    where it stopped (runs are keyed by their full configuration, so changed settings are recomputed). ``get(key,
    fn)`` returns the cached result of ``key`` (a flat JSON-able dict) or computes ``fn()`` and stores it; with
    ``resume=False`` every run is recomputed (and stored)."""

    def __init__(self, out_dir: str | Path, resume: bool = True):
        self.dir = Path(out_dir) / "runs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.resume = resume

    def get(self, key: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        name = "_".join(f"{k}={v}" for k, v in key.items()).replace("/", "-").replace(" ", "")
        if len(name) > 200:  # file names must stay short; shorter (earlier) names are kept as they were
            name = f"{name[:100]}_{short_hash(name)}"
        path = self.dir / f"{name}.json"
        if self.resume and path.exists():
            try:
                cached = json.loads(path.read_text())
                if cached.get("key") == json.loads(json.dumps(key)):
                    return cached["result"]
            except (OSError, ValueError):
                pass
        result = fn()
        atomic_write_bytes(path, (json.dumps({"key": key, "result": result}) + "\n").encode())
        return result


def fmt_ms(stats: dict[str, Any], digits: int = 1) -> str:
    """``mean ± std`` of a :func:`mean_std` result."""
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table (one line per row, cells formatted with ``str``), ending in a newline."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: str | Path, results: dict[str, Any], table: str) -> None:
    """Write ``results.json`` and ``table.md`` atomically."""
    out_dir = Path(out_dir)
    atomic_write_bytes(out_dir / "results.json", (json.dumps(results, indent=2) + "\n").encode())
    atomic_write_bytes(out_dir / "table.md", table.encode())


def image_grid(x: Tensor, rows: int, cols: int, pad: int = 0, pad_value: float = 1.0) -> Any:
    """``(rows*cols, C, H, W)`` in [-1, 1] -> a numpy ``(rows*H', cols*W')`` (or ``(…, 3)``) image in [0, 1], row by
    row; missing tiles are black. ``pad`` > 0 puts a ``pad``-pixel border of ``pad_value`` (in [0, 1]; 1 = white)
    around every tile, so neighbouring images do not touch (H' = H + 2 pad)."""
    x = x[: rows * cols].detach().cpu()
    n, c, h, w = x.shape
    if n < rows * cols:
        x = torch.cat([x, -torch.ones(rows * cols - n, c, h, w)])
    x = ((x + 1) / 2).clamp(0, 1)
    if pad:
        x = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=pad_value)
        h, w = h + 2 * pad, w + 2 * pad
    g = x.reshape(rows, cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c)
    return (g.squeeze(-1) if c == 1 else g).numpy()


RunFn = Callable[..., dict[str, Any]]


def tag_comparison(cache: RunCache, key: dict[str, Any], run: RunFn, *, omegas: Sequence[float],
                   seeds: Sequence[int], sweep_seed: int, n: int, sweep_n: int, metric: str = "fid",
                   variants: Sequence[str] = (), sweep_seeds: Sequence[int] = ()) -> dict[str, Any]:
    """The ω sweep: choose ω_0 by grid search on validation seeds (the paper tunes ω_0 per task this way,
    docs/notation.md §3.3), then compare ω = 0 with the chosen ω_0 over the evaluation seeds. Ties go to the smaller ω.

    Validation: ``sweep_seed`` and any ``sweep_seeds`` (none of them reported); a cell's score is the mean of the
    metric over them. The selection's own spread is recorded: the choice each validation seed alone would make
    (``sweep["per_seed_best"]``, ``sweep["stable"]``), and ``sweep["edge"]`` is ``"upper"`` when the chosen ω is the
    grid's largest (widen the grid), ``"lower"`` when it is its smallest non-zero value, else ``None``.

    Args:
        cache: where finished runs are kept (resume).
        key: the configuration shared by every run of this comparison (becomes part of each run's key).
        run: ``(omega, seed, n) -> metrics`` (a flat dict of numbers; ``"preview"`` may hold a few samples), or
            ``(omega, seed, n, variant)`` when ``variants`` is given (e.g. TAG placements "pre"/"post").
        omegas: the ω_0 grid (0 is always added); seeds / n: evaluation seeds and samples per run;
        sweep_seed / sweep_n: the validation seed and its samples per run; metric: minimised by the search;
        variants: further settings searched jointly with ω (ω = 0 runs once, without a variant).

    Returns:
        ``{"sweep": {"grid": {"variant:omega" or "omega": metrics}, ...}, "best_omega": ω*, "best_variant": v*,
        "without": {metric: mean_std}, "with": {...}, "runs": {...}, "preview": {...}}``.

    Raises:
        ValueError: if ``sweep_seed`` is one of the evaluation ``seeds``.
    """
    validation = [sweep_seed, *(s for s in sweep_seeds if s != sweep_seed)]
    if set(validation) & set(seeds):
        raise ValueError(f"validation seed(s) {sorted(set(validation) & set(seeds))} are also evaluation seeds; "
                         "choose ω on seeds that are not reported")
    grid = sorted({float(w) for w in omegas} - {0.0})

    def get(w: float, v: str | None, seed: int, size: int) -> dict[str, Any]:
        k = {**key, "omega": w, **({"variant": v} if v and w else {}), "seed": seed, "n": size}
        return cache.get(k, lambda: run(w, seed, size, v) if variants else run(w, seed, size))

    cells = [(0.0, None)] + [(w, v) for v in (variants or [None]) for w in grid]
    name_of = {(f"{v}:{w}" if v and w else str(w)): (w, v) for w, v in cells}
    per_seed = {vs: {name: _numbers(get(w, v, vs, sweep_n)) for name, (w, v) in name_of.items()} for vs in validation}
    table = per_seed[sweep_seed] if len(validation) == 1 else {
        name: {k: sum(per_seed[vs][name][k] for vs in validation) / len(validation) for k in per_seed[sweep_seed][name]}
        for name in name_of}

    def choose(scores: dict[str, dict[str, float]]) -> str:
        return min(scores, key=lambda c: (scores[c][metric], name_of[c][0]))

    best_name = choose(table)
    best, best_variant = name_of[best_name]
    per_seed_best = {str(vs): name_of[choose(per_seed[vs])][0] for vs in validation}
    edge = None if not grid or best == 0 else "upper" if best == grid[-1] else "lower" if best == grid[0] else None
    sweep = {"grid": table, "metric": metric, "best": best_name, "validation_seeds": validation,
             "per_seed_best": per_seed_best, "stable": len(set(per_seed_best.values())) == 1, "edge": edge}
    if len(validation) > 1:
        sweep["per_seed"] = {str(vs): cells_ for vs, cells_ in per_seed.items()}
    out: dict[str, Any] = {"sweep": sweep, "best_omega": best, "best_variant": best_variant, "runs": {},
                           "preview": {}}
    for name, (w, v) in (("without", (0.0, None)), ("with", (best, best_variant))):
        runs = [get(w, v, s, n) for s in seeds]
        out["runs"][name] = [_numbers(r) for r in runs]
        out[name] = {k: mean_std([r[k] for r in runs]) for k in _numbers(runs[0])}
        out["preview"][name] = runs[0].get("preview")
    out["paired"] = {k: paired_ci(out["without"][k]["values"], out["with"][k]["values"]) for k in out["with"]
                     if k in out["without"]}
    return out


def _numbers(result: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def preview(x0: Tensor, k: int = 16) -> list:
    """The first ``k`` samples (flattened, rounded to 3 decimals), for figures (kept in the run cache)."""
    return [[round(v, 3) for v in s.reshape(-1).tolist()] for s in x0[:k].detach().cpu().double()]


def short_hash(text: str) -> str:
    """A 10-hex-digit digest of ``text`` (for run-cache keys that would make long file names)."""
    import hashlib

    return hashlib.sha1(text.encode()).hexdigest()[:10]


def relative_change(before: float, after: float) -> float:
    """``(after - before) / |before|`` (negative = decrease)."""
    return (after - before) / abs(before) if before else float("nan")
