"""What a Qwen3-VL / Qwen3-VL-MoE model is (pure JSON, no torch).

In the config, a Qwen3-VL model is a `ModelConfig` whose text fields are the language model's (the Qwen3 /
Qwen3-MoE fields, reused as they are by `models/qwen3/model.py`) plus a `vision` section: the HF
`vision_config` (`tower`), the special token ids and the MRoPE layout. `model_fields` reads that from a
Qwen3-VL config.json; `arch_from_model` turns it into a `Qwen3VLArch`, what the model code uses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from prism_mcore.config import ModelConfig
from prism_mcore.config.schema import VisionConfig
from prism_mcore.config.hf import read_hf_config
from prism_mcore.models.qwen3.hf_config import model_fields as text_model_fields

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
    hf_config: dict | None = field(default=None, repr=False, compare=False)  # the source config.json, if any
    training: VisionConfig | None = field(default=None, repr=False, compare=False)  # model.vision (how it trains)

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
    fields = text_model_fields({**text, "model_type": "qwen3_moe" if moe else "qwen3",
                                "tie_word_embeddings": tied})
    if moe:
        fields["norm_topk_prob"] = True
    return fields


# HF vision_config keys that describe the file or transformers' generic config machinery, not the tower.
_NOT_TOWER = ("model_type", "dtype", "torch_dtype", "transformers_version", "_name_or_path", "architectures",
              "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
              "is_encoder_decoder", "id2label", "label2id", "problem_type")


def model_fields(hf: dict) -> dict:
    """ModelConfig fields (text fields + the `vision` section) of a Qwen3-VL(-MoE) config.json."""
    if not is_qwen3_vl(hf):
        raise ValueError(f"model_type {hf.get('model_type')!r} is not Qwen3-VL (expected {DENSE} or {MOE})")
    fields = _text_fields(hf)
    text_cfg = hf.get("text_config") or {}
    rope = text_cfg.get("rope_parameters") or text_cfg.get("rope_scaling") or {}
    # transformers' Qwen3-VL text rotary is interleaved whatever `mrope_interleaved` says; so are we.
    section = [int(n) for n in rope.get("mrope_section", (24, 20, 20))]
    tower = {k: v for k, v in (hf.get("vision_config") or {}).items() if k not in _NOT_TOWER}
    fields["vision"] = {"tower": tower, "mrope_section": section,
                        **{k: int(hf[k]) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                   "vision_end_token_id") if hf.get(k) is not None}}
    return fields


def arch_from_model(model: ModelConfig, hf_config: dict | None = None) -> Qwen3VLArch:
    """The architecture of a ModelConfig with a `vision` section."""
    v = model.vision
    if v is None:
        raise ValueError("not a Qwen3-VL model config (no model.vision section)")
    text = model.model_copy(update={"vision": None})
    if text.is_moe and not text.norm_topk_prob:
        raise ValueError("Qwen3-VL-MoE with norm_topk_prob=false is not supported (transformers always "
                         "renormalizes the top-k routing weights)")
    section = tuple(int(n) for n in v.mrope_section)
    if len(section) != 3 or sum(section) != text.head_dim // 2:
        raise ValueError(f"mrope_section {list(section)} must have 3 entries adding up to head_dim/2 = "
                         f"{text.head_dim // 2}")
    tower = dict(v.tower)
    if tower.get("out_hidden_size", text.hidden_size) != text.hidden_size:
        raise ValueError(f"vision out_hidden_size {tower['out_hidden_size']} != text hidden_size {text.hidden_size}")
    return Qwen3VLArch(
        family=MOE if text.is_moe else DENSE, text=text, vision=tower, image_token_id=v.image_token_id,
        video_token_id=v.video_token_id, vision_start_token_id=v.vision_start_token_id,
        vision_end_token_id=v.vision_end_token_id, mrope_section=section, hf_config=hf_config, training=v)


def arch_from_hf(hf: dict | str | Path, **text_overrides) -> Qwen3VLArch:
    """The architecture of an HF Qwen3-VL(-MoE) config.json (a dict, or the checkpoint directory).
    `text_overrides` replace `ModelConfig` fields (e.g. dtype, moe_expert_backend, megatron)."""
    if not isinstance(hf, dict):
        hf = read_hf_config(hf)
    return arch_from_model(ModelConfig.model_validate({**model_fields(hf), **text_overrides}), hf_config=hf)
