"""The sampling loop on accelerators: no host reads inside the loop (checked on PyTorch's data-less meta device,
where any read of a tensor value raises), deferred finiteness checks that still name the first failure."""

from __future__ import annotations

import pytest
import torch

import tagdiff._utils as U
from tagdiff import DPSGuidance, NonFiniteError, TemporalAlignment, TimeGapRecorder, sample_ddim
from tagdiff.guidance import label_loss
from tagdiff.models.checkpoints import load_model
from tagdiff.models.unet import load_unet

ASSETS = "src/tagdiff/assets/digits"


def test_a_dps_tag_loop_with_the_recorder_reads_nothing_from_the_device(monkeypatch):
    """On the meta device every ``.item()``, ``bool()``, ``int()`` or copy to the host raises: the loop (DPS + TAG +
    Time-Gap recorder, DDIM η = 1 with clipping) runs to the end, where the one deferred read happens."""
    model, schedule = load_unet(f"{ASSETS}/unet")
    tp, clf = load_model(f"{ASSETS}/time_predictor"), load_model(f"{ASSETS}/clf_clean")
    meta = torch.device("meta")
    model, tp, clf = model.to(meta), tp.to(meta), clf.to(meta)
    reads = []

    def exit_without_the_final_read(self, *exc):
        reads.append(len(U._DEFERRED.pop()))  # the checks that would be read once, here

    monkeypatch.setattr(U.deferred_finite_checks, "__exit__", exit_without_the_final_read)
    x = torch.randn(8, 1, 8, 8, device=meta)
    terms = [DPSGuidance(label_loss(clf, torch.zeros(8, dtype=torch.long)), 16.0), TemporalAlignment(tp, 1.0)]
    rec = TimeGapRecorder(tp)
    out = sample_ddim(model, x, schedule.timesteps(5), schedule, eta=1.0, clip_x0=1.0, terms=terms, callback=rec,
                      randn_like=torch.randn_like)
    assert out.device.type == "meta" and out.shape == x.shape
    assert reads and reads[0] >= 5 * 3  # model output, Δs, TLS and state checks of 5 steps, read once at the end
    assert rec.timesteps == schedule.timesteps(5).tolist()


def test_deferred_checks_raise_the_first_failure_at_the_end():
    good, bad = torch.ones(2, 3), torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    with pytest.raises(NonFiniteError, match=r"^second is not finite for samples \[0\]"):
        with U.deferred_finite_checks():
            U.check_finite(good, "first")
            U.check_finite(bad, lambda: "second")  # lazily formatted
            U.check_finite(bad * float("inf"), "third")
    with U.deferred_finite_checks(enabled=False), pytest.raises(NonFiniteError, match="^now"):
        U.check_finite(bad, "now")
