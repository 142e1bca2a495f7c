"""Vocab-parallel fused log-prob: TP2 on gloo (LM head sharded by vocab rows, padded like Megatron) must match TP1.

Covers a shard holding some padding rows and a shard holding nothing but padding."""
import pytest
import torch

from prism_mcore.ops import backends, token_logprobs

BACKENDS = ["torch"] + (["cpp"] if backends.extension() is not None else [])
# (padded vocab across both ranks, true vocab): rank 1 owns 10 padding rows / only padding rows
CASES = [(160, 150), (160, 70)]


def _case(padded_vocab, vocab_size, seed=1234):
    g = torch.Generator().manual_seed(seed)
    T, d = 23, 16
    hidden = torch.randn(T, d, generator=g)
    weight = torch.randn(padded_vocab, d, generator=g) * 0.5
    targets = torch.randint(0, vocab_size, (T,), generator=g)
    targets[5] = -100
    return hidden, weight, targets, torch.randn(T, generator=g), torch.randn(T, generator=g)


def _logprob_and_grads(hidden, weight, targets, g_logp, g_ent, vocab_size, backend, tp_group=None):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, ent = token_logprobs(h, w, targets, 0.8, vocab_size=vocab_size, tp_group=tp_group, backend=backend,
                               chunk_tokens=8, chunk_vocab=24)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    return logp.detach(), ent.detach(), h.grad, w.grad


def tp_rank(backend_names):
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for padded, vocab_size in CASES:
        hidden, weight, targets, g_logp, g_ent = _case(padded, vocab_size)
        shard = weight.chunk(world)[rank].contiguous()
        for name in backend_names:
            out[(padded, vocab_size, name)] = _logprob_and_grads(hidden, shard, targets, g_logp, g_ent, vocab_size,
                                                                 name, tp_group=dist.group.WORLD)
    return out


def test_tp2_matches_tp1(ranks):
    per_rank = ranks(tp_rank, 2, BACKENDS, timeout=120)
    for padded, vocab_size in CASES:
        hidden, weight, targets, g_logp, g_ent = _case(padded, vocab_size)
        for name in BACKENDS:
            logp1, ent1, dh1, dw1 = _logprob_and_grads(hidden, weight, targets, g_logp, g_ent, vocab_size, name)
            results = [r[(padded, vocab_size, name)] for r in per_rank]
            for logp2, ent2, dh2, _ in results:  # every rank holds the full per-token result and d(hidden)
                torch.testing.assert_close(logp2, logp1, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(ent2, ent1, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(dh2, dh1, rtol=1e-5, atol=1e-5)
            dw2 = torch.cat([r[3] for r in results])
            torch.testing.assert_close(dw2, dw1, rtol=1e-5, atol=1e-5)
            assert (dw2[vocab_size:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_shard_stats_combine_without_collectives(backend):
    """The per-shard stats alone (no group) reproduce TP1 once merged: the arithmetic the all-reduces do."""
    from prism_mcore.ops.logprob import _IMPLS, combine_stats, merge_shard_stats

    hidden, weight, targets, _, _ = _case(160, 150)
    parts = []
    for start in (0, 80):
        stats = torch.empty(4, hidden.shape[0])
        valid = max(0, min(80, 150 - start))
        _IMPLS[backend].forward_stats(hidden, weight[start:start + 80].contiguous(), targets, 1.25, start, valid, 8,
                                      24, stats)
        parts.append(stats)
    logp, ent, _, _ = combine_stats(merge_shard_stats(torch.stack(parts, 1)), targets)
    want_logp, want_ent = token_logprobs(hidden, weight, targets, 0.8, vocab_size=150, backend="torch")
    torch.testing.assert_close(logp, want_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, want_ent, rtol=1e-5, atol=1e-5)
