r"""Multi-condition guidance with and without TAG on digits: class + stroke thickness or slant (docs/notation.md
§3.7, §7.3;
Table 5 analogue).

Two conditions are guided at once, with TFG's combined guidance (the per-condition losses are summed,
docs/notation.md §4.4):

* **class** c_1 = y: ``ℓ_1(x̂_0) = −log p(y | x̂_0)`` of the clean classifier ``clf_clean`` (DPS label loss);
* **stroke thickness** c_2 ∈ {thin, thick}: the ink mass ``m(x) = mean over pixels of (x + 1)/2`` (the fraction of
  "ink" in [0, 1]) must reach a per-class target, ``ℓ_2(x̂_0) = (m(x̂_0) − m*_y)² / s²``. The target m*_y is the
  ``thick_quantile`` (default 0.75) quantile of class y's held-out ink for "thick" and the ``1 − thick_quantile``
  quantile for "thin".

Ink scale s (``ink_scale``, default 0.025). On digits the held-out ink of a class has quartiles about
median ± 0.025 (within-class std ≈ 0.03), so s = 0.025 ≈ the distance from the median to the target: an image at the
class median has ℓ_2 = 1, one two quartile-widths off has ℓ_2 = 4, the range of the label loss of a doubtful digit
(−log 0.1 = 2.3). It was checked with DPS alone (no TAG) on the validation seeds 100 and 101 only (4 default targets ×
32 samples; joint success / class accuracy / ink success / FID):

    s = ∞ (no ink term)   0.49 / 0.98 / 0.49 / 10.4
    s = 0.1               0.95 / 0.97 / 0.98 / 13.8
    s = 0.05              0.95 / 0.95 / 0.99 / 18.6
    s = 0.025             0.93 / 0.96 / 0.97 / 19.1   (seed 101: 0.91 / 0.93 / 0.98 / 32.4)
    s = 0.02              0.52 / 0.84 / 0.61 / 69.9
    s = 0.0125            0.16 / 0.28 / 0.55 / 272

(Each row is the ``dps`` row of the validation grid in ``table.md`` of
``tagdiff bench multicond --ink-scale S --out DIR``; add ``--sweep-seed 101`` for seed 101 and use
``--ink-scale 1e9`` for "no ink term".)

Both losses matter at s = 0.025 (the ink term lifts the ink success from chance to 97% while the class accuracy stays
near 96%), and it is the strongest ink term before the summed guidance breaks down (s <= 0.02): FID is already about
twice that of class guidance alone, i.e. the summed guidance pushes samples off the data manifold, the regime TAG
targets (the sum of per-condition scores is not the joint score, docs/notation.md §3.7). The ink loss is taken on the
unclipped
x̂_0 (its gradient never vanishes); the evaluation uses the final sample.

**Second attribute classifier** (``attribute="slant"``): c_2 ∈ {left, right}, the slant ``s(x) = −μ₁₁/μ₀₂`` of
the ink (:func:`tagdiff.data.attributes.slant`) below / above the class's training median. It is guided by a learned
attribute classifier, ``ℓ_2(x̂_0) = −log p(c_2 | x̂_0)`` of ``clf_slant`` (a clean 2-class classifier,
``tagdiff train classifier --kind clean --attribute slant``), with the same weight as the class loss (TFG's combined
guidance sums the losses); success is judged by the measured slant against the held-out class median, never by the
classifier. The joint predictor is ``time_predictor_class_slant`` (``--condition class_slant``).

Both losses enter one ``DPSGuidance(combined_loss(ℓ_1, ℓ_2), dps_guidance_scale)`` (the gradient goes through the
ε-model).
Methods (the paper's Table 5 rows; TAG is applied before each reverse step, Alg. 1, ω_t = ω_0 (1 − ᾱ_t)):

* **DPS** (the baseline, no TAG);
* **joint** (option a, "Multi"): a predictor conditioned on the joint condition ``c = 2 y + b`` (b = 1 thick / right,
  0 thin / left; 20 conditions), shipped in ``assets/digits/time_predictor_class_ink`` (``…_class_slant``);
* **single** (option b, Prop. B.1): the class-conditional predictor (``assets/digits/time_predictor_class``) at
  ``x′ = x − η_t² ∇ℓ_2(x̂_0)``, the point that already reflects the second condition;
* **unconditional** (option c, Prop. B.2): the shipped unconditional predictor at x″ (reparameterised by ℓ_1 = class,
  then ℓ_2; the paper does not fix the order).

η_t² = η_0² (1 − ᾱ_t) (:mod:`tagdiff.guidance.multicond`, its ``reparam_scale``). Here η_0 is called the
*reparameterisation
scale* (``reparam_scale``; DDIM's η is ``ddim_eta``, a different thing). The paper gives no η_0; it is swept over
``reparam_scales``. With η_0² = ``dps_guidance_scale`` (η_0 = 4 at the default scale 16) the reparameterisation
moves x_t by about as much as the DPS term does in one step (docs/notation.md §3.7 [INFERRED]: "reuse the guidance
step"), so the default grid {0, 1, 2, 4} spans "no reparameterisation" to "the DPS step". η_0 = 0 evaluates the
predictor at x itself.

Protocol: every setting (ω_0 ∈ ``omegas`` for each variant, and η_0 ∈ ``reparam_scales`` for single/unconditional)
is run on
the validation seed ``sweep_seed``; the best is the one with the highest joint success, ties broken by lower FID, then
by smaller ω_0/η_0. The reported numbers are mean ± std over ``seeds`` at the chosen settings: DPS, joint at its ω_0*,
and single/unconditional at every η_0 (each at its own best ω_0) with the chosen η_0* marked. All runs share x_T and
the sampling noise for a seed (common random numbers), so a ω = 0 run of any variant is the DPS run bit for bit.

Evaluation (models never used for guidance): class by the independent evaluation classifier ``clf_eval``; thickness
by m(x) of the final sample against the class's *held-out median* (thick: m > median, thin: m < median); joint
success = both. FID against the held-out images of the target class (feature space of ``clf_eval``, averaged over the
target classes) and the Time Gap of the unconditional predictor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tagdiff.data.attributes import attribute_quantiles, get_attribute
from tagdiff.data.ink import INK_LEVELS, ink_bins, ink_loss, ink_mass, ink_quantiles, joint_condition, parse_targets
from tagdiff.guidance import DPSGuidance, MultiConditionTAG, Term, combined_loss, label_loss

from .common import (
    ExperimentConfig,
    RunCache,
    Setup,
    draw,
    fmt_ms,
    grid_key,
    mean_std,
    preview,
    sample_metrics,
    short_hash,
)
from .multicond_report import PREVIEW_PER_TARGET, cell_name, figure, table
from .runner import Experiment, run

__all__ = ["MultiCondConfig", "Targets", "run_multicond", "ink_mass", "ink_loss", "ink_bins", "ink_quantiles",
           "joint_condition", "parse_targets", "make_targets", "multicond_terms", "evaluate", "load_predictors",
           "resolve_targets", "INK_LEVELS", "METHODS", "PAPER", "DEFAULT_TARGETS", "EXPERIMENT"]

METHODS = ("dps", "joint", "single", "unconditional")
PAPER = {"source": "the paper's Table 5 (CelebA-HQ, accuracy % = all target attributes correct; log-KID)",
         "accuracy": {"dps": [80.5, 92.1], "joint": [87.1, 94.9], "single": [91.0, 96.1],
                      "unconditional": [89.1, 96.0]},
         "log_kid": {"dps": [-2.75, -3.16], "joint": [-2.85, -3.19], "single": [-2.86, -3.27],
                     "unconditional": [-2.87, -3.08]},
         "pairs": ["Gender+Age", "Gender+Hair"]}
DEFAULT_TARGETS = {"ink": ("0:thick", "1:thin", "7:thick", "8:thin"),
                   "slant": ("0:right", "1:left", "7:right", "8:left")}


# ---------------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class MultiCondConfig(ExperimentConfig):
    """Settings (see the module docstring). ``ddim_eta`` is the sampler's (DDIM's) η; ``reparam_scales`` are the
    reparameterisation scales η_0 of Prop. B.1/B.2; ``omegas`` TAG's ω_0; ``dps_guidance_scale`` the DPS guidance scale.
    ``models_dir`` is a folder like the shipped assets (``unet/``, ``time_predictor/``, ``clf_*``, and
    ``time_predictor_class/``, ``time_predictor_class_<attribute>/`` and, for slant, ``clf_slant/``);
    ``class_predictor`` / ``joint_predictor`` / ``attribute_classifier`` override them. ``attribute`` is the second
    condition: ``ink`` (analytic loss, scale ``ink_scale``) or ``slant`` (attribute classifier). Empty ``targets``
    mean the attribute's :data:`DEFAULT_TARGETS`."""

    attribute: str = field(default="ink", metadata={"choices": tuple(DEFAULT_TARGETS), "help": "second condition: "
                                                    "ink (stroke thickness, analytic loss) or slant (a classifier)"})
    targets: tuple[str, ...] = field(default=(), metadata={"help": "comma-separated CLASS:LEVEL pairs or 'all' "
                                     "(default: 0:thick,1:thin,7:thick,8:thin for ink, 0:right,1:left,7:right,8:left "
                                     "for slant)"})
    num_per_target: int = 32
    sweep_per_target: int = 32
    num_steps: int = 50
    ddim_eta: float = 1.0
    dps_guidance_scale: float = field(default=16.0, metadata={"aliases": ("--dps-scale",)})
    ink_scale: float = 0.025
    thick_quantile: float = 0.75
    omegas: tuple[float, ...] = (0.5, 1.0, 2.0)
    reparam_scales: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0)
    class_predictor: str | None = None
    joint_predictor: str | None = None
    attribute_classifier: str | None = None


