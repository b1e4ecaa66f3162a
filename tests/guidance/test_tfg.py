"""TFG (Ye et al. 2024) and the TFG benchmark's normalised DPS, checked against hand-written loops and closed forms."""

from __future__ import annotations

import math
from functools import partial

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
from tfg_reference import space_timesteps

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


# ============================================================================================ x̂_0 clipping (benchmark)


def _ce_loss(x0: torch.Tensor) -> torch.Tensor:
    """-log softmax(x̂_0)[1]: a two-class "classifier" whose logits are x̂_0 itself."""
    return -torch.log_softmax(x0, -1)[:, 1]


def test_clipped_tfg_one_step_from_t0_matches_the_benchmark():
    """ε-model = 0, one step on the benchmark's grid [0], x = [1.5, 0.5], ρ = 1, DDIM(η = 1), clip 1.

    x̂_0 = x / sqrt(ᾱ_0) = [1.500075, 0.500025]. The benchmark (``methods/tfg.py`` with ``methods/base.py``
    ``_predict_x0``, ``clip_x0=True``) clamps x̂_0 to [1.0, 0.500025] before the loss: the gradient flows only into
    the unclipped pixel, ∂ log p / ∂x̂_0[1] = 1 - softmax([1, 0.500025])[1] = 0.62246, and the step (ᾱ_prev = 1)
    returns the clamped x̂_0 plus Δ_t / sqrt(α_t): [1.0, 1.123]. Without clipping in the loss (the sampler still
    clips its step) tagdiff gave [0.269, 1.231].
    """
    def zero(x, t):
        return torch.zeros_like(x)
    grid = SCH.timesteps(1, "linspace")
    assert grid.tolist() == [0]
    x = torch.tensor([[1.5, 0.5]], dtype=F64)
    run = partial(sample_ddim, zero, x, grid, SCH, eta=1.0, clip_x0=1.0)
    clipped = run(terms=[TFGGuidance(_ce_loss, rho=1.0, clip_x0=1.0)])
    a0 = float(AB[0])
    x0 = 0.5 / math.sqrt(a0)
    p1 = 1 / (1 + math.exp(1.0 - x0))
    ref = torch.tensor([[1.0, x0 + (1 - p1) / math.sqrt(a0) / math.sqrt(a0)]], dtype=F64)
    torch.testing.assert_close(clipped, ref, rtol=1e-12, atol=1e-12)
    assert clipped.flatten().tolist() == pytest.approx([1.0, 1.123], abs=5e-4)
    unclipped = run(terms=[TFGGuidance(_ce_loss, rho=1.0, clip_x0=None)])
    assert unclipped.flatten().tolist() == pytest.approx([0.269, 1.231], abs=5e-4)


