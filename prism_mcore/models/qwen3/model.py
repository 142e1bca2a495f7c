"""Qwen3 and Qwen3-MoE as Megatron-core GPT models.

The architecture comes from our `ModelConfig` (whose field names are those of HF's config.json),
the layout from `ParallelConfig`. Megatron knobs we do not model pass through `model.megatron`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from prism_mcore.config import ModelConfig, ParallelConfig
from prism_mcore.models.qwen3.memory import VOCAB_DIVISIBLE_BY, padded_vocab_size  # noqa: F401  (re-exported)
from prism_mcore.platform import ensure_platform

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def have_transformer_engine() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def transformer_config(model: ModelConfig, parallel: ParallelConfig):
    from megatron.core.transformer.transformer_config import TransformerConfig

    ensure_platform()
    dtype = _DTYPES[model.dtype]
    on_gpu = torch.cuda.is_available()
    kwargs = dict(
        num_layers=model.num_hidden_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.intermediate_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_key_value_heads,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        sequence_parallel=parallel.sequence_parallel,
        use_cpu_initialization=not on_gpu,
        # The fused CUDA paths below have no CPU implementation.
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )
    if model.is_moe:
        kwargs.update(
            num_moe_experts=model.num_experts,
            moe_router_topk=model.num_experts_per_tok,
            moe_ffn_hidden_size=model.moe_intermediate_size or model.intermediate_size,
            # Qwen3-MoE: softmax over all experts then top-k; with norm_topk_prob the top-k
            # probabilities are renormalized, which equals a softmax over the top-k logits.
            moe_router_pre_softmax=not model.norm_topk_prob,
            moe_router_dtype="fp32",
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=model.router_aux_loss_coef,
            moe_token_dispatcher_type="alltoall",
            moe_grouped_gemm=False,
            moe_permute_fusion=False,
            moe_router_fusion=False,
        )
    kwargs.update(model.megatron)
    return TransformerConfig(**kwargs)


def layer_spec(model: ModelConfig, config):
    from megatron.core.models.gpt import gpt_layer_specs as specs

    num_experts = model.num_experts or None
    if have_transformer_engine():
        spec = specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=config.moe_grouped_gemm, qk_layernorm=True)
    else:
        spec = specs.get_gpt_layer_local_spec(
            num_experts=num_experts, moe_grouped_gemm=config.moe_grouped_gemm, qk_layernorm=True,
            normalization="RMSNorm")
    if model.is_moe and model.moe_expert_backend == "grouped":
        # Our grouped-GEMM experts in place of SequentialMLP; parameters and checkpoints are unchanged.
        from prism_mcore.models.qwen3.grouped_experts import use_grouped_experts

        spec = use_grouped_experts(spec)
    return spec


def build_qwen3(model: ModelConfig, parallel: ParallelConfig):
    """The local pipeline stage of a Qwen3(-MoE) GPTModel; call after `init_model_parallel`."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(model, parallel)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(model, config),
        vocab_size=padded_vocab_size(model.vocab_size, parallel.tp),
        max_sequence_length=model.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(model.rope_theta),
    )
    return gpt