@dataclass(frozen=True)
class Targets:
    """Per-sample targets of one run (targets repeated ``n`` times each, in order)."""

    classes: Tensor   # (B,) int64
    bins: Tensor      # (B,) int64, attribute level (1 = thick / right: above the class median)
    value: Tensor     # (B,) float32, target value m* of the attribute (ink: the guidance target)
    median: Tensor    # (B,) float32, held-out class median (the evaluation threshold)


def resolve_targets(cfg: MultiCondConfig) -> tuple[str, ...]:
    """``cfg.targets``, or the attribute's default targets when empty. Raises ValueError for an unknown attribute."""
    get_attribute(cfg.attribute)
    if cfg.attribute not in DEFAULT_TARGETS:
        raise ValueError(f"bench multicond supports the attributes {', '.join(DEFAULT_TARGETS)}, got {cfg.attribute!r}")
    return tuple(cfg.targets) or DEFAULT_TARGETS[cfg.attribute]


def _validate(cfg: MultiCondConfig) -> None:
    resolve_targets(cfg)
    if cfg.ddim_eta < 0 or any(e < 0 for e in cfg.reparam_scales) or not cfg.reparam_scales:
        raise ValueError(f"ddim_eta and reparam_scales must be >= 0: got ddim_eta={cfg.ddim_eta} and "
                         f"reparam_scales={list(cfg.reparam_scales)}")
    if any(w <= 0 for w in cfg.omegas) or not cfg.omegas:
        raise ValueError(f"omegas must be positive TAG strengths (ω = 0 is the DPS row), got {list(cfg.omegas)}")
    if cfg.dps_guidance_scale < 0:
        raise ValueError(f"dps_guidance_scale must be >= 0, got {cfg.dps_guidance_scale}")
    if not 0.5 < cfg.thick_quantile < 1:
        raise ValueError(f"thick_quantile must be in (0.5, 1), got {cfg.thick_quantile}")
    if min(cfg.num_per_target, cfg.sweep_per_target) < 2 or cfg.num_steps < 1:
        raise ValueError("num_per_target and sweep_per_target must be >= 2 (FID needs two samples) and num_steps >= 1")
    ink_loss(0.0, cfg.ink_scale)


