"""Hugging Face Qwen3 / Qwen3-MoE <-> Megatron tensors, exactly.

Megatron side: the keys of `GPTModel.sharded_state_dict()` with their *global* shapes, where
per-layer tensors carry a leading layer axis and expert tensors a second, expert axis (see
prism_mcore/parallel/shards.py). HF side: the on-disk names transformers 5.x writes
(`model.layers.{i}.mlp.experts.{e}.gate_proj.weight`, ...).

Layout facts this file encodes:
  * Megatron's fused QKV interleaves per KV group: [q heads of group g; k_g; v_g] for g = 0..G-1.
  * Megatron's SwiGLU fc1 is [gate; up] along the output dimension (as are HF's gate/up pairs).
  * The vocabulary is padded to a multiple of 128*TP rows (zeros), and stripped on export.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from prism_mcore.config import ModelConfig


# ---- per-layer name tables -------------------------------------------------------------------

_ATTN = "decoder.layers.self_attention."
_MLP = "decoder.layers.mlp."
# Megatron key -> HF name (per layer, "{i}" = layer) for tensors that map one-to-one.
_LAYER_DIRECT = {
    _ATTN + "linear_qkv.layer_norm_weight": "model.layers.{i}.input_layernorm.weight",
    _ATTN + "linear_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    _ATTN + "q_layernorm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    _ATTN + "k_layernorm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    _MLP + "linear_fc1.layer_norm_weight": "model.layers.{i}.post_attention_layernorm.weight",
    _MLP + "linear_fc2.weight": "model.layers.{i}.mlp.down_proj.weight",
    _MLP + "router.weight": "model.layers.{i}.mlp.gate.weight",
}
_QKV = _ATTN + "linear_qkv.weight"
_FC1 = _MLP + "linear_fc1.weight"
_EXPERT_FC1 = _MLP + "experts.experts.linear_fc1.weight"
_EXPERT_FC2 = _MLP + "experts.experts.linear_fc2.weight"
_EXPERT = "model.layers.{i}.mlp.experts.{e}."
# (Megatron 0.16 gives the local and the Transformer Engine layer specs the same checkpoint keys.)


def hf_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of this architecture holds, with its shape."""
    h, hd, inter = m.hidden_size, m.head_dim, m.intermediate_size
    shapes = {"model.embed_tokens.weight": (m.vocab_size, h), "model.norm.weight": (h,)}
    if not m.tie_word_embeddings:
        shapes["lm_head.weight"] = (m.vocab_size, h)
    for i in range(m.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (m.num_attention_heads * hd, h),
            p + "self_attn.k_proj.weight": (m.num_key_value_heads * hd, h),
            p + "self_attn.v_proj.weight": (m.num_key_value_heads * hd, h),
            p + "self_attn.o_proj.weight": (h, m.num_attention_heads * hd),
            p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
        })
        if m.is_moe:
            moe_inter = m.moe_intermediate_size or inter
            shapes[p + "mlp.gate.weight"] = (m.num_experts, h)
            for e in range(m.num_experts):
                q = _EXPERT.format(i=i, e=e)
                shapes.update({q + "gate_proj.weight": (moe_inter, h), q + "up_proj.weight": (moe_inter, h),
                               q + "down_proj.weight": (h, moe_inter)})
        else:
            shapes.update({p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                           p + "mlp.down_proj.weight": (h, inter)})
    return shapes


# ---- HF -> Megatron ------------------------------------------------------------------------------

