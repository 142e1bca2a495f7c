"""Qwen3 / Qwen3-MoE config.json <-> our ModelConfig fields (pure JSON, no torch)."""
from __future__ import annotations

# HF config.json key -> ModelConfig field (transformers 5 names; older aliases handled below)
_HF_FIELDS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_hidden_layers", "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads", "head_dim": "head_dim", "rms_norm_eps": "rms_norm_eps",
    "tie_word_embeddings": "tie_word_embeddings", "max_position_embeddings": "max_position_embeddings",
    "num_experts_per_tok": "num_experts_per_tok", "moe_intermediate_size": "moe_intermediate_size",
    "norm_topk_prob": "norm_topk_prob", "router_aux_loss_coef": "router_aux_loss_coef",
}
MODEL_TYPES = ("qwen3", "qwen3_moe")


def model_fields(hf: dict) -> dict:
    """ModelConfig fields described by an HF Qwen3 / Qwen3-MoE config.json."""
    if hf.get("model_type") not in MODEL_TYPES:
        raise ValueError(f"model_type {hf.get('model_type')!r} is not supported (expected qwen3 or qwen3_moe)")
    fields = {ours: hf[theirs] for theirs, ours in _HF_FIELDS.items() if hf.get(theirs) is not None}
    if "head_dim" not in fields:
        try:
            fields["head_dim"] = int(hf["hidden_size"]) // int(hf["num_attention_heads"])
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            raise ValueError("needs head_dim, or hidden_size and num_attention_heads (positive integers)") from None
    rope = hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta"))
    if theta is not None:
        fields["rope_theta"] = theta
    if hf["model_type"] == "qwen3_moe":
        fields["num_experts"] = hf.get("num_local_experts", hf.get("num_experts"))
        if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
            raise ValueError("Qwen3-MoE with dense layers (mlp_only_layers / decoder_sparse_step != 1) "
                             "is not supported")
    dtype = hf.get("dtype", hf.get("torch_dtype"))
    if dtype in ("float32", "bfloat16", "float16"):
        fields["dtype"] = dtype
    return fields


def hf_config_dict(m, eos_token_id: int, pad_token_id: int, transformers_version: str) -> dict:
    """config.json of a Qwen3(-MoE) ModelConfig (for a model with no source directory)."""
    body = {"architectures": ["Qwen3MoeForCausalLM" if m.is_moe else "Qwen3ForCausalLM"],
            "model_type": "qwen3_moe" if m.is_moe else "qwen3", "vocab_size": m.vocab_size,
            "hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size,
            "num_hidden_layers": m.num_hidden_layers, "num_attention_heads": m.num_attention_heads,
            "num_key_value_heads": m.num_key_value_heads, "head_dim": m.head_dim, "rms_norm_eps": m.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
            "tie_word_embeddings": m.tie_word_embeddings, "max_position_embeddings": m.max_position_embeddings,
            "hidden_act": "silu", "attention_bias": False, "dtype": m.dtype,
            "eos_token_id": eos_token_id, "pad_token_id": pad_token_id, "bos_token_id": None,
            "transformers_version": transformers_version}
    if m.is_moe:
        body.update(num_experts=m.num_experts, num_experts_per_tok=m.num_experts_per_tok,
                    moe_intermediate_size=m.moe_intermediate_size or m.intermediate_size,
                    norm_topk_prob=m.norm_topk_prob, router_aux_loss_coef=m.router_aux_loss_coef,
                    decoder_sparse_step=1, mlp_only_layers=[])
    return body


def sequence_classifier(cfg: dict) -> None:
    """A discriminator is released as `Qwen3(Moe)ForSequenceClassification` with one label: transformers'
    own class for a backbone + `score` Linear(hidden, 1, bias=False), scored at the last token."""
    base = "Qwen3Moe" if cfg.get("model_type") == "qwen3_moe" else "Qwen3"
    cfg.update(architectures=[f"{base}ForSequenceClassification"], num_labels=1,
               id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
