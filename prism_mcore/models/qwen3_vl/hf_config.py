"""config.json of a Qwen3-VL(-MoE) model, and the marks an exported discriminator carries."""
from __future__ import annotations

from prism_mcore.models.qwen3_vl.config import MOE, Qwen3VLArch

# transformers has no sequence-classification class for Qwen3-VL: an exported discriminator keeps the
# ForConditionalGeneration identity (its backbone loads there; `score.weight` is then reported unexpected)
# and names its value head here, which `prism convert hf-to-mcore` reads back.
VALUE_HEAD_KEY = "prism_value_head"


def hf_config_dict(arch: Qwen3VLArch) -> dict:
    """The source config.json when the model came from one, else transformers' own config of the
    architecture (a model built from `model:` fields)."""
    if arch.hf_config is not None:
        return dict(arch.hf_config)
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    from prism_mcore.checkpoint.hf_config import transformers_version
    from prism_mcore.data.tokenizer import ENDOFTEXT_ID, IM_END_ID

    m = arch.text
    text = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
                num_key_value_heads=m.num_key_value_heads, head_dim=m.head_dim, rms_norm_eps=m.rms_norm_eps,
                max_position_embeddings=m.max_position_embeddings, tie_word_embeddings=m.tie_word_embeddings,
                rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta,
                                 "mrope_section": list(arch.mrope_section), "mrope_interleaved": True},
                eos_token_id=IM_END_ID, pad_token_id=ENDOFTEXT_ID, dtype=m.dtype)
    if arch.is_moe:
        text.update(num_experts=m.num_experts, num_experts_per_tok=m.num_experts_per_tok,
                    moe_intermediate_size=m.moe_intermediate_size or m.intermediate_size, norm_topk_prob=True,
                    router_aux_loss_coef=m.router_aux_loss_coef, decoder_sparse_step=1, mlp_only_layers=[])
    config_cls = Qwen3VLMoeConfig if arch.family == MOE else Qwen3VLConfig
    config = config_cls(text_config=text, vision_config=dict(arch.vision), image_token_id=arch.image_token_id,
                        video_token_id=arch.video_token_id, vision_start_token_id=arch.vision_start_token_id,
                        vision_end_token_id=arch.vision_end_token_id, tie_word_embeddings=m.tie_word_embeddings)
    out = config.to_dict()
    out["transformers_version"] = transformers_version()
    # the class transformers and vLLM load it as (a bare config says none, and vLLM then runs it as a pooler)
    out["architectures"] = ["Qwen3VLMoeForConditionalGeneration" if arch.family == MOE
                            else "Qwen3VLForConditionalGeneration"]
    return out


def mark_discriminator(cfg: dict) -> None:
    cfg[VALUE_HEAD_KEY] = "score.weight"


def is_discriminator(cfg: dict) -> bool:
    return VALUE_HEAD_KEY in cfg
