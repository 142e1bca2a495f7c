"""config.json, generation config and tokenizer for a model that has no source HF directory.

A model built from `model:` fields and trained from scratch (the demo's policy) has nothing to copy
next to its exported weights; these files make the export loadable by transformers and vLLM as it is.
"""
from __future__ import annotations

import json
from pathlib import Path

from prism_mcore.config import ModelConfig
from prism_mcore.data.tokenizer import ENDOFTEXT_ID, IM_END_ID


def transformers_version() -> str:
    """The installed transformers' version, as `save_pretrained` records it in config.json (readers such as
    vLLM use it to pick how to read the file)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:  # metadata missing (a vendored copy): the module knows its own version
        import transformers

        return transformers.__version__


def hf_config_dict(m: ModelConfig) -> dict:
    body = {"architectures": ["Qwen3MoeForCausalLM" if m.is_moe else "Qwen3ForCausalLM"],
            "model_type": "qwen3_moe" if m.is_moe else "qwen3", "vocab_size": m.vocab_size,
            "hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size,
            "num_hidden_layers": m.num_hidden_layers, "num_attention_heads": m.num_attention_heads,
            "num_key_value_heads": m.num_key_value_heads, "head_dim": m.head_dim, "rms_norm_eps": m.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
            "tie_word_embeddings": m.tie_word_embeddings, "max_position_embeddings": m.max_position_embeddings,
            "hidden_act": "silu", "attention_bias": False, "dtype": m.dtype,
            "eos_token_id": IM_END_ID, "pad_token_id": ENDOFTEXT_ID, "bos_token_id": None,
            "transformers_version": transformers_version()}
    if m.is_moe:
        body.update(num_experts=m.num_experts, num_experts_per_tok=m.num_experts_per_tok,
                    moe_intermediate_size=m.moe_intermediate_size or m.intermediate_size,
                    norm_topk_prob=m.norm_topk_prob, router_aux_loss_coef=m.router_aux_loss_coef,
                    decoder_sparse_step=1, mlp_only_layers=[])
    return body


def write_scratch_side_files(m: ModelConfig, out: Path) -> list[Path]:
    """Write config.json, generation_config.json and the real Qwen3 tokenizer into `out`; return the paths."""
    from prism_mcore.data.tokenizer import qwen3_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config_dict(m), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
                                                            "pad_token_id": ENDOFTEXT_ID}, indent=2) + "\n")
    qwen3_tokenizer().save_pretrained(str(out))
    return sorted(out.iterdir())
