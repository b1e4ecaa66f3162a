"""Table and figure of ``tagdiff bench multicond`` (:mod:`tagdiff_bench.multicond`): the Table 5 analogue, every
reparameterisation scale η_0, the validation grid, success per target, and a figure of samples per method with joint
success against η_0. Both read only the results dict (and the config's settings), so this module does not import
the experiment (no import circle): ``cfg`` is the run's ``MultiCondConfig``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .common import fmt_ms, image_grid, markdown_table

__all__ = ["METHOD_NAMES", "PREVIEW_PER_TARGET", "cell_name", "table", "figure"]

METHOD_NAMES = {"dps": "DPS (baseline)", "joint": "DPS + TAG, joint φ(x, c₁, c₂)",
                "single": "DPS + TAG, single φ(x′, c)", "unconditional": "DPS + TAG, uncond. φ(x″)"}
PREVIEW_PER_TARGET = 4  # samples per target kept for the figure


def cell_name(method: str, omega: float, reparam_scale: float = 0.0) -> str:
    """Name of a validation-grid cell: ``dps``, ``joint:ω=W`` or ``<single|unconditional>:reparam=E:ω=W``."""
    if method == "dps":
        return "dps"
    return f"joint:ω={omega}" if method == "joint" else f"{method}:reparam={reparam_scale}:ω={omega}"


def table(results: dict[str, Any], cfg: Any) -> str:
    """The markdown of ``table.md``: the Table 5 analogue, every η_0, the validation grid and success per target."""
    a = cfg.attribute
    pct = ("joint_success", "class_accuracy", f"{a}_success")  # shown in %, as the paper's accuracies

    def cells(row: dict[str, Any]) -> list[str]:
        m = row["metrics"]
        return [fmt_ms({"mean": 100 * m[k]["mean"], "std": 100 * m[k]["std"]}) for k in pct] + \
            [fmt_ms(m["fid"], 2), fmt_ms(m["time_gap"])]

    def paper(method: str) -> str:
        a = results["paper"]["accuracy"][method]
        return f"{a[0]} / {a[1]}"

    main_rows = [r for r in results["rows"] if r["chosen"]]
    rows = [[METHOD_NAMES[r["method"]], "✗" if r["method"] == "dps" else "✓",
             "–" if r["reparam_scale"] is None else r["reparam_scale"],
             r["omega"] if r["method"] != "dps" else "–", *cells(r), paper(r["method"])] for r in main_rows]
    q = cfg.thick_quantile
    loss = (f"ℓ_ink (ink scale {cfg.ink_scale}, targets = the {1 - q:g}/{q:g} held-out quantiles of the class)"
            if a == "ink" else "ℓ_slant = −log p(level | x̂_0) of the slant classifier clf_slant")
    head = (f"Multi-condition guidance (class + {'stroke thickness' if a == 'ink' else a}), {cfg.dataset}: targets "
            f"{', '.join(results['config']['targets'])}, {cfg.num_per_target} samples per target per seed; "
            f"DDIM(η={cfg.ddim_eta}) {cfg.num_steps} steps, x̂_0 clipped to [-1, 1]; DPS scale "
            f"{cfg.dps_guidance_scale} on "
            f"ℓ_class + {loss}; TAG before each step, ω_t = ω_0(1-ᾱ_t), "
            f"η_t² = η_0²(1-ᾱ_t) (η_0: reparameterisation scale). ω_0 ∈ {list(cfg.omegas)} and η_0 ∈ "
            f"{list(cfg.reparam_scales)} chosen on seed "
            f"{cfg.sweep_seed} by joint success (then FID); mean ± std over seeds {list(cfg.seeds)}. Success judged "
            f"by clf_eval (class) and by the {a} measure vs the held-out class median. Paper column: Table 5 "
            "CelebA accuracy (%), Gender+Age / Gender+Hair.\n\n")
    headers = ["method", "TAG", "η_0*", "ω_0*", "joint success % ↑", "class acc. % ↑", f"{a} success % ↑", "FID ↓",
               "Time Gap", "paper Acc % (CelebA)"]
    out = head + markdown_table(headers, rows)
    scale_rows = [[r["method"], r["reparam_scale"], r["omega"], "✓" if r["chosen"] else "", *cells(r)]
                  for r in results["rows"] if r["reparam_scale"] is not None]
    out += ("\nEvery η_0 (each at its best ω_0 on the validation seed), evaluation seeds; ✓ = chosen η_0*:\n\n"
            + markdown_table(["variant", "η_0", "ω_0", "chosen", "joint success %", "class acc. %", f"{a} success %",
                              "FID", "Time Gap"], scale_rows))
    grid_rows = [[name, *(f"{100 * m[k]:.1f}" for k in pct), f"{m['fid']:.2f}", f"{m['time_gap']:.1f}"]
                 for name, m in results["sweep"]["grid"].items()]
    out += (f"\nValidation grid (seed {cfg.sweep_seed}, {cfg.sweep_per_target} samples per target):\n\n"
            + markdown_table(["setting", "joint success %", "class acc. %", f"{a} success %", "FID", "Time Gap"],
                             grid_rows))
    per = [[METHOD_NAMES[r["method"]], *(f"{100 * v:.1f}" for v in r["per_target"].values())] for r in main_rows]
    out += ("\nJoint success (%) per target, mean over seeds:\n\n"
            + markdown_table(["method", *main_rows[0]["per_target"]], per))
    return out


def figure(path: Path, results: dict[str, Any], cfg: Any, shape: tuple[int, ...]) -> None:
    """``multicond.png``: samples of each method at its chosen setting (rows: targets) and, on the validation seed,
    joint success against η_0 (each at its best ω_0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results["preview"])  # in the order of the table's rows
    fig = plt.figure(figsize=(2.2 * len(methods) + 4.2, 3.4))
    gs = fig.add_gridspec(1, len(methods) + 1, width_ratios=[1] * len(methods) + [1.8])
    k = min(cfg.num_per_target, PREVIEW_PER_TARGET)
    P = len(results["preview"][methods[0]]) // k
    for j, method in enumerate(methods):
        x = torch.tensor(results["preview"][method]).reshape(-1, *shape)
        ax = fig.add_subplot(gs[0, j])
        ax.imshow(image_grid(x, P, k), cmap="gray", vmin=0, vmax=1)
        row = next(r for r in results["rows"] if r["method"] == method and r["chosen"])
        how = "" if method == "dps" else f" ω_0={row['omega']}" + (
            "" if row["reparam_scale"] is None else f" η_0={row['reparam_scale']}")
        ax.set_title(f"{method}{how}\njoint success {100 * row['metrics']['joint_success']['mean']:.1f}%", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([(i + 0.5) * shape[-2] - 0.5 for i in range(P)],
                      list(row["per_target"]) if P == len(row["per_target"]) else [""] * P,
                      fontsize=7)
    ax = fig.add_subplot(gs[0, -1])
    grid = results["sweep"]["grid"]
    for method, style in (("single", "o-"), ("unconditional", "s-")):
        ys = [max(grid[cell_name(method, w, e)]["joint_success"] for w in cfg.omegas)
              for e in cfg.reparam_scales]
        ax.plot(list(cfg.reparam_scales), ys, style, label=f"{method} (best ω_0)")
    ax.axhline(grid[cell_name("dps", 0.0)]["joint_success"], color="k", ls="--", lw=1, label="DPS")
    ax.axhline(max(grid[cell_name("joint", w)]["joint_success"] for w in cfg.omegas), color="tab:red", ls=":", lw=1,
               label="joint (best ω_0)")
    ax.set_xlabel("reparameterisation scale η_0")
    ax.set_ylabel(f"joint success (seed {cfg.sweep_seed})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
