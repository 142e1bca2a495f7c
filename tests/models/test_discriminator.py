"""The PRISM discriminator (Qwen3-MoE backbone + scalar value head) on CPU/gloo: padding and packing
invariance, TP2+SP / PP2 equivalence, the per-row last-token readout, the head, gradients."""
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from disc_jobs import HEAD_SEED, parallel_suite, single_rank_suite  # noqa: E402

from prism_mcore.models.discriminator import (HF_VALUE_HEAD_NAME, VALUE_HEAD_KEY, Discriminator,  # noqa: E402
                                              positions_and_mask, segment_ids, sequence_scores)

ATOL = 1e-5


def assert_same(got: list, ref: list, what: str):
    assert len(got) == len(ref)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=0, atol=ATOL, msg=lambda m: f"{what}, sequence {i}: {m}")


@pytest.fixture(scope="module")
def single():
    from prism_mcore.platform.multiproc import run_on_ranks

    return run_on_ranks(single_rank_suite, 1, timeout=200)[0]


@pytest.fixture(scope="module")
def parallel(single):
    from prism_mcore.platform.multiproc import run_on_ranks

    return run_on_ranks(parallel_suite, 2, {moe: single[moe]["weights"] for moe in (False, True)}, timeout=240)


# ---- (a) one rank: left-padded, right-padded and packed give the same scores ----------------------

@pytest.mark.timeout(240)
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_padding_and_packing_invariance(single, moe):
    scores = single[moe]["scores"]
    assert [len(s) for s in scores["left"]] == [3, 5, 7]
    for layout in ("right", "packed"):
        assert_same(scores[layout], scores["left"], f"{layout} vs left")


@pytest.mark.timeout(240)
def test_megatron_conventions(single):
    c = single["conventions"]
    assert c["mask_types"] == {"arbitrary"}  # the provided mask is authoritative on every backend
    assert c["rope_matches_megatron"]  # same rotary tensor as Megatron's at positions 0..s-1 (+offset)
    assert c["pads_finite"]  # fully masked pad queries attend to themselves: no NaN


# ---- (b) TP2 + sequence parallel (MoE) and PP2 (dense) equal the single-rank scores ---------------

@pytest.mark.timeout(420)
def test_tp2_sequence_parallel_moe(single, parallel):
    for rank, res in enumerate(parallel):
        for layout, seqs in res["tp2_sp_moe"]["scores"].items():
            assert_same(seqs, single[True]["scores"]["left"], f"TP2+SP rank {rank}, {layout}")
    # the replicated head draws identical dropout masks on both TP ranks
    train = [res["tp2_sp_moe"]["train"] for res in parallel]
    assert torch.equal(train[0], train[1])


@pytest.mark.timeout(420)
def test_pp2_dense(single, parallel):
    last = [res["pp2_dense"] for res in parallel if res["pp2_dense"]["last_stage"]]
    assert len(last) == 1
    for layout, seqs in last[0]["scores"].items():
        assert_same(seqs, single[False]["scores"]["left"], f"PP2 last stage, {layout}")


# ---- (c) the readout: each row's own last valid token -------------------------------------------

def test_readout_per_row_mixed_padding():
    mask = torch.tensor([[1, 1, 1, 1, 1, 1],   # unpadded row first: the original's failure case
                         [0, 0, 0, 1, 1, 1],   # left-padded
                         [1, 1, 1, 1, 0, 0],   # right-padded
                         [0, 1, 1, 1, 1, 0]])  # both sides
    scores = torch.randn(4, 6)
    expected = torch.stack([scores[0, 5], scores[1, 5], scores[2, 3], scores[3, 4]])
    assert torch.equal(sequence_scores(scores, mask), expected)
    # the original guessed the padding side from mask[0, 0] and read index sum-1 in every row
    original = scores[torch.arange(4), mask.sum(1) - 1]
    assert not torch.equal(original, expected)


def test_readout_packed_and_unmasked():
    scores = torch.randn(2, 8)
    lengths = [[2, 3, 1], [8]]
    expected = torch.stack([scores[0, 1], scores[0, 4], scores[0, 5], scores[1, 7]])
    assert torch.equal(sequence_scores(scores, packed_seq_lengths=lengths), expected)
    cu = torch.tensor([0, 2, 5, 6])  # cu_seqlens of a single packed row
    assert torch.equal(sequence_scores(scores[:1], packed_seq_lengths=cu), expected[:3])
    assert torch.equal(sequence_scores(scores), scores[:, -1])


def test_positions_and_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    pos, masked = positions_and_mask(segment_ids((2, 5), mask))
    assert pos[0, 2:].tolist() == pos[1, :3].tolist() == [0, 1, 2]
    allowed = ~masked[:, 0]
    assert allowed[0, 4].tolist() == [False, False, True, True, True]  # pad keys masked, causal
    assert allowed[0, 0].tolist() == [True, False, False, False, False]  # a pad query sees only itself
    pos, masked = positions_and_mask(segment_ids((1, 6), packed_seq_lengths=[[2, 3]]))
    assert pos[0, :5].tolist() == [0, 1, 0, 1, 2]
    assert (~masked[0, 0, 4]).tolist() == [False, False, True, True, True, False]  # block-diagonal causal


# ---- (d) the head --------------------------------------------------------------------------------

@pytest.mark.timeout(240)
def test_head_init_names_and_dropout(single):
    head = single["head"]
    g = torch.Generator().manual_seed(HEAD_SEED)
    assert torch.equal(head["weight"], torch.randn(1, 64, generator=g) * 0.02)
    assert head["bias"] is None
    assert head["names"] == [VALUE_HEAD_KEY] and head["sharded_keys"] == [VALUE_HEAD_KEY]  # no LM head left
    assert HF_VALUE_HEAD_NAME == "score.weight"
    assert torch.equal(head["eval"][0], head["eval"][1])
    assert not torch.allclose(head["train"][0], head["train"][1])
    assert single["bf16"] == {"scores_dtype": torch.float32, "head_dtype": torch.float32, "finite": True}


def test_head_init_std():
    stub = types.SimpleNamespace(value_head=torch.nn.Linear(16384, 1, bias=False))
    Discriminator.reset_head(stub, seed=0)
    w = stub.value_head.weight.detach()
    assert abs(float(w.std()) - 0.02) < 5e-4 and abs(float(w.mean())) < 5e-4


# ---- (e) gradients of a Bradley-Terry loss reach backbone and head ---------------------------------

@pytest.mark.timeout(240)
def test_bt_gradients_reach_every_part(single):
    grads = single["grads"]
    for layer in (0, 1):
        parts = {
            "router": f"layers.{layer}.mlp.router.weight",
            "experts": f"layers.{layer}.mlp.experts.",
            "attention qkv": f"layers.{layer}.self_attention.linear_qkv.weight",
            "attention out": f"layers.{layer}.self_attention.linear_proj.weight",
        }
        for part, pattern in parts.items():
            assert sum(v for k, v in grads.items() if pattern in k) > 0, f"layer {layer}: no gradient on the {part}"
    assert grads[VALUE_HEAD_KEY] > 0
    assert grads["backbone.embedding.word_embeddings.weight"] > 0
