"""Correction baselines (TCS, Epsilon Scaling, Langevin corrector, Time-Shift) against exact Gaussian-mixture truth."""

from __future__ import annotations

import math

import pytest
import torch

from tagdiff import DPSGuidance, StackedRandomGenerator, StepContext, VPSchedule, sample_ddim, sample_ddpm
from tagdiff.data.gmm import GaussianMixture
from tagdiff.guidance import EpsilonScaling, LangevinCorrector, TimeCorrection, TimeShift
from tagdiff.sampling.terms import guided_eps_and_x0

F64 = torch.float64
SCH = VPSchedule.linear(1000)
AB = SCH.alpha_bar
KS_CRIT = 1.95  # two-sided Kolmogorov-Smirnov critical value sqrt(n) D_n at level 1e-3


def _axis_mixture(dim: int, m: float, stds, weights=(0.4, 0.6)) -> GaussianMixture:
    """Two components at ±m e_1 in ``dim`` dimensions: e_1 is the mixture axis, the other dims are isotropic."""
    means = torch.zeros(2, dim, dtype=F64)
    means[0, 0], means[1, 0] = m, -m
    return GaussianMixture(means, stds=stds, weights=list(weights))


# TCS: tight components (s = 0.1) so that Tweedie's shrinkage removes little variance (see TimeCorrection docstring)
MIX_T = _axis_mixture(32, 3.0, 0.1)
# Langevin: unequal widths, overlapping enough that the score is not trivially linear
MIX_L = _axis_mixture(32, 2.5, [0.5, 0.8])


def _noise(seed: int):
    g = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype)


def _q_t(mix: GaussianMixture, n: int, t: int, seed: int) -> torch.Tensor:
    """Exact draws from the noisy marginal q_t."""
    g = torch.Generator().manual_seed(seed)
    x0 = mix.sample(n, g)[0].to(F64)
    return SCH.q_sample(x0, torch.full((n,), t), torch.randn(n, mix.dim, generator=g, dtype=F64))


def _ctx(mix: GaussianMixture, t: int, n: int, seed: int = 99, t_prev: int | None = None) -> StepContext:
    tt = torch.full((n,), t)
    tp = torch.full((n,), t - 10 if t_prev is None else t_prev)
    return StepContext(SCH, mix.eps_model(SCH), {}, _noise(seed), tt, tp)


def _component_vars(mix: GaussianMixture, t: int) -> torch.Tensor:
    return AB[t] * mix.stds**2 + 1 - AB[t]


def _axis_moments(mix: GaussianMixture, t: int) -> tuple[float, float]:
    """Exact mean and variance of q_t along e_1."""
    a, mu, w = AB[t].sqrt(), mix.means[:, 0], mix.weights
    mean = float(a * (w * mu).sum())
    return mean, float((w * (a * a * mu * mu + _component_vars(mix, t))).sum()) - mean**2


def _axis_ks(y: torch.Tensor, mix: GaussianMixture, t: int) -> float:
    """One-sample KS statistic of ``y`` against the exact CDF of q_t along e_1."""
    y = y.sort().values
    a, sd = AB[t].sqrt(), _component_vars(mix, t).sqrt()
    cdf = sum(mix.weights[k] * torch.special.ndtr((y - a * mix.means[k, 0]) / sd[k]) for k in range(2))
    i = torch.arange(1, y.numel() + 1, dtype=F64) / y.numel()
    return float(torch.maximum(i - cdf, cdf - (i - 1 / y.numel())).max())


def _var_se(y: torch.Tensor) -> float:
    """Standard error of the sample variance (from the sample's own 4th central moment)."""
    return float(((y - y.mean()) ** 2).std() / math.sqrt(y.numel()))


def _orth_var(x: torch.Tensor) -> tuple[float, float]:
    """Per-dim variance pooled over the isotropic dims 2..D, and its standard error sqrt(2 / (n (D-1))) · var."""
    v = float(x[:, 1:].var(0).mean())
    return v, v * math.sqrt(2 / (x.shape[0] * (x.shape[1] - 1)))


