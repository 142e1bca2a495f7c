"""The PRISM discriminator: a Megatron backbone of any family (built through its model spec, models/spec.py:
Qwen3(-MoE), Qwen3-VL(-MoE)) plus a scalar value head (spec section 1).

`Discriminator.forward(input_ids, attention_mask, packed_seq_lengths, pixel_values=None, image_grid_thw=None,
position_ids=None)` returns one float32 score per token, [b, s], on the last pipeline stage (earlier stages
return their hidden states, [s, b, h], for the pipeline schedule). `sequence_scores` reads each sequence's
score at its own last valid token.

Conventions (checked against megatron-core 0.16.1):
  * Every token is rotated by its position within its own sequence (restarting at 0 for each packed
    sequence), so a left-padded row sees the same positions as the same row right-padded or packed. The
    spec computes them (`forward_inputs`): per-token positions [b, s] for Qwen3 (whose backbone the spec
    builds with a rotary that honours them), 3-D MRoPE positions [3, b, s] from the image grids for
    Qwen3-VL (`rope_index_packed`); the images go to the backbone with them.
  * The attention mask is boolean [b, 1, s, s], True = masked, causal AND same-sequence AND valid-key,
    with the diagonal always open so pad queries (whose keys are all masked) cannot produce NaN.
    The local DotProductAttention honours a given mask in its torch softmax (CPU), but with
    AttnMaskType.causal its fused CUDA softmax ignores it, and TE's "causal" type takes no mask; so
    every attention is switched to AttnMaskType.arbitrary, making our mask the whole truth on every
    backend (the GPU paths are untested here).
  * GPTModel's output layer is replaced by a parameter-free module that hands the final (normed)
    hidden states through, all-gathered along the sequence under sequence parallelism; GPTModel then
    returns them as [b, s, h] (it transposes when labels is None). The head runs here, in float32.

The value head is replicated on every TP rank (same seeded init, same dropout masks), so the gather's
backward just keeps this rank's slice (tensor_parallel_output_grad=False): every rank already holds
the full gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from prism_mcore.models.segments import (PackedLengths, packed_lengths_per_row, segment_attention_mask,  # noqa: F401
                                         segment_ids, segment_positions)

HF_VALUE_HEAD_NAME = "score.weight"  # the head's name in exported HF checkpoints, shape [1, hidden]
VALUE_HEAD_KEY = "value_head.weight"  # its key in our (sharded) state dicts
HEAD_INIT_STD = 0.02


# --------------------------------------------------------------------------------------------
# Masks, positions and the readout (plain torch: usable without Megatron)
# --------------------------------------------------------------------------------------------

def positions_and_mask(seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token positions [b, s] (index within its own sequence, pads 0 or repeating the last valid
    position) and the boolean attention mask [b, 1, s, s] with True = masked."""
    return segment_positions(seg), segment_attention_mask(seg)


