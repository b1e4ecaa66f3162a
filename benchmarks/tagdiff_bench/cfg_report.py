"""Table and figure of ``tagdiff bench cfg`` (:mod:`tagdiff.bench.cfg`), from its ``results`` dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import fmt_ci, fmt_ms, markdown_table

__all__ = ["figure", "table"]

FAMILY_NAMES = {"cfg": "CFG", "apg": "APG", "cfgzero": "CFG-Zero*", "interval": "interval", "cfg++": "CFG++"}


def _cells(results: dict[str, Any], family: str) -> list[tuple[float, dict[str, Any]]]:
    return [(float(k.split("/", 1)[1]), r) for k, r in results["runs"].items() if k.split("/", 1)[0] == family]


def table(results: dict[str, Any], cfg: Any) -> str:
    """``table.md``: one row per (family, scale) with mean ± std over the evaluation seeds, without → with TAG, the
    paired change of FID with its 95 % interval ("(noise)" when it holds 0), then the per-seed FIDs."""
    rows, seeds = [], []
    for key, r in results["runs"].items():
        family, scale = key.split("/", 1)
        a, b = r["without"], r.get("with")

        def pair(m: str, digits: int, std: bool = True, a: dict = a, b: dict | None = b, r: dict = r) -> str:
            def one(s: dict) -> str:
                return fmt_ms(s[m], digits) if std else f"{s[m]['mean']:.{digits}f}"

            return one(a) if b is None or r["best_omega"] == 0 else f"{one(a)} → {one(b)}"

        if b is None:
            ci, w = "–", "–"
        else:
            w = f"{r['best_omega']:g}"
            ci = "no TAG chosen" if r["best_omega"] == 0 else fmt_ci(r["paired"]["fid"], "t")
        rows.append([FAMILY_NAMES[family], scale, w, pair("fid", 2), ci, pair("accuracy", 3),
                     pair("time_gap", 0, False), pair("saturation", 3, False), pair("intensity_w1", 3, False)])
        per = ", ".join(f"{v:.2f}" for v in a["fid"]["values"])
        seeds.append([FAMILY_NAMES[family], scale, per,
                      "–" if b is None else ", ".join(f"{v:.2f}" for v in b["fid"]["values"])])
    ref = results["reference"]
    flow = results["config"].get("sampler") == "flow euler"
    clip = ("flow Euler on the model's σ grid from σ = 1 − 1/T, no x̂_0 clip" if flow else
            f"x̂_0 clipped to ±{cfg.clip_x0:g} (CFG++: unclipped sampler, x̂_0^λ clipped to ±{cfg.cfgpp_clip_x0:g})"
            if not results["config"].get("latent") else
            f"latent model (VAE {cfg.vae}): guidance, TAG and the Time Gap on latents with the latent predictor, x̂_0 "
            "not clamped, samples decoded and clamped to [-1, 1] before every metric")
    head = (f"Classifier-free guidance ± TAG, {cfg.dataset}: {results['config']['classes']} classes × "
            f"{cfg.num_per_target} samples per evaluation seed {list(cfg.seeds)} (mean ± std); ω_0 ∈ "
            f"{{0, {', '.join(f'{w:g}' for w in cfg.omegas)}}} chosen per (method, scale) by FID on seed "
            f"{cfg.sweep_seed} ({cfg.sweep_per_target} per class). "
            + (f"{cfg.num_steps} steps, " if flow else
               f"DDIM η = 0, {cfg.num_steps} steps ({cfg.timestep_spacing} grid), ")
            + f"{clip}; interval = training timesteps {results['window'][0]}.."
            f"{results['window'][1]} (σ in ({cfg.interval_sigma[0]:g}, {cfg.interval_sigma[1]:g}]). CFG++'s column "
            "'scale' is its λ. FID: mean over classes of the per-class FID in the evaluation classifier's features; "
            f"saturation: fraction of pixels with |x_0| > 0.98 (held-out images: {ref['saturation_held_out']:.3f}); "
            "intensity W1: Wasserstein-1 distance of the pixel intensities to the held-out images. Each cell: "
            "without → with TAG (ω*; one value where ω* = 0 or the method has no TAG run); Time Gap, saturation and "
            "W1 are means; ΔFID: paired change with TAG and its 95 % t-interval over the seeds.\n\n")
    body = markdown_table(["method", "scale", "ω*", "FID", "ΔFID (TAG)", "accuracy", "Time Gap", "saturation",
                           "intensity W1"], rows)
    out = (head + body + "\n\nFID per evaluation seed " + f"{list(cfg.seeds)}:\n\n"
           + markdown_table(["method", "scale", "without TAG", "with TAG"], seeds))
    if results.get("runs_ctag"):
        crow = []
        for key, r in results["runs_ctag"].items():
            family, scale = key.split("/", 1)
            a, b, w = r["without"], r["with"], r["best_omega"]
            same = w == 0
            crow.append([FAMILY_NAMES[family], scale, f"{w:g}", fmt_ms(a["fid"], 2),
                         "=" if same else fmt_ms(b["fid"], 2),
                         "no TAG chosen" if same else fmt_ci(r["paired"]["fid"], "t"),
                         f"{a['accuracy']['mean']:.3f}" + ("" if same else f" → {b['accuracy']['mean']:.3f}"),
                         f"{a['time_gap']['mean']:.0f}" + ("" if same else f" → {b['time_gap']['mean']:.0f}"),
                         ", ".join(f"{v:.2f}" for v in b["fid"]["values"])])
        out += ("\n\nTAG with the class-conditional time predictor p(t | x, y) (+ctag; ω_0 chosen the same way; Time "
                "Gap of the unconditional predictor):\n\n"
                + markdown_table(["method", "scale", "ω*", "FID", "FID + cTAG", "ΔFID", "accuracy", "Time Gap",
                                  "FID + cTAG per seed"], crow))
    return out


def figure(path: Path, results: dict[str, Any], cfg: Any) -> None:
    """``cfg.png``: FID, accuracy, saturation, intensity W1 and Time Gap against the guidance scale (log2 axis) for
    CFG, APG and the interval, with (solid) and without (dashed) TAG (dotted: TAG with the class-conditional
    predictor; a "with" point equals "without" where ω* = 0), error bars ± std over seeds; below, the same for
    CFG++ against its λ (linear axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = (("fid", "FID (per class)"), ("accuracy", "accuracy"), ("saturation", "saturation (|x_0| > 0.98)"),
               ("intensity_w1", "intensity W1 to held-out"), ("time_gap", "Time Gap"))
    has_pp = bool(_cells(results, "cfg++"))
    fig, axes = plt.subplots(1 + has_pp, len(metrics), figsize=(18, 3.6 * (1 + has_pp)), squeeze=False)
    colors = {"cfg": "C0", "apg": "C1", "interval": "C2", "cfg++": "C3", "cfgzero": "C4"}
    for row, families in enumerate((("cfg", "apg", "cfgzero", "interval"), ("cfg++",))[: 1 + has_pp]):
        for j, (m, label) in enumerate(metrics):
            ax = axes[row, j]
            for family in families:
                cells = sorted(_cells(results, family), key=lambda c: c[0])
                if not cells:
                    continue
                xs = [c[0] for c in cells]
                ctag = dict(_cells({"runs": results.get("runs_ctag", {})}, family))
                for name, style in (("without", "--"), ("with", "-"), ("ctag", ":")):
                    if name == "ctag":
                        if not ctag:
                            continue
                        pts = [(x, ctag[x]["with"][m]) for x in xs if x in ctag]
                    elif name not in cells[0][1]:
                        continue
                    else:
                        pts = [(c[0], c[1][name][m]) for c in cells]
                    suffix = {"without": "", "with": " + TAG", "ctag": " + class TAG"}[name]
                    ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts], yerr=[p[1]["std"] for p in pts],
                                fmt=style, marker="o", ms=3, capsize=2, color=colors[family],
                                label=f"{FAMILY_NAMES[family]}{suffix}")
            if row == 0:
                ax.set_xscale("log", base=2)
                ax.set_xlabel("guidance scale s")
            else:
                ax.set_xlabel("CFG++ λ")
            if m == "fid":
                ax.set_yscale("log")
            ax.set_title(label, fontsize=9)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"bench cfg, {cfg.dataset}: mean ± std over seeds {list(cfg.seeds)} "
                 f"({cfg.num_per_target} per class); dashed: without TAG, solid: with TAG (ω_0 per scale)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
