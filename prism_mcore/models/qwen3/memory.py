"""Qwen3 / Qwen3-MoE parameter and activation counts for the memory estimate (pure arithmetic, no torch).

config/memory.py does the layout arithmetic (sharding, optimizer, pipeline, recomputation) for any family;
these are the Qwen3 decoder's own numbers, which Qwen3-VL's language model shares.
"""
from __future__ import annotations

from dataclasses import dataclass

VOCAB_DIVISIBLE_BY = 128  # Megatron pads the vocabulary to a multiple of this x tp (models/qwen3/model.py)


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = VOCAB_DIVISIBLE_BY) -> int:
    """Megatron's convention: the embedding rows are a multiple of divisible_by * tp.

    The extra rows are never real tokens; log-prob code masks them and HF export strips them."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of one Qwen3(-MoE) model (unsharded), by part."""

    embedding: int
    lm_head: int  # 0 when tied (or replaced by a value head)
    attention: int  # per layer: q/k/v/o projections + q/k norms
    mlp: int  # per layer: dense SwiGLU, or the router (MoE)
    experts: int  # per layer: all experts' SwiGLU weights (MoE), else 0
    norms: int  # per layer: input and post-attention RMSNorm
    final_norm: int
    value_head: int
    num_layers: int
    head_dim: int = 0  # the q/k norms' size (replicated over TP, unlike the projections)
    extra: int = 0  # parameters outside the language model (a vision tower), on the first stage

    @property
    def per_layer(self) -> int:
        return self.attention + self.mlp + self.experts + self.norms

    @property
    def total(self) -> int:
        return (self.embedding + self.lm_head + self.num_layers * self.per_layer + self.final_norm
                + self.value_head + self.extra)


def param_counts(m, *, vocab_size: int | None = None, lm_head: bool = True, value_head: bool = False) -> ParamCounts:
    """Exact counts for HF's Qwen3ForCausalLM / Qwen3MoeForCausalLM (every layer sparse, no shared
    expert, no biases). `vocab_size` overrides the rows (Megatron's padded vocabulary); `lm_head=False`
    drops the untied head (the discriminator replaces it with a [1, hidden] `value_head`)."""
    h, q, kv = m.hidden_size, m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
    v = vocab_size or m.vocab_size
    attention = h * q + 2 * h * kv + q * h + 2 * m.head_dim
    if m.is_moe:
        inter = m.moe_intermediate_size or m.intermediate_size
        mlp, experts = m.num_experts * h, m.num_experts * 3 * h * inter
    else:
        mlp, experts = 3 * h * m.intermediate_size, 0
    return ParamCounts(embedding=v * h, lm_head=v * h if lm_head and not m.tie_word_embeddings else 0,
                       attention=attention, mlp=mlp, experts=experts, norms=2 * h, final_norm=h,
                       value_head=h if value_head else 0, num_layers=m.num_hidden_layers, head_dim=m.head_dim)


def layer_activation_elements(m, tp: int, sp: bool, etp: int, tokens: float) -> float:
    """Elements autograd keeps for one transformer layer over `tokens` tokens of one rank's micro-batch
    (before the CP split; attention scores excluded, see config/memory.py `attention_score_elements`).

    Per token, h = hidden, q = heads * head_dim, kv = kv_heads * head_dim, I = intermediate:
      attention: RMSNorm input h, QKV input h, q/k-norm inputs q + kv, flash-attention q, k, v (q + 2 kv),
                 its output (the projection's input) q                       -> 2h + 3q + 3kv
      dense MLP: RMSNorm input h, fc1 input h, SwiGLU input 2I, fc2 input I  -> 2h + 3I
    Korthikanti et al.'s 34 s b h for GPT (q = kv = h, I = 4h, GeLU, 2 dropout masks) is the same count.
    Under TP the q/kv/I terms split over tp; the four h terms split only with sequence parallelism.
    MoE MLP (alltoall dispatcher, balanced routing): RMSNorm input h and the fp32 router input (2h in
    16-bit elements) per SP-local token; k copies of each token leave the dispatcher (h each), and each
    expert rank, gathering its TP group's tokens, keeps fc1 input h, SwiGLU input 2I/etp, fc2 input
    I/etp and the expert output h (for the probability-weighted unpermute) per copy.
    """
    h, q, kv = m.hidden_size, m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
    sp_tokens = tokens / tp if sp else tokens
    attention = sp_tokens * 2 * h + tokens * 3 * (q + kv) / tp
    if m.is_moe:
        inter, k = m.moe_intermediate_size or m.intermediate_size, m.num_experts_per_tok
        mlp = sp_tokens * (h + 2 * h + k * h) + tokens * k * (2 * h + 3 * inter / etp)
    else:
        mlp = sp_tokens * 2 * h + tokens * 3 * m.intermediate_size / tp
    return attention + mlp
