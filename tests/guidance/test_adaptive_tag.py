"""AdaptiveTemporalAlignment (ω per step and sample from the predictor's reading of x, the reviewers' question 6):
its gain against the exact time posterior of a Gaussian mixture, computed here from the posterior itself; no pull
where t is the posterior's mode; the same number of predictor calls as TAG in a sampler loop; and the refusals."""

from __future__ import annotations

import pytest
import torch

from tagdiff import AdaptiveTemporalAlignment, LinearDrift, TemporalAlignment, TimeGapRecorder, VPSchedule, sample_ddpm
from tagdiff.data.gmm import ExactTimePosterior, toy_mixture

F64 = torch.float64
SCH = VPSchedule.linear(1000)
GMM = toy_mixture()
TP = GMM.time_posterior(SCH)


def _xt(n=64, t=400, seed=0, scale=0.8):
    g = torch.Generator().manual_seed(seed)
    x0, _ = GMM.sample(n, generator=g)
    tt = torch.full((n,), t)
    return scale * SCH.q_sample(x0.double(), tt, torch.randn(n, 2, generator=g, dtype=F64)), tt


@pytest.mark.parametrize("signal", ["confidence", "gap"])
def test_the_step_is_the_tag_step_times_the_gain_of_the_exact_posterior(signal):
    x, t = _xt()
    log_p = torch.log_softmax(TP(x).double(), -1)            # the exact p(t' | x) over all 1000 timesteps
    mode = log_p.argmax(-1)
    want = (1 - (log_p[torch.arange(len(x)), t] - log_p.max(-1).values).exp() if signal == "confidence"
            else ((mode - t).abs().double() / 100).clamp(max=1))
    assert 0.05 < float(want.mean()) < 0.95                  # a test that sees both pulled and unpulled samples
    plain = TemporalAlignment(TP, 2.0).tls_step(x, t, SCH)
    got = AdaptiveTemporalAlignment(TP, 2.0, signal=signal).tls_step(x, t, SCH)
    torch.testing.assert_close(got, plain * want[:, None], rtol=1e-10, atol=1e-12)


def test_no_pull_where_t_is_the_posterior_mode():
    x, _ = _xt(t=300, scale=1.0)
    mode = TP(x).argmax(-1)
    tag = AdaptiveTemporalAlignment(TP, 5.0, omega_schedule="constant")
    assert torch.equal(tag.correct(x, mode, schedule=SCH), x)
    assert not torch.equal(TemporalAlignment(TP, 5.0, omega_schedule="constant").correct(x, mode, schedule=SCH), x)


class _Counting(ExactTimePosterior):
    """The exact posterior, counting its forward calls."""

    calls = 0

    def forward(self, x, c=None):
        self.calls += 1
        return super().forward(x, c)


def test_in_a_sampler_loop_it_costs_what_tag_costs_and_still_closes_the_time_gap():
    model = GMM.eps_model(SCH)
    x = torch.randn(128, 2, generator=torch.Generator().manual_seed(5))
    ts = SCH.timesteps(50)
    gaps, calls = {}, {}
    for name, make in {"drift": None, "tag": TemporalAlignment, "adaptive": AdaptiveTemporalAlignment}.items():
        spy = _Counting(GMM, SCH)
        rec = TimeGapRecorder(TP)
        g = torch.Generator().manual_seed(6)
        terms = [LinearDrift(-0.01)] + ([make(spy, 1.0)] if make else [])
        sample_ddpm(model, x, ts, SCH, terms=terms, callback=rec,
                    randn_like=lambda z, g=g: torch.randn(z.shape, generator=g, dtype=z.dtype))
        gaps[name], calls[name] = rec.mean, spy.calls
    assert calls["adaptive"] == calls["tag"] == 50             # one predictor call per step: the TLS forward
    assert gaps["adaptive"] < 0.9 * gaps["drift"], gaps


def test_refusals_name_the_value():
    with pytest.raises(ValueError, match="signal must be one of"):
        AdaptiveTemporalAlignment(TP, 1.0, signal="entropy")
    with pytest.raises(ValueError, match="gap_scale must be > 0"):
        AdaptiveTemporalAlignment(TP, 1.0, signal="gap", gap_scale=0.0)
