"""Rank functions for the discriminator tests (module level, so spawned ranks can import them)."""
from __future__ import annotations

import torch

TINY = ["model.vocab_size=256", "model.hidden_size=64", "model.intermediate_size=96", "model.num_hidden_layers=2",
        "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.head_dim=16",
        "model.max_position_embeddings=64"]
MOE = ["model.num_experts=4", "model.num_experts_per_tok=2", "model.moe_intermediate_size=48"]
LENGTHS = [3, 5, 7]  # three sequences; packed they fill 15 of a 16-token row
PAD_TO, PACK_TO = 8, 16
HEAD_SEED = 7


def sequences(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 256, (n,), generator=g) for n in LENGTHS]


def batches(seed: int = 0) -> dict[str, dict]:
    """The same sequences left-padded, right-padded and packed into one row (pad id 0)."""
    seqs = sequences(seed)
    out = {}
    for side in ("left", "right"):
        ids = torch.zeros(len(seqs), PAD_TO, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            cols = slice(PAD_TO - len(s), PAD_TO) if side == "left" else slice(0, len(s))
            ids[i, cols], mask[i, cols] = s, 1
        out[side] = {"input_ids": ids, "attention_mask": mask}
    packed = torch.zeros(1, PACK_TO, dtype=torch.long)
    packed[0, :sum(LENGTHS)] = torch.cat(seqs)
    out["packed"] = {"input_ids": packed, "attention_mask": None, "packed_seq_lengths": [LENGTHS]}
    return out


def per_sequence(token_scores: torch.Tensor, batch: dict) -> list[torch.Tensor]:
    """Each sequence's own token scores, wherever the layout put them."""
    if batch.get("packed_seq_lengths"):
        return list(token_scores[0, :sum(LENGTHS)].split(LENGTHS))
    return [row[m.bool()] for row, m in zip(token_scores, batch["attention_mask"])]


def build(layout: dict, moe: bool, full_weights: dict | None = None, dtype: str = "float32", seed: int = 1234):
    from prism_mcore.config import load_config
    from prism_mcore.models.discriminator import build_discriminator
    from prism_mcore.parallel.layout import init_model_parallel
    from prism_mcore.parallel.shards import load_full

    overrides = TINY + (MOE if moe else []) + [f"model.dtype={dtype}"]
    overrides += [f"parallel.{k}={v}" for k, v in layout.items()]
    cfg = load_config(None, overrides)
    init_model_parallel(cfg, seed=seed)
    model = build_discriminator(cfg.model, cfg.parallel, seed=HEAD_SEED)
    if full_weights is not None:
        load_full(model, lambda key, region: full_weights[key][region])
    return model


@torch.no_grad()
def scores_by_layout(model) -> dict[str, list[torch.Tensor]]:
    return {name: per_sequence(model(**batch), batch) for name, batch in batches().items()}


def single_rank_suite() -> dict:
    """Everything the single-rank tests look at, from one process (spawning is the slow part)."""
    from prism_mcore.models.discriminator import sequence_scores
    from prism_mcore.parallel.shards import assemble, local_shards

    out = {}
    for moe in (False, True):
        model = build({}, moe).eval()
        out[moe] = {"weights": assemble([local_shards(model)]), "scores": scores_by_layout(model)}

    # conventions: every attention takes our mask as is; our RoPE at 0..s-1 (+ offset) is Megatron's
    from megatron.core.transformer.enums import AttnMaskType

    rotary = model.backbone.rotary_pos_emb
    rope_ok = []
    for offset in (0, 3):
        rotary.positions = torch.arange(offset, offset + PACK_TO)[None]
        rope_ok.append(torch.equal(rotary(PACK_TO), rotary.rope.get_emb(PACK_TO, offset)))
    rotary.positions = None
    with torch.no_grad():
        left = model(**batches()["left"])
    mask_types = {m.attn_mask_type.name for m in model.modules() if isinstance(getattr(m, "attn_mask_type", None),
                                                                           AttnMaskType)}
    out["conventions"] = {"mask_types": mask_types, "rope_matches_megatron": all(rope_ok),
                          "pads_finite": bool(torch.isfinite(left).all())}

    # the head: seeded init, no bias, dropout only in train mode (MoE model from the loop above)
    batch = batches()["left"]
    with torch.no_grad():
        eval_runs = [model(**batch) for _ in range(2)]
        model.train()
        train_runs = [model(**batch) for _ in range(2)]
    out["head"] = {"weight": model.value_head.weight.detach().clone(), "bias": model.value_head.bias,
                   "names": [n for n, _ in model.named_parameters() if "value_head" in n],
                   "sharded_keys": sorted(k for k in out[True]["weights"] if "value_head" in k or "output_layer" in k),
                   "eval": eval_runs, "train": train_runs}

    # gradients of a Bradley-Terry loss (sequences 0, 2 preferred over 1) reach every part
    model.zero_grad(set_to_none=True)
    s = sequence_scores(model(**batch), batch["attention_mask"])
    loss = -torch.nn.functional.logsigmoid(s[[0, 2]] - s[1]).mean()
    loss.backward()
    out["grads"] = {n: float(p.grad.abs().sum()) if p.grad is not None else 0.0 for n, p in model.named_parameters()}

    # bf16 backbone: the head still runs (and returns) in float32
    bf16 = build({}, False, dtype="bfloat16").eval()
    with torch.no_grad():
        scores = bf16(**batch)
    out["bf16"] = {"scores_dtype": scores.dtype, "head_dtype": bf16.value_head.weight.dtype,
                   "finite": bool(torch.isfinite(scores).all())}
    return out


def parallel_suite(weights: dict) -> dict:
    """World 2, one process pair for both layouts: TP2 + sequence parallel with the MoE backbone, then
    PP2 with the dense one, each loaded with the single-rank weights (`weights[moe]`)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = build({"tp": 2, "sequence_parallel": True}, True, weights[True]).eval()
    tp = {"scores": scores_by_layout(model)}
    model.train()  # dropout must draw the same mask on both TP ranks: the head is replicated
    with torch.no_grad():
        tp["train"] = model(**batches()["left"])

    model = build({"pp": 2}, False, weights[False]).eval()
    pp = {"last_stage": ps.is_pipeline_last_stage(), "scores": {}}
    for name, batch in batches().items():
        b, s = batch["input_ids"].shape
        with torch.no_grad():
            res = get_forward_backward_func()(
                forward_step_func=lambda it, m: (m(**next(it)), None), data_iterator=iter([batch]), model=[model],
                num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True)
        if pp["last_stage"]:  # loss_func None: the schedule hands back the raw last-stage output
            pp["scores"][name] = per_sequence(res[0], batch)
    return {"tp2_sp_moe": tp, "pp2_dense": pp}
