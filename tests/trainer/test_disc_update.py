"""The align stage's discriminator step under Megatron (MoE, expert parallel, several micro-batches per
rank, prompt groups split across micro-batches): the loss it reports equals the Stage-2 formula evaluated in float64 on the scores of the
eval-mode scoring pass, and repeated updates on the same rollouts widen the teacher-student gap."""
import pytest

from align_jobs import update_matches_formula_and_learns


@pytest.mark.parametrize("world_size,ep,micro_tokens", [(1, 1, 4096), (2, 2, 200), (1, 1, 90)],
                         ids=["single", "ep2_dp2_micro", "groups_split"])
def test_discriminator_update(ranks, world_size, ep, micro_tokens):
    history = ranks(update_matches_formula_and_learns, world_size, world_size, ep, micro_tokens,
                    timeout=300)[0]["history"]
    for row in history:
        assert row["d_loss"] == pytest.approx(row["reference"], rel=1e-4)
    assert history[-1]["d_loss"] < history[0]["d_loss"]
    assert history[-1]["gap"] > history[0]["gap"]
