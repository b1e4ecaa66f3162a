"""DDPM/DDIM steps and sampling loops against diffusers' schedulers, exact Gaussian ODE maps and exact mixtures."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from tagdiff import (
    GaussianMixture,
    NonFiniteError,
    StackedRandomGenerator,
    StepInfo,
    TemporalAlignment,
    TFGGuidance,
    TimeShift,
    VPSchedule,
    ddim_step,
    ddpm_step,
    get_sampler,
    guided_eps,
    sample,
    sample_ddim,
    sample_ddpm,
)
from tagdiff.data import toy_mixture
from tagdiff.sampling.terms import StepTerm

DIFFUSERS_NAME = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
B = 16

# A 2-D mixture with unequal weights and non-unit stds, on the scale of image data (|x0| ~ 1) so that clipping
# x0_hat at 1 is sometimes active and sometimes not.
SMALL_GMM = GaussianMixture([[0.8, -0.4], [-0.6, 0.7]], stds=[0.2, 0.35], weights=[0.4, 0.6])


@pytest.fixture(scope="module", params=["linear", "cosine"])
def schedule(request):
    return VPSchedule.from_name(request.param)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _full(v: int, n: int = B) -> torch.Tensor:
    return torch.full((n,), v, dtype=torch.long)


def _diffusers(cls, schedule: VPSchedule, spacing: str, n: int, float64_tables: bool, **kwargs):
    """A diffusers scheduler for ``schedule``. With ``float64_tables`` its alpha_bar table (which diffusers builds in
    float32) is replaced by tagdiff's float64 one, so both sides evaluate the same formulas on the same numbers and
    can be compared at float64 accuracy; ``step`` reads nothing else from the schedule."""
    sched = cls.from_config(schedule.to_diffusers_config(), timestep_spacing=spacing, **kwargs)
    if float64_tables:
        sched.alphas_cumprod = schedule.alpha_bar.clone()
    sched.set_timesteps(n)
    return sched


def _x_T(dtype, seed=0, n=B, d=2):
    return torch.randn(n, d, generator=_gen(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------------- diffusers noise
def test_diffusers_draws_noise_like_torch_randn():
    """The premise of the DDPM comparison: diffusers' ``randn_tensor`` with a seeded CPU generator is exactly
    ``torch.randn`` with an identically seeded generator."""
    for dtype in (torch.float32, torch.float64):
        z = torch.randn((B, 2), generator=_gen(123), dtype=dtype)
        assert torch.equal(randn_tensor((B, 2), generator=_gen(123), dtype=dtype), z)
        assert not torch.equal(randn_tensor((B, 2), generator=_gen(124), dtype=dtype), z)


# ---------------------------------------------------------------------------------------------- step equivalence
def _compare_ddpm(schedule, n, spacing, dtype, atol, rtol, clip=False, gmm=SMALL_GMM):
    """Run our chain; at every step hand the SAME x, model output and noise to diffusers and compare x_prev."""
    model = gmm.eps_model(schedule)
    f64 = dtype == torch.float64
    sched = _diffusers(DDPMScheduler, schedule, spacing, n, f64, clip_sample=clip, clip_sample_range=1.0)
    grid = schedule.timesteps(n, spacing)
    assert torch.equal(grid, sched.timesteps.long()[:n])
    x = _x_T(dtype)
    clipped_any = False
    for i, t in enumerate(grid.tolist()):
        t_prev = grid[i + 1].item() if i + 1 < n else -1
        assert sched.previous_timestep(t) == t_prev
        eps = model(x, _full(t))
        z = torch.randn(x.shape, generator=_gen(1000 + i), dtype=dtype)
        ref = sched.step(eps, t, x, generator=_gen(1000 + i))
        ours, x0_hat = ddpm_step(x, eps, _full(t), _full(t_prev), schedule, noise=z, clip_x0=1.0 if clip else None)
        assert ours.dtype == dtype and ours.shape == x.shape
        torch.testing.assert_close(ours, ref.prev_sample, atol=atol, rtol=rtol, msg=lambda m, t=t: f"t={t}: {m}")
        torch.testing.assert_close(x0_hat, ref.pred_original_sample, atol=atol, rtol=rtol)
        clipped_any |= bool((schedule.x0_from_eps(x, _full(t), eps).abs() > 1).any())
        x = ours
    assert torch.isfinite(x).all()
    return clipped_any


@pytest.mark.parametrize("n, spacing", [(1, "leading"), (1, "trailing"), (1, "linspace"), (10, "leading"),
                                        (10, "trailing"), (10, "linspace"), (50, "leading"), (50, "trailing"),
                                        (50, "linspace"), (1000, "trailing")])
def test_ddpm_step_matches_diffusers_float64(schedule, n, spacing):
    # Exact up to rounding, except that diffusers adds sqrt(1e-20) * z of noise on a final step with t > 0
    # (trailing grids) where tagdiff adds none: hence atol 1e-9 rather than 1e-12.
    _compare_ddpm(schedule, n, spacing, torch.float64, atol=1e-9, rtol=1e-12)


@pytest.mark.parametrize("n, spacing", [(1, "trailing"), (10, "leading"), (50, "trailing"), (50, "linspace")])
def test_ddpm_step_matches_diffusers_float32_native(schedule, n, spacing):
    # Unmodified diffusers (float32 tables built by diffusers itself) vs tagdiff (float64 tables cast to float32).
    _compare_ddpm(schedule, n, spacing, torch.float32, atol=1e-5, rtol=1e-5)


def test_ddpm_step_matches_diffusers_float32_native_1000_steps():
    _compare_ddpm(VPSchedule.linear(), 1000, "leading", torch.float32, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ddpm_step_clip_matches_diffusers_clip_sample(schedule, dtype):
    # the toy mixture lives at |x| ~ 10, so x0_hat is clipped to [-1, 1] at (nearly) every step
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    clipped = _compare_ddpm(schedule, 50, "leading", dtype, atol=tol, rtol=tol, clip=True, gmm=toy_mixture())
    assert clipped


def _compare_ddim(schedule, n, spacing, eta, dtype, atol, rtol, clip=False, gmm=SMALL_GMM):
    model = gmm.eps_model(schedule)
    f64 = dtype == torch.float64
    sched = _diffusers(DDIMScheduler, schedule, spacing, n, f64, clip_sample=clip, clip_sample_range=1.0,
                       set_alpha_to_one=True)
    T = schedule.num_train_timesteps
    grid = schedule.timesteps(n, spacing)
    assert torch.equal(grid, sched.timesteps.long())
    x = _x_T(dtype, seed=1)
    clipped_any, rederived_checked = False, 0
    for i, t in enumerate(grid.tolist()):
        t_prev = grid[i + 1].item() if i + 1 < n else -1
        # diffusers' DDIM moves to t - T // n; the comparison is meaningful only where that is the grid's next element
        assert t - T // n == t_prev or (t_prev == -1 and t - T // n < 0)
        eps = model(x, _full(t))
        z = torch.randn(x.shape, generator=_gen(2000 + i), dtype=dtype)
        ref = sched.step(eps, t, x, eta=eta, variance_noise=z, use_clipped_model_output=clip)
        ours, x0_hat = ddim_step(x, eps, _full(t), _full(t_prev), schedule, noise=z, eta=eta,
                                 clip_x0=1.0 if clip else None)
        torch.testing.assert_close(ours, ref.prev_sample, atol=atol, rtol=rtol, msg=lambda m, t=t: f"t={t}: {m}")
        torch.testing.assert_close(x0_hat, ref.pred_original_sample, atol=atol, rtol=rtol)
        if clip:
            clipped_any |= bool((schedule.x0_from_eps(x, _full(t), eps).abs() > 1).any())
            # tagdiff re-derives eps from the clipped x0_hat (guided-diffusion's DDIM), which is diffusers'
            # use_clipped_model_output=True, not its default
            if eta == 0 and (x0_hat.abs() == 1).any() and t_prev >= 0:
                plain = sched.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
                assert not torch.allclose(ours, plain, atol=1e-3)
                rederived_checked += 1
        x = ours
    return clipped_any, rederived_checked


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("n, spacing", [(1, "leading"), (1, "trailing"), (10, "leading"), (10, "trailing"),
                                        (50, "leading"), (50, "trailing"), (100, "trailing")])
def test_ddim_step_matches_diffusers_float64(schedule, n, spacing, eta):
    _compare_ddim(schedule, n, spacing, eta, torch.float64, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("n, spacing", [(10, "leading"), (50, "trailing")])
def test_ddim_step_matches_diffusers_float32_native(schedule, n, spacing, eta):
    _compare_ddim(schedule, n, spacing, eta, torch.float32, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_step_clip_matches_diffusers_clip_sample(schedule, eta):
    clipped, rederived_checked = _compare_ddim(schedule, 20, "trailing", eta, torch.float64, atol=1e-10, rtol=1e-10,
                                               clip=True, gmm=toy_mixture())
    assert clipped
    assert rederived_checked > 0 or eta > 0


def _ddim_to_alpha_bar_0(schedule, spacing, n):
    """diffusers' DDIMScheduler(set_alpha_to_one=False) on tagdiff's float64 tables: its last step goes to
    final_alpha_cumprod = alphas_cumprod[0] (which diffusers takes from its own float32 table: replaced too)."""
    sched = _diffusers(DDIMScheduler, schedule, spacing, n, True, clip_sample=False, set_alpha_to_one=False)
    sched.final_alpha_cumprod = schedule.alpha_bar[0].clone()
    return sched


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("n, spacing", [(1, "trailing"), (10, "trailing"), (10, "leading"), (50, "trailing")])
def test_ddim_step_final_alpha_bar_0_matches_diffusers_float64(schedule, n, spacing, eta):
    """set_alpha_to_one=False: with the same x, ε and noise, every step equals diffusers' to 1e-12, the last one
    (ᾱ_t -> ᾱ_0, std = η sqrt((1 - ᾱ_0) / (1 - ᾱ_t) (1 - ᾱ_t / ᾱ_0)) > 0, noise added) included."""
    model = SMALL_GMM.eps_model(schedule)
    sched = _ddim_to_alpha_bar_0(schedule, spacing, n)
    grid = schedule.timesteps(n, spacing)
    ab0 = float(schedule.alpha_bar[0])
    x = _x_T(torch.float64, seed=1)
    for i, t in enumerate(grid.tolist()):
        t_prev = grid[i + 1].item() if i + 1 < n else -1
        eps = model(x, _full(t))
        z = torch.randn(x.shape, generator=_gen(2000 + i), dtype=torch.float64)
        ref = sched.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
        ours = ddim_step(x, eps, _full(t), _full(t_prev), schedule, noise=z, eta=eta, final_alpha_bar=ab0)[0]
        torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12, msg=lambda m, t=t: f"t={t}: {m}")
        x = ours
    if eta > 0 and grid[-1] > 0:  # the last step's noise matters (a leading grid ends at t = 0: ᾱ_t = ᾱ_0, std 0)
        no_noise = ddim_step(x, eps, _full(t), _full(-1), schedule, noise=None, eta=eta, final_alpha_bar=ab0)[0]
        assert (ours - no_noise).abs().max() > 1e-3 * eta


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("n, spacing", [(1, "trailing"), (10, "trailing"), (20, "leading")])
def test_sample_ddim_final_alpha_bar_0_matches_diffusers_loop(schedule, n, spacing, eta):
    """Whole chains, each side drawing from its own identically seeded generator: sample_ddim(final_alpha_bar =
    alpha_bar[0], eta) draws noise at the last step as DDIMScheduler(set_alpha_to_one=False) does, so the chains and
    the generators stay in step (before the fix: 1.5e-2 at η = 0.5, 3e-2 at η = 1 on the linear schedule)."""
    model = SMALL_GMM.eps_model(schedule)
    x_T = _x_T(torch.float64, seed=5)
    g_ours, g_ref = _gen(9), _gen(9)
    ours = sample_ddim(model, x_T, schedule.timesteps(n, spacing), schedule, eta=eta,
                       final_alpha_bar=float(schedule.alpha_bar[0]),
                       randn_like=lambda z: torch.randn(z.shape, generator=g_ours, dtype=z.dtype))
    sched = _ddim_to_alpha_bar_0(schedule, spacing, n)
    x = x_T
    for t in sched.timesteps.tolist():
        x = sched.step(model(x, _full(t)), t, x, eta=eta, generator=g_ref).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-12, atol=1e-12)
    assert torch.equal(g_ours.get_state(), g_ref.get_state())  # the same number of draws


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_draws_last_step_noise_only_when_it_is_used(eta):
    """Noise draws per chain of n steps: n - 1 with final_alpha_bar = 1 (the last step's std is 0: nothing drawn,
    the default's results and generator state unchanged), n with final_alpha_bar = alpha_bar[0] and η > 0, none with
    η = 0. The generic sample() with partial(ddim_step, ...) does the same."""
    s, n = VPSchedule.linear(), 6
    model, grid, x_T = SMALL_GMM.eps_model(s), s.timesteps(n, "trailing"), _x_T(torch.float64)
    for fab, expected in [(1.0, n - 1), (float(s.alpha_bar[0]), n)]:
        expected = expected if eta > 0 else 0
        for run in (partial(sample_ddim, eta=eta, final_alpha_bar=fab),
                    partial(sample, partial(ddim_step, eta=eta, final_alpha_bar=fab), needs_noise=eta > 0)):
            draws = []
            run(model, x_T, grid, s, randn_like=lambda z, d=draws: d.append(1) or torch.randn_like(z))
            assert len(draws) == expected, (fab, len(draws))


def test_ddim_eta1_has_ddpm_variance():
    # Song et al. 2021, Eq. 16: with eta = 1 the DDIM step noise std equals DDPM's posterior std, and the two steps
    # agree in distribution. With the noise set to zero the means differ only through the direction term; the noise
    # scale (x_prev(z) - x_prev(0)) / z is identical.
    s = VPSchedule.cosine()
    x = _x_T(torch.float64)
    eps = SMALL_GMM.eps_model(s)(x, _full(500))
    z = torch.randn(x.shape, generator=_gen(3), dtype=torch.float64)
    t, tp = _full(500), _full(450)
    d_ddim = ddim_step(x, eps, t, tp, s, noise=z, eta=1.0)[0] - ddim_step(x, eps, t, tp, s, noise=0 * z, eta=1.0)[0]
    d_ddpm = ddpm_step(x, eps, t, tp, s, noise=z)[0] - ddpm_step(x, eps, t, tp, s, noise=0 * z)[0]
    torch.testing.assert_close(d_ddim, d_ddpm, rtol=1e-10, atol=1e-12)
    ab_t, ab_p = s.alpha_bar[500], s.alpha_bar[450]
    std = ((1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p)).sqrt()
    torch.testing.assert_close(d_ddpm, std * z, rtol=1e-10, atol=1e-12)


def test_steps_to_clean_data_return_x0_hat():
    # the last step (t_prev = -1, alpha_bar = 1) must land exactly on the Tweedie estimate, noise or not
    s = VPSchedule.linear()
    x = _x_T(torch.float64)
    eps = SMALL_GMM.eps_model(s)(x, _full(20))
    z = torch.randn(x.shape, generator=_gen(4), dtype=torch.float64)
    x0 = s.x0_from_eps(x, _full(20), eps)
    for out in (ddpm_step(x, eps, _full(20), _full(-1), s, noise=z), ddim_step(x, eps, _full(20), _full(-1), s),
                ddim_step(x, eps, _full(20), _full(-1), s, noise=z, eta=1.0)):
        torch.testing.assert_close(out[0], x0, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out[1], x0, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- full loops
def _rng_randn_like(seed):
    g = _gen(seed)
    return lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype)


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_sample_ddpm_matches_diffusers_loop(schedule, spacing):
    """Whole chains from the same x_T and one seeded generator each. On grids ending at t = 0 diffusers draws noise
    exactly when tagdiff does (every step but the last), so the generators stay in step."""
    n = 25
    model = SMALL_GMM.eps_model(schedule)
    x_T = _x_T(torch.float64, seed=5)
    ours = sample_ddpm(model, x_T, schedule.timesteps(n, spacing), schedule, randn_like=_rng_randn_like(9))
    sched = _diffusers(DDPMScheduler, schedule, spacing, n, True, clip_sample=False)
    g, x = _gen(9), x_T
    for t in sched.timesteps.tolist():
        x = sched.step(model(x, _full(t)), t, x, generator=g).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-10, atol=1e-10)
    # and the noise mattered: another seed gives another sample
    other = sample_ddpm(model, x_T, schedule.timesteps(n, spacing), schedule, randn_like=_rng_randn_like(10))
    assert (other - ours).abs().max() > 1e-2


def _manual_loop(step_fn, model, x, grid, schedule, randn_like, needs_noise):
    for i, t in enumerate(grid.tolist()):
        t_prev = grid[i + 1].item() if i + 1 < len(grid) else -1
        tt, tp = _full(t, x.shape[0]), _full(t_prev, x.shape[0])
        noise = randn_like(x) if needs_noise and t_prev >= 0 else None
        x, _ = step_fn(x, model(x, tt), tt, tp, schedule, noise=noise)
    return x


@pytest.mark.parametrize("sampler, eta", [("ddpm", None), ("ddim", 0.0), ("ddim", 0.5), ("ddim", 1.0)])
@pytest.mark.parametrize("spacing, n", [("trailing", 7), ("linspace", 20), ("leading", 1)])
def test_sample_equals_manual_loop(schedule, sampler, eta, spacing, n):
    model = SMALL_GMM.eps_model(schedule)
    grid = schedule.timesteps(n, spacing)
    x_T = _x_T(torch.float64, seed=6)
    if sampler == "ddpm":
        out = sample_ddpm(model, x_T, grid, schedule, randn_like=_rng_randn_like(1))
        ref = _manual_loop(ddpm_step, model, x_T, grid, schedule, _rng_randn_like(1), True)
    else:
        out = sample_ddim(model, x_T, grid, schedule, eta=eta, randn_like=_rng_randn_like(1))
        ref = _manual_loop(partial(ddim_step, eta=eta), model, x_T, grid, schedule, _rng_randn_like(1), eta > 0)
        generic = sample(partial(ddim_step, eta=eta), model, x_T, grid, schedule, randn_like=_rng_randn_like(1),
                         needs_noise=eta > 0)
        torch.testing.assert_close(generic, ref, rtol=0, atol=0)
    assert out.shape == x_T.shape and out.dtype == x_T.dtype and not out.requires_grad
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert get_sampler(sampler) is (sample_ddpm if sampler == "ddpm" else sample_ddim)


def test_sample_callback_sees_every_step():
    s = VPSchedule.linear()
    grid = s.timesteps(6, "trailing")
    seen: list[StepInfo] = []
    x_T = _x_T(torch.float64)
    sample_ddim(SMALL_GMM.eps_model(s), x_T, grid, s, callback=seen.append)
    assert [info.i for info in seen] == list(range(6))
    assert all(info.num_steps == 6 for info in seen)
    assert [int(info.t[0]) for info in seen] == grid.tolist()
    assert [int(info.t_prev[0]) for info in seen] == grid.tolist()[1:] + [-1]
    assert all(info.t.shape == (B,) and info.t.dtype == torch.long for info in seen)
    torch.testing.assert_close(seen[0].x, x_T, rtol=0, atol=0)


def test_ddim_eta0_is_deterministic_and_draws_no_noise(schedule):
    def no_noise(x):
        raise AssertionError("DDIM(eta=0) must not draw noise")

    model = SMALL_GMM.eps_model(schedule)
    grid = schedule.timesteps(20)
    x_T = _x_T(torch.float64, seed=7)
    torch.manual_seed(0)
    a = sample_ddim(model, x_T, grid, schedule, eta=0.0, randn_like=no_noise)
    torch.manual_seed(1)
    b = sample_ddim(model, x_T, grid, schedule, eta=0.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("sampler", [partial(sample_ddpm), partial(sample_ddim, eta=0.5)])
def test_stochastic_samplers_deterministic_under_fixed_generator(schedule, sampler):
    model = SMALL_GMM.eps_model(schedule)
    grid = schedule.timesteps(15)
    x_T = _x_T(torch.float64, seed=8)
    a = sampler(model, x_T, grid, schedule, randn_like=_rng_randn_like(3))
    b = sampler(model, x_T, grid, schedule, randn_like=_rng_randn_like(3))
    c = sampler(model, x_T, grid, schedule, randn_like=_rng_randn_like(4))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-2


@pytest.mark.parametrize("sampler", [partial(sample_ddpm), partial(sample_ddim, eta=0.5), partial(sample_ddim)])
def test_batch_independence_with_per_sample_seeds(sampler):
    s = VPSchedule.linear()
    model = toy_mixture().eps_model(s)
    grid = s.timesteps(25)
    seeds = [11, 22, 33, 44, 55]
    rng = StackedRandomGenerator(seeds)
    batch = sampler(model, rng.randn((5, 2), dtype=torch.float64), grid, s, randn_like=rng.randn_like)
    for j in (0, 3):
        one = StackedRandomGenerator([seeds[j]])
        alone = sampler(model, one.randn((1, 2), dtype=torch.float64), grid, s, randn_like=one.randn_like)
        torch.testing.assert_close(alone[0], batch[j], rtol=1e-6, atol=1e-6)
    # different seeds give different samples
    assert torch.cdist(batch, batch).add(torch.eye(5) * 1e9).min() > 1e-3


# ---------------------------------------------------------------------------------------------- distribution
@pytest.mark.parametrize(
    "gmm, kind",
    [(GaussianMixture([[6.0, 2.0], [-4.0, -3.0]], stds=[0.5, 1.5], weights=[0.3, 0.7]), "linear"),
     (toy_mixture(), "cosine")],
    ids=["asymmetric-linear", "toy-cosine"],
)
def test_ddpm_samples_exact_mixture(gmm, kind):
    """DDPM, 200 steps, exact ε: mode weights, per-mode means and covariances of 4000 samples match the mixture.

    Tolerances are 4.5 standard errors of the estimators (weight: sqrt(w(1-w)/n); mean: s/sqrt(n_k); variance:
    s^2 sqrt(2/n_k); covariance: s^2/sqrt(n_k)). DDPM's own O(1/N) bias at N = 200 (variances ~3-7% low, measured
    with 40k samples) is smaller than these bands, so a wrong variance (e.g. fixed_large, a missing noise term) or a
    wrong mean coefficient fails while the seeded run is not marginal.
    """
    s = VPSchedule.from_name(kind)
    n = 4000
    g = _gen(2024)
    x_T = torch.randn(n, 2, generator=g, dtype=torch.float64)
    out = sample_ddpm(gmm.eps_model(s), x_T, s.timesteps(200), s,
                      randn_like=lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype))
    assert torch.isfinite(out).all()
    label = gmm.class_logits(out, torch.tensor(-1), s).argmax(-1)  # modes are > 6 stds apart: unambiguous
    z = 4.5
    for k in range(gmm.num_components):
        w = float(gmm.weights[k])
        sel = out[label == k]
        nk = sel.shape[0]
        assert abs(nk / n - w) < z * math.sqrt(w * (1 - w) / n)
        sd2 = float(gmm.stds[k]) ** 2
        torch.testing.assert_close(sel.mean(0), gmm.means[k], rtol=0, atol=z * math.sqrt(sd2 / nk))
        cov = torch.cov(sel.T)
        torch.testing.assert_close(cov.diagonal(), torch.full((2,), sd2, dtype=torch.float64), rtol=0,
                                   atol=z * sd2 * math.sqrt(2 / nk))
        assert abs(float(cov[0, 1])) < z * sd2 / math.sqrt(nk)


# ---------------------------------------------------------------------------------------------- convergence order
def _exact_pf_ode_to_clean(x_T, s2, ab_T):
    # x0 ~ N(0, s^2): p_t = N(0, v_t) with v_t = ab_t s^2 + 1 - ab_t; the PF-ODE maps x_T -> x_T sqrt(v_0 / v_T)
    return x_T * math.sqrt(s2 / (ab_T * s2 + 1 - ab_T))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("sd", [0.5, 2.0])
@pytest.mark.parametrize("spacing, ns", [("trailing", [10, 20, 50, 100, 200, 500]),
                                         ("linspace", [10, 28, 112, 334, 1000])])
def test_ddim_is_first_order(kind, sd, spacing, ns):
    """DDIM(eta=0) with the exact ε of N(0, sd²) against the exact PF-ODE solution, diffrax style.

    The sampler ends with a jump to alpha_bar = 1 (t_prev = -1), so we compare with the exact map to clean data,
    ``x_0 = x_T sd / sqrt(ab_T sd² + 1 - ab_T)``. This is fair: the last jump from t_last is a DDIM step like any
    other, of size 1 - ab[t_last]. On "trailing" grids t_last = T/N - 1 shrinks with N. On "linspace" grids
    (the ns are chosen so that the grids are uniform) t_last = 0 for every N: the final jump from ab[0] = 1 - beta_0
    carries an N-independent error ~ 1e-4 of x, two orders below the smallest total error here, so it does not
    flatten the fit (test_ddim_final_jump_floor checks that floor separately).

    The map is linear in x_T, so the error is deterministic. DDIM is the exponential-integrator / first-order
    discretisation of the PF-ODE; measured slopes are -0.95..-1.01. We require the fitted slope in [-1.15, -0.85]
    (a zeroth- or second-order scheme lands far outside), every refinement to reduce the error, and the finest
    error to be small.
    """
    s = VPSchedule.from_name(kind)
    T = s.num_train_timesteps
    gmm = GaussianMixture([[0.0]], stds=sd)
    model = gmm.eps_model(s)
    x_T = torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None]
    exact = _exact_pf_ode_to_clean(x_T, sd**2, float(s.alpha_bar[-1]))
    errs = []
    for n in ns:
        grid = s.timesteps(n, spacing)
        assert grid[0] == T - 1
        if spacing == "linspace":  # n - 1 divides T - 1: uniform integer grids from T - 1 down to 0
            assert torch.equal(grid, torch.arange(T - 1, -1, -(T - 1) // (n - 1)))
        out = sample_ddim(model, x_T, grid, s, eta=0.0)
        errs.append(float((out - exact).abs().max() / 3.0))
    slope = np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert all(e1 < e0 for e0, e1 in zip(errs, errs[1:])), errs
    assert -1.15 < slope < -0.85, (slope, errs)
    assert errs[-1] < 0.01 * sd


def test_ddim_final_jump_floor():
    """On a linspace grid the last step jumps from t = 0 to alpha_bar = 1. Its error is that of one DDIM step of size
    beta_0 applied to the (almost exact) state at t = 0: compared with "exact ODE to t = 0, then one DDIM jump", the
    error keeps decreasing at first order, and the jump's own contribution is the N-independent gap between the two
    references, ~1e-4 (beta_0 = 1e-4), far below the discretisation error of the body of the grid."""
    s = VPSchedule.linear()
    sd2 = 0.25
    model = GaussianMixture([[0.0]], stds=math.sqrt(sd2)).eps_model(s)
    ab_T, ab_0 = float(s.alpha_bar[-1]), float(s.alpha_bar[0])
    x_T = torch.ones(1, 1, dtype=torch.float64)
    exact_clean = _exact_pf_ode_to_clean(x_T, sd2, ab_T)
    x_at_0 = x_T * math.sqrt((ab_0 * sd2 + 1 - ab_0) / (ab_T * sd2 + 1 - ab_T))
    via_jump = ddim_step(x_at_0, model(x_at_0, _full(0, 1)), _full(0, 1), _full(-1, 1), s)[0]
    floor = float((via_jump - exact_clean).abs())
    assert 1e-6 < floor < 1e-4
    ns = [10, 28, 112, 334, 1000]
    errs = [float((sample_ddim(model, x_T, s.timesteps(n, "linspace"), s) - via_jump).abs()) for n in ns]
    slope = np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert -1.1 < slope < -0.9, (slope, errs)
    assert min(errs) > 10 * floor


# ---------------------------------------------------------------------------------------------- bad input
def test_get_sampler_unknown_name():
    with pytest.raises(ValueError, match="'nope'"):
        get_sampler("nope")


@pytest.mark.parametrize("grid", [[10, 10, 5], [5, 10], [10, 3, 4], [], [999.0, 500.0], [1000, 5], [5, -1]])
def test_bad_grid_raises(grid):
    s = VPSchedule.linear()
    model = SMALL_GMM.eps_model(s)
    with pytest.raises(ValueError):
        sample_ddpm(model, _x_T(torch.float32), torch.tensor(grid), s)


def test_bad_x_raises():
    s = VPSchedule.linear()
    model = SMALL_GMM.eps_model(s)
    grid = s.timesteps(3)
    with pytest.raises(ValueError, match="batch"):
        sample_ddpm(model, torch.zeros(2), grid, s)
    with pytest.raises(ValueError, match="expects"):
        sample_ddim(model, torch.zeros(4, 3), grid, s)
    with pytest.raises(ValueError, match="expects"):
        sample_ddim(model, torch.zeros(4, 2, 1), grid, s)
    # a model trained on another T
    with pytest.raises(ValueError, match="T="):
        sample_ddpm(SMALL_GMM.eps_model(VPSchedule.linear(500)), torch.zeros(4, 2), grid, s)


@pytest.mark.parametrize("sampler", [sample_ddpm, partial(sample_ddim, eta=0.0), partial(sample_ddim, eta=1.0)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_model_output_raises(sampler, bad):
    s = VPSchedule.linear()
    good = SMALL_GMM.eps_model(s)
    calls = []

    def model(x, t):
        calls.append(int(t[0]))
        eps = good(x, t)
        if len(calls) == 3:
            eps = eps.clone()
            eps[1, 0] = bad
        return eps

    with pytest.raises(NonFiniteError, match="samples \\[1\\]"):
        sampler(model, _x_T(torch.float32), s.timesteps(10), s)
    assert len(calls) == 3


def test_non_finite_state_raises():
    # a model whose output is finite but overflows the state must not return inf/NaN samples either
    s = VPSchedule.linear()
    with pytest.raises(NonFiniteError):
        sample_ddim(lambda x, t: torch.full_like(x, 3e38), _x_T(torch.float32), s.timesteps(10), s)


def test_negative_eta_raises():
    s = VPSchedule.linear()
    x = _x_T(torch.float64)
    with pytest.raises(ValueError, match="eta"):
        sample_ddim(SMALL_GMM.eps_model(s), x, s.timesteps(3), s, eta=-0.1)
    with pytest.raises(ValueError, match="eta"):
        ddim_step(x, x, _full(10), _full(5), s, eta=-1.0)


def test_recurrence_renoises_between_repeats_and_a_step_term_replaces_t():
    """TFG's ``num_recur`` = a manual loop that re-noises x_prev back to t between repeats; a step term that retimes
    = a manual loop whose step starts from the returned timestep."""
    schedule = VPSchedule.linear(1000)
    model = SMALL_GMM.eps_model(schedule)
    grid = schedule.timesteps(4)
    x_T = _x_T(torch.float64, seed=3)
    recur = TFGGuidance(lambda x0: x0.sum(-1), rho=0.0, mu=0.0, num_recur=2)  # recurrence only, no guidance
    out = sample_ddpm(model, x_T, grid, schedule, randn_like=_rng_randn_like(2), terms=[recur])
    rl, x = _rng_randn_like(2), x_T
    ts = grid.tolist() + [-1]
    for i in range(len(grid)):
        t, tp = _full(ts[i]), _full(ts[i + 1])
        for r in range(2):
            if r:
                a = schedule.alpha_bar_at(t, x) / schedule.alpha_bar_at(tp, x)
                x = a.sqrt() * x + (1 - a).sqrt() * rl(x)
            x, _ = ddpm_step(x, model(x, t), t, tp, schedule, noise=rl(x) if ts[i + 1] >= 0 else None)
    torch.testing.assert_close(out, x, rtol=0, atol=0)

    class MinusFive(StepTerm):
        def step(self, x, t, t_prev, ctx, evaluate, update):
            return update(x, evaluate(x, t - 5).eps_hat, t - 5, t_prev)

    shifted = sample_ddim(model, x_T, grid, schedule, terms=[MinusFive()])
    x = x_T
    for i in range(len(grid)):
        t, tp = _full(ts[i] - 5), _full(ts[i + 1])
        x, _ = ddim_step(x, model(x, t), t, tp, schedule)
    torch.testing.assert_close(shifted, x, rtol=0, atol=0)


def test_bad_terms_are_rejected_by_name():
    schedule = VPSchedule.linear(1000)
    run = partial(sample_ddim, SMALL_GMM.eps_model(schedule), _x_T(torch.float64), schedule.timesteps(3), schedule)
    loss = lambda x0: x0.sum(-1)  # noqa: E731
    with pytest.raises(ValueError, match="at most one step term.*TFGGuidance, TimeShift"):
        run(terms=[TFGGuidance(loss, rho=1.0), TimeShift()])
    with pytest.raises(TypeError, match="ScoreTerm, Corrector or StepTerm.*str"):
        run(terms=["tag"])
    with pytest.raises(TypeError, match="score terms only.*TemporalAlignment is a corrector"):
        guided_eps(SMALL_GMM.eps_model(schedule), schedule, [TemporalAlignment(SMALL_GMM.time_posterior(schedule))])
    with pytest.raises(TypeError, match="TFGGuidance is a step term"):
        guided_eps(SMALL_GMM.eps_model(schedule), schedule, [TFGGuidance(loss, rho=1.0)])
