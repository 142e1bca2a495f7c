"""RoPE at per-token positions for a Qwen3 GPTModel (the discriminator's backbone).

Megatron 0.16's RotaryEmbedding rotates by sequence index 0..s-1 and ignores `position_ids`. Packed rows
and left padding need each token's own position (restarting at 0 for each packed sequence), so this
module stands in for `GPTModel.rotary_pos_emb` and takes the positions the model was called with: a
forward pre-hook on the model stores `position_ids` [b, s] for the call, a forward hook clears them.
"""
from __future__ import annotations

import torch


class PositionalRotary(torch.nn.Module):
    """Stands in for GPTModel.rotary_pos_emb: RoPE at the positions set for the current forward."""

    def __init__(self, rope: torch.nn.Module):
        super().__init__()
        if rope.rotary_interleaved or rope.seq_len_interpolation_factor is not None:
            raise NotImplementedError("interleaved / interpolated RoPE")
        self.rope = rope
        self.positions: torch.Tensor | None = None  # [b, s], set for the duration of one model call

    def get_rotary_seq_len(self, *args, **kwargs) -> int:
        return self.rope.get_rotary_seq_len(*args, **kwargs)

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None) -> torch.Tensor:
        if self.positions is None or self.positions.shape[1] != max_seq_len or offset or packed_seq:
            raise RuntimeError("rotary positions not set for this forward (call the model with position_ids [b, s])")
        inv_freq = self.rope.inv_freq.to(self.positions.device, torch.float32)
        freqs = self.positions.float()[..., None] * inv_freq  # [b, s, d/2], as HF computes it
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.transpose(0, 1)[:, :, None, :].contiguous()  # [s, b, 1, d]: broadcasts over heads


def use_positional_rotary(gpt) -> PositionalRotary:
    """Make `gpt(input_ids, position_ids [b, s], ...)` rotate every token by its own position."""
    rotary = PositionalRotary(gpt.rotary_pos_emb)
    gpt.rotary_pos_emb = rotary

    def before(module, args, kwargs):
        positions = args[1] if len(args) > 1 else kwargs.get("position_ids")
        if positions is None or positions.dim() != 2:
            raise ValueError("this model needs position_ids [b, s] (per-token rotary positions)")
        rotary.positions = positions

    def after(module, args, kwargs, output):
        rotary.positions = None

    gpt.register_forward_pre_hook(before, with_kwargs=True)
    gpt.register_forward_hook(after, with_kwargs=True, always_call=True)
    return rotary
