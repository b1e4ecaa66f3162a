"""Inverse problems (``tagdiff bench inverse``): DPS against an exact linear-Gaussian posterior, a tiny end-to-end run
on the shipped digits models checked against an independent recomputation, and the CLI's bad-input errors."""

from __future__ import annotations

import json

import pytest
import torch
from tagdiff_bench.common import draw, load_setup
from tagdiff_bench.inverse import InverseConfig, run_inverse
from torchmetrics.functional.image import peak_signal_noise_ratio

from tagdiff import DPSGuidance, VPSchedule, sample_ddim
from tagdiff.cli.main import main
from tagdiff.data.gmm import GaussianMixture
from tagdiff.operators import make_operator

F64 = torch.float64


def test_dps_moves_samples_towards_the_exact_linear_gaussian_posterior_mean():
    """x* ~ N(m, s² I) in 4-D, y = A x* + N(0, σ_y² I) with a 2×4 matrix A. The posterior is Gaussian with precision
    I/s² + AᵀA/σ_y² and mean Σ_post (m/s² + Aᵀy/σ_y²). DPS (exact ε-model, loss ‖Ax̂_0 − y‖²/(2σ_y²), scale 1)
    is approximate, so check one-sidedly that it moves the sample mean most of the way to the posterior mean."""
    schedule = VPSchedule.linear(1000)
    m, s, s_y = torch.tensor([1.0, -0.5, 0.0, 0.5], dtype=F64), 0.8, 0.3
    A = torch.tensor([[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, -1.0]], dtype=F64)
    x_star = torch.tensor([-0.5, 1.0, 1.0, -0.5], dtype=F64)
    y = A @ x_star + s_y * torch.randn(2, generator=torch.Generator().manual_seed(1), dtype=F64)
    precision = torch.eye(4, dtype=F64) / s**2 + A.T @ A / s_y**2
    mu_post = torch.linalg.solve(precision, m / s**2 + A.T @ y / s_y**2)
    model = GaussianMixture(m[None], stds=s).eps_model(schedule)

    def sample(terms):
        g = torch.Generator().manual_seed(0)
        return sample_ddim(model, torch.randn(2000, 4, generator=g, dtype=F64), schedule.timesteps(50), schedule,
                           eta=1.0, terms=terms, randn_like=lambda z: torch.randn(z.shape, generator=g, dtype=z.dtype))

    plain = sample([])
    dps = sample([DPSGuidance(lambda x0: ((x0 @ A.T - y) ** 2).sum(-1) / (2 * s_y**2), 1.0)])
    assert torch.isfinite(dps).all()
    assert (plain.mean(0) - m).norm() < 0.1  # the unguided sampler draws from the prior
    d_plain, d_dps = (plain.mean(0) - mu_post).norm(), (dps.mean(0) - mu_post).norm()
    assert d_dps < 0.5 * d_plain, (dps.mean(0), mu_post)
    assert torch.dot(dps.mean(0) - plain.mean(0), mu_post - m) > 0.5 * (mu_post - m).norm() ** 2  # right direction


def test_tiny_run_writes_outputs_and_matches_an_independent_recomputation(tmp_path):
    cfg = InverseConfig(operators=("sr2",), num_images=4, num_steps=3, omegas=(1.0,), seeds=(0,), device="cpu")
    res = run_inverse(tmp_path, cfg, progress=False)
    for name in ("results.json", "table.md", "inverse.png"):
        assert (tmp_path / name).exists()
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert set(on_disk["operators"]) == {"sr2"} and on_disk["paper"]["sr"]["dps"]["fid"] == [139.0, 128.3]
    r = res["operators"]["sr2"]
    assert set(r["dps"]["sweep"]["grid"]) == set(r["tfg"]["sweep"]["grid"]) == {"0.0", "1.0"}
    # independent recomputation of the ω = 0 DPS run of seed 0: same images, measurement, guidance and seed
    setup = load_setup("digits")
    x_true = setup.held_x[torch.randperm(len(setup.held_x), generator=torch.Generator().manual_seed(0))[:4]]
    A = make_operator("sr2", 8, 0.05)
    y = A.measure(x_true, generator=torch.Generator().manual_seed(0))
    x0 = draw(setup, [DPSGuidance(A.loss(y), cfg.dps_guidance_scale)], n=4, seed=0, num_steps=3)["x0"]
    psnr = peak_signal_noise_ratio(x0, x_true, data_range=2.0, reduction="none", dim=(1, 2, 3)).mean()
    assert r["dps"]["runs"]["without"][0]["psnr"] == pytest.approx(float(psnr))
    consistency = (A(x0) - y).flatten(1).norm(dim=1).mean()
    assert r["dps"]["runs"]["without"][0]["consistency"] == pytest.approx(float(consistency))
    table = (tmp_path / "table.md").read_text()
    assert "| sr2 | DPS |" in table and "| sr2 | TFG |" in table and "139.0 → 128.3" in table


def test_cli_rejects_unknown_operator_and_negative_noise(tmp_path, capsys):
    assert main(["bench", "inverse", "--out", str(tmp_path / "a"), "--operators", "blur9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "blur9" in err[0] and "deblur" in err[0]  # names the bad one and lists valid ones
    assert main(["bench", "inverse", "--out", str(tmp_path / "b"), "--noise-std", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "noise_std" in err[0]