def load_predictors(setup: Setup, cfg: MultiCondConfig) -> dict[str, Any]:
    """The time predictor of each TAG variant, ``{"joint": 2K conditions, "single": K, "unconditional": …}``, and
    for ``attribute="slant"`` the attribute classifier under ``"attribute"`` (2 classes: left, right).

    Raises:
        CheckpointError: a missing predictor folder. ValueError: a predictor with the wrong number of conditions, or
            an attribute classifier trained for another attribute.
    """
    from tagdiff.guidance.temporal import check_time_predictor
    from tagdiff.models.checkpoints import load_model, read_config

    root = Path(setup.models_dir)
    K = setup.models["clf_eval"].num_classes
    joint = f"class_{cfg.attribute}"
    preds = {"joint": load_model(cfg.joint_predictor or root / f"time_predictor_{joint}", setup.device),
             "single": load_model(cfg.class_predictor or root / "time_predictor_class", setup.device),
             "unconditional": setup.models["time_predictor"]}
    for name, want, how in (("joint", 2 * K, joint), ("single", K, "class")):
        n = getattr(preds[name], "num_classes", None)
        if n != want:
            raise ValueError(f"the {name} time predictor must have {want} conditions (train time-predictor "
                             f"--condition {how}), got num_classes={n}")
    for p in preds.values():
        check_time_predictor(p.eval(), setup.held_x[:1], setup.schedule)
    if cfg.attribute != "ink":
        path = cfg.attribute_classifier or root / f"clf_{cfg.attribute}"
        trained_for = read_config(path).get("attribute")
        if trained_for != cfg.attribute:
            raise ValueError(f"{path} is not a {cfg.attribute} classifier (train classifier --kind clean --attribute "
                             f"{cfg.attribute}); its config.json records attribute={trained_for!r}")
        preds["attribute"] = load_model(path, setup.device).eval()
    return preds


