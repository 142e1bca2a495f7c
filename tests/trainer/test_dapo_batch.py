"""DAPO dynamic sampling in the rl stage (`dapo_batch`): generation batches until enough prompt groups
whose accuracy varies are collected, whole groups kept in order, bounded by max_gen_batches."""
from dataclasses import dataclass

from prism_mcore.config import PrismConfig
from prism_mcore.trainer.rl import dapo_batch


@dataclass
class R:
    acc: float


def _cfg(**algorithm):
    return PrismConfig.model_validate({"algorithm": {"name": "dapo", **algorithm}, "rollout": {"n": 2},
                                       "data": {"global_batch_size": 3}})


def _batches(size):
    i = 0
    while True:
        yield list(range(i, i + size))
        i += size


def _rollouts_with_signal_every(k):
    """Prompt p's group has varying accuracy iff p % k == 0."""
    calls = []

    def rollouts_of(examples, seed):
        calls.append(seed)
        return [[R(1.0), R(0.0 if p % k == 0 else 1.0)] for p in examples]

    return rollouts_of, calls


def test_keeps_groups_with_signal_until_target():
    rollouts_of, calls = _rollouts_with_signal_every(4)
    examples, rollouts, stats = dapo_batch(_cfg(gen_batch_size=6), rollouts_of, _batches(3), step=7)
    assert examples == [0, 4, 8]  # the first three prompts with signal, in order
    assert all({r.acc for r in g} == {0.0, 1.0} for g in rollouts)
    assert stats == {"gen_batches": 2, "prompts_generated": 12, "prompts_kept": 3}
    assert calls == [7000, 7001]  # distinct sampling seeds per generation batch


def test_stops_after_max_gen_batches_and_trains_on_what_it_has():
    rollouts_of, _ = _rollouts_with_signal_every(100)
    examples, _, stats = dapo_batch(_cfg(gen_batch_size=3, max_gen_batches=2), rollouts_of, _batches(3), step=0)
    assert examples == [0] and stats["gen_batches"] == 2


def test_without_signal_falls_back_to_one_batch():
    def rollouts_of(examples, seed):
        return [[R(1.0), R(1.0)] for _ in examples]

    examples, _, stats = dapo_batch(_cfg(gen_batch_size=3, max_gen_batches=1), rollouts_of, _batches(3), step=0)
    assert examples == [0, 1, 2] and stats["prompts_kept"] == 3


def test_grpo_takes_one_batch():
    rollouts_of, calls = _rollouts_with_signal_every(4)
    cfg = PrismConfig.model_validate({"algorithm": {"name": "grpo"}, "rollout": {"n": 2},
                                      "data": {"global_batch_size": 3}})
    examples, _, stats = dapo_batch(cfg, rollouts_of, _batches(3), step=5)
    assert examples == [0, 1, 2] and stats == {} and calls == [5]
