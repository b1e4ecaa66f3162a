"""VPSchedule against diffusers' schedulers and exact identities of the VP forward process."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from tagdiff import VPSchedule
from tagdiff.sampling.schedules import SCHEDULE_KINDS, TIMESTEP_SPACINGS
from tfg_reference import space_timesteps

DIFFUSERS_NAME = {"linear": "linear", "cosine": "squaredcos_cap_v2", "scaled_linear": "scaled_linear"}
# diffusers builds its tables in float32, tagdiff in float64: compare at float32 accuracy
# (absolute; alpha_bar is O(1) at small t and the cumprod of 1000 float32 factors drifts by ~1e-7 absolute).
F32_ATOL = 1e-6


def _diffusers_ddpm(kind: str, **kwargs) -> DDPMScheduler:
    return DDPMScheduler(beta_schedule=DIFFUSERS_NAME[kind], **kwargs)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- tables
@pytest.mark.parametrize("kind", ["linear", "cosine", "scaled_linear"])
def test_alpha_bar_matches_diffusers(kind):
    ours = VPSchedule.from_name(kind)
    # tagdiff's scaled_linear defaults are Stable Diffusion's; diffusers' defaults are DDPM's
    kw = {"beta_start": 0.00085, "beta_end": 0.012} if kind == "scaled_linear" else {}
    ref = _diffusers_ddpm(kind, **kw)
    assert ours.num_train_timesteps == 1000
    assert ours.alpha_bar.dtype == torch.float64 and ours.betas.dtype == torch.float64
    torch.testing.assert_close(ours.betas, ref.betas.double(), rtol=0, atol=F32_ATOL)
    torch.testing.assert_close(ours.alpha_bar, ref.alphas_cumprod.double(), rtol=1e-4, atol=F32_ATOL)


def test_cosine_alpha_bar_is_nichol_dhariwal():
    # away from the beta cap, alpha_bar[t] = f((t+1)/T) / f(0) with f(s) = cos((s + 0.008)/1.008 * pi/2)^2
    T = 1000
    s = VPSchedule.cosine(T)

    def f(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    expected = torch.tensor([f((t + 1) / T) / f(0) for t in range(T)], dtype=torch.float64)
    capped = int((s.betas >= 0.999 - 1e-12).sum())
    assert capped <= 2  # only the very last betas hit the cap
    torch.testing.assert_close(s.alpha_bar[: T - capped], expected[: T - capped], rtol=1e-10, atol=1e-15)


def test_linear_betas_are_exact_linspace():
    s = VPSchedule.linear(10, beta_start=0.1, beta_end=0.55)
    torch.testing.assert_close(s.betas, torch.arange(10, dtype=torch.float64) * 0.05 + 0.1, rtol=0, atol=1e-15)
    torch.testing.assert_close(s.alpha_bar, torch.cumprod(1 - s.betas, 0), rtol=0, atol=0)


@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
@pytest.mark.parametrize("T", [1, 2, 10, 1000])
def test_alpha_bar_invariants(kind, T):
    s = VPSchedule.from_name(kind, T)
    ab = s.alpha_bar
    assert ab.shape == (T,)
    assert ((s.betas > 0) & (s.betas < 1)).all()
    assert ((ab > 0) & (ab <= 1)).all()
    assert (ab[1:] < ab[:-1]).all(), "alpha_bar must be strictly decreasing"
    # the clean-data entry t = -1 is exactly 1
    x = torch.zeros(3, 2, dtype=torch.float64)
    assert (s.alpha_bar_at(torch.full((3,), -1), x) == 1).all()


@pytest.mark.parametrize("betas", [[0.1, 0.0], [1.0, 0.1], [0.1, 1.1], [-0.1], [[0.1, 0.2]], []])
def test_bad_betas_raise(betas):
    with pytest.raises(ValueError, match="betas"):
        VPSchedule(torch.tensor(betas, dtype=torch.float64))


@pytest.mark.parametrize("T", [0, -5, 10.0, "1000"])
def test_bad_num_train_timesteps_raise(T):
    with pytest.raises(ValueError, match="num_train_timesteps"):
        VPSchedule.linear(T)


def test_unknown_schedule_name_raises_naming_it():
    with pytest.raises(ValueError, match="'sqrt_cosine_v9'"):
        VPSchedule.from_name("sqrt_cosine_v9")
    with pytest.raises(ValueError, match="'sqrt_cosine_v9'"):
        VPSchedule.from_diffusers({"beta_schedule": "sqrt_cosine_v9"})
    with pytest.raises(ValueError, match="field.*beta_magic.*alpha_bar"):  # an unknown field is refused by name
        VPSchedule.from_diffusers({"beta_schedule": "linear", "beta_magic": 2.0})
    with pytest.raises(ValueError, match="kind"):
        VPSchedule.from_dict({"num_train_timesteps": 10})


# ---------------------------------------------------------------------------------------------- (de)serialisation
@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"beta_schedule": "linear"}, VPSchedule.linear()),
        ({"beta_schedule": "squaredcos_cap_v2"}, VPSchedule.cosine()),
        ({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}, VPSchedule.scaled_linear()),
        ({"beta_schedule": "linear", "num_train_timesteps": 200, "beta_start": 1e-3, "beta_end": 0.05},
         VPSchedule.linear(200, 1e-3, 0.05)),
    ],
)
def test_from_diffusers_scheduler_and_config(cls, kwargs, expected):
    sched = cls(**kwargs)
    from_obj = VPSchedule.from_diffusers(sched)
    from_cfg = VPSchedule.from_diffusers(dict(sched.config))
    from_frozen = VPSchedule.from_diffusers(sched.config)
    assert from_obj == expected and from_cfg == expected and from_frozen == expected
    torch.testing.assert_close(from_obj.alpha_bar, sched.alphas_cumprod.double(), rtol=1e-4, atol=F32_ATOL)


def test_from_diffusers_trained_betas():
    betas = torch.linspace(0.01, 0.3, 25, dtype=torch.float64) ** 1.5
    sched = DDPMScheduler(num_train_timesteps=25, trained_betas=betas.tolist())
    s = VPSchedule.from_diffusers(sched.config)
    torch.testing.assert_close(s.betas, betas, rtol=0, atol=0)
    torch.testing.assert_close(s.alpha_bar, sched.alphas_cumprod.double(), rtol=1e-5, atol=F32_ATOL)


SCHEDULES_FOR_ROUNDTRIP = [
    VPSchedule.linear(),
    VPSchedule.linear(50, beta_start=2e-3, beta_end=0.3),
    VPSchedule.cosine(),
    VPSchedule.cosine(37),
    VPSchedule.scaled_linear(),
    VPSchedule(torch.linspace(0.01, 0.2, 17, dtype=torch.float64) ** 2),  # no spec -> "trained"
]


@pytest.mark.parametrize("s", SCHEDULES_FOR_ROUNDTRIP)
def test_to_dict_from_dict_roundtrip(s):
    d = s.to_dict()
    d_json = json.loads(json.dumps(d))  # must be JSON-able
    for dd in (d, d_json):
        s2 = VPSchedule.from_dict(dd)
        assert s2 == s
        torch.testing.assert_close(s2.alpha_bar, s.alpha_bar, rtol=0, atol=0)
        assert s2.to_dict() == d_json
    assert VPSchedule.from_dict(d).num_train_timesteps == s.num_train_timesteps
    # from_dict must not mutate its argument
    assert s.to_dict() == d


@pytest.mark.parametrize("s", SCHEDULES_FOR_ROUNDTRIP)
def test_to_diffusers_config_roundtrip(s):
    cfg = s.to_diffusers_config()
    sched = DDPMScheduler.from_config(cfg)
    assert sched.config.num_train_timesteps == s.num_train_timesteps
    assert sched.config.prediction_type == "epsilon"
    torch.testing.assert_close(sched.alphas_cumprod.double(), s.alpha_bar, rtol=1e-4, atol=F32_ATOL)
    assert VPSchedule.from_diffusers(sched) == s
    assert VPSchedule.from_diffusers(cfg) == s


def test_equality_and_hash():
    a, b = VPSchedule.linear(), VPSchedule.linear()
    assert a == b and hash(a) == hash(b)
    assert a != VPSchedule.cosine()
    assert a != VPSchedule.linear(beta_end=0.021)
    assert a != "linear"


# ---------------------------------------------------------------------------------------------- timestep grids
@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("n", [1, 3, 10, 50, 100, 1000])
@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_timesteps_match_diffusers(spacing, n, cls):
    s = VPSchedule.linear()
    sched = cls(timestep_spacing=spacing)
    sched.set_timesteps(n)
    ts = s.timesteps(n, spacing)
    assert ts.dtype == torch.int64 and ts.shape == (n,)
    assert torch.equal(ts, sched.timesteps.long())


@pytest.mark.parametrize("T", [7, 1000])
@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
def test_timesteps_every_n(T, spacing):
    """Every n in [1, T]: in range, strictly decreasing, the right length, and equal to diffusers' grid.

    diffusers' "trailing" grid occasionally has one element too many (its float ``arange`` overshoots and the extra
    element is -1, e.g. T=1000, n=61); tagdiff keeps the first n, which are diffusers' n proper timesteps.
    """
    s = VPSchedule.linear(T)
    sched = DDPMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    for n in range(1, T + 1):
        ts = s.timesteps(n, spacing)
        assert ts.shape == (n,), n
        assert ts.min() >= 0 and ts.max() <= T - 1, n
        assert (ts[1:] < ts[:-1]).all(), n
        if spacing == "trailing":
            assert ts[0] == T - 1
        if spacing != "trailing":
            assert ts[-1] == 0
        sched.set_timesteps(n)
        ref = sched.timesteps.long()
        assert torch.equal(ts, ref[:n]), (n, (ts != ref[:n]).nonzero().flatten().tolist())
        assert (ref[n:] < 0).all(), n


def test_timesteps_default_is_trailing_and_full_grid():
    s = VPSchedule.cosine(100)
    assert torch.equal(s.timesteps(5), s.timesteps(5, "trailing"))
    full = torch.arange(99, -1, -1)
    for spacing in TIMESTEP_SPACINGS:
        assert torch.equal(s.timesteps(100, spacing), full)


@pytest.mark.parametrize("n", [0, -1, 1001, 2.0, "10", None])
def test_timesteps_bad_num_steps(n):
    with pytest.raises(ValueError, match="num_steps"):
        VPSchedule.linear().timesteps(n)


def test_timesteps_bad_spacing_names_it():
    with pytest.raises(ValueError, match="'uniformish'"):
        VPSchedule.linear().timesteps(10, "uniformish")


# ---------------------------------------------------------------------------------------------- timestep validation
def test_check_timesteps():
    s = VPSchedule.linear(100)
    out = s.check_timesteps(torch.tensor([0, 5, 99], dtype=torch.int32))
    assert out.dtype == torch.int64 and out.tolist() == [0, 5, 99]
    assert s.check_timesteps(torch.tensor([-1, 3]), allow_clean=True).tolist() == [-1, 3]
    with pytest.raises(ValueError, match="out of range"):
        s.check_timesteps(torch.tensor([100]))
    with pytest.raises(ValueError, match="out of range"):
        s.check_timesteps(torch.tensor([-1]))
    with pytest.raises(ValueError, match="out of range"):
        s.check_timesteps(torch.tensor([-2, 5]), allow_clean=True)
    with pytest.raises(ValueError, match="integer"):
        s.check_timesteps(torch.tensor([3.0]))
    with pytest.raises(ValueError, match="integer"):
        s.check_timesteps(3.5)


@pytest.mark.parametrize("bad_t", [torch.tensor([1000, 5]), torch.tensor([-2, 5]), torch.tensor([998.5, 5.0])])
def test_conversions_reject_bad_timesteps(bad_t):
    # t = T used to read the appended clean-data entry (alpha_bar = 1) and t = -2 wrapped round to alpha_bar[T-1];
    # both must be errors, as must fractional timesteps (silently truncated before).
    s = VPSchedule.linear()
    x = torch.randn(2, 3, generator=_gen(0), dtype=torch.float64)
    for fn in (s.q_sample, s.x0_from_eps, s.eps_from_x0, s.score_from_eps, s.eps_from_score):
        with pytest.raises(ValueError, match="timestep"):
            fn(x, bad_t, x)
    with pytest.raises(ValueError, match="timestep"):
        s.alpha_bar_at(bad_t, x)
    with pytest.raises(ValueError, match="timestep"):
        s.sigma(bad_t)


# ---------------------------------------------------------------------------------------------- conversions
@pytest.fixture(params=["linear", "cosine"])
def schedule(request):
    return VPSchedule.from_name(request.param)


def _random_case(schedule, B=64, D=(3, 2), seed=0):
    g = _gen(seed)
    T = schedule.num_train_timesteps
    # include both ends of the schedule
    t = torch.cat([torch.tensor([0, T - 1]), torch.randint(0, T, (B - 2,), generator=g)])
    x = torch.randn(B, *D, generator=g, dtype=torch.float64)
    v = torch.randn(B, *D, generator=g, dtype=torch.float64)
    return t, x, v


def test_alpha_bar_at_shapes(schedule):
    t, x, _ = _random_case(schedule, B=5, D=(4, 3, 2))
    ab = schedule.alpha_bar_at(t, x)
    assert ab.shape == (5, 1, 1, 1) and ab.dtype == torch.float64
    torch.testing.assert_close(ab.flatten(), schedule.alpha_bar[t], rtol=0, atol=0)
    ab32 = schedule.alpha_bar_at(t, x.float())
    assert ab32.dtype == torch.float32
    # a scalar timestep broadcasts over the batch
    ab_s = schedule.alpha_bar_at(torch.tensor(7), x)
    assert ab_s.shape == (5, 1, 1, 1) and (ab_s == schedule.alpha_bar[7]).all()


def test_q_sample_formula(schedule):
    t, x0, eps = _random_case(schedule)
    ab = schedule.alpha_bar[t].reshape(-1, 1, 1)
    expected = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    torch.testing.assert_close(schedule.q_sample(x0, t, eps), expected, rtol=0, atol=1e-15)
    # t = -1 is clean data
    torch.testing.assert_close(schedule.q_sample(x0, torch.full_like(t, -1), eps), x0, rtol=0, atol=0)


def test_q_sample_matches_diffusers_add_noise():
    ours = VPSchedule.linear()
    ref = DDPMScheduler(beta_schedule="linear")
    t, x0, eps = _random_case(ours)
    x0, eps = x0.float(), eps.float()
    torch.testing.assert_close(ours.q_sample(x0, t, eps), ref.add_noise(x0, eps, t), rtol=1e-5, atol=1e-5)


def test_q_sample_marginal_moments():
    # x_t = sqrt(ab) x0 + sqrt(1 - ab) eps with x0 ~ N(m, s^2): mean sqrt(ab) m, variance ab s^2 + 1 - ab
    s = VPSchedule.cosine()
    g = _gen(1)
    n, m, sd = 200_000, 3.0, 0.5
    t = torch.full((n,), 400)
    x0 = m + sd * torch.randn(n, 1, generator=g, dtype=torch.float64)
    xt = s.q_sample(x0, t, torch.randn(n, 1, generator=g, dtype=torch.float64))
    ab = float(s.alpha_bar[400])
    var = ab * sd**2 + 1 - ab
    assert abs(xt.mean().item() - math.sqrt(ab) * m) < 5 * math.sqrt(var / n)
    assert abs(xt.var().item() - var) < 5 * var * math.sqrt(2 / n)


def test_x0_eps_inverse_pair(schedule):
    t, x, v = _random_case(schedule)
    torch.testing.assert_close(schedule.eps_from_x0(x, t, schedule.x0_from_eps(x, t, v)), v, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(schedule.x0_from_eps(x, t, schedule.eps_from_x0(x, t, v)), v, rtol=1e-9, atol=1e-9)


def test_forward_process_identities(schedule):
    # Tweedie with the true noise recovers x0 exactly; eps_from_x0 with the true x0 recovers the noise.
    t, x0, eps = _random_case(schedule)
    xt = schedule.q_sample(x0, t, eps)
    torch.testing.assert_close(schedule.x0_from_eps(xt, t, eps), x0, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(schedule.eps_from_x0(xt, t, x0), eps, rtol=1e-8, atol=1e-8)


def test_x0_from_eps_formula(schedule):
    t, x, eps = _random_case(schedule)
    ab = schedule.alpha_bar[t].reshape(-1, 1, 1)
    torch.testing.assert_close(schedule.x0_from_eps(x, t, eps), (x - (1 - ab).sqrt() * eps) / ab.sqrt(),
                               rtol=1e-12, atol=1e-12)


def test_score_eps_inverse_pair(schedule):
    t, x, v = _random_case(schedule)
    torch.testing.assert_close(schedule.eps_from_score(x, t, schedule.score_from_eps(x, t, v)), v, rtol=1e-12, atol=0)
    torch.testing.assert_close(schedule.score_from_eps(x, t, schedule.eps_from_score(x, t, v)), v, rtol=1e-12, atol=0)


def test_score_from_eps_on_analytic_gaussian(schedule):
    # x0 ~ N(0, s^2 I): p_t = N(0, v I) with v = ab s^2 + 1 - ab, so score = -x / v and the MMSE noise
    # prediction is E[eps | x_t] = sqrt(1 - ab) x / v.
    sd = 1.7
    t, x, _ = _random_case(schedule)
    ab = schedule.alpha_bar[t].reshape(-1, 1, 1)
    var = ab * sd**2 + 1 - ab
    eps = (1 - ab).sqrt() * x / var
    torch.testing.assert_close(schedule.score_from_eps(x, t, eps), -x / var, rtol=1e-12, atol=1e-12)
    # cross-check the sign/scale with autograd of the log-density
    xr = x.clone().requires_grad_(True)
    logp = (-0.5 * xr**2 / var).sum()
    (grad,) = torch.autograd.grad(logp, xr)
    torch.testing.assert_close(schedule.score_from_eps(x, t, eps), grad, rtol=1e-12, atol=1e-12)


def test_sigma_and_t_from_sigma_roundtrip(schedule):
    T = schedule.num_train_timesteps
    t = torch.arange(T)
    sig = schedule.sigma(t)
    assert sig.dtype == torch.float64 and sig.shape == (T,)
    torch.testing.assert_close(sig, ((1 - schedule.alpha_bar) / schedule.alpha_bar).sqrt(), rtol=1e-14, atol=0)
    assert (sig[1:] > sig[:-1]).all()
    assert torch.equal(schedule.t_from_sigma(sig), t)
    # nearest in log-sigma: small relative perturbations keep the timestep
    assert torch.equal(schedule.t_from_sigma(sig * (1 + 1e-7)), t)
    assert torch.equal(schedule.t_from_sigma(sig * (1 - 1e-7)), t)
    # shape is preserved, and alpha_bar = 1 / (1 + sigma^2)
    assert schedule.t_from_sigma(sig[:6].reshape(2, 3)).shape == (2, 3)
    torch.testing.assert_close(1 / (1 + sig**2), schedule.alpha_bar, rtol=1e-12, atol=0)
    assert schedule.sigma(torch.tensor(-1)).item() == 0.0
    # beyond the grid: clamps to the ends
    assert schedule.t_from_sigma(torch.tensor([1e-9, 1e9])).tolist() == [0, T - 1]


@pytest.mark.parametrize("kw", [dict(rescale_betas_zero_snr=True), dict(beta_schedule="sigmoid"),
                                dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
                                dict(beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True),
                                dict(trained_betas=np.linspace(1e-4, 0.02, 1000).tolist(), rescale_betas_zero_snr=True),
                                dict(timestep_spacing="trailing", steps_offset=1, prediction_type="v_prediction")])
def test_from_diffusers_reads_every_field_that_changes_alpha_bar(kw):
    """ᾱ equals diffusers' own (float32) ``alphas_cumprod``; zero-SNR rescaling gives ᾱ_{T-1} = 0 exactly; grid and
    prediction fields leave ᾱ alone; the schedule round-trips through its dict and its diffusers config."""
    sched = DDPMScheduler(**kw)
    s = VPSchedule.from_diffusers(sched)
    torch.testing.assert_close(s.alpha_bar, sched.alphas_cumprod.double(), rtol=0, atol=2e-6)
    if kw.get("rescale_betas_zero_snr"):
        assert float(s.alpha_bar[-1]) == 0.0 and float(s.betas[-1]) == 1.0
        assert "zero terminal SNR" in s.describe()
    assert VPSchedule.from_dict(s.to_dict()) == s
    assert VPSchedule.from_diffusers(DDPMScheduler(**s.to_diffusers_config())) == s
def test_one_step_grid_is_zero_under_the_benchmark_spacing():
    """The paper's (TFG benchmark's) one-step grid is [0]: its one-step sampler calls ε_θ(x_T, t = 0). diffusers'
    "leading" and "linspace" agree; only "trailing" gives [T - 1]."""
    s = VPSchedule.linear()
    assert space_timesteps(1000, 1) == [0] and space_timesteps(1000, 3) == [999, 500, 0]
    assert s.timesteps(1, "linspace").tolist() == [0]
    assert s.timesteps(1, "leading").tolist() == [0]
    assert s.timesteps(1, "trailing").tolist() == [999]
    assert s.timesteps(2, "linspace").tolist() == [999, 0]
    assert s.timesteps(3, "linspace").tolist() == [999, 500, 0]
    for n in range(1, 1001):
        assert s.timesteps(n, "space_timesteps").tolist() == space_timesteps(1000, n), n
    # "linspace" (the experiments' default) is the benchmark's grid at the paper's step counts and every n <= 20 ...
    for n in (*range(1, 21), 50, 100):
        assert s.timesteps(n, "linspace").tolist() == space_timesteps(1000, n), n
    # ... but not everywhere: the benchmark's accumulated float stride rounds 499.4999... down at n = 21
    assert s.timesteps(21, "space_timesteps")[10] == 499 and s.timesteps(21, "linspace")[10] == 500


@pytest.mark.parametrize("n", [1, 3, 10, 50])
def test_steps_offset_shifts_the_leading_grid_as_diffusers(n):
    s = VPSchedule.linear()
    sched = DDIMScheduler(timestep_spacing="leading", steps_offset=1)
    sched.set_timesteps(n)
    assert torch.equal(s.timesteps(n, "leading", steps_offset=1), sched.timesteps.long())
    assert s.timesteps(1, "leading", 1).tolist() == [1]


def test_bad_steps_offset_raises():
    s = VPSchedule.linear()
    with pytest.raises(ValueError, match="only applies to the 'leading'"):
        s.timesteps(5, "trailing", steps_offset=1)
    with pytest.raises(ValueError, match=">= 0"):
        s.timesteps(5, "leading", steps_offset=-1)
    with pytest.raises(ValueError, match="pushes"):
        s.timesteps(1000, "leading", steps_offset=1)
