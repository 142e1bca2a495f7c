"""The Qwen3-VL / Qwen3-VL-MoE model spec (models/spec.py): one family, MoE when `num_experts > 0`.

A `ModelConfig` is Qwen3-VL when it has a `vision` section (config/hf.py fills it from a Qwen3-VL
`model.hf_path`); the architecture object is `config.Qwen3VLArch`. `model.vision.train` / `.lr_mult` decide,
when the model is built, which vision parameters train and at what learning-rate multiple (see
`vision_training`); `.max_pixels` sizes the image processor and the memory estimate.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from prism_mcore.models.qwen3 import memory as text_memory
from prism_mcore.models.qwen3_vl import memory
from prism_mcore.models.spec import ExtraMemory, ModelSpec

# The vision parameters `train: merger` trains (transformers' names inside the tower).
MERGER_PREFIXES = ("merger.", "deepstack_merger_list.")
# Replicated over TP, these parameters may carry this attribute; build_optimizer groups them by it.
LR_MULT_ATTR = "prism_lr_mult"


def vision_training(tower, train: str, lr_mult: float) -> None:
    """Freeze the vision parameters `train` leaves out (before DDP and the optimizer see them: frozen
    parameters get no gradient buffer, no optimizer state and build no autograd graph) and tag the rest
    with their learning-rate multiplier."""
    for name, param in tower.named_parameters():
        trains = train == "full" or (train == "merger" and name.startswith(MERGER_PREFIXES))
        param.requires_grad_(trains)
        if trains and lr_mult != 1.0:
            setattr(param, LR_MULT_ATTR, float(lr_mult))


class Qwen3VLSpec(ModelSpec):
    name = "qwen3_vl"
    hf_model_types = ("qwen3_vl", "qwen3_vl_moe")
    expert_layouts = ("released", "transformers")

    # ---- config ---------------------------------------------------------------------------------
    def model_fields(self, hf: dict) -> dict:
        from prism_mcore.models.qwen3_vl.config import model_fields

        return model_fields(hf)

    def matches(self, model) -> bool:
        return getattr(model, "vision", None) is not None

    def arch(self, model):
        from prism_mcore.models.qwen3_vl.config import arch_from_model

        return arch_from_model(model)

    def text_config(self, arch):
        return arch.text

    def hf_config(self, arch) -> dict:
        from prism_mcore.models.qwen3_vl.hf_config import hf_config_dict

        return hf_config_dict(arch)

    def as_sequence_classifier(self, cfg: dict) -> None:
        from prism_mcore.models.qwen3_vl.hf_config import mark_discriminator

        mark_discriminator(cfg)

    def is_discriminator_config(self, hf: dict) -> bool:
        from prism_mcore.models.qwen3_vl.hf_config import is_discriminator

        return is_discriminator(hf)

    # ---- build and forward ------------------------------------------------------------------------
    def build(self, arch, parallel, discriminator: bool = False):
        import dataclasses

        from prism_mcore.models.qwen3_vl.model import build_qwen3_vl
        from prism_mcore.models.spec import attach

        if discriminator:  # the LM head is replaced by the value head
            arch = dataclasses.replace(arch, text=arch.text.model_copy(update={"tie_word_embeddings": False}))
        model = build_qwen3_vl(arch, parallel)
        if model.vision is not None and arch.training is not None:
            vision_training(model.vision, arch.training.train, arch.training.lr_mult)
        attach(model, self, arch)
        return model

    def forward_inputs(self, arch, tokens, attention_mask=None, position_ids=None, packed_seq_lengths=None,
                       pixel_values=None, image_grid_thw=None) -> tuple[Any, dict]:
        if position_ids is None or position_ids.dim() != 3:
            from prism_mcore.models.qwen3_vl.rope import rope_index_packed
            from prism_mcore.models.segments import segment_ids

            seg = segment_ids(tuple(tokens.shape), attention_mask, packed_seq_lengths, device=tokens.device)
            position_ids = rope_index_packed(tokens, image_grid_thw, seg, arch.spatial_merge_size,
                                             arch.image_token_id, arch.vision_start_token_id)
        extra = {}
        if pixel_values is not None and pixel_values.numel():  # a micro-batch of text rows has no images
            extra = {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw}
        return position_ids, extra

    # ---- HF adapter -------------------------------------------------------------------------------
    def hf_shapes(self, arch, expert_layout: str | None = None) -> dict:
        from prism_mcore.models.qwen3_vl.hf_adapter import RELEASED, hf_shapes

        return hf_shapes(arch, expert_layout or RELEASED)

    def megatron_reader(self, arch, hf_get: Callable, expert_layout: str | None = None) -> Callable:
        from prism_mcore.models.qwen3_vl.hf_adapter import RELEASED, megatron_reader

        return megatron_reader(arch, hf_get, expert_layout or RELEASED)

    def hf_views(self, arch, key: str, layer, value, expert_layout: str | None = None) -> Iterator:
        from prism_mcore.models.qwen3_vl.hf_adapter import RELEASED, hf_views

        return hf_views(arch, key, layer, value, expert_layout or RELEASED)

    def is_layered(self, key: str) -> bool:
        from prism_mcore.models.qwen3_vl.hf_adapter import is_layered

        return is_layered(key)

    def check_checkpoint(self, source, arch, expert_layout: str | None = None) -> None:
        """Shape check that names the other expert layout when the checkpoint has it."""
        from prism_mcore.models.qwen3_vl.hf_adapter import RELEASED
        from prism_mcore.models.qwen3_vl.weights import check_checkpoint

        check_checkpoint(source, arch, expert_layout or RELEASED)

    # ---- tokenizer, processor, engines, upcycling ---------------------------------------------------
    def tokenizer(self, hf_dir=None):
        from prism_mcore.data.tokenizer import qwen3_tokenizer

        return qwen3_tokenizer()  # Qwen3-VL's vocabulary and special tokens are Qwen3's

    def processor(self, arch):
        """The image processor (data/images.py: transformers' PIL processor at Qwen3-VL's values and PRISM's
        sizes) for the tower's patch / merge sizes and `model.vision.max_pixels`."""
        from prism_mcore.data.images import ImageProcessor

        max_pixels = arch.training.max_pixels if arch.training is not None else 313600
        return ImageProcessor.from_vision({**arch.vision, "spatial_merge_size": arch.spatial_merge_size}, max_pixels)

    def engine_kwargs(self, arch) -> dict:
        # Video is not supported; images per prompt as PRISM's rows carry them (one, two for headroom).
        return {"limit_mm_per_prompt": {"image": 2, "video": 0}}

    def upcycle(self, dense_dir, out_dir, **kwargs):
        from prism_mcore.models.qwen3_vl.upcycle import upcycle

        return upcycle(dense_dir, out_dir, **kwargs)

    # ---- memory -----------------------------------------------------------------------------------
    def param_counts(self, model, *, vocab_size: int | None = None, lm_head: bool = True, value_head: bool = False):
        import dataclasses

        counts = text_memory.param_counts(model, vocab_size=vocab_size, lm_head=lm_head, value_head=value_head)
        return dataclasses.replace(counts, extra=memory.vision_params(model.vision.tower))

    def layer_activation_elements(self, model, tp: int, sp: bool, etp: int, tokens: float) -> float:
        return text_memory.layer_activation_elements(model, tp, sp, etp, tokens)

    def padded_vocab_size(self, vocab_size: int, tp: int) -> int:
        return text_memory.padded_vocab_size(vocab_size, tp)

    def extra_memory(self, model, *, rows: int, seq: int) -> ExtraMemory:
        v = model.vision
        per_image = memory.image_tokens(v.tower, v.max_pixels)
        tokens = min(rows * seq, rows * per_image)  # one image per row (PRISM's rows), within the row
        return ExtraMemory(
            params=memory.vision_params(v.tower), trainable=memory.trainable_vision_params(v.tower, v.train),
            activation_elements=memory.vision_activation_elements(v.tower, v.train, tokens),
            notes=(f"vision tower ({v.train}, replicated over TP, first stage): {tokens} image tokens per "
                   f"micro-batch ({per_image} per image at max_pixels={v.max_pixels}, one image per row)",))


SPEC = Qwen3VLSpec()
