import pytest
import torch

from prism_mcore.algorithms.dapo import DynamicSampler, groups_with_signal, overlong_penalty, select_groups


def test_overlong_penalty_hand_computed():
    lengths = torch.tensor([100, 4096, 5120, 6144, 8192])
    assert overlong_penalty(lengths, 8192, 4096).tolist() == pytest.approx([0.0, 0.0, -0.25, -0.5, -1.0])
    assert overlong_penalty(lengths, 8192, 4096, penalty_factor=2.0)[-1].item() == pytest.approx(-2.0)
    with pytest.raises(ValueError):
        overlong_penalty(lengths, 8192, 0)


def test_groups_with_signal():
    acc = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0])
    g = torch.tensor([0, 0, 1, 1, 2, 2, 3])  # group 3 is a singleton
    assert groups_with_signal(acc, g).tolist() == [True, True, False, False, False, False, False]
    assert groups_with_signal(torch.tensor([True, False]), torch.tensor([5, 5])).tolist() == [True, True]


def test_select_groups_keeps_whole_groups_in_order_and_truncates():
    acc = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    g = torch.tensor([4, 4, 9, 9, 1, 1, 7, 7, 2, 2])
    assert select_groups(acc, g).tolist() == [0, 1, 4, 5, 6, 7, 8, 9]
    assert select_groups(acc, g, max_groups=2).tolist() == [0, 1, 4, 5]
    assert select_groups(acc, g, max_groups=0).tolist() == []
    interleaved = torch.tensor([3, 5, 3, 5])
    assert select_groups(torch.tensor([0.0, 0.0, 1.0, 1.0]), interleaved, max_groups=1).tolist() == [0, 2]


def test_dynamic_sampler_refills_until_target_then_truncates():
    sampler = DynamicSampler(target_groups=3, max_gen_batches=10)
    g = torch.arange(8) // 2
    kept = []
    # batch 1: groups 0 and 2 have signal
    kept.append(sampler.offer(torch.tensor([0, 1, 1, 1, 0, 1, 0, 0.0]), g))
    assert kept[-1].tolist() == [0, 1, 4, 5] and not sampler.done
    # batch 2: three groups have signal; only one is still needed
    kept.append(sampler.offer(torch.tensor([1, 0, 0, 1, 1, 0, 1, 1.0]), g))
    assert kept[-1].tolist() == [0, 1]
    assert sampler.done and sampler.num_groups == 3 and sampler.num_gen_batches == 2 and not sampler.exhausted


def test_dynamic_sampler_exhaustion():
    sampler = DynamicSampler(target_groups=2, max_gen_batches=2)
    g = torch.arange(4) // 2
    for _ in range(2):
        sampler.offer(torch.zeros(4), g)
    assert sampler.exhausted and not sampler.done
    unlimited = DynamicSampler(target_groups=2, max_gen_batches=0)
    for _ in range(50):
        unlimited.offer(torch.zeros(4), g)
    assert not unlimited.exhausted