def last_token_index(attention_mask: torch.Tensor | None = None, packed_seq_lengths: PackedLengths = None,
                     shape: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of every sequence's last valid token, row-major and in packing order."""
    if packed_seq_lengths is not None:
        b = shape[0] if shape is not None else attention_mask.shape[0]
        rows, cols = [], []
        for r, lengths in enumerate(packed_lengths_per_row(packed_seq_lengths, b)):
            ends = torch.tensor(lengths).cumsum(0) - 1
            rows.append(torch.full_like(ends, r))
            cols.append(ends)
        return torch.cat(rows), torch.cat(cols)
    if attention_mask is None:
        b, s = shape
        return torch.arange(b), torch.full((b,), s - 1, dtype=torch.long)
    valid = attention_mask != 0
    if not bool(valid.any(1).all()):
        raise ValueError("a row of attention_mask has no valid token")
    s = valid.shape[1]
    # the last valid column of each row, whatever side (or sides) the padding is on
    last = s - 1 - valid.flip(1).long().argmax(1)
    return torch.arange(valid.shape[0], device=last.device), last


def sequence_scores(token_scores: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    packed_seq_lengths: PackedLengths = None) -> torch.Tensor:
    """[num_sequences] scores read at each sequence's own last valid token (per row, any padding mix)."""
    rows, cols = last_token_index(attention_mask, packed_seq_lengths, tuple(token_scores.shape))
    return token_scores[rows.to(token_scores.device), cols.to(token_scores.device)]


# --------------------------------------------------------------------------------------------
# The Megatron model
# --------------------------------------------------------------------------------------------

class ReplicatedDropout(torch.nn.Module):
    """Inverted dropout whose masks agree on all ranks replicating the head (the TP group): it draws
    from a private generator seeded alike there, not from the global RNG, whose state Megatron's
    seeding leaves different per TP rank on CPU (its deferred CUDA-RNG restores never run)."""

    def __init__(self, p: float, seed: int):
        super().__init__()
        self.p, self.seed = p, seed
        self._generator: torch.Generator | None = None

    def reseed(self, step: int) -> None:
        """Masks as a function of (seed, step), so a run resumed at a step draws what it would have drawn."""
        self._step, self._generator = step, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self._generator is None or self._generator.device != x.device:
            step = getattr(self, "_step", None)
            seed = self.seed if step is None else self.seed * 1_000_003 + step
            self._generator = torch.Generator(x.device).manual_seed(seed)
        keep = torch.rand(x.shape, generator=self._generator, device=x.device) >= self.p
        return x * keep / (1 - self.p)


class _FinalHidden(torch.nn.Module):
    """Stands in for GPTModel.output_layer: no LM head, just the final hidden states, whole along the
    sequence. `sequence_parallel` mirrors ColumnParallelLinear's flag, which GPTModel may toggle."""

    def __init__(self, sequence_parallel: bool, tp_group):
        super().__init__()
        self.sequence_parallel = sequence_parallel
        self.tp_group = tp_group

    def forward(self, hidden_states, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False, group=self.tp_group)
        return hidden_states, None


class Discriminator(torch.nn.Module):
    """A GPTModel pipeline stage with its LM head replaced by Dropout -> Linear(hidden, 1, bias=False).

    Megatron's schedules and grad finalization look model attributes up through `.module` chains
    (`get_attr_wrapped_model`); `module` is therefore the backbone, so `model_type`, `vp_stage`, ...
    resolve there while `config` and `set_input_tensor` resolve here. `sharded_state_dict` gives the
    backbone exactly a GPTModel's keys, plus `value_head.weight`."""

    def __init__(self, backbone: torch.nn.Module, head_dropout: float = 0.1, seed: int = 42):
        super().__init__()
        from megatron.core import parallel_state
        from megatron.core.transformer.enums import AttnMaskType

        if backbone.share_embeddings_and_output_weights:
            raise ValueError("build the backbone with untied embeddings: the LM head is replaced")
        if backbone.config.context_parallel_size > 1:
            raise NotImplementedError("context parallelism (the rotary positions are not CP-sliced)")
        self.backbone = backbone
        self.config = backbone.config
        self.pre_process = backbone.pre_process
        self.post_process = backbone.post_process

        from prism_mcore.models.spec import spec_of

        self.spec, self.arch = spec_of(backbone)
        for module in backbone.modules():
            if getattr(module, "attn_mask_type", None) == AttnMaskType.causal:
                module.attn_mask_type = AttnMaskType.arbitrary

        self.value_head = None
        if self.post_process:
            backbone.output_layer = _FinalHidden(self.config.sequence_parallel, backbone.pg_collection.tp)
            device = next(backbone.parameters()).device
            # fresh masks per data-parallel replica, identical across the TP ranks of one replica
            dropout_seed = seed + 7919 * (1 + parallel_state.get_data_parallel_rank())
            self.head_dropout = ReplicatedDropout(head_dropout, dropout_seed)
            self.value_head = torch.nn.Linear(self.config.hidden_size, 1, bias=False, device=device,
                                              dtype=torch.float32)
            self.reset_head(seed)

    @torch.no_grad()
    def reset_head(self, seed: int) -> None:
        """N(0, 0.02^2) from a private generator: the same weights on every rank, whatever RNG state."""
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(self.value_head.weight.shape, generator=g, dtype=torch.float32) * HEAD_INIT_STD
        self.value_head.weight.copy_(w)

    @property
    def module(self) -> torch.nn.Module:
        return self.backbone

    def set_input_tensor(self, input_tensor) -> None:
        self.backbone.set_input_tensor(input_tensor)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                packed_seq_lengths: PackedLengths = None, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        seg = segment_ids(tuple(input_ids.shape), attention_mask, packed_seq_lengths, device=input_ids.device)
        positions, extra = self.spec.forward_inputs(self.arch, input_ids, attention_mask, position_ids,
                                                    packed_seq_lengths, pixel_values, image_grid_thw)
        length = input_ids.shape[1]
        tp = self.config.tensor_model_parallel_size
        if self.config.sequence_parallel and length % tp:
            # SP splits the sequence over TP ranks: right-pad with segment 0 (padding), sliced off below
            extra_cols = tp - length % tp
            input_ids = F.pad(input_ids, (0, extra_cols))
            seg = F.pad(seg, (0, extra_cols))
            positions = F.pad(positions, (0, extra_cols))
        mask = segment_attention_mask(seg)
        if self.config.num_moe_experts:
            extra["padding_mask"] = self._padding_mask(seg == 0)  # keeps pads out of the aux loss
        out = self.backbone(input_ids, positions, mask, **extra)
        if not self.post_process:
            return out  # hidden states for the next pipeline stage
        hidden = self.head_dropout(out.float())  # [b, s, h]; fp32 even when the backbone runs in bf16
        return F.linear(hidden, self.value_head.weight.float()).squeeze(-1)[:, :length]

    def _padding_mask(self, pads: torch.Tensor) -> torch.Tensor:
        # GPTModel splits the padding mask along the sequence for SP only on the first stage.
        if self.config.sequence_parallel and not self.pre_process:
            from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

            pads = scatter_to_sequence_parallel_region(pads.t().contiguous()).t().contiguous()
        return pads

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        from megatron.core.transformer.module import MegatronModule

        # LanguageModule's version insists on the LM head's `output_layer.weight`; the generic one gives
        # the backbone exactly the keys of a GPTModel (nothing here is tied or has extra state).
        state = MegatronModule.sharded_state_dict(self.backbone, prefix, sharded_offsets, metadata)
        # Checkpoint keys stay those of a plain GPTModel; the dict keys follow this module's structure
        # so that `load_state_dict` on the loaded dict finds them.
        state = {f"{prefix}backbone.{k[len(prefix):]}" if k.startswith(prefix) else k: v for k, v in state.items()}
        if self.value_head is not None:
            from megatron.core import parallel_state as ps
            from megatron.core.dist_checkpointing.mapping import ShardedTensor

            # Replicated over TP and DP: exactly one rank (TP 0, DP 0) owns the saved copy.
            replica = (0, ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(with_context_parallel=True))
            key = f"{prefix}{VALUE_HEAD_KEY}"
            state[key] = ShardedTensor.from_rank_offsets(key, self.value_head.weight, replica_id=replica)
        return state


def build_discriminator(model_cfg, parallel_cfg, head_dropout: float = 0.1, seed: int = 42) -> Discriminator:
    """The local pipeline stage of the discriminator; call after `init_model_parallel`. The backbone is the
    model family's (models/spec.py), built with untied embeddings so the last stage holds no LM head (it is
    replaced by the value head)."""
    from prism_mcore.models.spec import resolve

    spec, arch = resolve(model_cfg)
    return Discriminator(spec.build(arch, parallel_cfg, discriminator=True), head_dropout=head_dropout, seed=seed)