# --------------------------------------------------------------------------------------------------- TCS
@pytest.mark.parametrize("t", [25, 100, 250])
def test_tcs_exact_posterior_recovers_true_t(t):
    # For one tight component, log p_t(x) ≈ -||x - a μ||² / (2 v_t) - D/2 log v_t: the argmax estimates v_t from a
    # χ²_D statistic with relative sd sqrt(2 / D), i.e. sd_t ≈ sqrt(2 / D) v_t / |dv_t/dt| in timesteps (delta
    # method; the mean term only adds information).
    n, D = 512, MIX_T.dim
    x = _q_t(MIX_T, n, t, seed=t)
    t_pred = TimeCorrection(MIX_T.time_posterior(SCH)).predict_t(x)
    v = AB * 0.1**2 + 1 - AB
    sd_t = math.sqrt(2 / D) * float(v[t] / ((v[t + 1] - v[t - 1]) / 2))
    err = (t_pred - t).to(F64)
    assert (err.abs() <= 3 * sd_t + 2).to(F64).mean() >= 0.97
    assert abs(float(err.median())) <= 0.25 * sd_t + 2  # median's SE ≈ 1.25 sd_t / sqrt(n) ≈ 0.06 sd_t
    # off-manifold (variance ×2.25) samples look noisier: a larger t_pred for almost every sample
    t_off = TimeCorrection(MIX_T.time_posterior(SCH)).predict_t(1.5 * x)
    assert (t_off > t_pred).to(F64).mean() >= 0.95
    assert float((t_off - t_pred).to(F64).median()) > 3 * sd_t


def test_tcs_post_maps_samples_onto_the_t_prev_marginal():
    # The re-projection replaces x' by a draw around Tweedie's x0_hat: it removes at most ᾱ s² of variance per dim
    # (ᾱ E[Var(x_0 | x')], documented), so the exact q_{t_prev} moments must hold within [-ᾱ s², 0] + 4 SE.
    n, t_prev = 4000, 250
    term = TimeCorrection(MIX_T.time_posterior(SCH))
    deficit = float(AB[t_prev]) * 0.1**2
    mean_ex, var_ex = _axis_moments(MIX_T, t_prev)
    v_ex = float(_component_vars(MIX_T, t_prev)[0])
    x = _q_t(MIX_T, n, t_prev, seed=1)
    # on-manifold, and off-manifold (variance ×1.44, still inside the range of q_t: a far noisier sample gets
    # t_pred = T - 1, where x0_hat collapses to the data mean and the sample loses its mode)
    for start in (x, 1.2 * x):
        out = term.post(start, torch.full((n,), t_prev), _ctx(MIX_T, t_prev + 10, n, t_prev=t_prev))
        y = out[:, 0]
        assert abs(float(y.mean()) - mean_ex) <= 4 * float(y.std()) / math.sqrt(n)
        assert var_ex - deficit - 4 * _var_se(y) <= float(y.var()) <= var_ex + 4 * _var_se(y)
        v, se = _orth_var(out)
        assert v_ex - deficit - 4 * se <= v <= v_ex + 4 * se
    assert _orth_var(1.2 * x)[0] > 1.4 * v_ex  # the off-manifold start really was off


def test_tcs_post_is_renoised_exact_tweedie_at_the_argmax_time():
    # Conditional on x', TCS's output is sqrt(ᾱ_{t_prev}) E[x_0 | x' at t_pred] + sqrt(1 - ᾱ_{t_prev}) z with
    # t_pred = argmax_s p(s | x'): compare with the closed-form Tweedie estimate, with the noise z pinned
    n, t_prev = 64, 200
    x = 1.2 * _q_t(MIX_L, n, t_prev, seed=20)
    z = _noise(21)(x)
    ctx = StepContext(SCH, MIX_L.eps_model(SCH), {}, lambda _: z)
    out = TimeCorrection(MIX_L.time_posterior(SCH)).post(x, torch.full((n,), t_prev), ctx)
    t_pred = MIX_L.time_logits(x, SCH).argmax(-1)
    assert (t_pred != t_prev).all() and float(t_pred.to(F64).median()) > t_prev + 20  # not a no-op here
    a = float(AB[t_prev].sqrt())
    torch.testing.assert_close(out, a * MIX_L.x0_hat(x, t_pred, SCH) + math.sqrt(1 - a * a) * z,
                               rtol=1e-10, atol=1e-10)


def test_tcs_skips_final_step_and_outside_window():
    x = _q_t(MIX_T, 4, 100, seed=2)
    tp = MIX_T.time_posterior(SCH)
    ctx = _ctx(MIX_T, 110, 4, t_prev=100)
    assert TimeCorrection(tp).post(x, torch.full((4,), -1), ctx) is x
    assert TimeCorrection(tp, window=(200, 300)).post(x, torch.full((4,), 100), ctx) is x
    out = TimeCorrection(tp, window=(50, 150)).post(x, torch.tensor([100, 400, 100, -1]), ctx)
    changed = (out != x).any(-1)
    assert changed.tolist() == [True, False, True, False]


