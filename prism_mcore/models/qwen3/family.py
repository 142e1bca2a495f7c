"""The Qwen3 / Qwen3-MoE model spec (models/spec.py): one family, MoE when `num_experts > 0`.

The architecture object is the `ModelConfig` itself. Heavy modules (torch, Megatron, transformers) are
imported inside the methods, so the estimator can use the spec without them.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from prism_mcore.models.qwen3 import hf_config, memory
from prism_mcore.models.spec import ModelSpec

# The per-expert names transformers' save_pretrained writes for Qwen3-MoE (the only layout).
PER_EXPERT = "per_expert"


class Qwen3Spec(ModelSpec):
    name = "qwen3"
    hf_model_types = hf_config.MODEL_TYPES
    expert_layouts = (PER_EXPERT,)

    # ---- config ---------------------------------------------------------------------------------
    def model_fields(self, hf: dict) -> dict:
        return hf_config.model_fields(hf)

    def matches(self, model) -> bool:
        return getattr(model, "vision", None) is None

    def arch(self, model):
        return model

    def hf_config(self, arch) -> dict:
        from prism_mcore.checkpoint.hf_config import transformers_version
        from prism_mcore.data.tokenizer import ENDOFTEXT_ID, IM_END_ID

        return hf_config.hf_config_dict(arch, IM_END_ID, ENDOFTEXT_ID, transformers_version())

    def as_sequence_classifier(self, cfg: dict) -> None:
        hf_config.sequence_classifier(cfg)

    def is_discriminator_config(self, hf: dict) -> bool:
        architectures = hf.get("architectures") or []
        return isinstance(architectures, list) and any(str(a).endswith("ForSequenceClassification")
                                                       for a in architectures)

    # ---- build and forward ------------------------------------------------------------------------
    def build(self, arch, parallel, discriminator: bool = False):
        from prism_mcore.models.qwen3.model import build_qwen3
        from prism_mcore.models.spec import attach

        if discriminator:
            arch = arch.model_copy(update={"tie_word_embeddings": False})  # the LM head is replaced
        model = build_qwen3(arch, parallel)
        if discriminator:
            from prism_mcore.models.qwen3.rotary import use_positional_rotary

            use_positional_rotary(model)
        attach(model, self, arch)
        return model

    def forward_inputs(self, arch, tokens, attention_mask=None, position_ids=None, packed_seq_lengths=None,
                       pixel_values=None, image_grid_thw=None) -> tuple[Any, dict]:
        if pixel_values is not None:
            raise ValueError("a Qwen3 text model takes no images (pixel_values given)")
        if position_ids is None:
            from prism_mcore.models.segments import segment_ids, segment_positions

            seg = segment_ids(tuple(tokens.shape), attention_mask, packed_seq_lengths, device=tokens.device)
            position_ids = segment_positions(seg)
        return position_ids, {}

    # ---- HF adapter -------------------------------------------------------------------------------
    def hf_shapes(self, arch, expert_layout: str | None = None) -> dict:
        from prism_mcore.models.qwen3.hf_adapter import hf_shapes

        self._layout(expert_layout)
        return hf_shapes(arch)

    def megatron_reader(self, arch, hf_get: Callable, expert_layout: str | None = None) -> Callable:
        from prism_mcore.models.qwen3.hf_adapter import megatron_reader

        self._layout(expert_layout)
        return megatron_reader(arch, hf_get)

    def hf_views(self, arch, key: str, layer, value, expert_layout: str | None = None) -> Iterator:
        from prism_mcore.models.qwen3.hf_adapter import hf_views

        self._layout(expert_layout)
        return hf_views(arch, key, layer, value)

    def hf_tensors(self, arch, key: str, layer, value, expert_layout: str | None = None) -> Iterator:
        from prism_mcore.models.qwen3.hf_adapter import hf_tensors

        self._layout(expert_layout)
        return hf_tensors(arch, key, layer, value)

    def is_layered(self, key: str) -> bool:
        from prism_mcore.models.qwen3.hf_adapter import is_layered

        return is_layered(key)

    def _layout(self, expert_layout: str | None) -> None:
        if expert_layout not in (None, PER_EXPERT):
            raise ValueError(f"Qwen3-MoE checkpoints have one expert layout ({PER_EXPERT}), not {expert_layout!r}")

    # ---- tokenizer, engines, upcycling ------------------------------------------------------------
    def tokenizer(self, hf_dir=None):
        from prism_mcore.data.tokenizer import qwen3_tokenizer

        return qwen3_tokenizer()

    def upcycle(self, dense_dir, out_dir, **kwargs):
        from prism_mcore.models.qwen3.upcycle import upcycle

        return upcycle(dense_dir, out_dir, **kwargs)

    def upcycle_main(self, argv: list[str]) -> int:
        from prism_mcore.models.qwen3.upcycle import main

        return main(argv)

    # ---- memory -----------------------------------------------------------------------------------
    def param_counts(self, model, *, vocab_size: int | None = None, lm_head: bool = True, value_head: bool = False):
        return memory.param_counts(model, vocab_size=vocab_size, lm_head=lm_head, value_head=value_head)

    def layer_activation_elements(self, model, tp: int, sp: bool, etp: int, tokens: float) -> float:
        return memory.layer_activation_elements(model, tp, sp, etp, tokens)

    def padded_vocab_size(self, vocab_size: int, tp: int) -> int:
        return memory.padded_vocab_size(vocab_size, tp)


SPEC = Qwen3Spec()
