"""Qwen3-VL and Qwen3-VL-MoE as Megatron-core models: a Qwen3(-MoE) GPTModel (built from the same
TransformerConfig and layer spec as `models/qwen3/model.py`) with

  * interleaved MRoPE fed by 3-D position ids [3, b, s] (`rope.InterleavedMRoPE`, `rope.rope_index`),
  * on the first pipeline stage the vision tower (`vision.py`), whose merged features replace the
    image-pad token embeddings, and whose deepstack features are added to the hidden states after
    decoder layers 0 .. k-1 (k = number of deepstack features).

Checkpoint keys are those of a GPTModel plus `vision.*` (the tower's own parameter names), so the
text half converts exactly as Qwen3 does (see hf_adapter.py).

Deepstack is applied by forward hooks on the first k layers that read this forward's features from
the model instance (set at the start of `forward`, cleared at its end). Hence two requirements,
checked when the model is built: those k layers live on the first pipeline stage (the features are
computed there and the pipeline ships one tensor between stages), and no full-layer activation
recomputation (it would re-run the layers after the features are cleared).
"""
from __future__ import annotations

import functools

import torch

from prism_mcore.platform import ensure_platform

ensure_platform()  # before Megatron's first import (CPU machines)

from megatron.core.models.gpt import GPTModel  # noqa: E402

from prism_mcore.config import ParallelConfig  # noqa: E402
from prism_mcore.models.qwen3.model import layer_spec, padded_vocab_size, transformer_config  # noqa: E402
from prism_mcore.models.qwen3_vl.config import Qwen3VLArch  # noqa: E402
from prism_mcore.models.qwen3_vl.rope import InterleavedMRoPE  # noqa: E402
from prism_mcore.models.qwen3_vl.vision import VisualPlacement, build_vision_tower, encode_images  # noqa: E402


def _first_stage_layers(config) -> int:
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    vp_stage = 0 if config.virtual_pipeline_model_parallel_size else None
    return get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=0)


def check_layout(arch: Qwen3VLArch, config) -> None:
    """Raise (on every rank alike) for layouts this model does not support."""
    k = arch.num_deepstack
    if config.pipeline_model_parallel_size > 1 and k > _first_stage_layers(config):
        raise ValueError(f"Qwen3-VL adds deepstack features after decoder layers 0..{k - 1}, which must sit on the "
                         f"first pipeline stage; it holds {_first_stage_layers(config)} layers at pp="
                         f"{config.pipeline_model_parallel_size} (set num_layers_in_first_pipeline_stage >= {k})")
    if k and config.recompute_granularity == "full":
        raise NotImplementedError("full activation recomputation with deepstack (the recomputed layers would "
                                  "miss the features); use recompute_granularity='selective'")
    if config.context_parallel_size > 1:
        raise NotImplementedError("context parallelism for Qwen3-VL (MRoPE positions are not CP-sliced)")


class Qwen3VLModel(GPTModel):
    """One pipeline stage of a Qwen3-VL(-MoE) language model, with the vision tower on the first stage.

    forward(input_ids [b, s], position_ids [3, b, s], attention_mask=None, pixel_values=None
    [patches, C*T*P*P], image_grid_thw=None [images, 3], ...) returns what GPTModel returns: logits
    [b, s, vocab/tp] on the last stage (or the loss with labels, or hidden states when the output
    layer is redirected, e.g. by `use_fused_logprob_head`), hidden states [s, b, h] elsewhere."""

    def __init__(self, arch: Qwen3VLArch, config, transformer_layer_spec, vocab_size: int, pre_process: bool,
                 post_process: bool, vision_seed: int = 1234, attn_implementation: str | None = None, **kwargs):
        check_layout(arch, config)
        super().__init__(config=config, transformer_layer_spec=transformer_layer_spec, vocab_size=vocab_size,
                         max_sequence_length=arch.text.max_position_embeddings, pre_process=pre_process,
                         post_process=post_process,
                         share_embeddings_and_output_weights=arch.text.tie_word_embeddings,
                         position_embedding_type="mrope", rotary_base=int(arch.text.rope_theta), **kwargs)
        self.arch = arch
        self.image_token_id = arch.image_token_id
        # GPTModel built Megatron's sectioned MRoPE; Qwen3-VL's layout is interleaved.
        self.rotary_pos_emb = InterleavedMRoPE(arch.text.head_dim, arch.text.rope_theta, arch.mrope_section)
        self._deepstack: tuple[VisualPlacement, list[torch.Tensor]] | None = None
        if pre_process:
            device = next(self.embedding.parameters()).device
            self.vision = build_vision_tower(arch, config.params_dtype, config.sequence_parallel, seed=vision_seed,
                                             attn_implementation=attn_implementation, device=device)
            for layer in self.decoder.layers:
                index = layer.layer_number - 1  # global, 0-based
                if index < arch.num_deepstack:
                    layer.register_forward_hook(functools.partial(Qwen3VLModel._add_deepstack, self, index))
        else:
            self.vision = None

    def _add_deepstack(self, index: int, module, args, output):
        if self._deepstack is None:
            return output
        placement, features = self._deepstack
        if index >= len(features):
            return output
        hidden, context = output
        return placement.add(hidden, features[index]), context

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                decoder_input: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None, **kwargs):
        deepstack = None
        if self.pre_process and decoder_input is None:
            decoder_input = self.embedding(input_ids=input_ids, position_ids=None)  # [s(/tp), b, h]
            if pixel_values is not None:
                if image_grid_thw is None:
                    raise ValueError("pixel_values without image_grid_thw")
                features, deep = encode_images(self.vision, pixel_values, image_grid_thw)
                placement = VisualPlacement(input_ids, self.image_token_id, features.shape[0])
                decoder_input = placement.replace(decoder_input, features)
                deepstack = (placement, deep)
            if padding_mask is not None and self.config.sequence_parallel:
                # GPTModel slices the MoE padding mask for SP only when it embeds the tokens itself.
                from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

                padding_mask = scatter_to_sequence_parallel_region(padding_mask.t().contiguous()).t().contiguous()
        self._deepstack = deepstack
        try:
            return super().forward(input_ids, position_ids, attention_mask, decoder_input=decoder_input,
                                   padding_mask=padding_mask, **kwargs)
        finally:
            self._deepstack = None


def build_qwen3_vl(arch: Qwen3VLArch, parallel: ParallelConfig, vision_seed: int = 1234,
                   attn_implementation: str | None = None) -> Qwen3VLModel:
    """The local pipeline stage of a Qwen3-VL(-MoE) model; call after `init_model_parallel`. Weights are
    freshly initialized (`weights.load_hf_weights` fills them from an HF directory)."""
    from megatron.core import parallel_state

    text = arch.text_for_megatron()
    config = transformer_config(text, parallel)
    return Qwen3VLModel(arch, config, layer_spec(text, config), padded_vocab_size(text.vocab_size, parallel.tp),
                        pre_process=parallel_state.is_pipeline_first_stage(),
                        post_process=parallel_state.is_pipeline_last_stage(),
                        vision_seed=vision_seed, attn_implementation=attn_implementation)
