"""Exact Gaussian mixtures (tagdiff.data.gmm): every quantity checked against an independent ground truth.

Ground truths used here: ``torch.distributions`` densities, autograd of the exact log-density, Tweedie's formula,
central finite differences, the closed form of the paper's Thm 3.3 (§8.2), and Monte-Carlo moments of the forward
process.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tagdiff import VPSchedule, tls
from tagdiff.data.gmm import ExactTimePosterior, GaussianMixture, toy_mixture
from tagdiff.models.time_predictor import TimePredictor

F64 = torch.float64
SCHEDULE = VPSchedule.linear(1000)
# A small-T schedule (betas scaled so that the chain still reaches noise) keeps sums over all timesteps cheap.
SMALL = VPSchedule.linear(50, beta_start=1e-4 * 20, beta_end=0.02 * 20)

MIX_2D = GaussianMixture([[1.0, 2.0], [-2.0, 0.5], [0.5, -1.5]], stds=[0.5, 1.5, 0.8], weights=[0.2, 0.5, 0.3])
MIX_3D = GaussianMixture([[1.0, 0.0, -1.0], [-1.0, 2.0, 0.5]], stds=[0.7, 1.3], weights=[0.65, 0.35])
MIXTURES = {"2d": MIX_2D, "3d": MIX_3D}
TIMESTEPS = [0, 7, 120, 480, 999]


def _points(gmm: GaussianMixture, n: int = 16, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, gmm.dim, generator=g, dtype=F64)


def _reference_component_log_probs(gmm: GaussianMixture, x: torch.Tensor, ab: float) -> torch.Tensor:
    """log π_k + log N(x; sqrt(ab) μ_k, (ab s_k² + 1 - ab) I) from torch.distributions, shape (B, K)."""
    cols = []
    for k in range(gmm.num_components):
        var = ab * float(gmm.stds[k]) ** 2 + (1 - ab)
        dist = torch.distributions.MultivariateNormal(
            math.sqrt(ab) * gmm.means[k], covariance_matrix=var * torch.eye(gmm.dim, dtype=F64)
        )
        cols.append(math.log(float(gmm.weights[k])) + dist.log_prob(x))
    return torch.stack(cols, -1)


def _ab(schedule: VPSchedule, t: int) -> float:
    return 1.0 if t < 0 else float(schedule.alpha_bar[t])


# ---------------------------------------------------------------------------------------------- densities


@pytest.mark.parametrize("name", MIXTURES)
@pytest.mark.parametrize("t", [-1, *TIMESTEPS])
def test_log_prob_matches_torch_distributions(name, t):
    gmm = MIXTURES[name]
    x = _points(gmm)
    ref = torch.logsumexp(_reference_component_log_probs(gmm, x, _ab(SCHEDULE, t)), -1)
    got = gmm.log_prob(x, torch.tensor(t), SCHEDULE)
    assert got.dtype == F64 and got.shape == (x.shape[0],)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_log_prob_accepts_per_sample_timesteps():
    x = _points(MIX_2D, n=len(TIMESTEPS))
    t = torch.tensor(TIMESTEPS)
    got = MIX_2D.log_prob(x, t, SCHEDULE)
    ref = torch.stack([MIX_2D.log_prob(x[i:i + 1], t[i], SCHEDULE)[0] for i in range(len(TIMESTEPS))])
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-13)


def test_clean_log_prob_integrates_to_one_in_1d():
    gmm = GaussianMixture([[0.0], [3.0]], stds=[0.4, 1.1], weights=[0.3, 0.7])
    grid = torch.linspace(-12, 15, 20001, dtype=F64)[:, None]
    dens = gmm.log_prob(grid, torch.tensor(-1), SCHEDULE).exp()
    assert float(torch.trapezoid(dens, grid[:, 0])) == pytest.approx(1.0, abs=1e-8)


# ---------------------------------------------------------------------------------------------- score, eps, Tweedie


@pytest.mark.parametrize("name", MIXTURES)
@pytest.mark.parametrize("t", TIMESTEPS)
def test_score_is_autograd_of_log_prob(name, t):
    gmm = MIXTURES[name]
    x = _points(gmm).requires_grad_(True)
    tt = torch.full((x.shape[0],), t)
    (ref,) = torch.autograd.grad(gmm.log_prob(x, tt, SCHEDULE).sum(), x)
    got = gmm.score(x.detach(), tt, SCHEDULE)
    assert got.shape == x.shape and got.dtype == F64
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    K=st.integers(1, 4),
    D=st.integers(1, 3),
    t=st.integers(0, 999),
    seed=st.integers(0, 2**31 - 1),
)
def test_score_is_autograd_of_log_prob_random_mixtures(K, D, t, seed):
    g = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(K, D, generator=g, dtype=F64)
    stds = 0.2 + 2 * torch.rand(K, generator=g, dtype=F64)
    w = torch.rand(K, generator=g, dtype=F64) + 0.05
    gmm = GaussianMixture(means, stds, w / w.sum())
    x = (4 * torch.randn(8, D, generator=g, dtype=F64)).requires_grad_(True)
    (ref,) = torch.autograd.grad(gmm.log_prob(x, torch.tensor(t), SCHEDULE).sum(), x)
    torch.testing.assert_close(gmm.score(x.detach(), torch.tensor(t), SCHEDULE), ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", MIXTURES)
@pytest.mark.parametrize("t", TIMESTEPS)
def test_eps_is_minus_sqrt_one_minus_alpha_bar_times_score(name, t):
    gmm = MIXTURES[name]
    x = _points(gmm)
    tt = torch.full((x.shape[0],), t)
    ref = -math.sqrt(1 - _ab(SCHEDULE, t)) * gmm.score(x, tt, SCHEDULE)
    torch.testing.assert_close(gmm.eps(x, tt, SCHEDULE), ref, rtol=1e-13, atol=1e-14)
    model = gmm.eps_model(SCHEDULE)
    assert model.sample_shape == (gmm.dim,) and model.num_train_timesteps == 1000
    torch.testing.assert_close(model(x, tt), ref, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("name", MIXTURES)
@pytest.mark.parametrize("t", TIMESTEPS)
def test_x0_hat_is_tweedie(name, t):
    gmm = MIXTURES[name]
    x = _points(gmm)
    tt = torch.full((x.shape[0],), t)
    ab = _ab(SCHEDULE, t)
    ref = (x + (1 - ab) * gmm.score(x, tt, SCHEDULE)) / math.sqrt(ab)
    torch.testing.assert_close(gmm.x0_hat(x, tt, SCHEDULE), ref, rtol=1e-9, atol=1e-9)
    # and with the schedule's own ε -> x0 conversion
    torch.testing.assert_close(SCHEDULE.x0_from_eps(x, tt, gmm.eps(x, tt, SCHEDULE)), ref, rtol=1e-9, atol=1e-9)


def test_x0_hat_single_gaussian_is_conjugate_posterior_mean():
    gmm = GaussianMixture([[1.5, -0.5]], stds=0.6)
    x = _points(gmm)
    t = 300
    ab = _ab(SCHEDULE, t)
    a, s2 = math.sqrt(ab), 0.36
    # x_t = a x_0 + sqrt(1 - ab) ε with x_0 ~ N(μ, s² I): E[x_0 | x_t] = μ + a s² / (a² s² + 1 - ab) (x_t - a μ)
    ref = gmm.means[0] + a * s2 / (ab * s2 + 1 - ab) * (x - a * gmm.means[0])
    torch.testing.assert_close(gmm.x0_hat(x, torch.tensor(t), SCHEDULE), ref, rtol=1e-12, atol=1e-12)


def test_outputs_keep_float32_dtype():
    x = _points(MIX_2D).float()
    t = torch.tensor(100)
    for fn in (MIX_2D.score, MIX_2D.eps, MIX_2D.x0_hat, MIX_2D.class_logits):
        out = fn(x, t, SCHEDULE)
        assert out.dtype == torch.float32 and out.shape[0] == x.shape[0]
        ref = fn(x.double(), t, SCHEDULE)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- class posterior


@pytest.mark.parametrize("name", MIXTURES)
@pytest.mark.parametrize("t", [-1, *TIMESTEPS])
def test_class_posterior_is_normalised_component_density(name, t):
    gmm = MIXTURES[name]
    x = _points(gmm)
    tt = torch.tensor(t)
    logits = gmm.class_logits(x, tt, SCHEDULE)
    assert logits.shape == (x.shape[0], gmm.num_components)
    torch.testing.assert_close(logits.exp().sum(-1), torch.ones(x.shape[0], dtype=F64), rtol=0, atol=1e-12)
    ref = torch.softmax(_reference_component_log_probs(gmm, x, _ab(SCHEDULE, t)), -1)
    torch.testing.assert_close(logits.exp(), ref, rtol=1e-10, atol=1e-13)
    if t >= 0:
        torch.testing.assert_close(gmm.classifier(SCHEDULE)(x, torch.full((x.shape[0],), t)), logits)


def test_class_posterior_far_from_other_modes_is_confident():
    gmm = toy_mixture()
    x = torch.tensor([[10.0, 10.0], [-10.0, -10.0]], dtype=F64)
    p = gmm.class_logits(x, torch.tensor(-1), SCHEDULE).exp()
    assert p[0, 0] > 1 - 1e-12 and p[1, 1] > 1 - 1e-12


# ---------------------------------------------------------------------------------------------- exact time posterior


def test_time_posterior_is_a_time_predictor():
    tp = MIX_2D.time_posterior(SCHEDULE)
    assert isinstance(tp, ExactTimePosterior) and isinstance(tp, TimePredictor)
    assert tp.num_train_timesteps == 1000 and tp.sample_shape == (2,)


@pytest.mark.parametrize("name", MIXTURES)
def test_time_posterior_rows_sum_to_one_and_logits_are_log_prob(name):
    gmm = MIXTURES[name]
    tp = gmm.time_posterior(SCHEDULE)
    x = _points(gmm, scale=1.5)
    logits = tp(x)
    assert logits.shape == (x.shape[0], 1000) and logits.dtype == F64
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(probs.sum(-1), torch.ones(x.shape[0], dtype=F64), rtol=0, atol=1e-12)
    # logits = log p_t(x) + c(x): compare with a direct loop over a few t
    ts = [0, 3, 99, 500, 998, 999]
    direct = torch.stack([gmm.log_prob(x, torch.tensor(t), SCHEDULE) for t in ts], -1)
    diff = logits[:, ts] - direct
    torch.testing.assert_close(diff, diff[:, :1].expand_as(diff), rtol=0, atol=1e-9)
    # log_prob of the predictor is the normalised posterior
    for t in ts:
        torch.testing.assert_close(tp.log_prob(x, torch.tensor(t)), torch.log_softmax(logits, -1)[:, t])


def test_time_posterior_equals_bayes_rule_over_all_timesteps():
    """With a small T, p(t | x) = p_t(x) / Σ_s p_s(x) computed by a loop over every t."""
    tp = MIX_3D.time_posterior(SMALL)
    x = _points(MIX_3D, scale=1.2)
    direct = torch.stack([MIX_3D.log_prob(x, torch.tensor(t), SMALL) for t in range(50)], -1)
    torch.testing.assert_close(torch.log_softmax(tp(x), -1), torch.log_softmax(direct, -1), rtol=1e-10, atol=1e-10)


def test_time_posterior_rejects_wrong_shape():
    tp = MIX_2D.time_posterior(SCHEDULE)
    with pytest.raises(ValueError, match="shape"):
        tp(torch.zeros(4, 3, dtype=F64))


@pytest.mark.parametrize("name", MIXTURES)
@pytest.mark.parametrize("t", [0, 40, 250, 700, 999])
def test_tls_matches_central_finite_differences(name, t):
    gmm = MIXTURES[name]
    tp = gmm.time_posterior(SCHEDULE)
    x = _points(gmm, n=6, scale=1.5)
    tt = torch.full((x.shape[0],), t)
    got = tls(tp, x, tt)
    assert got.shape == x.shape and got.dtype == F64
    h = 1e-5
    fd = torch.zeros_like(x)
    for j in range(gmm.dim):
        e = torch.zeros(gmm.dim, dtype=F64)
        e[j] = h
        fd[:, j] = (tp.log_prob(x + e, tt) - tp.log_prob(x - e, tt)) / (2 * h)
    torch.testing.assert_close(got, fd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", MIXTURES)
@pytest.mark.parametrize("t", [0, 5, 20, 49])
def test_tls_matches_thm_3_3_closed_form(name, t):
    """docs/notation.md §6.3: ∇ log p(t_i | x) = ∇ log p_{t_i}(x) - Σ_k p(t_k | x) ∇ log p_{t_k}(x)."""
    gmm = MIXTURES[name]
    tp = gmm.time_posterior(SMALL)
    x = _points(gmm, n=8, scale=1.5)
    B = x.shape[0]
    scores = torch.stack([gmm.score(x, torch.full((B,), k), SMALL) for k in range(50)], 1)  # (B, T, D)
    gamma = torch.softmax(tp(x), -1)                                                        # (B, T)
    closed = scores[:, t] - (gamma[..., None] * scores).sum(1)
    got = tls(tp, x, torch.full((B,), t))
    torch.testing.assert_close(got, closed, rtol=1e-9, atol=1e-10)
    # Eq. 12 form: Σ_{k≠i} γ_k (∇ log p_{t_i} - ∇ log p_{t_k})
    others = [k for k in range(50) if k != t]
    eq12 = (gamma[:, others, None] * (scores[:, t:t + 1] - scores[:, others])).sum(1)
    torch.testing.assert_close(got, eq12, rtol=1e-9, atol=1e-10)


def test_tls_points_towards_the_right_noise_level():
    """Off the t-manifold along the radial direction, the TLS pulls x back: scaled-down forward samples of the toy
    (too close to the origin for t) get a TLS pointing outwards, i.e. positive inner product with x."""
    gmm = toy_mixture()
    tp = gmm.time_posterior(SCHEDULE)
    x0, _ = gmm.sample(64, generator=torch.Generator().manual_seed(0))
    t = torch.full((64,), 100)
    xt = SCHEDULE.q_sample(x0.double(), t, torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(1)))
    g = tls(tp, 0.7 * xt, t)
    assert ((g * xt).sum(-1) > 0).all()


# ----------------------------------------------------------------------------------------- sampling / forward process


def test_sample_component_frequencies_and_moments():
    gmm = MIX_2D
    n = 100_000
    x0, k = gmm.sample(n, generator=torch.Generator().manual_seed(0))
    assert x0.shape == (n, 2) and x0.dtype == torch.float32 and k.dtype == torch.int64
    freq = torch.bincount(k, minlength=3).double() / n
    se = (gmm.weights * (1 - gmm.weights) / n).sqrt()
    assert ((freq - gmm.weights).abs() < 5 * se).all()
    for j in range(3):
        xs = x0[k == j].double()
        se_mean = float(gmm.stds[j]) / math.sqrt(xs.shape[0])
        assert ((xs.mean(0) - gmm.means[j]).abs() < 5 * se_mean).all()
        assert ((xs.var(0) / gmm.stds[j] ** 2 - 1).abs() < 5 * math.sqrt(2 / xs.shape[0])).all()


@pytest.mark.parametrize("name", MIXTURES)
def test_q_sample_has_exact_marginal_moments(name):
    gmm = MIXTURES[name]
    n, t = 200_000, 300
    g = torch.Generator().manual_seed(1)
    x0, _ = gmm.sample(n, generator=g)
    noise = torch.randn(x0.shape, generator=g, dtype=F64)
    xt = SCHEDULE.q_sample(x0.double(), torch.full((n,), t), noise)
    ab = _ab(SCHEDULE, t)
    a = math.sqrt(ab)
    w, mu, s2 = gmm.weights, gmm.means, gmm.stds**2
    m0 = (w[:, None] * mu).sum(0)
    second = s2[:, None, None] * torch.eye(gmm.dim, dtype=F64) + mu[:, :, None] * mu[:, None, :]   # E[x0 x0ᵀ | k]
    cov0 = (w[:, None, None] * second).sum(0)
    cov0 = cov0 - torch.outer(m0, m0)
    mean_t, cov_t = a * m0, ab * cov0 + (1 - ab) * torch.eye(gmm.dim, dtype=F64)
    emp_mean, emp_cov = xt.mean(0), torch.cov(xt.T)
    sd = cov_t.diagonal().sqrt()
    assert ((emp_mean - mean_t).abs() < 5 * sd / math.sqrt(n)).all(), (emp_mean, mean_t)
    # sd of a sample covariance entry is at most ~ sqrt(E[x_i² x_j²] / n); bound it crudely by 4 sd_i sd_j / sqrt(n)
    tol = 5 * 4 * torch.outer(sd, sd) / math.sqrt(n)
    assert ((emp_cov - cov_t).abs() < tol).all(), (emp_cov, cov_t)
    # the exact score belongs to the density of these samples: E_{p_t}[∇ log p_t(x)] = 0
    sc = gmm.score(xt[:20_000], torch.tensor(t), SCHEDULE)
    assert (sc.mean(0).abs() < 5 * sc.std(0) / math.sqrt(20_000)).all()


def test_toy_mixture_is_the_papers():
    g = toy_mixture()
    torch.testing.assert_close(g.means, torch.tensor([[10.0, 10.0], [-10.0, -10.0]], dtype=F64))
    torch.testing.assert_close(g.stds, torch.ones(2, dtype=F64))
    torch.testing.assert_close(g.weights, torch.full((2,), 0.5, dtype=F64))


def test_to_dict_round_trip():
    d = MIX_3D.to_dict()
    g = GaussianMixture(**d)
    for attr in ("means", "stds", "weights"):
        assert torch.equal(getattr(g, attr), getattr(MIX_3D, attr))


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("shape", [(4, 3), (4,), (4, 2, 1), (2, 1)])
def test_wrong_x_dimension_raises(shape):
    x = torch.zeros(shape, dtype=F64)
    for fn in (MIX_2D.log_prob, MIX_2D.score, MIX_2D.eps, MIX_2D.x0_hat, MIX_2D.class_logits):
        with pytest.raises(ValueError, match=r"expected \(B, 2\)"):
            fn(x, torch.tensor(10), SCHEDULE)
    with pytest.raises(ValueError, match=r"expected \(B, 2\)"):
        MIX_2D.time_logits(x, SCHEDULE)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"means": [1.0, 2.0]}, "means must have shape"),
        ({"means": [[[1.0]]]}, "means must have shape"),
        ({"means": [[0.0, float("nan")], [1.0, 1.0]]}, "means must be finite"),
        ({"weights": [0.7, 0.7]}, "weights"),
        ({"weights": [1.2, -0.2]}, "weights"),
        ({"weights": [0.5, 0.25, 0.25]}, "weights"),
        ({"weights": [0.5, float("nan")]}, "weights"),
        ({"weights": [float("nan"), float("nan")]}, "weights"),
        ({"stds": 0.0}, "stds"),
        ({"stds": [1.0, -0.5]}, "stds"),
        ({"stds": [1.0, float("nan")]}, "stds"),
        ({"stds": float("inf")}, "stds"),
        ({"stds": [1.0, 2.0, 3.0]}, "stds"),
    ],
)
def test_bad_mixture_parameters_raise(kwargs, match):
    args = {"means": [[0.0, 0.0], [1.0, 1.0]], "stds": 1.0, "weights": None, **kwargs}
    with pytest.raises(ValueError, match=match):
        GaussianMixture(**args)
