"""Digit attributes (:mod:`tagdiff.data.attributes`): the slant measure against sheared strokes whose slope is known
exactly, its invariances, per-class median bins, target parsing with attribute levels, and the labels of a slant
attribute classifier."""

from __future__ import annotations

import pytest
import torch

from tagdiff.cli.recipes import attribute_labels, condition_labels
from tagdiff.data import dataset_info, load_dataset
from tagdiff.data.attributes import (
    ATTRIBUTES,
    attribute_bins,
    attribute_quantiles,
    get_attribute,
    ink_mass,
    parse_targets,
    slant,
)


def _stroke(slope: float, size: int = 28, width: int = 1, value: float = 1.0) -> torch.Tensor:
    """A straight stroke u = c − slope · v (v = row, downwards) of the given width: its slant is exactly ``slope``
    when every row holds the same whole-pixel pattern."""
    img = torch.full((1, 1, size, size), -1.0, dtype=torch.float64)
    for r in range(size):
        u = round(size / 2 - slope * (r - size / 2))
        img[0, 0, r, u:u + width] = 2 * value - 1
    return img


@pytest.mark.parametrize("slope", [-0.5, 0.0, 0.25, 0.5])
def test_slant_of_a_sheared_stroke_is_its_slope(slope):
    # u = round(c − slope · v): the least-squares slope of u on v is −slope up to the rounding; whole-pixel steps
    # (slope 0.5 on even rows, 0.25) keep the rounding error small
    x = _stroke(slope)
    v = torch.arange(28, dtype=torch.float64)
    u = torch.tensor([round(14 - slope * (r - 14)) for r in range(28)], dtype=torch.float64)
    exact = -((u - u.mean()) * (v - v.mean())).sum() / ((v - v.mean()) ** 2).sum()
    assert slant(x).item() == pytest.approx(exact.item(), abs=1e-6)  # up to the blank-image guard eps
    assert slant(x).item() == pytest.approx(slope, abs=0.02)


def test_slant_invariances_and_sign():
    x = _stroke(0.5)
    s = slant(x)
    assert s.item() > 0.45  # the top of the stroke is to the right: leans right
    assert torch.allclose(slant(x.flip(-1)), -s)  # a mirror image leans the other way
    assert torch.allclose(slant(x.roll(3, -1)), s)  # horizontal translation (the stroke stays inside)
    assert torch.allclose(slant(_stroke(0.5, width=3)), s)  # stroke thickness
    assert torch.allclose(slant(_stroke(0.5, value=0.4)), s)  # ink intensity
    assert torch.isfinite(slant(-torch.ones(2, 1, 8, 8))).all()  # a blank image
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(slant(x).sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_quantiles_bins_and_targets_per_attribute():
    x, y = load_dataset("digits", "train")
    for name, attr in ATTRIBUTES.items():
        q = attribute_quantiles(name, x, y, 10)
        assert q.shape == (10, 3) and (q[:, 0] <= q[:, 1]).all() and (q[:, 1] <= q[:, 2]).all()
        bins = attribute_bins(name, x, y, 10)
        assert torch.equal(bins, (attr.measure(x.double()) > q[y, 1]).long())
        frac = torch.stack([bins[y == k].float().mean() for k in range(10)])
        assert ((frac > 0.4) & (frac <= 0.5)).all()  # a median split per class
    assert get_attribute("ink").measure is ink_mass
    c, b = parse_targets(("7:right", "1:left"), 10, get_attribute("slant").levels)
    assert c.tolist() == [7, 1] and b.tolist() == [1, 0]
    with pytest.raises(ValueError, match="'left' or 'right'"):
        parse_targets(("0:thick",), 10, get_attribute("slant").levels)
    with pytest.raises(ValueError, match="unknown attribute 'colour'"):
        get_attribute("colour")


def test_slant_classifier_and_joint_condition_labels():
    x, y = load_dataset("digits", "train")
    info = dataset_info("digits")
    joint, meta = condition_labels("class_slant", x, y, info)
    med = attribute_quantiles("slant", x, y, 10, (0.5,))[:, 0]
    assert torch.equal(joint, 2 * y + (slant(x.double()) > med[y]).long()) and meta["num_conditions"] == 20
    assert meta["slant_medians"] == pytest.approx(med.tolist())
    labels, clf_info, clf_meta = attribute_labels("slant", x, y, info)
    assert torch.equal(labels, joint % 2) and clf_info.num_classes == 2 and clf_meta["levels"] == ["left", "right"]
    # held-out labels use the training medians when given
    hx, hy = load_dataset("digits", "held_out")
    held, _, _ = attribute_labels("slant", hx, hy, info, med)
    assert torch.equal(held, (slant(hx.double()) > med[hy]).long())
    with pytest.raises(ValueError, match="unknown attribute"):
        attribute_labels("colour", x, y, info)
