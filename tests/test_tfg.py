"""TFG (Ye et al. 2024) and the TFG benchmark's normalised DPS, checked against hand-written loops and closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from tagdiff import StackedRandomGenerator, VPSchedule, sample_ddim
from tagdiff.data.gmm import GaussianMixture
from tagdiff.guidance import (
    TFG_SCHEDULES,
    DPSGuidance,
    DPSNormalized,
    StepContext,
    Strength,
    TFGGuidance,
    dps_as_tfg,
    tfg_schedule,
)

F64 = torch.float64
SCH = VPSchedule.linear(1000)
MIX = GaussianMixture([[2.0, 0.0], [-2.0, 1.5]], stds=[0.5, 0.8], weights=[0.6, 0.4])
MODEL = MIX.eps_model(SCH)
Y = torch.tensor([1.0, -1.0], dtype=F64)
AB = SCH.alpha_bar  # (T,) float64


def _loss(x0: torch.Tensor) -> torch.Tensor:
    """Per-sample quadratic loss ||x0 - y||², so log p = -||x0 - y||² and ∇_{x0} log p = -2 (x0 - y)."""
    return ((x0 - Y.to(x0)) ** 2).sum(-1)


def _noise(seed: int):
    g = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype)


def _x_T(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _ab(t: int) -> float:
    return 1.0 if t < 0 else float(AB[t])


def _grid_prev(ts: list[int]) -> list[int]:
    return ts[1:] + [-1]


def _hand_schedule(name: str, ts: list[int]) -> list[float]:
    """TFG's get_rho/get_mu weights written out by hand: raw[i] * N / sum(raw)."""
    alphas = [_ab(t) / _ab(tp) for t, tp in zip(ts, _grid_prev(ts))]
    raw = {"increase": alphas, "decrease": [1 - a for a in alphas], "constant": [1.0] * len(ts)}[name]
    return [r * len(raw) / sum(raw) for r in raw]


def _ctx(ts: list[int], i: int, n: int, randn_like=torch.randn_like) -> StepContext:
    t = torch.full((n,), ts[i])
    t_prev = torch.full((n,), _grid_prev(ts)[i])
    return StepContext(SCH, MODEL, {}, randn_like, t, t_prev, i, len(ts), torch.tensor(ts))


def _attached(x: torch.Tensor, t: torch.Tensor, model=MODEL) -> tuple[torch.Tensor, torch.Tensor]:
    """x with requires_grad and x0_hat(x) still on its graph, as the sampler hands them to the hooks."""
    x = x.detach().requires_grad_()
    return x, SCH.x0_from_eps(x, t, model(x, t))


# ============================================================================================== DPS as TFG


