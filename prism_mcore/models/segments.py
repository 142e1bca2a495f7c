"""Rows as sequences: segment ids from an attention mask or packed lengths, and each token's position
within its own sequence (plain torch, any family).

A row is right- or left-padded (one sequence where the mask is 1) or packs several sequences back to
back (`packed_seq_lengths`, per row; padding after them). Segment ids are 0 on padding and k >= 1 on the
k-th sequence of the row; a token's position counts from 0 at its sequence's first token, so a row has
the same positions whatever side its padding is on.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

# Per-row lists of packed sequence lengths, or cu_seqlens (0, l1, l1+l2, ...) of a single row.
PackedLengths = Union[Sequence[Sequence[int]], torch.Tensor, None]


def packed_lengths_per_row(packed_seq_lengths: PackedLengths, batch: int) -> list[list[int]]:
    if isinstance(packed_seq_lengths, torch.Tensor):
        cu = packed_seq_lengths.flatten().tolist()
        if batch != 1 or not cu or cu[0] != 0:
            raise ValueError("cu_seqlens must start at 0 and describe a single packed row (batch size 1)")
        rows = [[b - a for a, b in zip(cu[:-1], cu[1:])]]
    else:
        rows = [[int(n) for n in row] for row in packed_seq_lengths]
    if len(rows) != batch:
        raise ValueError(f"packed_seq_lengths has {len(rows)} rows, the batch has {batch}")
    if any(n <= 0 for row in rows for n in row):
        raise ValueError("packed sequence lengths must be positive")
    return rows


def segment_ids(shape: tuple[int, int], attention_mask: torch.Tensor | None = None,
                packed_seq_lengths: PackedLengths = None, device=None) -> torch.Tensor:
    """[b, s] long: 0 on padding, k >= 1 on the k-th sequence of the row. With packing the mask is not
    consulted (the lengths say everything); otherwise each row's valid tokens form one sequence."""
    b, s = shape
    if packed_seq_lengths is not None:
        seg = torch.zeros(b, s, dtype=torch.long)
        for r, lengths in enumerate(packed_lengths_per_row(packed_seq_lengths, b)):
            if sum(lengths) > s:
                raise ValueError(f"row {r}: packed lengths {lengths} exceed the row length {s}")
            seg[r, :sum(lengths)] = torch.repeat_interleave(torch.arange(1, len(lengths) + 1), torch.tensor(lengths))
        return seg.to(device)
    if attention_mask is None:
        return torch.ones(b, s, dtype=torch.long, device=device)
    return (attention_mask != 0).long().to(device)


def segment_positions(seg: torch.Tensor) -> torch.Tensor:
    """Per-token positions [b, s]: index within its own sequence (pads 0 or repeating the last valid
    position)."""
    b, s = seg.shape
    valid = seg > 0
    count = valid.long().cumsum(1)
    # each sequence starts counting at its first token; pads keep cumsum(mask) - 1, clamped at 0
    start = count.new_full((b, int(seg.max()) + 1), s).scatter_reduce(1, seg, count - 1, "amin")
    start[:, 0] = 0
    return (count - 1 - start.gather(1, seg)).clamp(min=0)


def segment_attention_mask(seg: torch.Tensor) -> torch.Tensor:
    """Boolean [b, 1, s, s], True = masked: causal AND same sequence AND valid key, with the diagonal always
    open so pad queries (whose keys are all masked) cannot produce NaN."""
    s = seg.shape[1]
    valid = seg > 0
    causal = torch.ones(s, s, dtype=torch.bool, device=seg.device).tril()
    allowed = causal & (seg[:, :, None] == seg[:, None, :]) & valid[:, None, :]
    allowed |= torch.eye(s, dtype=torch.bool, device=seg.device)
    return ~allowed[:, None]