class _TinyEps(torch.nn.Module):
    """A fixed tiny ε-net on (B, 4): tanh MLP with a sinusoidal time feature (seeded weights, float64)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(123)
        self.w1 = torch.nn.Parameter(0.6 * torch.randn(4, 16, generator=g, dtype=F64), requires_grad=False)
        self.wt = torch.nn.Parameter(torch.randn(2, 16, generator=g, dtype=F64), requires_grad=False)
        self.w2 = torch.nn.Parameter(0.4 * torch.randn(16, 4, generator=g, dtype=F64), requires_grad=False)

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=F64).reshape(-1).expand(x.shape[0]) / 1000
        feat = torch.stack([torch.sin(3 * t), torch.cos(3 * t)], -1)
        return torch.tanh(x @ self.w1 + feat @ self.wt) @ self.w2 + 0.3 * x


_W_CLF = torch.randn(4, 3, generator=torch.Generator().manual_seed(7), dtype=F64)
_TARGET = torch.tensor([0, 1, 2, 0, 1, 2])


def _clf_log_p(x0: torch.Tensor) -> torch.Tensor:
    """log p(c | x0) of a fixed linear 3-class classifier, per sample (the benchmark's ``get_guidance`` logp)."""
    return torch.log_softmax(2.0 * x0 @ _W_CLF, -1).gather(1, _TARGET[:, None])[:, 0]


def _benchmark_tfg(eps_net, x, num_steps, rho, mu, sigma, iter_steps, noise, renoise, clip=1.0):
    """The TFG benchmark's sampler, transcribed from ``YWolfeee/Training-Free-Guidance``:

    * grid and ᾱ's (``diffusion/unet/openai.py::get_diffusion``): ts = space_timesteps(1000, N); the respaced
      betas 1 - ᾱ_t / ᾱ_last over the grid, ᾱ_ts their cumprod reversed, ᾱ_prev = [.., 1];
    * ``methods/tfg.py::TFGGuidance.guide_step`` with recur_steps = 1 and eps_bsz = 1 (logsumexp over one draw is
      the identity; ``rescale_grad`` is a no-op for images): ρ/μ = ρ̄·sched[t]·N/Σ sched ("increase": α_t),
      std = σ̄ sqrt(1 - ᾱ_t) (sigma_schedule "decrease"), x̂_0 = clamp((x - sqrt(1-ᾱ) ε)/sqrt(ᾱ)) (``_predict_x0``),
      Δ_t = ρ ∇_x log p(c | x̂_0 + mc_eps), new_x0 += μ ∇ log p(c | new_x0 + mc_eps) (iter_steps times),
      Δ_0 = new_x0 - x̂_0;
    * ``methods/base.py``: ``_predict_x_prev_from_zero`` (ε re-derived from the clamped x̂_0, DDIM Eq. 12 with
      σ = η sqrt((1-ᾱ_p)/(1-ᾱ_t)(1-ᾱ_t/ᾱ_p)), noise only where t > 0), then
      x_prev += Δ_t / sqrt(α_t) + sqrt(ᾱ_p) Δ_0, and ``_predict_xt`` re-noises once more (discarded with
      recur_steps = 1; drawn from ``renoise`` here so that the other draws line up with tagdiff's stream).
    """
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
    ab_full = torch.cumprod(1 - betas, 0)
    ts = torch.tensor(space_timesteps(1000, num_steps))
    new_betas, last = [], 1.0
    for i, ab in enumerate(ab_full):
        if i in set(ts.tolist()):
            new_betas.append(1 - ab / last)
            last = ab
    ab_ts = torch.cumprod(1 - torch.stack(new_betas), 0)
    ab_prevs = torch.cat([torch.ones(1, dtype=F64), ab_ts[:-1]]).flip(0)
    ab_ts = ab_ts.flip(0)
    sched = ab_ts / ab_prevs  # "increase" for both ρ and μ
    eta = 1.0
    for k in range(num_steps):
        a_t, a_p = ab_ts[k], ab_prevs[k]
        rho_k = rho * sched[k] * len(sched) / sched.sum()
        mu_k = mu * sched[k] * len(sched) / sched.sum()
        std = sigma * (1 - a_t) ** 0.5
        t = ts[k]
        mc_eps = std * noise(x) if std != 0 else torch.zeros_like(x)
        x_g = x.clone().detach().requires_grad_()
        x0 = ((x_g - (1 - a_t) ** 0.5 * eps_net(x_g, t)) / a_t**0.5).clamp(-clip, clip)
        (delta_t,) = torch.autograd.grad(_clf_log_p(x0 + mc_eps).sum(), x_g)
        delta_t = delta_t * rho_k
        x0 = x0.detach()
        new_x0 = x0.clone()
        for _ in range(iter_steps):
            z = new_x0.detach().requires_grad_()
            (g,) = torch.autograd.grad(_clf_log_p(z + mc_eps).sum(), z)
            new_x0 = new_x0 + mu_k * g
        delta_0 = new_x0 - x0
        alpha_t = a_t / a_p
        new_eps = (x - a_t**0.5 * x0) / (1 - a_t) ** 0.5
        sig = eta * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)) ** 0.5
        prev = a_p**0.5 * (x - (1 - a_t) ** 0.5 * new_eps) / a_t**0.5 + (1 - a_p - sig**2) ** 0.5 * new_eps
        if eta > 0 and t.item() > 0:
            prev = sig * noise(prev) + prev
        x_prev = (prev + delta_t / alpha_t**0.5 + delta_0 * a_p**0.5).detach()
        _ = alpha_t**0.5 * x_prev + (1 - alpha_t) ** 0.5 * renoise(x_prev)  # _predict_xt: unused at recur_steps = 1
        x = x_prev  # guide_step returns x_prev
    return x