def test_tcs_in_sampler_and_clip():
    x_T = torch.randn(8, MIX_T.dim, generator=torch.Generator().manual_seed(3), dtype=F64)
    ts = SCH.timesteps(10)
    term = TimeCorrection(MIX_T.time_posterior(SCH), window=(0, 500), clip_x0=5.0)
    out = sample_ddpm(MIX_T.eps_model(SCH), x_T, ts, SCH, terms=[term], randn_like=_noise(4))
    ref = sample_ddpm(MIX_T.eps_model(SCH), x_T, ts, SCH, randn_like=_noise(4))
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    # clip_x0 bounds x0_hat, hence the re-noised state: |x| <= sqrt(ᾱ) clip + sqrt(1 - ᾱ) |z|
    n = 64
    x = 4.0 * _q_t(MIX_T, n, 50, seed=5)
    z = _noise(6)(x)
    out = TimeCorrection(MIX_T.time_posterior(SCH), clip_x0=0.5).post(
        x, torch.full((n,), 50), StepContext(SCH, MIX_T.eps_model(SCH), {}, lambda _: z))
    a = float(AB[50].sqrt())
    assert ((out - math.sqrt(1 - a * a) * z).abs() <= a * 0.5 + 1e-12).all()


# --------------------------------------------------------------------------------------------------- ES
@pytest.mark.parametrize("sampler, eta", [("ddpm", None), ("ddim", 0.0), ("ddim", 0.5)])
def test_es_lambda_one_is_bit_identical(sampler, eta):
    model = MIX_L.eps_model(SCH)
    x_T = torch.randn(16, MIX_L.dim, generator=torch.Generator().manual_seed(7), dtype=F64)
    ts = SCH.timesteps(12)

    def run(terms):
        if sampler == "ddpm":
            return sample_ddpm(model, x_T, ts, SCH, terms=terms, randn_like=_noise(8))
        return sample_ddim(model, x_T, ts, SCH, eta=eta, terms=terms, randn_like=_noise(8))

    assert torch.equal(run([EpsilonScaling(1.0)]), run([]))
    assert not torch.equal(run([EpsilonScaling(1.01)]), run([]))


