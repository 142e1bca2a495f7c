"""What a Qwen3-VL / Qwen3-VL-MoE checkpoint is, read from its HF config.json (pure JSON, no torch).

The text half becomes our `ModelConfig` (the Qwen3 / Qwen3-MoE fields, reused as they are by
`models/qwen3/model.py`); the rest (vision tower, special token ids, MRoPE layout) stays here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from prism_mcore.config import ModelConfig
from prism_mcore.config.hf import model_fields_from_hf, read_hf_config

DENSE, MOE = "qwen3_vl", "qwen3_vl_moe"


def is_qwen3_vl(hf: dict) -> bool:
    """Whether an HF config.json describes a Qwen3-VL (dense or MoE) checkpoint."""
    return hf.get("model_type") in (DENSE, MOE)


@dataclass(frozen=True)
class Qwen3VLArch:
    """A Qwen3-VL architecture: `text` is the language model as a Qwen3(-MoE) `ModelConfig`, `vision`
    the HF `vision_config` dict (the tower is built from it as transformers builds it)."""

    family: str  # DENSE or MOE (the HF model_type)
    text: ModelConfig
    vision: dict
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    mrope_section: tuple[int, int, int]
    hf_config: dict = field(repr=False, compare=False)  # the whole config.json, for transformers' classes

    @property
    def is_moe(self) -> bool:
        return self.family == MOE

    @property
    def spatial_merge_size(self) -> int:
        return int(self.vision.get("spatial_merge_size", 2))

    @property
    def num_deepstack(self) -> int:
        """Deepstack features are added after decoder layers 0 .. num_deepstack - 1."""
        return len(self.vision.get("deepstack_visual_indexes", ()))

    def text_for_megatron(self) -> ModelConfig:
        """`text` with the MRoPE section passed through to Megatron's TransformerConfig (GPTModel's
        'mrope' position embedding insists on it)."""
        return self.text.model_copy(update={"megatron": {**self.text.megatron,
                                                          "mrope_section": list(self.mrope_section)}})


def _text_fields(hf: dict) -> dict:
    text = dict(hf.get("text_config") or {})
    moe = hf["model_type"] == MOE
    # Qwen3-VL keeps tie_word_embeddings at the top level (transformers reads it there); the text
    # config may repeat it. The top level wins, as in transformers.
    tied = hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    if moe and text.get("norm_topk_prob") is False:
        # transformers' Qwen3-VL-MoE router always renormalizes the top-k weights and vLLM follows
        # norm_topk_prob: a checkpoint saying false would run differently in the two.
        raise ValueError("Qwen3-VL-MoE with norm_topk_prob=false is not supported (transformers always "
                         "renormalizes the top-k routing weights)")
    if "dtype" not in text and hf.get("dtype") is not None:
        text["dtype"] = hf["dtype"]
    fields = model_fields_from_hf({**text, "model_type": "qwen3_moe" if moe else "qwen3",
                                   "tie_word_embeddings": tied})
    if moe:
        fields["norm_topk_prob"] = True
    return fields


def arch_from_hf(hf: dict | str | Path, **text_overrides) -> Qwen3VLArch:
    """The architecture of an HF Qwen3-VL(-MoE) config.json (a dict, or the checkpoint directory).
    `text_overrides` replace `ModelConfig` fields (e.g. dtype, moe_expert_backend, megatron)."""
    if not isinstance(hf, dict):
        hf = read_hf_config(hf)
    if not is_qwen3_vl(hf):
        raise ValueError(f"model_type {hf.get('model_type')!r} is not Qwen3-VL (expected {DENSE} or {MOE})")
    text_cfg = hf.get("text_config") or {}
    rope = text_cfg.get("rope_parameters") or text_cfg.get("rope_scaling") or {}
    # transformers' Qwen3-VL text rotary is interleaved whatever `mrope_interleaved` says; so are we.
    section = tuple(int(n) for n in rope.get("mrope_section", (24, 20, 20)))
    text = ModelConfig.model_validate({**_text_fields(hf), **text_overrides})
    if len(section) != 3 or sum(section) != text.head_dim // 2:
        raise ValueError(f"mrope_section {list(section)} must have 3 entries adding up to head_dim/2 = "
                         f"{text.head_dim // 2}")
    vision = dict(hf.get("vision_config") or {})
    if vision.get("out_hidden_size", text.hidden_size) != text.hidden_size:
        raise ValueError(f"vision out_hidden_size {vision['out_hidden_size']} != text hidden_size {text.hidden_size}")
    return Qwen3VLArch(
        family=hf["model_type"], text=text, vision=vision,
        image_token_id=int(hf.get("image_token_id", 151655)), video_token_id=int(hf.get("video_token_id", 151656)),
        vision_start_token_id=int(hf.get("vision_start_token_id", 151652)),
        vision_end_token_id=int(hf.get("vision_end_token_id", 151653)),
        mrope_section=section, hf_config=hf)