@pytest.mark.parametrize("rho_schedule", TFG_SCHEDULES)
def test_dps_as_tfg_matches_a_hand_written_ddim_loop(rho_schedule):
    """TFG with μ = γ = 0, one recurrence: x_prev = DDIM_η=1(x_t, x̂_0) + ρ_t ∇_{x_t} log p(c | x̂_0(x_t)) / sqrt(α_t)."""
    ts = SCH.timesteps(8).tolist()
    rho_bar, n = 0.05, 6
    rhos = _hand_schedule(rho_schedule, ts)
    x = _x_T(n, 1)
    noise = _noise(2)
    for i, (t, tp) in enumerate(zip(ts, _grid_prev(ts))):
        a_t, a_p = _ab(t), _ab(tp)
        xg = x.detach().requires_grad_()
        eps = MODEL(xg, torch.full((n,), t))
        x0 = (xg - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        (grad,) = torch.autograd.grad((-_loss(x0)).sum(), xg)
        x0, eps = x0.detach(), eps.detach()
        sigma = math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
        x = math.sqrt(a_p) * x0 + math.sqrt(max(1 - a_p - sigma**2, 0.0)) * eps
        if tp >= 0:
            x = x + sigma * noise(x)
        x = x + rho_bar * rhos[i] * grad / math.sqrt(a_t / a_p)
    term = TFGGuidance(_loss, rho=rho_bar, rho_schedule=rho_schedule)
    out = sample_ddim(MODEL, _x_T(n, 1), torch.tensor(ts), SCH, eta=1.0, terms=[term], randn_like=_noise(2))
    torch.testing.assert_close(out, x, rtol=1e-10, atol=1e-10)
    plain = sample_ddim(MODEL, _x_T(n, 1), torch.tensor(ts), SCH, eta=1.0, randn_like=_noise(2))
    assert (out - plain).abs().max() > 1e-2  # the guidance did act


def test_dps_as_tfg_equals_score_space_dps_with_scale_rho_over_beta():
    r"""TFG's ρ-only step is score-space DPS with the per-step scale ρ_t / β_t, for DDIM η = 1 without clipping.

    DDIM(η=1): x_prev = sqrt(ᾱ_p) x̂_0 + sqrt(1 - ᾱ_p - σ²) ε + σ z with σ² = (1 - ᾱ_p) β_t / (1 - ᾱ_t),
    β_t = 1 - α_t, α_t = ᾱ_t / ᾱ_p. A score change Δs moves ε by -sqrt(1 - ᾱ_t) Δs and x̂_0 by
    (1 - ᾱ_t) Δs / sqrt(ᾱ_t). Since 1 - ᾱ_p - σ² = α_t (1 - ᾱ_p)² / (1 - ᾱ_t), x_prev moves by
    [(1 - ᾱ_t) - α_t (1 - ᾱ_p)] Δs / sqrt(α_t) = β_t Δs / sqrt(α_t) (the DDPM posterior-mean shift; also at the last
    step, ᾱ_p = 1). TFG adds ρ_t ∇ log p / sqrt(α_t), so Δs = (ρ_t / β_t) ∇ log p = -(ρ_t / β_t) ∇ℓ: DPSGuidance
    with scale ρ_t / β_t.
    """
    ts = SCH.timesteps(10, spacing="leading").tolist()
    rho_bar, n = 0.08, 6
    rhos = _hand_schedule("increase", ts)
    scale_at = {t: rho_bar * r / (1 - _ab(t) / _ab(tp)) for t, tp, r in zip(ts, _grid_prev(ts), rhos)}
    strength = Strength(1.0, schedule=lambda t, s: torch.tensor([scale_at[int(v)] for v in t], dtype=F64))
    kw = dict(eta=1.0, randn_like=_noise(4))
    tfg = sample_ddim(MODEL, _x_T(n, 3), torch.tensor(ts), SCH, terms=[dps_as_tfg(_loss, rho_bar)], **kw)
    kw["randn_like"] = _noise(4)
    dps = sample_ddim(MODEL, _x_T(n, 3), torch.tensor(ts), SCH, terms=[DPSGuidance(_loss, strength)], **kw)
    torch.testing.assert_close(tfg, dps, rtol=1e-10, atol=1e-10)


# ============================================================================================== μ-iterations and γ


@pytest.mark.parametrize("num_iter,mu_schedule,i", [(1, "increase", 3), (4, "increase", 3), (2, "decrease", 7)])
def test_mu_iterations_match_the_closed_form_for_a_quadratic_loss(num_iter, mu_schedule, i):
    """ρ = γ = 0: each iteration is x̂_0 ← x̂_0 - 2μ_t (x̂_0 - y), so Δ_0 = ((1 - 2μ_t)^K - 1)(x̂_0 - y), and the
    shift is sqrt(ᾱ_p) Δ_0.

    K = 1 is the single gradient step sqrt(ᾱ_p) μ_t ∇_{x0} log p = -2 sqrt(ᾱ_p) μ_t (x̂_0 - y). Step i = 7 is the last
    of the 8-step grid (ᾱ_p = 1).
    """
    ts, mu_bar, n = SCH.timesteps(8).tolist(), 0.1, 5
    ctx = _ctx(ts, i, n)
    x, x0_hat = _attached(_x_T(n, 5), ctx.t)
    term = TFGGuidance(_loss, mu=mu_bar, num_iter=num_iter, mu_schedule=mu_schedule)
    got = term.shift(x, ctx.t, x0_hat, ctx)
    mu_t = mu_bar * _hand_schedule(mu_schedule, ts)[i]
    ref = math.sqrt(_ab(_grid_prev(ts)[i])) * ((1 - 2 * mu_t) ** num_iter - 1) * (x0_hat.detach() - Y)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_gamma_smoothing_noise_has_std_gamma_sqrt_one_minus_alpha_bar():
    """Single Gaussian prior, x̂_0 = m + c (x - a m) with c = a s² / v: the ρ step at x̂_0 + γ_t z is
    ρ_t (-2 c (x̂_0 + γ_t z - y)) / sqrt(α_t), γ_t = γ̄ sqrt(1 - ᾱ_t), z drawn from the context's noise source."""
    m, s = torch.tensor([0.3, -0.2], dtype=F64), 1.2
    prior = GaussianMixture(m[None], stds=s)
    model = prior.eps_model(SCH)
    ts, i, n, rho_bar, gamma_bar = SCH.timesteps(5).tolist(), 2, 4, 0.3, 0.7
    ctx = _ctx(ts, i, n, randn_like=_noise(9))
    x, x0_hat = _attached(_x_T(n, 6), ctx.t, model)
    got = TFGGuidance(_loss, rho=rho_bar, gamma=gamma_bar).shift(x, ctx.t, x0_hat, ctx)
    a_t, a_p = _ab(ts[i]), _ab(ts[i + 1])
    c = math.sqrt(a_t) * s**2 / (a_t * s**2 + 1 - a_t)
    z = _noise(9)(x)
    x0_ref = prior.x0_hat(x.detach(), ctx.t, SCH)
    mc = x0_ref + gamma_bar * math.sqrt(1 - a_t) * z
    ref = rho_bar * _hand_schedule("increase", ts)[i] * (-2 * c * (mc - Y)) / math.sqrt(a_t / a_p)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_inactive_tfg_returns_none_and_leaves_sampling_and_the_noise_stream_untouched():
    ts, n = SCH.timesteps(4).tolist(), 3
    ctx = _ctx(ts, 1, n)
    x, x0_hat = _attached(_x_T(n), ctx.t)
    for term in (TFGGuidance(_loss, gamma=1.0), TFGGuidance(_loss, mu=0.5, num_iter=0), DPSNormalized(_loss, 0.0)):
        assert term.shift(x, ctx.t, x0_hat, ctx) is None
    kw = dict(eta=1.0)
    out = sample_ddim(MODEL, _x_T(n), torch.tensor(ts), SCH, terms=[TFGGuidance(_loss, gamma=2.0)],
                      randn_like=_noise(1), **kw)
    plain = sample_ddim(MODEL, _x_T(n), torch.tensor(ts), SCH, randn_like=_noise(1), **kw)
    assert torch.equal(out, plain)


# ============================================================================================== schedules


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_schedules_have_mean_one_and_the_right_shape(spacing):
    ts = SCH.timesteps(12, spacing=spacing)
    alphas = torch.tensor([_ab(t) / _ab(tp) for t, tp in zip(ts.tolist(), _grid_prev(ts.tolist()))], dtype=F64)
    w = {name: tfg_schedule(name, ts, SCH) for name in TFG_SCHEDULES}
    for name, v in w.items():
        assert v.shape == (12,) and v.dtype == F64
        torch.testing.assert_close(v.mean(), torch.tensor(1.0, dtype=F64), rtol=0, atol=1e-12, msg=name)
    ratio = w["increase"] / alphas
    torch.testing.assert_close(ratio, ratio[0].expand(12), rtol=1e-12, atol=0)
    ratio = w["decrease"] / (1 - alphas)
    torch.testing.assert_close(ratio, ratio[0].expand(12), rtol=1e-12, atol=0)
    assert torch.equal(w["constant"], torch.ones(12, dtype=F64))
    # α_t grows as t falls (noise level drops): "increase" is increasing along the reverse process
    assert (w["increase"][1:] > w["increase"][:-1]).all()


# ============================================================================================== DPSNormalized


def test_dps_normalized_shift_is_scaled_gradient_over_abs_log_p():
    """Single Gaussian prior: ∇_x log p = -2 c (x̂_0 - y) and |log p| = ||x̂_0 - y||², so the shift is
    s (-2 c (x̂_0 - y)) / ||x̂_0 - y||²."""
    m, s = torch.tensor([0.5, 0.4], dtype=F64), 0.9
    prior = GaussianMixture(m[None], stds=s)
    model = prior.eps_model(SCH)
    ts, i, n, scale = SCH.timesteps(6).tolist(), 2, 5, 0.4
    ctx = _ctx(ts, i, n)
    x, x0_hat = _attached(_x_T(n, 8), ctx.t, model)
    got = DPSNormalized(_loss, scale).shift(x, ctx.t, x0_hat, ctx)
    a_t = _ab(ts[i])
    c = math.sqrt(a_t) * s**2 / (a_t * s**2 + 1 - a_t)
    r = prior.x0_hat(x.detach(), ctx.t, SCH) - Y
    ref = scale * (-2 * c * r) / (r**2).sum(-1, keepdim=True)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    # log p = 0 (a loss with zero value and gradient) is clamped: finite zero shift
    zero = DPSNormalized(lambda x0: 0 * x0.sum(-1), scale).shift(x, ctx.t, x0_hat, ctx)
    assert torch.equal(zero, torch.zeros_like(zero))


def test_dps_normalized_in_the_sampler_is_ddim_plus_the_shift():
    """TFG code methods/dps.py: x_prev = DDIM_η=1(x_t, ε̂) + s ∇_{x_t} log p / |log p|, written out by hand."""
    ts, n, scale = [999, 500], 4, 0.3
    out = sample_ddim(MODEL, _x_T(n, 2), torch.tensor(ts), SCH, eta=1.0, terms=[DPSNormalized(_loss, scale)],
                      randn_like=_noise(3))
    x, noise = _x_T(n, 2), _noise(3)
    for t, tp in zip(ts, _grid_prev(ts)):
        a_t, a_p = _ab(t), _ab(tp)
        xg = x.detach().requires_grad_()
        eps = MODEL(xg, torch.full((n,), t))
        x0 = (xg - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        log_p = -_loss(x0)
        (grad,) = torch.autograd.grad(log_p.sum(), xg)
        eps = eps.detach()
        sigma = math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
        x_new = math.sqrt(a_p) * x0.detach() + math.sqrt(max(1 - a_p - sigma**2, 0.0)) * eps
        if tp >= 0:
            x_new = x_new + sigma * noise(x)
        x = x_new + scale * grad / log_p.detach().abs()[:, None]
    torch.testing.assert_close(out, x, rtol=1e-10, atol=1e-10)


# ============================================================================================== recurrence, randomness


def test_recurrence_changes_the_result_and_stays_finite():
    ts = SCH.timesteps(6)
    once = sample_ddim(MODEL, _x_T(8), ts, SCH, eta=1.0, terms=[TFGGuidance(_loss, rho=0.05, mu=0.05, num_iter=2)],
                       randn_like=_noise(5))
    twice = sample_ddim(MODEL, _x_T(8), ts, SCH, eta=1.0, randn_like=_noise(5),
                        terms=[TFGGuidance(_loss, rho=0.05, mu=0.05, num_iter=2, num_recur=2)])
    assert torch.isfinite(twice).all()
    assert (once - twice).abs().max() > 1e-3


def test_gamma_draws_noise_from_the_context():
    """Deterministic DDIM (η = 0): with γ = 0 the noise seed is irrelevant, with γ > 0 it changes the result."""
    ts = SCH.timesteps(6)

    def run(gamma, seed):
        term = TFGGuidance(_loss, rho=0.1, mu=0.05, gamma=gamma, num_iter=2)
        return sample_ddim(MODEL, _x_T(8), ts, SCH, eta=0.0, terms=[term], randn_like=_noise(seed))

    assert torch.equal(run(0.0, 1), run(0.0, 2))
    assert (run(0.5, 1) - run(0.5, 2)).abs().max() > 1e-3


def test_tfg_sampling_is_independent_of_the_batch():
    terms = [TFGGuidance(_loss, rho=0.05, mu=0.05, gamma=0.3, num_iter=2, num_recur=2)]
    seeds = [100, 101, 102, 103]

    def run(seed_list):
        rng = StackedRandomGenerator(seed_list)
        x = rng.randn((len(seed_list), 2), dtype=F64)
        return sample_ddim(MODEL, x, SCH.timesteps(5), SCH, eta=1.0, terms=terms, randn_like=rng.randn_like)

    batch = run(seeds)
    assert torch.isfinite(batch).all()
    for i in (0, 2):
        torch.testing.assert_close(run([seeds[i]])[0], batch[i], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(run([7, seeds[3]])[1], batch[3], rtol=1e-12, atol=1e-12)


# ============================================================================================== bad input


@pytest.mark.parametrize("kwargs,match", [
    (dict(rho=-0.1), "rho.*-0.1"), (dict(mu=-1.0), "mu.*-1.0"), (dict(gamma=-0.5), "gamma.*-0.5"),
    (dict(rho=float("nan")), "rho.*nan"), (dict(num_iter=-1), "num_iter.*-1"), (dict(num_recur=0), "num_recur.*0"),
    (dict(num_recur=1.5), "num_recur.*1.5"), (dict(rho_schedule="linear"), "rho_schedule.*'linear'.*increase"),
    (dict(mu_schedule="up"), "mu_schedule.*'up'.*decrease"),
])
def test_bad_tfg_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TFGGuidance(_loss, **kwargs)


def test_bad_schedule_name_and_scale_raise():
    with pytest.raises(ValueError, match="'cosine'.*increase, decrease, constant"):
        tfg_schedule("cosine", SCH.timesteps(4), SCH)
    with pytest.raises(ValueError, match="guidance_scale.*inf"):
        DPSNormalized(_loss, float("inf"))
    with pytest.raises(TypeError, match="callable"):
        TFGGuidance("not a loss", rho=1.0)


@pytest.mark.parametrize("term_fn", [lambda f: TFGGuidance(f, rho=0.1), lambda f: TFGGuidance(f, mu=0.1),
                                     lambda f: DPSNormalized(f, 0.1)])
def test_loss_must_be_per_sample(term_fn):
    term = term_fn(lambda x0: _loss(x0).sum())
    with pytest.raises(ValueError, match=r"per-sample with shape \(4,\), got \(\)"):
        sample_ddim(MODEL, _x_T(4), SCH.timesteps(3), SCH, terms=[term])


def test_tfg_outside_a_sampler_loop_raises():
    n = 3
    t = torch.full((n,), 500)
    x, x0_hat = _attached(_x_T(n), t)
    ctx = StepContext(SCH, MODEL, {}, torch.randn_like, t, torch.full((n,), 400))
    with pytest.raises(ValueError, match="sampler grid"):
        TFGGuidance(_loss, rho=0.1).shift(x, t, x0_hat, ctx)