def test_es_eps_is_model_eps_over_lambda_t():
    n = 6
    x = _q_t(MIX_L, n, 300, seed=9)
    t = torch.tensor([0, 100, 300, 499, 800, 999])
    ctx = StepContext(SCH, MIX_L.eps_model(SCH), {}, torch.randn_like, t)
    eps = MIX_L.eps(x, t, SCH)
    lam, k = 1.01, 2e-5
    lam_t = (lam + k * (t.to(F64) - 499.5))[:, None]
    eps_es = guided_eps_and_x0(x, t, ctx, [EpsilonScaling(lam, k)])[0]
    torch.testing.assert_close(eps_es, eps / lam_t, rtol=1e-12, atol=1e-13)
    # ES scales the model's ε only: another term's correction is added unscaled
    dps = DPSGuidance(lambda x0: ((x0 - 1.0) ** 2).sum(-1), 0.3)
    eps_dps = guided_eps_and_x0(x, t, ctx, [dps])[0]
    eps_both = guided_eps_and_x0(x, t, ctx, [EpsilonScaling(lam, k), dps])[0]
    torch.testing.assert_close(eps_both, eps_dps - eps + eps / lam_t, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------- Langevin
def test_langevin_batch_norms_keep_q_t_invariant():
    # score_sde's rule (a common step) with the exact score: ULA's stationary variance exceeds v by ≈ ε/2 ≈ α snr² v,
    # so after any number of steps the per-dim variance is within snr² (relative) of exact, plus sampling error.
    n, t, snr = 4000, 200, 0.1
    x = _q_t(MIX_L, n, t, seed=10)
    out = LangevinCorrector(snr, n_steps=10, norms="batch").pre(x, torch.full((n,), t), _ctx(MIX_L, t, n))
    assert not torch.equal(out, x)
    mean_ex, _ = _axis_moments(MIX_L, t)
    assert _axis_ks(out[:, 0], MIX_L, t) < KS_CRIT / math.sqrt(n)
    assert abs(float(out[:, 0].mean()) - mean_ex) <= 4 * float(out[:, 0].std()) / math.sqrt(n)
    v_ex = float((MIX_L.weights * _component_vars(MIX_L, t)).sum())
    v, se = _orth_var(out)
    assert abs(v - v_ex) <= 4 * se + snr**2 * v_ex


def test_langevin_sample_norms_invariant_up_to_documented_dimension_bias():
    # per-sample norms: each step inflates E||x||² by ≈ 16 α snr² / (D - 2); negligible in D = 256
    D, n, t, snr, steps = 256, 1000, 200, 0.1, 5
    mix = _axis_mixture(D, 2.5, [0.5, 0.8])
    x = _q_t(mix, n, t, seed=11)
    out = LangevinCorrector(snr, n_steps=steps).pre(x, torch.full((n,), t), _ctx(mix, t, n))
    assert _axis_ks(out[:, 0], mix, t) < KS_CRIT / math.sqrt(n)
    v_ex = float((mix.weights * _component_vars(mix, t)).sum())
    v, se = _orth_var(out)
    assert abs(v - v_ex) <= 4 * se + (steps * 16 * snr**2 / (D - 2) + snr**2) * v_ex


@pytest.mark.parametrize("norms", ["sample", "batch"])
def test_langevin_one_step_norm_inflation_matches_theory(norms):
    # x ~ N(0, v I) in D dims, exact score -x / v. One step with ε = 2α (snr ||z|| / ||s||)²:
    #   E||x'||² / E||x||² - 1 = 16 α snr² / (D - 2) + 4 α² snr⁴ (D + 2) / (D - 2)   (per-sample norms; χ² moments)
    # while a common step (batch norms) gives only the O(snr⁴) ULA term.
    D, n, t, snr = 8, 20000, 200, 0.2
    mix = GaussianMixture(torch.zeros(1, D, dtype=F64), stds=0.7)
    x = _q_t(mix, n, t, seed=12)
    out = LangevinCorrector(snr, norms=norms).pre(x, torch.full((n,), t), _ctx(mix, t, n))
    diff = (out**2).sum(-1) - (x**2).sum(-1)
    v = float(_component_vars(mix, t)[0])
    alpha = 1 - float(SCH.betas[t])
    rel, se = float(diff.mean()) / (v * D), float(diff.std()) / math.sqrt(n) / (v * D)
    c = 2 * alpha * snr**2
    expected = 8 * c / (D - 2) + c * c * (D + 2) / (D - 2) if norms == "sample" else c * c
    assert abs(rel - expected) <= 4 * se + 0.1 * abs(expected)
    if norms == "sample":
        assert rel > 10 * se  # the documented bias is real, not noise


def test_langevin_moves_perturbed_start_toward_q_t():
    n, t = 4000, 200
    x = 1.5 * _q_t(MIX_L, n, t, seed=13)
    out = LangevinCorrector(0.16, n_steps=20).pre(x, torch.full((n,), t), _ctx(MIX_L, t, n))
    v_ex = float((MIX_L.weights * _component_vars(MIX_L, t)).sum())
    excess_before, excess_after = _orth_var(x)[0] - v_ex, _orth_var(out)[0] - v_ex
    assert excess_before > v_ex and 0 < excess_after < 0.6 * excess_before
    assert _axis_ks(out[:, 0], MIX_L, t) < _axis_ks(x[:, 0], MIX_L, t) - 0.03


def test_langevin_batch_independent_and_windowed():
    seeds = [3, 1, 4, 1]
    x = _q_t(MIX_L, 4, 300, seed=14)
    term = LangevinCorrector(0.16, n_steps=3)

    def run(xs, ss):
        ctx = StepContext(SCH, MIX_L.eps_model(SCH), {}, StackedRandomGenerator(ss).randn_like)
        return term.pre(xs, torch.full((xs.shape[0],), 300), ctx)

    assert torch.equal(run(x, seeds)[2:3], run(x[2:3], seeds[2:3]))
    ctx = _ctx(MIX_L, 300, 4)
    assert LangevinCorrector(0.16, window=(0, 100)).pre(x, torch.full((4,), 300), ctx) is x
    out = LangevinCorrector(0.16, window=(0, 100)).pre(x, torch.tensor([300, 50, 300, 50]), ctx)
    assert (out != x).any(-1).tolist() == [False, True, False, True]


# --------------------------------------------------------------------------------------------------- Time-Shift
D_TS = 3072
_g = torch.Generator().manual_seed(15)
MIX_TS = GaussianMixture(0.5 * torch.randn(2, D_TS, generator=_g, dtype=F64), stds=0.3, weights=[0.4, 0.6])
# expected per-sample unbiased variance over dims of clean data: spread of μ_k's coordinates + s²
DATA_VAR = float((MIX_TS.weights * MIX_TS.means.var(dim=1)).sum()) + 0.3**2


@pytest.mark.parametrize("t", [100, 250, 400])
def test_time_shift_on_manifold_stays_near_t_and_inflated_goes_up(t):
    n = 256
    x = _q_t(MIX_TS, n, t, seed=t)
    shift = TimeShift(width=20, cutoff=1000, data_var=DATA_VAR)
    tt, tp = torch.full((n,), t), torch.full((n,), t - 10)
    s = shift.retime(x, tt, tp, SCH)
    assert s.dtype == torch.int64 and s.shape == (n,)
    assert ((s - t).abs() <= 10).all() and (s > tp).all()
    off = (s - t).to(F64)
    assert abs(float(off.mean())) <= 4 * float(off.std()) / math.sqrt(n) + 0.5   # unbiased around t
    s_up = shift.retime(1.05 * x, tt, tp, SCH)  # variance ×1.1: the window's noisiest end
    assert (s_up >= s).all() and float((s_up - t).to(F64).mean()) > 8
    # the paper's literal rule (data_var = 0) ignores the data's own variance and shifts on-manifold samples up
    assert float((TimeShift(20, 1000).retime(x, tt, tp, SCH) - t).to(F64).mean()) > 8


def test_time_shift_respects_bounds_and_cutoff():
    n = 32
    x = _q_t(MIX_TS, n, 990, seed=16)
    shift = TimeShift(width=20, cutoff=1000, data_var=DATA_VAR)
    tt, tp = torch.full((n,), 995), torch.full((n,), 992)
    assert (shift.retime(3 * x, tt, tp, SCH) == 999).all()       # wants far more noise: capped at T - 1
    assert (shift.retime(0.3 * x, tt, tp, SCH) == 993).all()     # wants far less: capped just above t_prev
    x = _q_t(MIX_TS, 4, 400, seed=17)
    t = torch.tensor([400, 200, 301, 300])
    s = TimeShift(width=20, cutoff=300, data_var=DATA_VAR).retime(2 * x, t, t - 20, SCH)
    assert s[[0, 2]].tolist() == [400, 301] and (s[[1, 3]] == t[[1, 3]] + 10).all()


def test_time_shift_in_sampler():
    mix = _axis_mixture(32, 2.5, [0.5, 0.8])
    x_T = torch.randn(8, 32, generator=torch.Generator().manual_seed(18), dtype=F64)
    ts = SCH.timesteps(20)
    ref = sample_ddim(mix.eps_model(SCH), x_T, ts, SCH)
    out = sample_ddim(mix.eps_model(SCH), x_T, ts, SCH, terms=[TimeShift(10, 500)])
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert torch.equal(sample_ddim(mix.eps_model(SCH), x_T, ts, SCH, terms=[TimeShift(10, 0)]), ref)  # grid t > 0


# --------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("make, match", [
    (lambda: EpsilonScaling(0.0), "0.0"),
    (lambda: EpsilonScaling(-1.0), "-1.0"),
    (lambda: EpsilonScaling(float("nan")), "nan"),
    (lambda: LangevinCorrector(0.0), "0.0"),
    (lambda: LangevinCorrector(-0.1), "-0.1"),
    (lambda: LangevinCorrector(0.1, n_steps=0), "n_steps.*0"),
    (lambda: LangevinCorrector(0.1, n_steps=1.5), "1.5"),
    (lambda: LangevinCorrector(0.1, window=(10, 5)), r"\(10, 5\)"),
    (lambda: LangevinCorrector(0.1, norms="mean"), "mean"),
    (lambda: TimeCorrection(MIX_T.time_posterior(SCH), window=(5,)), r"\(5,\)"),
    (lambda: TimeCorrection(MIX_T.time_posterior(SCH), clip_x0=0), "clip_x0.*0"),
    (lambda: TimeShift(width=0), "width.*0"),
    (lambda: TimeShift(cutoff=-1), "cutoff.*-1"),
    (lambda: TimeShift(data_var=-0.5), "-0.5"),
])
def test_bad_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_arguments_at_sampling_time():
    model = MIX_T.eps_model(SCH)
    x_T = torch.randn(2, MIX_T.dim, dtype=F64)
    ts = SCH.timesteps(5)
    with pytest.raises(ValueError, match="T=500"):
        sample_ddpm(model, x_T, ts, SCH, terms=[TimeCorrection(MIX_T.time_posterior(VPSchedule.linear(500)))])
    with pytest.raises(ValueError, match=r"lam=1.0, k=0.01"):
        sample_ddim(model, x_T, ts, SCH, terms=[EpsilonScaling(1.0, k=0.01)])
    with pytest.raises(ValueError, match="shape"):
        TimeShift().retime(torch.zeros(2, 1), torch.tensor([5, 5]), torch.tensor([1, 1]), SCH)