@pytest.mark.parametrize("num_steps", [50, 1, 3])
def test_clipped_tfg_loop_equals_a_transcription_of_the_benchmark(num_steps):
    """50 steps (and the one- and three-step grids) of TFG with the benchmark's CIFAR-10 label settings (ρ̄ = 1,
    μ̄ = 0.25, γ̄ = 0.001, 4 iterations, recurrence 1, "increase" schedules, DDIM η = 1, clip_x0) on a fixed tiny
    ε-net: tagdiff (``TFGGuidance(clip_x0=1)`` in ``sample_ddim(clip_x0=1)`` over the benchmark grid) equals the
    transcription above, fed the same noise by role."""
    net = _TinyEps()
    x_T = 1.5 * torch.randn(6, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    grid = SCH.timesteps(num_steps, "space_timesteps")
    term = TFGGuidance(lambda x0: -_clf_log_p(x0), rho=1.0, mu=0.25, gamma=0.001, num_iter=4, clip_x0=1.0)
    ours = sample_ddim(net, x_T, grid, SCH, eta=1.0, clip_x0=1.0, terms=[term], randn_like=_noise(11))
    ref = _benchmark_tfg(net, x_T, num_steps, 1.0, 0.25, 0.001, 4, _noise(11), _noise(12))
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
    plain = sample_ddim(net, x_T, grid, SCH, eta=1.0, clip_x0=1.0, randn_like=_noise(11))
    assert (ours - plain).abs().max() > 1e-2  # the guidance acted
    if num_steps == 50:  # and the clamp mattered: without it in the loss the result differs
        unclipped = TFGGuidance(lambda x0: -_clf_log_p(x0), rho=1.0, mu=0.25, gamma=0.001, num_iter=4,
                                clip_x0=None)
        other = sample_ddim(net, x_T, grid, SCH, eta=1.0, clip_x0=1.0, terms=[unclipped], randn_like=_noise(11))
        assert (other - ours).abs().max() > 1e-3


@pytest.mark.parametrize("num_steps", [50, 3])
def test_default_tfg_follows_the_sampler_clip_and_so_matches_the_benchmark(num_steps):
    """TFGGuidance's default clip_x0="sampler": in sample_ddim(clip_x0=1) it is the benchmark's TFG (the
    transcription above, to 1e-9); in an unclipped sampler it equals clip_x0=None bit for bit (no clamp at 1 on
    unbounded data); an explicit number or None overrides it (None in a clipping sampler: the mixed variant)."""
    net = _TinyEps()
    x_T = 1.5 * torch.randn(6, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    grid = SCH.timesteps(num_steps, "space_timesteps")
    kw = dict(rho=1.0, mu=0.25, gamma=0.001, num_iter=4)

    def run(clip_sampler, **term_kw):
        term = TFGGuidance(lambda x0: -_clf_log_p(x0), **kw, **term_kw)
        return sample_ddim(net, x_T, grid, SCH, eta=1.0, clip_x0=clip_sampler, terms=[term], randn_like=_noise(11))

    default = run(1.0)
    assert TFGGuidance(_loss).clip_x0 == "sampler" and dps_as_tfg(_loss, 1.0).clip_x0 == "sampler"
    ref = _benchmark_tfg(net, x_T, num_steps, 1.0, 0.25, 0.001, 4, _noise(11), _noise(12))
    torch.testing.assert_close(default, ref, rtol=1e-9, atol=1e-9)
    assert torch.equal(default, run(1.0, clip_x0=1.0))
    assert (run(1.0, clip_x0=None) - ref).abs().max() > 1e-3  # the mixed variant is not the benchmark
    assert torch.equal(run(None), run(None, clip_x0=None))  # unclipped sampler: no clamp in the loss either
    assert (run(None) - run(None, clip_x0=1.0)).abs().max() > 1e-3  # (the clamp would have mattered)


def test_default_tfg_in_the_one_step_benchmark_case_and_bad_clip_values():
    """The one-step case of test_clipped_tfg_one_step_from_t0_matches_the_benchmark with the default term: the
    benchmark's [1.0, 1.123], not the [0.269, 1.231] the old default (None) gave in a clipping sampler."""
    grid = SCH.timesteps(1, "linspace")
    x = torch.tensor([[1.5, 0.5]], dtype=F64)
    out = sample_ddim(lambda x, t: torch.zeros_like(x), x, grid, SCH, eta=1.0, clip_x0=1.0,
                      terms=[TFGGuidance(_ce_loss, rho=1.0)])
    assert out.flatten().tolist() == pytest.approx([1.0, 1.123], abs=5e-4)
    for bad in ("auto", 0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match=r"clip_x0"):
            TFGGuidance(_loss, rho=1.0, clip_x0=bad)
