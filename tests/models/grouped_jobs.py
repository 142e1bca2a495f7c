"""Rank functions for the grouped-GEMM expert tests: the same tiny Qwen3-MoE built with
`model.moe_expert_backend=sequential` and `=grouped` on the same ranks, same weights."""
from __future__ import annotations

import torch

from mcore_jobs import tiny_config


def _run(model, tokens, labels):
    """Logits (this rank's vocab shard, no grad) and the gradients of mean token loss (+ router aux loss)."""
    b, s = tokens.shape
    positions = torch.arange(s).unsqueeze(0).expand(b, s)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = model(tokens, positions, None).detach().clone()
    model(tokens, positions, None, labels=labels).float().mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits, grads


def _shard_table(model):
    from prism_mcore.parallel.shards import local_shards

    return {s.key + str(s.global_offset): (s.global_shape, s.data) for s in local_shards(model)}


def _discriminators(seq_cfg, grp_cfg, seed: int):
    """The discriminator (value head on the MoE backbone) with each backend: token scores of a left-padded
    batch and the gradients of their masked sum."""
    from prism_mcore.models.discriminator import build_discriminator

    seq = build_discriminator(seq_cfg.model, seq_cfg.parallel, seed=7).eval()
    grp = build_discriminator(grp_cfg.model, grp_cfg.parallel, seed=7).eval()
    grp.load_state_dict(seq.state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(1, seq_cfg.model.vocab_size, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :2] = 0
    out = {}
    for name, model in (("seq", seq), ("grp", grp)):
        scores = model(ids, mask)
        (scores * mask).sum().backward()
        out[name] = {"scores": scores.detach().clone(),
                     "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}}
    return out


def grouped_vs_sequential(layout: dict, ckpt_dir: str | None = None, seed: int = 0,
                          with_discriminator: bool = False):
    """Build both backends at `layout`; the grouped model gets the sequential model's weights, either by
    `load_state_dict` or (ckpt_dir) through a Megatron dist checkpoint saved by the sequential model.
    Returns what the test compares; asserts the sharded layouts (checkpoint / HF / weight-sync keys) agree."""
    from megatron.core import dist_checkpointing
    import torch.distributed as dist

    from prism_mcore.models.qwen3.grouped_experts import GroupedGemmExperts
    from prism_mcore.models.qwen3.model import build_qwen3
    from prism_mcore.parallel.layout import init_model_parallel

    seq_cfg = tiny_config(layout, moe=True)
    grp_cfg = tiny_config(layout, moe=True, extra=["model.moe_expert_backend=grouped"])
    init_model_parallel(seq_cfg, seed=1234)
    seq = build_qwen3(seq_cfg.model, seq_cfg.parallel)
    grp = build_qwen3(grp_cfg.model, grp_cfg.parallel)
    experts = grp.decoder.layers[0].mlp.experts
    assert type(experts) is GroupedGemmExperts and type(seq.decoder.layers[0].mlp.experts) is not GroupedGemmExperts
    assert [n for n, _ in seq.named_parameters()] == [n for n, _ in grp.named_parameters()]

    if ckpt_dir is None:
        grp.load_state_dict(seq.state_dict())
    else:
        dist_checkpointing.save(seq.sharded_state_dict(), ckpt_dir)
        dist.barrier()
        # Both load it back: data-parallel replicas were initialized independently, the checkpoint holds one.
        for model in (seq, grp):
            model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir))
    seq_table, grp_table = _shard_table(seq), _shard_table(grp)
    assert seq_table.keys() == grp_table.keys()
    for k, (shape, data) in seq_table.items():
        assert grp_table[k][0] == shape and torch.equal(grp_table[k][1], data), k

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, seq_cfg.model.vocab_size, (2, 17), generator=g)
    tokens, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    seq_logits, seq_grads = _run(seq, tokens, labels)
    grp_logits, grp_grads = _run(grp, tokens, labels)
    expert_grads = [n for n in grp_grads if ".local_experts." in n]
    disc = _discriminators(seq_cfg, grp_cfg, seed) if with_discriminator else None
    return {"discriminator": disc, "seq_logits": seq_logits, "grp_logits": grp_logits, "seq_grads": seq_grads, "grp_grads": grp_grads,
            "local_experts": experts.num_local_experts, "expert_grads": expert_grads,
            "fc1_shape": tuple(experts.local_experts[0].linear_fc1.weight.shape)}
