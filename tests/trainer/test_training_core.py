"""The training core (data/batch.py, parallel/microbatch.py, algorithms/aggregation.py, trainer/step.py,
trainer/policy_update.py): one batch type, one planner, one normaliser, used by every stage.

The multi-rank tests compare against a single-rank, full-batch run of the same update: a data-parallel
split with uneven micro-batches must give the same gradient (fp32, normwise 1e-6) for every aggregation
mode; PPO mini-batches must make later updates off-policy (ratios != 1, clip fractions > 0); an MoE
update at EP2 with uneven rows per rank must finish (ranks used to plan different micro-batch counts and
wait on each other's expert all-to-alls)."""
import math

import pytest
import torch

from prism_mcore.algorithms.aggregation import AGG_MODES, LossNormalizer, aggregate
from prism_mcore.algorithms.kl import kl_estimate
from prism_mcore.data.batch import Batch, next_token_batch
from prism_mcore.parallel.microbatch import first_fit_decreasing, units_of


# ---- pure parts --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", AGG_MODES)
def test_normaliser_shares_add_up_to_the_full_batch_mean(mode):
    torch.manual_seed(0)
    values = torch.randn(7, 9, dtype=torch.float64)
    mask = torch.rand(7, 9) > 0.4
    mask[3] = False  # an all-padding row does not dilute a sequence mean
    full = aggregate(values, mask, mode, norm_length=9)
    whole = LossNormalizer.local(mask, mode, norm_length=9)
    parts = [slice(0, 1), slice(1, 4), slice(4, 7)]  # uneven micro-batches
    shares = sum(whole.share(values[p], mask[p]) for p in parts)
    assert float(shares) == pytest.approx(float(full), rel=1e-12)
    # what backward sees undoes the schedule's 1/num_micro and DDP's 1/dp
    scaled = LossNormalizer(mode, whole.num_tokens, whole.num_seqs, scale=6.0, norm_length=9)
    assert float(sum(scaled.loss(values[p], mask[p]) for p in parts)) == pytest.approx(6 * float(full), rel=1e-12)


