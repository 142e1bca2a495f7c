import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prism_mcore.algorithms.advantages import (broadcast_to_tokens, consecutive_groups, fill_invalid_with_group_floor,
                                               group_normalize, grpo_advantages, prism_advantages)

T = torch.tensor


def test_grpo_hand_computed():
    # group 0: [1, 0, 0, 1] mean .5, unbiased std sqrt(1/3); group 1: [0.2, 1.0] mean .6, std sqrt(.32)
    r = T([1.0, 0.0, 0.0, 1.0, 0.2, 1.0], dtype=torch.float64)
    g = T([0, 0, 0, 0, 1, 1])
    s0, s1 = math.sqrt(1 / 3), math.sqrt(0.32)
    expected = [0.5 / (s0 + 1e-6), -0.5 / (s0 + 1e-6), -0.5 / (s0 + 1e-6), 0.5 / (s0 + 1e-6),
                -0.4 / (s1 + 1e-6), 0.4 / (s1 + 1e-6)]
    assert grpo_advantages(r, g).tolist() == pytest.approx(expected, rel=1e-9)
    assert grpo_advantages(r, g, norm_by_std=False).tolist() == pytest.approx([.5, -.5, -.5, .5, -.4, .4])


def test_grpo_constant_and_singleton_groups_are_zero():
    r = T([0.2, 0.2, 0.2, 5.0, 1.0, 0.0])
    g = T([7, 7, 7, 3, 9, 9])  # arbitrary, non-sorted labels; label 3 is a singleton
    a = grpo_advantages(r, g)
    assert a[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert a[4] > 0 > a[5]
    assert grpo_advantages(T([1, 0, 1, 1]), consecutive_groups(4, 2)).dtype == torch.float32


def test_consecutive_groups():
    assert consecutive_groups(6, 3).tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError):
        consecutive_groups(5, 2)


# Multiples of 1/4 keep sums exact, so "equal after a shift" means equal, not equal up to rounding
# (0 and 4e-17 are distinct rewards but 1 + 4e-17 == 1).
quarters = st.integers(-400, 400).map(lambda k: k / 4)
groups = st.lists(st.lists(quarters, min_size=2, max_size=6), min_size=1, max_size=5)


def _flatten(gs):
    values = torch.tensor([v for grp in gs for v in grp], dtype=torch.float64)
    index = torch.tensor([i for i, grp in enumerate(gs) for _ in grp])
    return values, index


@settings(max_examples=60, deadline=None)
@given(groups)
def test_grpo_zero_mean_per_group(gs):
    r, g = _flatten(gs)
    a = grpo_advantages(r, g)
    sums = torch.zeros(len(gs), dtype=a.dtype).index_add_(0, g, a)
    assert torch.allclose(sums, torch.zeros_like(sums), atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(groups, quarters, st.floats(0.1, 20))
def test_grpo_shift_and_scale_invariance(gs, shift, scale):
    r, g = _flatten(gs)
    base = grpo_advantages(r, g, eps=0.0)
    assert torch.allclose(grpo_advantages(r + shift, g, eps=0.0), base, atol=1e-5)
    assert torch.allclose(grpo_advantages(r * scale, g, eps=0.0), base, atol=1e-5)
    # with the default eps the change is at most O(eps / std)
    std_ok = group_normalize(r, g, norm_by_std=False).abs().amax() > 1e-2
    if std_ok:
        assert torch.allclose(grpo_advantages(r * scale + shift, g), grpo_advantages(r, g), atol=1e-2)


def test_fill_invalid_with_group_floor():
    s = T([3.0, 1.0, 0.0, 0.0, 0.0, 2.0])
    valid = T([True, True, False, False, False, True])
    g = T([0, 0, 0, 1, 1, 2])
    assert fill_invalid_with_group_floor(s, valid, g).tolist() == [3.0, 1.0, 0.0, -1.0, -1.0, 2.0]


def test_prism_hand_computed():
    # One group of 4: valid scores p=[2, 0, 4], r=[1, 1, 4]; sample 3 invalid -> p=-1, r=0
    p = T([2.0, 0.0, 4.0, 7.0], dtype=torch.float64)
    r = T([1.0, 1.0, 4.0, 7.0], dtype=torch.float64)
    valid = T([True, True, True, False])
    g = T([0, 0, 0, 0])
    pf, rf = T([2.0, 0.0, 4.0, -1.0], dtype=torch.float64), T([1.0, 1.0, 4.0, 0.0], dtype=torch.float64)
    ap = (pf - pf.mean()) / (pf.std() + 1e-6)
    ar = (rf - rf.mean()) / (rf.std() + 1e-6)
    expected = 0.5 * ap + 0.5 * ar - 1.5 * T([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    adv, metrics = prism_advantages(p, r, valid, g)
    assert torch.allclose(adv, expected)
    assert metrics["format_valid_frac"] == pytest.approx(0.75)
    gated, _ = prism_advantages(p, r, valid, g, alpha=0.3, format_penalty=2.0, gate_by_format=True)
    assert torch.allclose(gated, torch.where(valid, 0.3 * ap + 0.7 * ar, T(-2.0, dtype=torch.float64)))


def test_prism_all_invalid_group_gets_only_the_penalty():
    adv, _ = prism_advantages(T([0.0, 0.0]), T([0.0, 0.0]), T([False, False]), T([0, 0]))
    assert adv.tolist() == [-1.5, -1.5]


stream_groups = st.lists(st.lists(st.tuples(quarters, quarters, st.booleans()), min_size=2, max_size=5),
                         min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(stream_groups, st.data())
def test_prism_invariant_to_per_group_shift_of_either_stream(gs, data):
    p = torch.tensor([x[0] for grp in gs for x in grp], dtype=torch.float64)
    r = torch.tensor([x[1] for grp in gs for x in grp], dtype=torch.float64)
    valid = torch.tensor([x[2] for grp in gs for x in grp])
    g = torch.tensor([i for i, grp in enumerate(gs) for _ in grp])
    shifts = torch.tensor(data.draw(st.lists(quarters, min_size=len(gs), max_size=len(gs))),
                          dtype=torch.float64)[g]
    base, _ = prism_advantages(p, r, valid, g, eps=0.0)
    shifted_p, _ = prism_advantages(p + shifts, r, valid, g, eps=0.0)
    shifted_r, _ = prism_advantages(p, r + shifts, valid, g, eps=0.0)
    assert torch.allclose(shifted_p, base, atol=1e-5)
    assert torch.allclose(shifted_r, base, atol=1e-5)


def test_broadcast_to_tokens():
    mask = T([[1, 1, 0], [1, 0, 0]])
    assert broadcast_to_tokens(T([2.0, -1.0]), mask).tolist() == [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]
