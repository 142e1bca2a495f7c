"""Rank function: the tiny policy built with the TE spec (what `layer_spec` picks on a GPU with TE) and
with the local spec, the TE model's weights loaded into the local one through their (shared) checkpoint
keys, logits compared."""
from __future__ import annotations

import torch


def te_vs_local() -> dict:
    from unittest import mock

    from gpu_jobs import TINY
    from prism_mcore.config import ModelConfig, ParallelConfig, PrismConfig
    from prism_mcore.models.qwen3 import model as qwen3_model
    from prism_mcore.parallel.layout import init_model_parallel
    from prism_mcore.parallel.shards import iter_local_shards, load_full

    init_model_parallel(PrismConfig.model_validate({"model": TINY, "parallel": {"world_size": 1}}))
    te = qwen3_model.build_qwen3(ModelConfig(**TINY), ParallelConfig())
    uses_te = "TE" in type(te.decoder.layers[0].self_attention.linear_qkv).__name__
    full = {}
    for shard in iter_local_shards(te):  # one rank: every shard is its whole tensor
        full.setdefault(shard.key, torch.zeros(shard.global_shape, dtype=shard.data.dtype,
                                               device=shard.data.device))[shard.region()] = shard.data
    with mock.patch.object(qwen3_model, "have_transformer_engine", lambda: False):
        local = qwen3_model.build_qwen3(ModelConfig(**TINY), ParallelConfig())
    load_full(local, lambda key, region: full[key][region])
    tokens = torch.randint(0, 1000, (2, 32), device="cuda")
    positions = torch.arange(32, device="cuda").expand(2, 32)
    with torch.no_grad():
        a, b = te(tokens, positions, None).float(), local(tokens, positions, None).float()
    return {"uses_te": uses_te, "max_rel_err": float((a - b).abs().max() / b.abs().max())}
