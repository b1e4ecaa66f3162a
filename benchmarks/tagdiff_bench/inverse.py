"""Inverse problems with DPS and TFG, with and without TAG (docs/notation.md §7.2, Table 2 deblur/SR analogue).

For each measurement operator A (:mod:`tagdiff.operators`: ×2 super-resolution, Gaussian deblur, box and random
inpainting, denoising) a fixed set of ground-truth held-out images x* (the first ``num_images`` after a permutation
seeded with 0, the same for every seed) is measured once, ``y = A(x*) + σ_y n`` (noise seeded with 0), and
reconstructed by sampling with the guidance loss ``ℓ(x̂_0) = ‖A(x̂_0) − y‖₂`` (the norm, as the DPS/TFG code):

* **DPS**: ``DPSGuidance(ℓ, dps_guidance_scale)``, score-space, gradient through the ε-model (the paper's Eq. 9);
* **TFG**: ``TFGGuidance(ℓ, ρ̄, μ̄, γ̄)``, N_iter = 4, no recurrence, "increase" schedules (docs/notation.md §4.3);
* **+TAG**: ``TemporalAlignment`` before each step (Alg. 1), ω_t = ω_0 (1 − ᾱ_t).

Sampler: DDIM(η = 1), ``num_steps`` trailing steps, x̂_0 clipped to [-1, 1]. The evaluation seed varies x_T and the
sampling noise only. ω_0 is chosen per operator and base guidance by FID (the paper's headline metric) on the
validation seed, via :func:`~tagdiff.bench.common.tag_comparison`; the table reports mean ± std over the evaluation
seeds. Metrics: per-image PSNR and SSIM against x* (torchmetrics, ``data_range=2``), FID against all held-out images
(evaluation classifier features), consistency ``mean_i ‖A(x̂_i) − y_i‖₂`` (the ground truth's own value, ≈ σ_y √m,
is reported as the noise floor), Time Gap and wall time.

Defaults (digits): ``dps_guidance_scale = 16`` and ``(ρ̄, μ̄, γ̄) = (1, 2, 0.01)`` came from a sweep on the validation
seed 100 (64 images, ω = 0, operators sr2 and inpaint_box): DPS scale ∈ {1, 4, 16, 64} gave PSNR 9.3/11.2/14.2/15.9
dB on sr2 (17.3 dB at 16, 18.5 at 64 on inpaint_box); 16 is the smallest scale that brings the consistency near the
noise floor, while 64 fits below it on sr2 (it fits the noise) and raises the Time Gap from 128 to 170-180. For TFG,
(ρ̄, μ̄) ∈ {(0.25, 2), (1, 2), (4, 2), (1, 8)} with γ̄ = 0.01 (TFG's SR/deblur value, the paper's Table 14): (1, 2) had the
best PSNR (16.2 / 18.4 dB) and consistency on both operators. Each value is an ω = 0 row of the validation grid in
``table.md`` of ``tagdiff bench inverse --operators sr2,inpaint_box --dps-guidance-scale S --tfg-rho R --tfg-mu M``.
``sr4`` is available but not a default: on 8×8 digits it
leaves a 2×2 measurement.

MNIST (28×28) takes ``--dps-guidance-scale 64``: the loss gradient ``Aᵀr/‖r‖`` has unit norm whatever the image size, so
per pixel it is about 3.5× weaker on 784 pixels than on 64. On the validation seed 100 (16 images, ω = 0), scale 16
left the consistency at 1.35 on sr2 (noise floor σ_y√m = 0.70) and 1.97 on inpaint_box (floor ≈ 1.2), PSNR 22.9 /
14.0 dB; scale 64 reached 0.78 / 1.50 and 26.1 / 14.1 dB. TFG's defaults already reach the floor on sr2 (0.71).
(``tagdiff bench inverse --dataset mnist --operators sr2,inpaint_box --num-images 16 --omegas 1 --seeds 1
--dps-guidance-scale S``.)

SSIM window: torchmetrics 1.9 ignores ``kernel_size`` when ``gaussian_kernel=True`` (its window is
2⌊3.5σ + 0.5⌋ + 1 = 11 px for σ = 1.5, over a reflect-padded image), which on 8×8 images makes every window span
the whole image. Images smaller than 16 px therefore use a uniform 3×3 window (``gaussian_kernel=False,
kernel_size=3``); larger ones (28×28 MNIST) the standard 11×11 Gaussian window, σ = 1.5.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tagdiff.guidance import DSG, DPSGuidance, DPSStep, TemporalAlignment, Term, TFGGuidance, mpgd
from tagdiff.operators import OPERATORS, Operator, make_operator

from .common import (
    ExperimentConfig,
    Setup,
    draw,
    fmt_ms,
    grid_key,
    image_grid,
    markdown_table,
    preview,
    sample_metrics,
)
from .runner import Comparison, Experiment, run

__all__ = ["InverseConfig", "run_inverse", "PAPER", "BASES", "ALL_BASES", "EXPERIMENT"]

BASES = ("dps", "tfg")  # the default bases
ALL_BASES = (*BASES, "dps_step", "mpgd", "dsg")  # + DPS as its Alg. 1 (after the clip), MPGD, DSG
PAPER = {"source": "the paper's Table 2 (Cat 256×256, DDPM; SR is 256 -> 64, i.e. ×4): FID; LPIPS without -> with TAG",
         "deblur": {"dps": {"fid": [139.7, 128.9], "lpips": [0.613, 0.570]},
                    "tfg": {"fid": [64.2, 62.7], "lpips": [0.154, 0.151]}},
         "sr": {"dps": {"fid": [139.0, 128.3], "lpips": [0.614, 0.572]},
                "tfg": {"fid": [65.5, 64.7], "lpips": [0.187, 0.175]}}}
_NUM_PREVIEW = 8


@dataclass(frozen=True)
class InverseConfig(ExperimentConfig):
    """Settings; ``noise_std`` is σ_y in pixel units of the [-1, 1] range, ``dps_guidance_scale`` DPS's guidance scale,
    ``tfg_rho`` / ``tfg_mu`` / ``tfg_gamma`` TFG's (ρ̄, μ̄, γ̄) and ``omegas`` TAG's ω_0 grid. See the module
    docstring for how the guidance defaults were chosen."""

    operators: tuple[str, ...] = ("sr2", "deblur", "inpaint_box", "inpaint_random", "denoise")
    noise_std: float = 0.05
    num_images: int = 64
    dps_guidance_scale: float = field(default=16.0, metadata={"aliases": ("--dps-scale",)})
    tfg_rho: float = 1.0
    tfg_mu: float = 2.0
    tfg_gamma: float = 0.01
    tfg_clip_x0: float = 1.0  # clamp x̂_0 in TFG's loss, as the benchmark's deblur/SR scripts (clip_x0=True); 0: off
    omegas: tuple[float, ...] = (0.5, 1.0, 2.0)
    num_steps: int = 50
    bases: tuple[str, ...] = BASES  # guidance methods compared ± TAG: some of ALL_BASES
    dps_step_scale: float = 1.0  # DPSStep (guidance after the clip), constant step ζ_t = s on ‖A(x̂_0) − y‖
    dps_step_size: str = "constant"  # or "score" (ζ_t = s β_t / √α_t, DPSGuidance's scale)
    mpgd_scale: float = 1.0
    dsg_guidance_rate: float = 0.1


def _validate(cfg: InverseConfig) -> None:
    bad = [name for name in cfg.operators if name not in OPERATORS]
    if bad or not cfg.operators:
        raise ValueError(f"unknown operator {', '.join(map(repr, bad)) or '(none given)'}; valid names: "
                         f"{', '.join(sorted(OPERATORS))}")
    if not cfg.noise_std >= 0:
        raise ValueError(f"noise_std (σ_y) must be >= 0, got {cfg.noise_std}")
    bad_bases = [b for b in cfg.bases if b not in ALL_BASES]
    if bad_bases or not cfg.bases:
        raise ValueError(f"unknown guidance base(s) {bad_bases or '(none given)'}; expected some of "
                         f"{', '.join(ALL_BASES)}")
    if min(cfg.omegas, default=0) < 0 or min(cfg.dps_guidance_scale, cfg.tfg_rho, cfg.tfg_mu, cfg.tfg_gamma) < 0:
        raise ValueError(f"omegas, dps_guidance_scale and tfg_rho/mu/gamma must be >= 0, got {cfg.omegas}, "
                         f"{cfg.dps_guidance_scale}, {cfg.tfg_rho}/{cfg.tfg_mu}/{cfg.tfg_gamma}")


def _comparisons(setup: Setup, cfg: InverseConfig) -> Any:
    """Per operator, its measurement of the fixed ground truth, then one comparison per base guidance (DPS, TFG)
    judged by FID (PSNR, SSIM and consistency recorded alongside)."""
    if not 2 <= cfg.num_images <= len(setup.held_x):
        raise ValueError(f"num_images must be in [2, {len(setup.held_x)}] (the held-out split), got {cfg.num_images}")
    g = torch.Generator().manual_seed(0)
    x_true = setup.held_x[torch.randperm(len(setup.held_x), generator=g)[: cfg.num_images]]
    for name in cfg.operators:
        A = make_operator(name, tuple(x_true.shape[-2:]), cfg.noise_std)
        y = A.measure(x_true.cpu(), generator=torch.Generator().manual_seed(0)).to(setup.device)  # noise on the CPU
        context = {"gt_consistency": _consistency(A, x_true, y),
                   "measurement": preview(_visualise(y, x_true.shape), _NUM_PREVIEW),
                   "ground_truth": preview(x_true, _NUM_PREVIEW)}
        for base in cfg.bases:
            def run(omega: float, seed: int, n: int, base: str = base, A: Operator = A, y: Tensor = y) -> dict:
                return _run(setup, cfg, base, A, x_true, y, omega, seed)

            params = _key_params(cfg, base)
            key = {"exp": "inverse", "dataset": cfg.dataset, "op": name, "sigma_y": cfg.noise_std, "base": base,
                   **params, "steps": cfg.num_steps, **grid_key(cfg)}
            yield Comparison((name, base), key, run, n=cfg.num_images, sweep_n=cfg.num_images, omegas=cfg.omegas,
                             context=context, line=lambda r, name=name, base=base: (
                                 f"  {name:<14} {base.upper()}  ω*={r['best_omega']:<4} PSNR "
                                 f"{fmt_ms(r['without']['psnr'], 2)} -> {fmt_ms(r['with']['psnr'], 2)}  FID "
                                 f"{fmt_ms(r['without']['fid'])} -> {fmt_ms(r['with']['fid'])}"))


def run_inverse(out_dir: str | Path, cfg: InverseConfig = InverseConfig(), *, progress: bool = True,
                resume: bool = True) -> dict[str, Any]:
    """Run the experiment; write ``results.json``, ``table.md`` and ``inverse.png`` in ``out_dir``.

    Returns:
        ``{"operators": {name: {"dps": tag_comparison result, "tfg": ..., "gt_consistency", "measurement",
        "ground_truth"}}, "config", "paper"}``.
    Raises:
        ValueError: an unknown operator (the valid names are listed), a negative σ_y, ω or guidance strength,
            fewer than 2 or more than the held-out images, a sweep seed that is also an evaluation seed, or an
            unavailable device.
    """
    return run(EXPERIMENT, out_dir, cfg, progress=progress, resume=resume)


def _ssim_kwargs(h: int, w: int) -> dict[str, Any]:
    return {"gaussian_kernel": False, "kernel_size": 3} if min(h, w) < 16 else {}


def _key_params(cfg: InverseConfig, base: str) -> dict[str, Any]:
    """The guidance's part of a run's cache key (DPS and TFG keys as they always were)."""
    if base == "dps":
        return {"scale": cfg.dps_guidance_scale}
    if base == "tfg":
        return {"rho": cfg.tfg_rho, "mu": cfg.tfg_mu, "gamma": cfg.tfg_gamma,
                **({"tfg_clip": cfg.tfg_clip_x0} if cfg.tfg_clip_x0 else {})}
    return {"dps_step": {"scale": cfg.dps_step_scale, "size": cfg.dps_step_size}, "mpgd": {"scale": cfg.mpgd_scale},
            "dsg": {"rate": cfg.dsg_guidance_rate}}[base]


def _guidance(cfg: InverseConfig, base: str, loss: Any) -> Term:
    if base == "dps":
        return DPSGuidance(loss, cfg.dps_guidance_scale)
    if base == "tfg":
        return TFGGuidance(loss, rho=cfg.tfg_rho, mu=cfg.tfg_mu, gamma=cfg.tfg_gamma, clip_x0=cfg.tfg_clip_x0 or None)
    if base == "dps_step":
        return DPSStep(loss, cfg.dps_step_scale, step_size=cfg.dps_step_size)
    if base == "mpgd":
        return mpgd(loss, cfg.mpgd_scale)
    return DSG(loss, cfg.dsg_guidance_rate)


def _consistency(A: Operator, x: Tensor, y: Tensor) -> float:
    """``mean_i ‖A(x_i) − y_i‖₂``."""
    return float(torch.linalg.vector_norm((A(x) - y).flatten(1), dim=1).mean())


def _visualise(y: Tensor, shape: torch.Size) -> Tensor:
    """The measurement as an image: itself, or nearest upsampling when A changes the size (super-resolution)."""
    return y if y.shape == shape else F.interpolate(y, size=tuple(shape[-2:]), mode="nearest")


def _run(setup: Setup, cfg: InverseConfig, base: str, A: Operator, x_true: Tensor, y: Tensor, omega: float,
         seed: int) -> dict[str, Any]:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    terms: list[Term] = [_guidance(cfg, base, A.loss(y))]
    if omega > 0:
        terms.append(TemporalAlignment(setup.models["time_predictor"], omega))
    out = draw(setup, terms, n=len(x_true), seed=seed, num_steps=cfg.num_steps,
               timestep_spacing=cfg.timestep_spacing, steps_offset=cfg.steps_offset)
    x0 = out["x0"]
    psnr = peak_signal_noise_ratio(x0, x_true, data_range=2.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(x0, x_true, data_range=2.0, **_ssim_kwargs(*x0.shape[-2:]))
    return {"psnr": float(psnr.mean()), "ssim": float(ssim), "fid": sample_metrics(setup, x0)["fid"],
            "consistency": _consistency(A, x0, y), "time_gap": out["time_gap"], "seconds": out["seconds"],
            "preview": preview(x0, _NUM_PREVIEW)}


def _table(results: dict[str, Any], cfg: InverseConfig) -> str:
    digits = {"psnr": 2, "ssim": 3, "fid": 2, "consistency": 3, "time_gap": 1}
    rows = []
    for name, res in results["operators"].items():
        for base in cfg.bases:
            r = res[base]
            cells = [f"{fmt_ms(r['without'][k], d)} → {fmt_ms(r['with'][k], d)}" for k, d in digits.items()]
            p = PAPER.get("sr" if name.startswith("sr") else name, {}).get(base)
            paper = f"{p['fid'][0]} → {p['fid'][1]}; {p['lpips'][0]} → {p['lpips'][1]}" if p else "–"
            rows.append([name, base.upper(), r["best_omega"], *cells, f"{res['gt_consistency']:.3f}", paper])
    head = (f"Inverse problems, {cfg.dataset}: σ_y = {cfg.noise_std}, {cfg.num_images} fixed held-out images; "
            f"DDIM(η=1) {cfg.num_steps} steps; DPS scale {cfg.dps_guidance_scale}, TFG (ρ̄, μ̄, γ̄) = ({cfg.tfg_rho}, "
            f"{cfg.tfg_mu}, {cfg.tfg_gamma}); TAG before each step, ω_t = ω_0(1-ᾱ_t), ω_0 ∈ {list(cfg.omegas)} chosen "
            f"by FID on seed {cfg.sweep_seed}. Cells: without → with TAG, mean ± std over seeds {list(cfg.seeds)}. "
            "Consistency = mean ‖A(x̂) − y‖₂; 'GT' is the ground truth's own (the noise floor).\n\n")
    table = markdown_table(["operator", "guidance", "ω_0*", "PSNR ↑", "SSIM ↑", "FID ↓", "consistency ↓",
                            "Time Gap", "GT", "paper FID; LPIPS (Cat)"], rows)
    grid_rows = [[name, base.upper(), w, f"{m['psnr']:.2f}", f"{m['fid']:.2f}", f"{m['time_gap']:.1f}"]
                 for name, res in results["operators"].items() for base in cfg.bases
                 for w, m in res[base]["sweep"]["grid"].items()]
    grid = markdown_table(["operator", "guidance", "ω_0", "PSNR", "FID", "Time Gap"], grid_rows)
    return head + table + f"\nω_0 grid on the validation seed {cfg.sweep_seed}:\n\n" + grid


def _pad(x: Tensor) -> Tensor:
    """Pad a figure row to ``_NUM_PREVIEW`` images with black ones (runs with fewer images)."""
    return torch.cat([x, -torch.ones(_NUM_PREVIEW - len(x), *x.shape[1:])])


def _figure(path: Path, results: dict[str, Any], cfg: InverseConfig, setup: Setup) -> None:
    shape = tuple(setup.eps_model.sample_shape)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(results["operators"])
    labels = ["measurement", *[f"{b.upper()}{tag}" for b in cfg.bases for tag in ("", "+TAG")], "ground truth"]
    fig, axes = plt.subplots(len(ops), 1, figsize=(4.4, 3.4 * len(ops)), squeeze=False)
    for ax, name in zip(axes[:, 0], ops):
        res = results["operators"][name]
        rows = [res["measurement"], *[res[b]["preview"][w] for b in cfg.bases for w in ("without", "with")],
                res["ground_truth"]]
        x = torch.cat([_pad(torch.tensor(r).reshape(-1, *shape)[:_NUM_PREVIEW]) for r in rows])
        ax.imshow(image_grid(x, len(rows), _NUM_PREVIEW), cmap="gray", vmin=0, vmax=1)
        for i in range(1, len(rows)):
            ax.axhline(i * shape[-2] - 0.5, color="tab:red" if i in (1, len(rows) - 1) else "0.5", lw=0.6)
        for j in range(1, _NUM_PREVIEW):
            ax.axvline(j * shape[-1] - 0.5, color="0.5", lw=0.6)
        ax.set_xticks([])
        ax.set_yticks([(i + 0.5) * shape[-2] - 0.5 for i in range(len(rows))], labels, fontsize=7)
        best = ", ".join(f"{b.upper()} {res[b]['best_omega']}" for b in cfg.bases)
        ax.set_title(f"{name}: ω_0* {best} (seed {results['config']['seeds'][0]})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


EXPERIMENT = Experiment(
    "inverse", InverseConfig, "SR/deblur/inpainting/denoising with DPS and TFG, with/without TAG (Table 2)",
    _validate, _table, section="operators", comparisons=_comparisons, paper=PAPER, figure=_figure,
    record=lambda setup, cfg: {
        "sampler": "ddim", "eta": 1.0, "clip_x0": 1.0, "tag_placement": "pre", "omega_schedule": "one_minus_alpha_bar",
        "omega_selected_by": "fid", "loss": "||A(x0_hat) - y||_2", "tfg_num_iter": 4,
        "ground_truth": "held-out[randperm(seed 0)[:num_images]]", "measurement_noise_seed": 0,
        "fid_reference": "all held-out images"})
