"""Rank functions for the HF <-> Megatron tests."""
from __future__ import annotations

import torch


def tiny_hf(out_dir, moe: bool = False, tied: bool = True, vocab: int = 300, kv_heads: int = 2, seed: int = 0):
    """A random tiny HF Qwen3 / Qwen3-MoE checkpoint (float32) written with transformers itself."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=128, tie_word_embeddings=tied,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-6)
    if moe:
        cfg = Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                             norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
        model = Qwen3MoeForCausalLM(cfg)
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**common))
    with torch.no_grad():  # norms start at 1.0; make them informative
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    return model


def tokens(vocab: int, batch: int = 2, seq: int = 12, seed: int = 1):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def megatron_logits(hf_dir: str, layout: dict, ids: torch.Tensor, extra: list[str] = ()):
    """Build the model at `layout` straight from the HF dir; full-vocab logits on every rank.
    `extra`: more config overrides (e.g. model.moe_expert_backend=grouped)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from prism_mcore.checkpoint.hf_io import LazyCheckpoint
    from prism_mcore.config import load_config
    from prism_mcore.models.qwen3.hf_adapter import megatron_reader
    from prism_mcore.models.qwen3.model import build_qwen3
    from prism_mcore.parallel.layout import init_model_parallel
    from prism_mcore.parallel.shards import load_full

    cfg = load_config(None, [f"model.hf_path={hf_dir}"] + [f"parallel.{k}={v}" for k, v in layout.items()]
                      + list(extra))
    init_model_parallel(cfg)
    model = build_qwen3(cfg.model, cfg.parallel)
    load_full(model, megatron_reader(cfg.model, LazyCheckpoint(hf_dir).get))
    model.eval()
    b, s = ids.shape
    positions = torch.arange(s).unsqueeze(0).expand(b, s)

    def step(data, m):
        out = m(ids, positions, None)
        return out, lambda o: (torch.zeros(()), {"logits": gather_from_tensor_model_parallel_region(o)})

    with torch.no_grad():
        out = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([None]), model=[model],
                                          num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    return out[0]["logits"][..., : cfg.model.vocab_size].clone()


def megatron_fused_logprobs(hf_dir: str, layout: dict, ids: torch.Tensor):
    """Next-token log-probs and entropies through the fused head (no logits) at `layout`."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from prism_mcore.checkpoint.hf_io import LazyCheckpoint
    from prism_mcore.config import load_config
    from prism_mcore.models.qwen3.hf_adapter import megatron_reader
    from prism_mcore.models.qwen3.logprob_head import hidden_to_logprobs, use_fused_logprob_head
    from prism_mcore.models.qwen3.model import build_qwen3
    from prism_mcore.parallel.layout import init_model_parallel
    from prism_mcore.parallel.shards import load_full

    cfg = load_config(None, [f"model.hf_path={hf_dir}"] + [f"parallel.{k}={v}" for k, v in layout.items()])
    init_model_parallel(cfg)
    model = build_qwen3(cfg.model, cfg.parallel)
    load_full(model, megatron_reader(cfg.model, LazyCheckpoint(hf_dir).get))
    use_fused_logprob_head(model)
    model.eval()
    b, s = ids.shape
    targets = torch.cat([ids[:, 1:], torch.full((b, 1), -1)], dim=1)

    def step(data, m):
        hidden = m(ids, torch.arange(s).unsqueeze(0).expand(b, s), None)

        def collect(h):
            logp, ent = hidden_to_logprobs(model, h, targets, cfg.model.vocab_size)
            return torch.zeros(()), {"logp": logp, "entropy": ent}

        return hidden, collect

    with torch.no_grad():
        out = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([None]), model=[model],
                                          num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    return out[0]["logp"][:, :-1].clone(), out[0]["entropy"][:, :-1].clone()