def test_aggregation_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert aggregate(loss, mask, "token-mean").item() == pytest.approx(7 / 3)
    assert aggregate(loss, mask, "seq-mean-token-sum").item() == pytest.approx(3.5)
    assert aggregate(loss, mask, "seq-mean-token-mean").item() == pytest.approx(2.75)
    assert aggregate(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx(7 / 6)
    assert aggregate(loss, mask, "seq-mean-token-sum-norm", norm_length=10).item() == pytest.approx(7 / 20)
    with pytest.raises(ValueError):
        aggregate(loss, mask, "sum")


def test_k3_uses_the_reference_clamps():
    # log-ratio clamped to +-20 before exp, the value to [-10, 10] (verl's low_var_kl)
    d = torch.tensor([-30.0, -20.0, -2.0, 0.5, 2.0, 30.0], dtype=torch.float64)
    got = kl_estimate(torch.zeros_like(d), d, "k3")
    clamped = d.clamp(-20, 20)
    assert torch.equal(got, (clamped.exp() - clamped - 1).clamp(-10, 10))
    assert got[0] == got[1] == 10.0
    assert got[2] == pytest.approx(math.exp(-2) + 1)
    assert float(kl_estimate(torch.zeros(1), torch.tensor([-12.0]), "k3")) == pytest.approx(10.0)
    assert float(kl_estimate(torch.zeros(1), torch.tensor([-9.0]), "k3")) == pytest.approx(math.exp(-9) + 8)


def test_first_fit_decreasing_by_padded_size():
    costs = [(1, 10), (1, 40), (2, 30), (1, 5), (1, 40)]  # (rows, longest)
    bins = first_fit_decreasing(costs, token_budget=100)
    assert bins == [[1, 4], [2, 0], [3]]  # longest first; rows x longest <= 100 per bin
    for b in bins:
        assert sum(costs[i][0] for i in b) * max(costs[i][1] for i in b) <= 100
    assert first_fit_decreasing([(1, 500)], token_budget=100) == [[0]]  # over budget: alone


def test_batch_rows_keep_their_images_and_units():
    b = next_token_batch([[1, 2, 3, 4], [5, 6], [7, 8, 9]], [[0, 1, 1], [1], [0, 1]], pad_id=0)
    b.pixel_values = torch.arange(10.0).unsqueeze(1)
    b.image_grid_thw = torch.tensor([[1, 1, 2], [1, 2, 2], [1, 1, 4]])  # 2, 4, 4 patches
    b.images_per_row = torch.tensor([1, 0, 2])
    b.position_ids = torch.arange(3)[None, :, None].expand(3, 3, b.length).clone()  # [3, B, S]
    b.unit = torch.tensor([0, 0, 1])
    sub = b.rows([2, 0])
    assert sub.pixel_values.flatten().tolist() == [2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert sub.image_grid_thw.tolist() == [[1, 2, 2], [1, 1, 4], [1, 1, 2]]
    assert sub.images_per_row.tolist() == [2, 1] and sub.position_ids[0, :, 0].tolist() == [2, 0]
    assert units_of(b) == [[0, 1], [2]]
    padded = sub.pad_to(3, 6)
    assert padded.tokens.shape == (3, 6) and padded.attention_mask[2].sum() == 0 and padded.loss_mask[2].sum() == 0
    assert padded.position_ids.shape == (3, 3, 6)
    assert b.to("cpu").tokens.data_ptr() == b.tokens.data_ptr()
    ph = Batch.placeholder(b)
    assert ph.tokens.shape == (1, 1) and ph.loss_mask.sum() == 0 and ph.images_per_row.tolist() == [0]


# ---- through Megatron on gloo ------------------------------------------------------------------

@pytest.mark.timeout(900)
@pytest.mark.parametrize("mode", AGG_MODES)
def test_dp2_uneven_micro_batches_give_the_full_batch_gradient(ranks, mode):
    from core_jobs import policy_gradients

    full = ranks(policy_gradients, 1, 1, mode, 100000)[0]  # one rank, one micro-batch
    split = ranks(policy_gradients, 2, 2, mode, 120)[0]    # 2 DP ranks, several uneven micro-batches each
    num = sum(float((full["grads"][k] - split["grads"][k]).square().sum()) for k in full["grads"])
    den = sum(float(g.square().sum()) for g in full["grads"].values())
    assert den > 0
    assert math.sqrt(num / den) < 1e-6, (mode, math.sqrt(num / den))
    assert split["pg_loss"] == pytest.approx(full["pg_loss"], rel=1e-5, abs=1e-7)


@pytest.mark.timeout(900)
def test_ppo_mini_batches_go_off_policy_and_clip_higher_changes_the_update(ranks):
    from core_jobs import ppo_updates

    grpo = ranks(ppo_updates, 1, 1, {"name": "grpo", "ppo_mini_batch_size": 1})[0]
    first, *later = grpo["updates"]
    assert len(grpo["updates"]) == 4
    assert first["ratio_min"] == pytest.approx(1.0, abs=1e-5) and first["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert first["clip_frac"] == 0.0
    for u in later:
        assert max(abs(u["ratio_min"] - 1), abs(u["ratio_max"] - 1)) > 1e-3, u
        assert u["clip_frac"] > 0, u
    # the same schedule with DAPO's clip-higher (0.28) instead of symmetric 0.2 clipping trains differently
    higher = ranks(ppo_updates, 1, 1, {"name": "grpo", "ppo_mini_batch_size": 1, "clip_ratio_high": 0.28})[0]
    assert higher["updates"][0] == pytest.approx(first, rel=1e-6, abs=1e-9)
    assert higher["checksum"] != pytest.approx(grpo["checksum"], rel=1e-9)
    assert any(h["clip_frac_high"] != g["clip_frac_high"] for h, g in zip(higher["updates"], grpo["updates"]))


@pytest.mark.timeout(600)
def test_moe_updates_at_ep2_with_uneven_rows_finish(ranks):
    """One row (policy) or one piece (discriminator) per micro-batch: the two DP ranks get 5 and 4 rows,
    2 and 1 pieces. They must agree on the count (placeholders), and the placeholders must add nothing:
    the same update with one micro-batch per rank gives the same loss and gradient norm."""
    from align_jobs import groups
    from core_jobs import disc_steps, moe_policy_update

    tight = ranks(moe_policy_update, 2, 2, 2, 60, timeout=300)
    assert tight[0] == tight[1] and tight[0]["updates"] == 1
    roomy = ranks(moe_policy_update, 2, 2, 2, 100000, timeout=300)[0]
    assert tight[0]["grad_norm"] == pytest.approx(roomy["grad_norm"], rel=1e-5)
    assert tight[0]["grad_norm"] > 0
    inputs, valid = groups(num_groups=3, n=3)
    tight = ranks(disc_steps, 2, 2, 2, 80, 1, (inputs, valid), timeout=300)
    assert tight[0] == tight[1]
    roomy = ranks(disc_steps, 2, 2, 2, 100000, 1, (inputs, valid), timeout=300)[0]
    # (sum of scores, d_loss, grad norm, pair accuracy) of the one step
    assert tight[0][0] == pytest.approx(roomy[0], rel=1e-5)


@pytest.mark.timeout(600)
def test_forward_pass_gathers_every_row_whatever_the_split(ranks):
    """The no-grad pass (old log-probs, scores) over uneven, trimmed micro-batches on 2 DP ranks returns the
    one-rank, one-micro-batch values for every row, zeros past each row's end."""
    from core_jobs import recomputed_logprobs

    whole = ranks(recomputed_logprobs, 1, 1, 100000)[0]
    split = ranks(recomputed_logprobs, 2, 2, 120)
    assert torch.equal(split[0], split[1])
    assert split[0].shape == whole.shape and (whole != 0).sum() > 50
    torch.testing.assert_close(split[0], whole, rtol=1e-5, atol=1e-5)
