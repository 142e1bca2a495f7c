"""The Qwen3-VL vision tower (transformers' own module, replicated on every TP rank) and the placement of
its features in the language model's hidden states.

Why transformers' module rather than a TP-sharded Megatron ViT: see docs/models.md ("Qwen3-VL"). In
short, the tower is ~5-10% of the policy's FLOPs, its packed per-image attention, 2-D rotary and
bilinear position-embedding interpolation are exactly transformers' code (so parity is by
construction), and replication needs only two rules to be correct under Megatron:

  * Same values on every rank that holds a replica: the tower is initialized from a fixed seed in a
    forked RNG (Megatron leaves the global RNG different per TP rank), then normally overwritten by
    the HF weights.
  * Gradients: every TP rank runs the whole tower on all images of the micro-batch, but it places
    the features only into the hidden states it holds. Without sequence parallelism those are the
    whole sequence, identical on all TP ranks (the residual stream is replicated), so each rank's
    tower gradient is already the full gradient and nothing is reduced, like Megatron's own
    replicated norms. With sequence parallelism each rank holds one slice of the sequence, so its
    tower gradient is the part from its slice: the parameters are marked `sequence_parallel`, and
    Megatron's `finalize_model_grads` sums them over the TP group (as it does for SP norms). Data
    parallel reduction is DDP's, as for any parameter; the grad-norm counts them on TP rank 0 only
    (they carry no `tensor_model_parallel` flag), so nothing is counted twice.
"""
from __future__ import annotations

import torch

from prism_mcore.models.qwen3_vl.config import MOE, Qwen3VLArch

# Megatron key prefix of the tower's parameters (GPTModel attribute `vision`); HF's is `model.visual.`.
VISION_PREFIX = "vision."
HF_VISION_PREFIX = "model.visual."


def hf_vision_classes(family: str):
    """transformers' (config class, model class) of the vision tower of this family."""
    if family == MOE:
        from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeVisionConfig
        from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionModel

        return Qwen3VLMoeVisionConfig, Qwen3VLMoeVisionModel
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    return Qwen3VLVisionConfig, Qwen3VLVisionModel


def _vision_config(arch: Qwen3VLArch, attn_implementation: str | None):
    config_cls, _ = hf_vision_classes(arch.family)
    fields = {k: v for k, v in arch.vision.items() if k not in ("model_type", "dtype", "transformers_version")}
    config = config_cls(**fields)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    return config


def build_vision_tower(arch: Qwen3VLArch, dtype: torch.dtype, sequence_parallel: bool, seed: int = 1234,
                       attn_implementation: str | None = None, device: torch.device | str | None = None):
    """transformers' vision model for `arch`, identical on every rank that builds it (see above)."""
    _, model_cls = hf_vision_classes(arch.family)
    config = _vision_config(arch, attn_implementation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tower = model_cls(config)
    tower.to(dtype=dtype, device=device)
    for param in tower.parameters():
        # Summed over TP by finalize_model_grads only when SP is on (each rank then saw a slice).
        param.sequence_parallel = sequence_parallel
    return tower


def vision_shapes(arch: Qwen3VLArch) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every vision tensor a checkpoint holds (from a meta-device tower: the tower
    is the one transformers builds, so its own parameter list is the truth)."""
    _, model_cls = hf_vision_classes(arch.family)
    with torch.device("meta"):
        tower = model_cls(_vision_config(arch, None))
    return {HF_VISION_PREFIX + name: tuple(t.shape) for name, t in tower.state_dict().items()}


def encode_images(tower, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(merged features [tokens, hidden], deepstack features: list of [tokens, hidden]) for all images,
    in image order; one image of grid (t, h, w) gives t*h*w / merge^2 tokens."""
    param = next(tower.parameters())
    out = tower(pixel_values.to(param.dtype), grid_thw=image_grid_thw, return_dict=True)
    return out.pooler_output, list(out.deepstack_features or [])


class VisualPlacement:
    """Where the image features go in the [s, b] hidden states: `mask` [s, b] marks image-pad tokens
    and `index` [s, b] the feature row each takes. Features are numbered row by row ([b, s] order,
    image after image, as the tower emits them), so the [s, b] layout must not be flattened directly."""

    def __init__(self, input_ids: torch.Tensor, image_token_id: int, num_features: int):
        mask = input_ids == image_token_id  # [b, s]
        count = int(mask.sum())
        if count != num_features:
            raise ValueError(f"input_ids hold {count} image tokens, the images give {num_features} features")
        index = mask.reshape(-1).long().cumsum(0).view_as(mask) - 1
        self.mask = mask.t().contiguous()
        self.index = index.clamp(min=0).t().contiguous()

    def _local(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The [rows, b] part of mask/index matching hidden states of `rows` rows: the whole sequence,
        or (sequence parallel) this TP rank's contiguous slice."""
        total = self.mask.shape[0]
        if rows == total:
            return self.mask, self.index
        from megatron.core import parallel_state as ps

        start = ps.get_tensor_model_parallel_rank() * rows
        if rows * ps.get_tensor_model_parallel_world_size() != total:
            raise ValueError(f"hidden states have {rows} rows; the sequence has {total}")
        return self.mask[start:start + rows], self.index[start:start + rows]

    def _spread(self, hidden: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask, index = self._local(hidden.shape[0])
        mask, index = mask.to(hidden.device), index.to(hidden.device)
        spread = features.to(hidden.dtype)[index]  # [rows, b, h]; the gather's backward sums into features
        return mask[..., None], spread

    def replace(self, hidden: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The token embeddings with the image features in place of the image-pad embeddings."""
        mask, spread = self._spread(hidden, features)
        return torch.where(mask, spread, hidden)

    def add(self, hidden: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Deepstack: the hidden states plus the features at the image-pad positions."""
        mask, spread = self._spread(hidden, features)
        return hidden + torch.where(mask, spread, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
