"""The one batch type every stage trains on, and the collation that builds it from token rows.

A `Batch` holds B rows of one padded length S. Every per-row tensor has B as its first dimension, except
`position_ids` for multimodal rotary ([3, B, S]) and the image tensors, which are per image / per patch
and are sliced along with the rows that own them. Optional fields are None when a stage does not use
them. `rows(index)` selects rows (micro-batches, data-parallel shares), `pad_to` pads to a fixed shape
(pipeline stages exchange fixed-shape activations), `to(device)` moves every tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Sequence

import torch


@dataclass
class Batch:
    tokens: torch.Tensor                                # [B, S] input token ids
    attention_mask: torch.Tensor                        # [B, S] 1 = a real token, 0 = padding
    labels: torch.Tensor | None = None                  # [B, S] next-token targets (policy stages)
    loss_mask: torch.Tensor | None = None               # [B, S] float, 1 = this target counts (assistant / response)
    position_ids: torch.Tensor | None = None            # [B, S], or [3, B, S] for multimodal rotary
    packed_seq_lengths: list[list[int]] | None = None   # per row, lengths of the sequences packed in it
    pixel_values: torch.Tensor | None = None            # [num_patches, patch_dim], images in row order
    image_grid_thw: torch.Tensor | None = None          # [num_images, 3] long: (t, h, w) patches per image
    images_per_row: torch.Tensor | None = None          # [B] long
    rollout_logprobs: torch.Tensor | None = None        # [B, S] the engine's log-probs of the sampled tokens
    old_logprobs: torch.Tensor | None = None            # [B, S] the policy's before this step's first update
    advantages: torch.Tensor | None = None              # [B, S] per token
    index: torch.Tensor | None = None                   # [B] long: each row's index in the step's full batch
    unit: torch.Tensor | None = None                    # [B] long: rows of one unit stay in one micro-batch
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # stage-specific per-row tensors [B, ...]

    # ---- shape -------------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def length(self) -> int:
        return self.tokens.shape[1]

    def row_lengths(self) -> torch.Tensor:
        """[B] tokens per row up to its last real one (the padded length a row needs)."""
        valid = self.attention_mask != 0
        last = valid.shape[1] - valid.flip(1).long().argmax(1)
        return torch.where(valid.any(1), last, torch.zeros_like(last))

    # ---- moving and slicing ------------------------------------------------------------------
    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        def move(value):
            if torch.is_tensor(value):
                return value.to(device, non_blocking=non_blocking)
            if isinstance(value, dict):
                return {k: move(v) for k, v in value.items()}
            return value

        return replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def rows(self, index: Sequence[int] | torch.Tensor) -> "Batch":
        """These rows (in this order), with their images and image patches."""
        idx = torch.as_tensor(index, dtype=torch.long)
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or f.name in ("pixel_values", "image_grid_thw", "images_per_row"):
                continue
            if f.name == "position_ids" and value.dim() == 3:
                out[f.name] = value[:, idx]
            elif f.name == "packed_seq_lengths":
                out[f.name] = [value[i] for i in idx.tolist()]
            elif f.name == "extra":
                out[f.name] = {k: v[idx] for k, v in value.items()}
            else:
                out[f.name] = value[idx]
        out.setdefault("extra", {})
        if self.images_per_row is not None:
            out.update(self._image_rows(idx))
        return Batch(**out)

    def _image_rows(self, idx: torch.Tensor) -> dict:
        counts = self.images_per_row.long()
        first_image = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        patches = self.image_grid_thw.prod(-1)
        first_patch = torch.cat([patches.new_zeros(1), patches.cumsum(0)])
        images, spans = [], []
        for r in idx.tolist():
            lo, hi = int(first_image[r]), int(first_image[r + 1])
            images += range(lo, hi)
            spans.append((int(first_patch[lo]), int(first_patch[hi])))
        pixels = torch.cat([self.pixel_values[a:b] for a, b in spans]) if spans else self.pixel_values[:0]
        return {"pixel_values": pixels, "image_grid_thw": self.image_grid_thw[images], "images_per_row": counts[idx]}

    def trimmed(self, length: int) -> "Batch":
        """The first `length` columns (a micro-batch cut to its longest row)."""
        if length >= self.length:
            return self
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("tokens", "attention_mask", "labels", "loss_mask", "rollout_logprobs", "old_logprobs",
                          "advantages") and value is not None:
                value = value[:, :length]
            elif f.name == "position_ids" and value is not None:
                value = value[..., :length]
            out[f.name] = value
        return Batch(**out)

    def pad_to(self, num_rows: int, length: int, pad_id: int = 0) -> "Batch":
        """Right-pad to [num_rows, length]: extra columns and rows are padding (mask 0, no loss, no images)."""
        extra_rows, extra_cols = num_rows - self.num_rows, length - self.length
        if extra_rows < 0 or extra_cols < 0:
            raise ValueError(f"cannot pad a [{self.num_rows}, {self.length}] batch to [{num_rows}, {length}]")
        if not (extra_rows or extra_cols):
            return self

        def pad(value: torch.Tensor, fill, rows_dim: int = 0) -> torch.Tensor:
            if value.dim() - rows_dim < 2:  # per-row values: only new rows
                shape = list(value.shape)
                shape[rows_dim] = extra_rows
                return torch.cat([value, value.new_full(shape, fill)], dim=rows_dim)
            shape = list(value.shape)
            shape[rows_dim + 1] = extra_cols
            value = torch.cat([value, value.new_full(shape, fill)], dim=rows_dim + 1)
            shape = list(value.shape)
            shape[rows_dim] = extra_rows
            return torch.cat([value, value.new_full(shape, fill)], dim=rows_dim)

        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or f.name in ("pixel_values", "image_grid_thw", "packed_seq_lengths"):
                out[f.name] = value
            elif f.name == "tokens" or f.name == "labels":
                out[f.name] = pad(value, pad_id)
            elif f.name == "position_ids":
                out[f.name] = pad(value, 0, rows_dim=1 if value.dim() == 3 else 0)
            elif f.name in ("index", "unit"):
                out[f.name] = pad(value, -1)
            elif f.name == "extra":
                out[f.name] = {k: pad(v, 0) for k, v in value.items()}
            else:
                out[f.name] = pad(value, 0)
        if self.packed_seq_lengths is not None:
            out["packed_seq_lengths"] = self.packed_seq_lengths + [[1]] * extra_rows
        return Batch(**out)

    @staticmethod
    def placeholder(like: "Batch", pad_id: int = 0) -> "Batch":
        """One padding row shaped like `like`'s rows: what a data-parallel rank with fewer micro-batches than
        its peers runs, so that every rank takes part in the same collectives (MoE all-to-alls, TP). Its
        first token counts as real for the attention (a row with no real token has no last token to read)
        but nothing in it counts towards a loss."""
        empty = like.rows([]).trimmed(0)
        out = empty.pad_to(1, 1, pad_id)
        out.attention_mask[0, 0] = 1
        if out.packed_seq_lengths is not None:
            out.packed_seq_lengths = [[1]]
        return out


def right_padded(rows: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[len(rows), length] token ids right-padded with `pad_id`, and the 0/1 attention mask."""
    length = length or max((len(r) for r in rows), default=1)
    tokens = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return tokens, mask


def next_token_batch(rows: Sequence[Sequence[int]], target_masks: Sequence[Sequence[float]], pad_id: int,
                     **per_token: Sequence[Sequence[float]]) -> Batch:
    """Language-model rows: inputs are row[:-1], labels row[1:], `target_masks[i][t]` says whether label t
    counts. `per_token` values (e.g. rollout_logprobs) are aligned with the labels, like the masks."""
    length = max(max((len(r) for r in rows), default=2) - 1, 1)
    tokens, mask = right_padded([r[:-1] for r in rows], pad_id, length)
    labels, _ = right_padded([r[1:] for r in rows], pad_id, length)

    def aligned(values: Sequence[Sequence[float]]) -> torch.Tensor:
        out = torch.zeros(len(rows), length)
        for i, v in enumerate(values):
            out[i, : len(v)] = torch.tensor(list(v), dtype=torch.float32)
        return out

    return Batch(tokens=tokens, attention_mask=mask, labels=labels, loss_mask=aligned(target_masks),
                 **{name: aligned(values) for name, values in per_token.items()})