def multicond_terms(method: str, setup: Setup, preds: dict[str, Any], tg: Targets, cfg: MultiCondConfig,
                    omega: float = 0.0, reparam_scale: float = 0.0) -> list[Term]:
    """``[MultiConditionTAG (if method != "dps"), DPSGuidance(ℓ_class + ℓ_attr)]`` for per-sample targets ``tg``;
    ``reparam_scale`` is η_0 of x′ / x″ (MultiConditionTAG's ``reparam_scale``), ``omega`` TAG's ω_0.

    ℓ_attr is ``(m(x̂_0) − m*)² / ink_scale²`` for ink and ``−log p(b | x̂_0)`` of the attribute classifier
    (``preds["attribute"]``) for slant.

    Raises:
        ValueError: an unknown method.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    l_class = label_loss(setup.models["clf_clean"], tg.classes)
    l_attr = ink_loss(tg.value, cfg.ink_scale) if cfg.attribute == "ink" else label_loss(preds["attribute"], tg.bins)
    terms: list[Term] = []
    if method == "joint":
        terms.append(MultiConditionTAG(preds["joint"], omega, "joint", condition=joint_condition(tg.classes, tg.bins)))
    elif method == "single":  # c_1 = the attribute, reflected in x′ (Prop. B.1); c_2 = class, given to the predictor
        terms.append(MultiConditionTAG(preds["single"], omega, "single", condition=tg.classes, losses=[l_attr],
                                       reparam_scale=reparam_scale))
    elif method == "unconditional":  # x″: class, then the attribute (Prop. B.2)
        terms.append(MultiConditionTAG(preds["unconditional"], omega, "unconditional", losses=[l_class, l_attr],
                                       reparam_scale=reparam_scale))
    terms.append(DPSGuidance(combined_loss(l_class, l_attr), cfg.dps_guidance_scale))
    return terms


def make_targets(setup: Setup, cfg: MultiCondConfig, n: int) -> tuple[Targets, dict[str, Any]]:
    """Per-sample targets (each target pair repeated ``n`` times) and the held-out attribute statistics used."""
    K = setup.models["clf_eval"].num_classes
    attr = get_attribute(cfg.attribute)
    classes, bins = parse_targets(resolve_targets(cfg), K, attr.levels)
    q = attribute_quantiles(cfg.attribute, setup.held_x, setup.held_y, K,
                            (1 - cfg.thick_quantile, 0.5, cfg.thick_quantile)).float()
    value = torch.where(bins == 1, q[classes, 2], q[classes, 0])
    dev = setup.device
    tg = Targets(classes.repeat_interleave(n).to(dev), bins.repeat_interleave(n).to(dev),
                 value.repeat_interleave(n).to(dev), q[classes, 1].repeat_interleave(n).to(dev))
    lo, hi = attr.levels
    stats = {str(c): {f"{lo}_target": float(q[c, 0]), "median": float(q[c, 1]), f"{hi}_target": float(q[c, 2]),
                      "n_held_out": int((setup.held_y == c).sum())} for c in sorted(set(classes.tolist()))}
    return tg, stats


def _run(setup: Setup, preds: dict[str, Any], cfg: MultiCondConfig, method: str, omega: float,
         reparam_scale: float, seed: int, n: int) -> dict[str, Any]:
    tg, _ = make_targets(setup, cfg, n)
    out = draw(setup, multicond_terms(method, setup, preds, tg, cfg, omega, reparam_scale), n=tg.classes.numel(),
               seed=seed, num_steps=cfg.num_steps, eta=cfg.ddim_eta, timestep_spacing=cfg.timestep_spacing,
               steps_offset=cfg.steps_offset)
    return {**evaluate(setup, out["x0"], tg, cfg.attribute), "time_gap": out["time_gap"], "seconds": out["seconds"],
            "preview": _preview(out["x0"], n)}


def evaluate(setup: Setup, x0: Tensor, tg: Targets, attribute: str = "ink") -> dict[str, Any]:
    """Metrics of final samples ``x0`` (``(B, C, H, W)`` in [-1, 1]) against per-sample targets ``tg`` (B entries):
    joint success, class accuracy (``clf_eval``), attribute success (its measure vs the held-out class median:
    ``ink_success`` / ``slant_success``), mean |m − m*| (``<attribute>_abs_error``), FID against the target classes'
    held-out images, and the joint success per target pair. The attribute is judged by its measure, never by the
    attribute classifier used for guidance."""
    attr = get_attribute(attribute)
    with torch.no_grad():
        pred = torch.cat([setup.models["clf_eval"](b).argmax(-1) for b in x0.split(512)])
    m = attr.measure(x0)
    class_ok = pred == tg.classes
    attr_ok = torch.where(tg.bins == 1, m > tg.median, m < tg.median)
    joint = class_ok & attr_ok
    names = [f"{int(c)}:{attr.levels[int(b)]}" for c, b in zip(tg.classes, tg.bins)]
    per_target = {p: float(joint[torch.tensor([q == p for q in names])].float().mean()) for p in dict.fromkeys(names)}
    return {"joint_success": float(joint.float().mean()), "class_accuracy": float(class_ok.float().mean()),
            f"{attribute}_success": float(attr_ok.float().mean()),
            f"{attribute}_abs_error": float((m - tg.value).abs().mean()),
            "fid": sample_metrics(setup, x0, target=tg.classes)["fid"], "per_target": per_target}


def _preview(x0: Tensor, n: int) -> list:
    k = min(n, PREVIEW_PER_TARGET)
    x = x0.reshape(-1, n, *x0.shape[1:])[:, :k].reshape(-1, *x0.shape[1:])
    return preview(x, len(x))


def _rank(m: dict[str, Any], omega: float, reparam_scale: float) -> tuple:
    """Selection order: highest joint success, then lowest FID, then the smallest ω_0 and η_0."""
    return (-m["joint_success"], m["fid"], omega, reparam_scale)


def _numeric(attribute: str) -> tuple[str, ...]:
    return ("joint_success", "class_accuracy", f"{attribute}_success", f"{attribute}_abs_error", "fid", "time_gap",
            "seconds")


def run_multicond(out_dir: str | Path, cfg: MultiCondConfig = MultiCondConfig(), *, progress: bool = True,
                  resume: bool = True) -> dict[str, Any]:
    """Run the experiment; write ``results.json``, ``table.md`` and ``multicond.png`` in ``out_dir``.

    Returns:
        ``{"rows": [{"method", "reparam_scale", "omega", "chosen", "metrics": {name: mean_std}, "per_target"}, ...],
        "sweep": {"grid": {cell: metrics}, "best": {...}}, "attribute_stats", "config", "paper"}``.
    Raises:
        ValueError: a bad target (class out of range, unknown level), an unknown attribute, η_0 < 0, ω <= 0, a sweep
            seed that is also an evaluation seed, a time predictor with the wrong number of conditions, or a wrong
            attribute classifier. CheckpointError: missing models.
    """
    return run(EXPERIMENT, out_dir, cfg, progress=progress, resume=resume)


def _measure(setup: Setup, cfg: MultiCondConfig, cache: RunCache, progress: bool) -> dict[str, Any]:
    """Every cell of the grid on the validation seed, then the chosen cells over the evaluation seeds (module
    docstring): ``{"rows", "sweep", "attribute_stats", "preview"}``."""
    parse_targets(resolve_targets(cfg), setup.models["clf_eval"].num_classes, get_attribute(cfg.attribute).levels)
    preds = load_predictors(setup, cfg)
    numeric = _numeric(cfg.attribute)
    targets = ",".join(resolve_targets(cfg))  # long strings are hashed: a cached run's file name must stay short
    paths = (setup.models_dir, cfg.class_predictor, cfg.joint_predictor, cfg.data_dir)
    if cfg.attribute != "ink":  # (the ink keys stay as they were, so earlier caches still resume)
        paths += (cfg.attribute, cfg.attribute_classifier)
    ckpt = ",".join(str(p) for p in paths)
    base = {"exp": "multicond", "dataset": cfg.dataset,
            "targets": targets if len(targets) <= 40 else short_hash(targets),
            "steps": cfg.num_steps, "ddim_eta": cfg.ddim_eta, "dps": cfg.dps_guidance_scale, "ink_scale": cfg.ink_scale,
            "q": cfg.thick_quantile, "ckpt": short_hash(ckpt), **grid_key(cfg)}

    def get(method: str, omega: float, scale: float, seed: int, n: int) -> dict[str, Any]:
        # the cache key keeps the earlier name "eta" for η_0, so runs cached before the rename still resume
        key = {**base, "method": method, "omega": float(omega), "eta": float(scale), "seed": seed, "n": n}
        return cache.get(key, lambda: _run(setup, preds, cfg, method, omega, scale, seed, n))

    # --- validation seed: every cell of the grid
    grid: dict[str, dict[str, Any]] = {}
    cells: dict[str, tuple[str, float, float]] = {"dps": ("dps", 0.0, 0.0)}
    cells.update({cell_name("joint", w): ("joint", w, 0.0) for w in cfg.omegas})
    for method in ("single", "unconditional"):
        cells.update({cell_name(method, w, e): (method, w, e) for e in cfg.reparam_scales for w in cfg.omegas})
    for name, (method, w, e) in cells.items():
        r = get(method, w, e, cfg.sweep_seed, cfg.sweep_per_target)
        grid[name] = {k: r[k] for k in numeric}
        if progress:
            print(f"  sweep {name:<28} joint {r['joint_success']:.3f}  class {r['class_accuracy']:.3f}  "
                  f"{cfg.attribute} {r[numeric[2]]:.3f}  FID {r['fid']:7.2f}  TG {r['time_gap']:6.1f}", flush=True)

    def best(method: str, scale: float | None) -> tuple[float, float]:
        cand = [(w, e) for (m, w, e) in cells.values() if m == method and (scale is None or e == scale)]
        name = {(w, e): n for n, (m, w, e) in cells.items() if m == method}
        return min(cand, key=lambda we: _rank(grid[name[we]], *we))

    chosen = {"joint": best("joint", 0.0), "single": best("single", None),
              "unconditional": best("unconditional", None)}

    # --- evaluation seeds: DPS, joint at ω*, single/unconditional at every η_0 (each at its best ω), η_0* marked
    plan = [("dps", 0.0, 0.0, True), ("joint", *chosen["joint"], True)]
    for method in ("single", "unconditional"):
        for e in cfg.reparam_scales:
            w, _ = best(method, e)
            plan.append((method, w, e, (w, e) == chosen[method]))
    rows, previews = [], {}
    for method, w, e, is_chosen in plan:
        runs = [get(method, w, e, s, cfg.num_per_target) for s in cfg.seeds]
        row = {"method": method, "reparam_scale": e if method in ("single", "unconditional") else None, "omega": w,
               "chosen": is_chosen, "metrics": {k: mean_std([r[k] for r in runs]) for k in numeric},
               "per_target": {p: mean_std([r["per_target"][p] for r in runs])["mean"] for p in runs[0]["per_target"]}}
        rows.append(row)
        if is_chosen:
            previews[method] = runs[0]["preview"]
        if progress:
            mm = row["metrics"]
            print(f"  {method:<13} η_0={e:<4} ω_0={w:<4} joint {fmt_ms(mm['joint_success'], 3)}  class "
                  f"{fmt_ms(mm['class_accuracy'], 3)}  {cfg.attribute} {fmt_ms(mm[numeric[2]], 3)}  FID "
                  f"{fmt_ms(mm['fid'], 2)}  TG {fmt_ms(mm['time_gap'])}", flush=True)
    _, attribute_stats = make_targets(setup, cfg, 1)
    return {"rows": rows,
            "sweep": {"grid": grid, "seed": cfg.sweep_seed, "criterion": "max joint_success, then min fid, then "
                      "smallest ω_0, η_0",
                      "best": {m: {"omega": w, "reparam_scale": e} for m, (w, e) in chosen.items()}},
            "attribute_stats": attribute_stats, "preview": previews}


def _record(setup: Setup, cfg: MultiCondConfig) -> dict[str, Any]:
    attr = get_attribute(cfg.attribute)
    lo, hi = attr.levels
    l_attr = "(m(x0_hat) - m*)^2 / ink_scale^2" if cfg.attribute == "ink" else "-log p_clf_slant(b | x0_hat)"
    return {"targets": list(resolve_targets(cfg)), "sampler": "ddim", "clip_x0": 1.0,
            "tag_placement": "pre", "omega_schedule": "one_minus_alpha_bar",
            "reparam_scale_schedule": "one_minus_alpha_bar (η_t² = η_0² (1 − ᾱ_t))",
            "losses": f"-log p_clf_clean(y | x0_hat) + {l_attr}",
            "joint_condition": f"2 * class + {cfg.attribute}_bin (1 = {hi})",
            "measure": f"{cfg.attribute}: {attr.description}",
            f"{cfg.attribute}_success": f"m(x0) > held-out class median ({hi}) / < median ({lo})",
            "fid_reference": "held-out images of the target class (clf_eval features)",
            "time_gap_predictor": "unconditional time_predictor"}


EXPERIMENT = Experiment(
    "multicond", MultiCondConfig,
    "class + stroke thickness (or slant) guided together; joint/single/unconditional TAG (Table 5)", _validate,
    table, measure=_measure, paper=PAPER, record=_record,
    figure=lambda path, results, cfg, setup: figure(path, results, cfg, tuple(setup.eps_model.sample_shape)))
