"""The reviewers' questions, answered with measurements (``tagdiff bench questions``), on the label suite's settings.

For DPS, classifier guidance (CG) and MPGD of the label suite (:func:`~tagdiff_bench.label.method_terms`), each
without TAG, with TAG at every step and with TAG at every k-th step only (``every``, an amortised TAG: the same ω_0,
the TLS step skipped at the other steps), over the evaluation seeds (common random numbers within a seed):

1. **Cost.** Wall-clock seconds per sample of every arm, measured side by side in one process: ``cost_rounds``
   interleaved rounds (arm A, B, C, ..., A, B, C, ...; one untimed warm-up round) of ``cost_samples`` samples
   without any measurement callback; medians, and the per-round ratio to the method without TAG (Student-t interval
   over rounds). Model evaluations per sample, counted by forward hooks on the ε-model, the time predictor and the
   guidance classifiers (``forward``: every forward; ``with_grad``: forwards taken with autograd, each followed by
   one backward). FID against cost (the figure's left panel).
2. **Time Gap vs FID.** Spearman's ρ between the mean Time Gap and the FID of every run (arms × seeds), with a
   percentile bootstrap interval (the runs resampled).
3. **Diversity.** Precision, recall, density and coverage (``prdc``, k = ``nearest_k``) and the Vendi score
   (:func:`vendi_score`: cosine kernel), per target class in the evaluation classifier's penultimate features
   against the held-out images of that class, averaged over targets.
4. **Conflict.** Per sampling step, the cosine between TAG's step ω_t·TLS and the guidance step (DPS's and CG's
   score-space Δs, the direction the step moves x_t; MPGD moves x̂_0 and has no Δs), averaged over samples, in the
   runs with TAG at every step: a curve over t, and TAG's per-seed FID gain against the mean cosine.

Every difference is the paired change over seeds with its Student-t 95 % interval (:func:`~tagdiff_bench.common.
paired_ci`).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tagdiff._utils import DEVICES
from tagdiff.guidance import TemporalAlignment, Term
from tagdiff.sampling.samplers import get_sampler
from tagdiff.sampling.schedules import GRID_SPACINGS
from tagdiff.sampling.terms import ScoreTerm

from .common import RunCache, Setup, draw, load_setup, markdown_table, mean_std, paired_ci, sample_metrics, short_hash
from .label import LabelConfig, method_terms
from .runner import Experiment, stopwatch

__all__ = ["QuestionsConfig", "EveryKth", "EvalCounter", "vendi_score", "diversity", "spearman_ci", "arms",
           "questions_run", "label_config", "EXPERIMENT"]

GUIDANCES = ("dps", "cg", "mpgd")
_L = LabelConfig()


@dataclass(frozen=True)
class QuestionsConfig:
    """Settings: the label suite's (:class:`~tagdiff_bench.label.LabelConfig` defaults), the methods, the amortised
    TAG's ``every`` (TAG at steps i ≡ 0 mod k), prdc's ``nearest_k``, and the timing block (``cost_samples`` per
    timed run, ``cost_rounds`` interleaved rounds)."""

    dataset: str = "digits"
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    methods: tuple[str, ...] = GUIDANCES
    every: tuple[int, ...] = (2, 4)
    targets: tuple[int, ...] = _L.targets
    num_per_target: int = _L.num_per_target
    num_steps: int = _L.num_steps
    eta: float = _L.eta
    omega: float = _L.omega
    dps_guidance_scale: float = _L.dps_guidance_scale
    cg_guidance_scale: float = _L.cg_guidance_scale
    mpgd_scale: float = _L.mpgd_scale
    nearest_k: int = 5
    cost_samples: int = 32
    cost_rounds: int = 5
    models_dir: str | None = None
    data_dir: str | None = None
    device: str = field(default="auto", metadata={"help": f"{' | '.join(DEVICES)} (default: auto)"})
    timestep_spacing: str = field(default=_L.timestep_spacing, metadata={"choices": GRID_SPACINGS})
    steps_offset: int = 0


def _validate(cfg: QuestionsConfig) -> None:
    bad = [m for m in cfg.methods if m not in GUIDANCES]
    if bad or not cfg.methods:
        raise ValueError(f"unknown method(s) {bad or '(none)'}; expected some of {', '.join(GUIDANCES)}")
    if any(k < 2 for k in cfg.every):
        raise ValueError(f"every must hold step intervals >= 2 (1 is TAG at every step), got {cfg.every}")
    if not cfg.seeds:
        raise ValueError("need at least one seed")
    if not 1 <= cfg.nearest_k < cfg.num_per_target:
        raise ValueError(f"nearest_k must be in [1, num_per_target), got {cfg.nearest_k}")
    if cfg.cost_samples < 1 or cfg.cost_rounds < 1:
        raise ValueError("cost_samples and cost_rounds must be >= 1")


def arms(cfg: QuestionsConfig) -> list[str]:
    """``dps, dps+tag, dps+tag/2, dps+tag/4, cg, ...``: each method without TAG, with it, with it every k-th step."""
    return [a for m in cfg.methods for a in (m, f"{m}+tag", *(f"{m}+tag/{k}" for k in cfg.every))]


def label_config(cfg: QuestionsConfig) -> LabelConfig:
    return LabelConfig(dataset=cfg.dataset, targets=cfg.targets, num_per_target=cfg.num_per_target,
                       num_steps=cfg.num_steps, eta=cfg.eta, dps_guidance_scale=cfg.dps_guidance_scale,
                       cg_guidance_scale=cfg.cg_guidance_scale, omega=cfg.omega, mpgd_scale=cfg.mpgd_scale,
                       timestep_spacing=cfg.timestep_spacing, steps_offset=cfg.steps_offset)


class EveryKth(TemporalAlignment):
    """TAG at the steps ``i`` with ``i % every == 0`` only (the sampler's step index; step 0 is the first)."""

    def __init__(self, time_predictor: Any, omega: float, every: int, **kwargs: Any):
        super().__init__(time_predictor, omega, **kwargs)
        self.every = int(every)

    def correct(self, x: Tensor, t: Tensor, ctx: Any = None, *, schedule: Any = None) -> Tensor:
        if ctx is not None and ctx.i is not None and ctx.i % self.every:
            return x
        return super().correct(x, t, ctx, schedule=schedule)


class _Probe:
    """Per-step cosines between the TAG step (kept by :class:`_ProbedTAG`) and the guidance's Δs of the same step."""

    def __init__(self) -> None:
        self.tls: Tensor | None = None
        self.steps: dict[int, tuple[int, float]] = {}


class _ProbedTAG(TemporalAlignment):
    def __init__(self, probe: _Probe, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.probe = probe

    def tls_step(self, x: Tensor, t: Tensor, schedule: Any, ctx: Any = None) -> Tensor:
        step = super().tls_step(x, t, schedule, ctx)
        self.probe.tls = step.detach()
        return step


class _ProbedScore(ScoreTerm):
    def __init__(self, inner: ScoreTerm, probe: _Probe):
        self.inner, self.probe = inner, probe
        self.needs_model_grad = inner.needs_model_grad

    def check(self, x: Tensor, schedule: Any) -> None:
        self.inner.check(x, schedule)

    def delta_score(self, x: Tensor, t: Tensor, x0_hat: Tensor, ctx: Any) -> Tensor | None:
        d = self.inner.delta_score(x, t, x0_hat, ctx)
        tls, self.probe.tls = self.probe.tls, None
        if d is not None and tls is not None:
            cos = torch.nn.functional.cosine_similarity(d.detach().flatten(1), tls.flatten(1), dim=1)
            self.probe.steps[int(ctx.i)] = (int(t.reshape(-1)[0]), float(cos.mean()))
        return d


def _terms(arm: str, setup: Setup, target: Tensor, cfg: QuestionsConfig, probe: _Probe | None = None) -> list[Term]:
    method, _, every = arm.partition("/")
    terms = method_terms(method, setup.models, target, label_config(cfg))
    tp = setup.models["time_predictor"]
    if every:
        return [EveryKth(tp, cfg.omega, int(every)) if isinstance(t, TemporalAlignment) else t for t in terms]
    if probe is not None and method.endswith("+tag"):
        return [_ProbedScore(t, probe) if isinstance(t, ScoreTerm) else
                _ProbedTAG(probe, tp, cfg.omega) if isinstance(t, TemporalAlignment) else t for t in terms]
    return terms


class EvalCounter:
    """Counts sample-evaluations of named modules by hooks (a batch of B counts B): ``forward`` every forward,
    ``with_grad`` those taken with autograd on, ``backward`` the backward passes that reach the module's output (a
    gradient hook on it). A context manager; :meth:`per_sample` divides by the samples drawn."""

    def __init__(self, **modules: torch.nn.Module):
        self.modules = modules
        self.counts = {name: {"forward": 0, "with_grad": 0, "backward": 0} for name in modules}
        self.handles: list[Any] = []

    def __enter__(self) -> EvalCounter:
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_hook(lambda m, i, o, name=name: self._count(name, o)))
        return self

    def _count(self, name: str, out: Tensor) -> None:
        n = int(out.shape[0])
        self.counts[name]["forward"] += n
        if torch.is_grad_enabled() and out.requires_grad:
            self.counts[name]["with_grad"] += n
            out.register_hook(lambda g, name=name: self._backward(name, g))

    def _backward(self, name: str, grad: Tensor) -> None:
        self.counts[name]["backward"] += int(grad.shape[0])

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def per_sample(self, n: int) -> dict[str, dict[str, float]]:
        return {k: {kk: vv / n for kk, vv in v.items()} for k, v in self.counts.items()}


def vendi_score(features: Tensor) -> float:
    """The Vendi score exp(−Σ λ_i log λ_i), λ the eigenvalues of K/n, K the cosine-similarity kernel of the rows of
    ``features`` ``(n, d)``: 1 for identical rows, n for orthogonal ones."""
    f = torch.nn.functional.normalize(features.detach().double().cpu(), dim=1)
    lam = torch.linalg.eigvalsh(f @ f.T / f.shape[0]).clamp_min(0)
    lam = lam[lam > 0]
    return float(torch.exp(-(lam * lam.log()).sum()))


def diversity(setup: Setup, x0: Tensor, target: Tensor, k: int) -> dict[str, Any]:
    """Precision, recall, density, coverage (prdc, ``k`` neighbours) and Vendi per target class in the evaluation
    classifier's penultimate features against that class's held-out images; ``mean`` over the targets."""
    from prdc import compute_prdc

    clf = setup.models["clf_eval"]
    per: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for y in target.unique().tolist():
            real = clf.features(setup.held_x[setup.held_y == y]).double().cpu()
            fake = clf.features(x0[target == y]).double().cpu()
            with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the sizes
                p = compute_prdc(real.numpy(), fake.numpy(), nearest_k=min(k, len(real) - 1))
            per[str(y)] = {**{m: float(v) for m, v in p.items()}, "vendi": vendi_score(fake),
                           "vendi_real": vendi_score(real)}
    return {"mean": {m: sum(v[m] for v in per.values()) / len(per) for m in next(iter(per.values()))},
            "per_target": per}


def spearman_ci(x: Any, y: Any, level: float = 0.95, num_resamples: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Spearman's ρ of paired values and its percentile bootstrap interval (the pairs resampled with replacement)."""
    from scipy.stats import rankdata

    x, y = np.asarray(x, float), np.asarray(y, float)

    def rho(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        ra, rb = rankdata(a, axis=-1), rankdata(b, axis=-1)
        ra, rb = ra - ra.mean(-1, keepdims=True), rb - rb.mean(-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (ra * rb).sum(-1) / np.sqrt((ra ** 2).sum(-1) * (rb ** 2).sum(-1))

    idx = np.random.default_rng(seed).integers(0, len(x), (num_resamples, len(x)))
    boot = rho(x[idx], y[idx])
    lo, hi = np.nanquantile(boot, [0.5 - level / 2, 0.5 + level / 2]) if len(x) > 2 else (math.nan, math.nan)
    return {"rho": float(rho(x, y)), "lo": float(lo), "hi": float(hi), "n": len(x), "level": level,
            "method": "Spearman rank correlation, percentile bootstrap over the pairs"}


def questions_run(setup: Setup, cfg: QuestionsConfig, arm: str, seed: int) -> dict[str, Any]:
    """One arm at one seed: FID, accuracy, Time Gap, diversity and (with TAG at every step) the per-step cosine."""
    target = torch.tensor(cfg.targets).repeat_interleave(cfg.num_per_target).to(setup.device)
    probe = _Probe()
    out = draw(setup, _terms(arm, setup, target, cfg, probe), n=target.numel(), seed=seed, num_steps=cfg.num_steps,
               eta=cfg.eta, timestep_spacing=cfg.timestep_spacing, steps_offset=cfg.steps_offset, clip_x0=1.0)
    m = sample_metrics(setup, out["x0"], target)
    div = diversity(setup, out["x0"], target, cfg.nearest_k)
    steps = sorted(probe.steps)
    return {"fid": m["fid"], "accuracy": m["accuracy"], "time_gap": out["time_gap"], "seconds": out["seconds"],
            **div["mean"], "diversity_per_target": div["per_target"],
            "cos_steps": steps, "cos_t": [probe.steps[i][0] for i in steps],
            "cos": [probe.steps[i][1] for i in steps]}


def _cost(setup: Setup, cfg: QuestionsConfig, names: list[str]) -> dict[str, Any]:
    """The timing block: interleaved rounds of every arm at ``cost_samples`` samples, no callback; evaluations per
    sample counted in the untimed warm-up round."""
    n = cfg.cost_samples
    target = torch.tensor(cfg.targets)[torch.arange(n) % len(cfg.targets)].to(setup.device)
    grid = setup.schedule.timesteps(cfg.num_steps, cfg.timestep_spacing, cfg.steps_offset)
    models = setup.models
    sampler = get_sampler("ddim")

    def run_arm(arm: str) -> None:
        g = torch.Generator().manual_seed(0)
        x_T = torch.randn((n, *setup.eps_model.sample_shape), generator=g).to(setup.device)
        sampler(setup.eps_model, x_T, grid, setup.schedule, terms=_terms(arm, setup, target, cfg), clip_x0=1.0,
                randn_like=lambda z: torch.randn(z.shape, generator=g, dtype=z.dtype).to(z.device), eta=cfg.eta)

    evals = {}
    for arm in names:
        with EvalCounter(eps_model=models["eps_model"], time_predictor=models["time_predictor"],
                         classifier=models["clf_noisy"] if arm.startswith("cg") else models["clf_clean"]) as c:
            run_arm(arm)
        evals[arm] = c.per_sample(n)
    times: dict[str, list[float]] = {a: [] for a in names}
    for _ in range(cfg.cost_rounds):
        for arm in names:
            clock = stopwatch()
            run_arm(arm)
            times[arm].append(clock() / n)
    out = {}
    for arm in names:
        base = arm.partition("+")[0]
        ratios = [a / b for a, b in zip(times[arm], times[base])]
        med = float(np.median(times[arm]))
        out[arm] = {"seconds_per_sample": med, "rounds": times[arm], "evals_per_sample": evals[arm],
                    "ratio_of_medians": med / float(np.median(times[base])), "ratios": ratios,
                    "ratio_ci": paired_ci([1.0] * len(ratios), ratios) if arm != base else None}
    return {"samples": n, "rounds": cfg.cost_rounds, "arms": out}


METRICS = ("fid", "accuracy", "time_gap", "precision", "recall", "density", "coverage", "vendi")


def _measure(setup: Setup, cfg: QuestionsConfig, cache: RunCache, progress: bool) -> dict[str, Any]:
    clock = stopwatch()
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("seeds", "device", "cost_samples", "cost_rounds",
                                                                    "methods", "every")}
    base = {"exp": "questions", "settings": short_hash(json.dumps({**settings, "checkpoints": setup.models_dir},
                                                                  sort_keys=True))}
    names = arms(cfg)
    runs: dict[str, list[dict[str, Any]]] = {a: [] for a in names}
    for seed in cfg.seeds:  # seed by seed, the arms interleaved
        for arm in names:
            r = cache.get({**base, "arm": arm, "seed": seed}, lambda arm=arm, seed=seed: questions_run(
                setup, cfg, arm, seed))
            runs[arm].append(r)
            if progress:
                print(f"  seed {seed} {arm:11s} FID {r['fid']:7.2f}  Time Gap {r['time_gap']:6.1f}  recall "
                      f"{r['recall']:.3f}  Vendi {r['vendi']:.2f}  {r['seconds']:5.1f} s", flush=True)
    cost = cache.get({**base, "cost": cfg.cost_samples, "rounds": cfg.cost_rounds, "arms": ",".join(names)},
                     lambda: _cost(setup, cfg, names))
    if progress:
        print("  cost: " + ", ".join(f"{a} ×{c['ratio_of_medians']:.2f}" for a, c in cost["arms"].items()), flush=True)
    quality = {a: {k: mean_std([r[k] for r in rs]) for k in METRICS} for a, rs in runs.items()}
    effect = {a: {k: paired_ci(quality[a.partition("+")[0]][k]["values"], quality[a][k]["values"]) for k in METRICS}
              for a in names if "+" in a}
    points = [(a, s, r["time_gap"], r["fid"]) for a, rs in runs.items() for s, r in zip(cfg.seeds, rs)]
    gap_fid = {**spearman_ci([p[2] for p in points], [p[3] for p in points]),
               "points": [{"arm": a, "seed": s, "time_gap": g, "fid": f} for a, s, g, f in points]}
    conflict: dict[str, Any] = {}
    for m in cfg.methods:
        tagged = runs[f"{m}+tag"]
        if not tagged[0]["cos"]:
            continue
        curves = np.array([r["cos"] for r in tagged])
        means = [float(np.mean(r["cos"])) for r in tagged]
        gains = [b["fid"] - r["fid"] for b, r in zip(runs[m], tagged)]
        conflict[m] = {"t": tagged[0]["cos_t"], "cosine": curves.mean(0).tolist(), "cosine_min": curves.min(0).tolist(),
                       "cosine_max": curves.max(0).tolist(), "mean_cosine": means,
                       "mean_cosine_ci": paired_ci([0.0] * len(means), means), "fid_gain": gains}
    pooled = [(c, g) for v in conflict.values() for c, g in zip(v["mean_cosine"], v["fid_gain"])]
    gain_vs_cos = spearman_ci(*zip(*pooled)) if len(pooled) > 2 else None
    real_vendi = {y: v["vendi_real"] for y, v in runs[names[0]][0]["diversity_per_target"].items()}
    return {"seeds": list(cfg.seeds), "arms": names, "cost": cost, "quality": quality, "tag_effect": effect,
            "time_gap_vs_fid": gap_fid, "conflict": conflict, "fid_gain_vs_cosine": gain_vs_cos,
            "vendi_real_per_target": real_vendi,
            "samples": {"per_target": cfg.num_per_target, "targets": list(cfg.targets),
                        "per_run": cfg.num_per_target * len(cfg.targets)},
            "seconds": clock()}


def _record(setup: Setup, cfg: QuestionsConfig) -> dict[str, Any]:
    return {"sampler": "ddim", "clip_x0": 1.0, "fid_features": "EvalClassifier.features (128-d)",
            "reference_images_per_target": {str(y): int((setup.held_y == y).sum()) for y in cfg.targets}}


def _num(v: float, digits: int) -> str:
    return "nan" if v is None or math.isnan(v) else f"{v:+.{digits}f}"


def _ci(ci: dict[str, Any], rel: bool = False, digits: int = 3) -> str:
    """The paired change and its Student-t 95 % interval (relative in % with ``rel``)."""
    if rel:
        return (f"{100 * ci['rel']:+.1f} % [{_num(100 * ci['t_rel_lo'], 1)}, {_num(100 * ci['t_rel_hi'], 1)}]")
    return f"{ci['diff']:+.{digits}f} [{_num(ci['t_lo'], digits)}, {_num(ci['t_hi'], digits)}]"


def _holds_zero(ci: dict[str, Any]) -> bool:
    return math.isnan(ci["t_lo"]) or ci["t_lo"] <= 0 <= ci["t_hi"]


def _reading_fid(ci: dict[str, Any]) -> str:
    if _holds_zero(ci):
        return "FID change within the noise: TAG not shown to help"
    return "TAG lowers FID" if ci["diff"] < 0 else "TAG raises FID: it hurts here"


def _reading_div(name: str, ci: dict[str, Any]) -> str:
    if _holds_zero(ci):
        return "no change beyond the noise"
    up = ci["diff"] > 0
    if name in ("recall", "coverage", "vendi"):
        return "more diverse" if up else "TAG costs diversity"
    return "closer to the real images" if up else "less faithful"


def _table(results: dict[str, Any], cfg: QuestionsConfig) -> str:
    seeds = ",".join(map(str, results["seeds"]))
    q, eff, cost = results["quality"], results["tag_effect"], results["cost"]
    rounds = f"{cost['rounds']} timing rounds"
    rows: list[list[str]] = []
    for m in cfg.methods:
        c0 = cost["arms"][m]
        for a in arms(cfg)[arms(cfg).index(m) + 1:arms(cfg).index(m) + 2 + len(cfg.every)]:
            c = cost["arms"][a]
            e0, e = c0["evals_per_sample"], c["evals_per_sample"]
            evals = "; ".join(
                f"{label} {e0[k]['forward']:.0f}+{e0[k]['backward']:.0f} → {e[k]['forward']:.0f}+{e[k]['backward']:.0f}"
                for label, k in (("ε-model", "eps_model"), ("time predictor", "time_predictor"),
                                 ("classifier", "classifier")))
            ratio = c["ratio_ci"]
            rows.append(["1 cost", f"{a} / {m}: wall-clock per sample", f"{1e3 * c0['seconds_per_sample']:.1f} ms",
                         f"{1e3 * c['seconds_per_sample']:.1f} ms",
                         f"×{c['ratio_of_medians']:.2f} (mean ratio {1 + ratio['diff']:.2f} "
                         f"[{1 + ratio['t_lo']:.2f}, {1 + ratio['t_hi']:.2f}])", rounds, evals])
            rows.append(["1 cost", f"{a} / {m}: FID", f"{q[m]['fid']['mean']:.2f}", f"{q[a]['fid']['mean']:.2f}",
                         _ci(eff[a]["fid"], rel=True), seeds, _reading_fid(eff[a]["fid"])])
    g = results["time_gap_vs_fid"]
    rows.append(["2 Time Gap vs FID", f"Spearman ρ over {g['n']} runs (arms × seeds)", "", "",
                 f"ρ = {g['rho']:+.2f} [{_num(g['lo'], 2)}, {_num(g['hi'], 2)}] (bootstrap)", seeds,
                 "runs with a larger Time Gap have a higher FID" if g["lo"] > 0 else
                 "no rank relation beyond the noise" if g["lo"] <= 0 <= g["hi"] else
                 "runs with a larger Time Gap have a lower FID"])
    for m in cfg.methods:
        a = f"{m}+tag"
        for k in ("precision", "recall", "density", "coverage", "vendi"):
            d = 2 if k == "vendi" else 3
            rows.append(["3 diversity", f"{a} vs {m}: {k}", f"{q[m][k]['mean']:.{d}f}", f"{q[a][k]['mean']:.{d}f}",
                         _ci(eff[a][k], digits=d), seeds, _reading_div(k, eff[a][k])])
    for m, c in results["conflict"].items():
        ci = c["mean_cosine_ci"]
        sign = ("slightly opposed, " if ci["t_hi"] < 0 else "slightly aligned, " if ci["t_lo"] > 0 else "")
        sign = (f"{sign}nearly orthogonal (cosine within ±0.1): no conflict to speak of" if abs(ci["diff"]) < 0.1 else
                "TAG and the guidance pull apart" if ci["t_hi"] < 0 else
                "TAG and the guidance pull together" if ci["t_lo"] > 0 else "no systematic alignment")
        rows.append(["4 conflict", f"{m}+tag: mean cos(ω_t·TLS, Δs) over steps", "", "",
                     f"{ci['diff']:+.3f} [{_num(ci['t_lo'], 3)}, {_num(ci['t_hi'], 3)}]", seeds, sign])
    gc = results["fid_gain_vs_cosine"]
    if gc is not None:
        rows.append(["4 conflict", f"FID gain of TAG vs mean cosine, Spearman ρ over {gc['n']} (method, seed)", "", "",
                     f"ρ = {gc['rho']:+.2f} [{_num(gc['lo'], 2)}, {_num(gc['hi'], 2)}] (bootstrap)", seeds,
                     "no rank relation beyond the noise" if gc["lo"] <= 0 <= gc["hi"] else
                     "larger cosine, larger gain" if gc["lo"] > 0 else "larger cosine, smaller gain"])
    s = results["samples"]
    head = (f"The reviewers' questions on {cfg.dataset}: targets {s['targets']}, {s['per_target']} samples per target "
            f"per run, DDIM(η={cfg.eta}) {cfg.num_steps} steps, ω_0 = {cfg.omega}, DPS scale "
            f"{cfg.dps_guidance_scale:g}, CG scale {cfg.cg_guidance_scale:g}, MPGD scale {cfg.mpgd_scale:g}; seeds "
            f"{seeds}. `+tag/k`: TAG at every k-th step only. Changes: paired over seeds with the Student-t 95 % "
            "interval (FID relative, others absolute). Cost: medians over interleaved timing rounds of "
            f"{cost['samples']} samples (no Time-Gap recorder), the ratio of medians and the mean per-round ratio "
            "with its t interval; evaluations per sample (forward+backward passes) from hooks on each network. "
            "Diversity: prdc (k = "
            f"{cfg.nearest_k}) and Vendi in the evaluation classifier's features against the held-out images of each "
            "target class, averaged over targets.\n\n")
    return head + markdown_table(["question", "quantity", "without TAG", "with TAG", "change [95 % CI]", "seeds",
                                  "reading"], rows)


def _figure(path: Path, results: dict[str, Any], cfg: QuestionsConfig, setup: Setup) -> None:
    """Left: FID against wall-clock per sample for every arm (each method's line: no TAG, TAG every k-th step, TAG
    at every step). Right: the cosine between TAG's step and the guidance's Δs over t (mean over seeds, band: the
    seeds' range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a0, a1) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    cost, q = results["cost"]["arms"], results["quality"]
    for m in cfg.methods:
        line = [m, *(f"{m}+tag/{k}" for k in sorted(cfg.every, reverse=True)), f"{m}+tag"]
        xs = [1e3 * cost[a]["seconds_per_sample"] for a in line]
        ys = [q[a]["fid"]["mean"] for a in line]
        es = [q[a]["fid"]["std"] for a in line]
        a0.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m)
        for a, x, y in zip(line, xs, ys):
            a0.annotate(a.partition("+")[2] or "no TAG", (x, y), fontsize=7, textcoords="offset points",
                        xytext=(4, 4))
    a0.set_xlabel("wall-clock per sample (ms, median of interleaved rounds)")
    a0.set_ylabel("FID (mean ± std over seeds)")
    a0.set_yscale("log")
    a0.legend(fontsize=8)
    a0.set_title("FID against cost", fontsize=9)
    for m, c in results["conflict"].items():
        a1.plot(c["t"], c["cosine"], label=f"{m}+tag")
        a1.fill_between(c["t"], c["cosine_min"], c["cosine_max"], alpha=0.2)
    a1.axhline(0, color="gray", lw=0.8)
    a1.invert_xaxis()
    a1.set_xlabel("training timestep t (sampling runs right to left)")
    a1.set_ylabel("cos(ω_t·TLS, guidance Δs), mean over samples")
    a1.legend(fontsize=8)
    a1.set_title("Conflict between TAG and the guidance", fontsize=9)
    fig.suptitle(f"The reviewers' questions ({cfg.dataset}, seeds {list(results['seeds'])}, "
                 f"{results['samples']['per_run']} samples per run)", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


EXPERIMENT = Experiment(
    "questions", QuestionsConfig, "the reviewers' questions: cost, Time Gap vs FID, diversity, conflict (± TAG)",
    _validate, _table, measure=_measure, record=_record, figure=_figure, check_targets=True,
    tail=("seconds",), load=lambda cfg: load_setup(cfg.dataset, cfg.models_dir, cfg.data_dir, cfg.device))
