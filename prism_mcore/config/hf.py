"""Reading a Hugging Face Qwen3 / Qwen3-MoE config.json into our ModelConfig fields (pure JSON)."""
from __future__ import annotations

import json
from pathlib import Path


# HF config.json key -> ModelConfig field (transformers 5 names; older aliases handled below)
_HF_FIELDS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_hidden_layers", "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads", "head_dim": "head_dim", "rms_norm_eps": "rms_norm_eps",
    "tie_word_embeddings": "tie_word_embeddings", "max_position_embeddings": "max_position_embeddings",
    "num_experts_per_tok": "num_experts_per_tok", "moe_intermediate_size": "moe_intermediate_size",
    "norm_topk_prob": "norm_topk_prob", "router_aux_loss_coef": "router_aux_loss_coef",
}


def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no config.json (is --hf a Hugging Face checkpoint directory?)")
    # Errors name the file: a bare "Expecting value: line 1 column 1" does not say which JSON is broken.
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: unreadable JSON ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def model_fields_from_hf(hf: dict) -> dict:
    """ModelConfig fields described by an HF Qwen3 / Qwen3-MoE config.json."""
    if hf.get("model_type") not in ("qwen3", "qwen3_moe"):
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


def fill_from_hf(model_tree: dict) -> dict:
    """`model:` section with the fields it does not set taken from `hf_path`'s config.json; fields the
    user did set are kept, and the weights' shapes are checked against them when loaded."""
    if not model_tree.get("hf_path"):
        return model_tree
    from_hf = model_fields_from_hf(read_hf_config(model_tree["hf_path"]))
    return {**from_hf, **model_tree}