def _interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    groups, hd = m.num_key_value_heads, m.head_dim
    per_group = m.num_attention_heads // groups
    q = q.reshape(groups, per_group * hd, -1)
    k = k.reshape(groups, hd, -1)
    v = v.reshape(groups, hd, -1)
    return torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def megatron_reader(m: ModelConfig, hf_get: Callable[[str, tuple], torch.Tensor]
                    ) -> Callable[[str, tuple[slice, ...]], torch.Tensor]:
    """A `read(key, region)` for `shards.load_full` that builds only the requested region of a
    Megatron tensor from HF tensors. `hf_get(name, index)` returns `tensor[index]` of one HF tensor
    (lazily, e.g. a safetensors slice), so each rank reads only its layers and experts."""

    def per_layer(key: str, i: int, rest: tuple) -> torch.Tensor:
        if key in _LAYER_DIRECT:
            return hf_get(_LAYER_DIRECT[key].format(i=i), rest)
        p = f"model.layers.{i}."
        if key == _QKV:
            q, k, v = (hf_get(p + f"self_attn.{n}_proj.weight", ()) for n in "qkv")
            return _interleave_qkv(q, k, v, m)[rest]
        if key == _FC1:
            return torch.cat([hf_get(p + "mlp.gate_proj.weight", ()), hf_get(p + "mlp.up_proj.weight", ())])[rest]
        if key in (_EXPERT_FC1, _EXPERT_FC2):
            experts, inner = rest[0], rest[1:]
            out = []
            for e in range(*experts.indices(m.num_experts)):
                q = _EXPERT.format(i=i, e=e)
                if key == _EXPERT_FC1:
                    w = torch.cat([hf_get(q + "gate_proj.weight", ()), hf_get(q + "up_proj.weight", ())])
                else:
                    w = hf_get(q + "down_proj.weight", ())
                out.append(w[inner])
            return torch.stack(out)
        raise KeyError(f"no HF source for Megatron tensor {key}")

    def read(key: str, region: tuple[slice, ...]) -> torch.Tensor:
        if key == "embedding.word_embeddings.weight" or key == "output_layer.weight":
            name = "model.embed_tokens.weight" if key.startswith("embedding") or m.tie_word_embeddings \
                else "lm_head.weight"
            rows = region[0]
            real = slice(min(rows.start, m.vocab_size), min(rows.stop, m.vocab_size))
            part = hf_get(name, (real, region[1]))
            return _pad_rows(part, rows.stop - rows.start)
        if key == "decoder.final_layernorm.weight":
            return hf_get("model.norm.weight", region)
        layers = region[0]
        return torch.stack([per_layer(key, i, region[1:]) for i in range(layers.start, layers.stop)])

    return read


# ---- Megatron -> HF ------------------------------------------------------------------------------

def hf_views(m: ModelConfig, key: str, layer: int | None, value: torch.Tensor
             ) -> Iterator[tuple[str, torch.Tensor, tuple[int, ...]]]:
    """(HF name, source, HF shape) for one Megatron tensor (or one layer of it: `value` without the layer
    axis); `source.reshape(shape)` is the HF tensor. Sources are views of `value` (no copies): the QKV
    split is one strided view per projection ([groups, rows of that projection per group, hidden])."""
    if key == "embedding.word_embeddings.weight":
        yield "model.embed_tokens.weight", value[: m.vocab_size], (m.vocab_size, value.shape[1])
        return
    if key == "output_layer.weight":
        if not m.tie_word_embeddings:
            yield "lm_head.weight", value[: m.vocab_size], (m.vocab_size, value.shape[1])
        return
    if key == "decoder.final_layernorm.weight":
        yield "model.norm.weight", value, tuple(value.shape)
        return
    i = layer
    p = f"model.layers.{i}."
    if key in _LAYER_DIRECT:
        yield _LAYER_DIRECT[key].format(i=i), value, tuple(value.shape)
    elif key == _QKV:
        groups, hd = m.num_key_value_heads, m.head_dim
        per_group = m.num_attention_heads // groups
        x = value.reshape(groups, (per_group + 2) * hd, -1)
        for n, part in zip("qkv", torch.split(x, [per_group * hd, hd, hd], dim=1)):
            yield p + f"self_attn.{n}_proj.weight", part, (part.shape[0] * part.shape[1], part.shape[2])
    elif key == _FC1:
        gate, up = value.chunk(2)
        yield p + "mlp.gate_proj.weight", gate, tuple(gate.shape)
        yield p + "mlp.up_proj.weight", up, tuple(up.shape)
    elif key == _EXPERT_FC1:
        for e in range(value.shape[0]):
            gate, up = value[e].chunk(2)
            yield _EXPERT.format(i=i, e=e) + "gate_proj.weight", gate, tuple(gate.shape)
            yield _EXPERT.format(i=i, e=e) + "up_proj.weight", up, tuple(up.shape)
    elif key == _EXPERT_FC2:
        for e in range(value.shape[0]):
            yield _EXPERT.format(i=i, e=e) + "down_proj.weight", value[e], tuple(value[e].shape)
    else:
        raise KeyError(f"no HF name for Megatron tensor {key}")


def hf_tensors(m: ModelConfig, key: str, layer: int | None, value: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs for one Megatron tensor (or one layer of it: `value` without the layer axis)."""
    for name, source, shape in hf_views(m, key, layer, value):
        yield name, source.reshape(shape)


def is_layered(key: str) -> bool:
    return key.startswith("decoder.layers.")
