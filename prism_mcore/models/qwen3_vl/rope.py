"""Qwen3-VL's 3-D text positions (the `get_rope_index` rule, images only) and its interleaved MRoPE.

Positions: every token gets a (t, h, w) triple. Text tokens count up on all three axes alike. An
image of LLM grid (t, h, w) (= patch grid / spatial merge) occupies t*h*w consecutive image-pad tokens
whose positions are start + (i_t, i_h, i_w) in (t, h, w) raster order; the text after it resumes at
start + max(h, w) (transformers adds max(H, W) // merge, not t*h*w). Padding (attention_mask 0) is
skipped when counting and gets position 0 on every axis, as transformers leaves it.

Rotary: frequency j of the head_dim/2 takes its angle from axis H when j % 3 == 1 and j < 3*section[1],
from W when j % 3 == 2 and j < 3*section[2], from T otherwise (Qwen3-VL's interleaved layout;
Megatron 0.16's MultimodalRotaryEmbedding implements only Qwen2-VL's contiguous sections).
"""
from __future__ import annotations

import torch


def _image_positions(start: int, t: int, h: int, w: int) -> torch.Tensor:
    grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
    return grid.reshape(3, -1) + start


class _Images:
    """The batch's image grids, consumed in order as image tokens are met."""

    def __init__(self, image_grid_thw: torch.Tensor | None):
        self.grids = [] if image_grid_thw is None else [tuple(int(x) for x in g) for g in image_grid_thw.tolist()]
        self.used = 0

    def take(self, where: str) -> tuple[int, int, int]:
        if self.used >= len(self.grids):
            raise ValueError(f"{where}: more images in input_ids than image_grid_thw lists ({len(self.grids)})")
        self.used += 1
        return self.grids[self.used - 1]

    def check_all_used(self) -> None:
        if self.used != len(self.grids):
            raise ValueError(f"image_grid_thw lists {len(self.grids)} images, input_ids hold {self.used}")


def _sequence_positions(ids: list[int], images: _Images, m: int, image_token_id: int,
                        vision_start_token_id: int | None, where: str) -> torch.Tensor:
    """[3, len(ids)] positions of one sequence (no padding inside), counting from 0."""
    if not ids:
        raise ValueError(f"{where} has no valid token")
    pieces, pos, i = [], 0, 0
    while i < len(ids):
        if ids[i] != image_token_id:
            j = i
            while j < len(ids) and ids[j] != image_token_id:
                j += 1
            pieces.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos += j - i
            i = j
            continue
        index = images.used
        t, h, w = images.take(where)
        if h % m or w % m:
            raise ValueError(f"image {index}: grid {(t, h, w)} is not divisible by the merge size {m}")
        n = t * (h // m) * (w // m)
        if ids[i:i + n] != [image_token_id] * n:
            raise ValueError(f"{where}: image {index} of grid {(t, h, w)} needs {n} consecutive image tokens "
                             f"at valid position {i}")
        if vision_start_token_id is not None and (i == 0 or ids[i - 1] != vision_start_token_id):
            raise ValueError(f"{where}: image {index} does not follow a vision-start token")
        pieces.append(_image_positions(pos, t, h // m, w // m))
        pos += max(h, w) // m
        i += n
    return torch.cat(pieces, dim=1)


def rope_index(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, attention_mask: torch.Tensor | None,
               spatial_merge_size: int, image_token_id: int, vision_start_token_id: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids [3, B, S], deltas [B, 1]) for a batch of token rows; `image_grid_thw` [N, 3] lists
    the patch grids of all images of the batch in row-major (row, then position) order.

    deltas[b] = max position + 1 - number of valid tokens: what generation adds to a plain
    arange to continue row b (transformers' `rope_deltas`). With `vision_start_token_id`, every image
    must follow a vision-start token (a misplaced image pad then fails here, not silently)."""
    b, s = input_ids.shape
    ids_cpu = input_ids.detach().cpu()
    valid_rows = torch.ones(b, s, dtype=torch.bool) if attention_mask is None else attention_mask.detach().cpu().bool()
    images = _Images(image_grid_thw)
    position_ids = torch.zeros(3, b, s, dtype=torch.long)
    deltas = torch.zeros(b, 1, dtype=torch.long)
    for row in range(b):
        valid = valid_rows[row]
        ids = ids_cpu[row][valid].tolist()
        positions = _sequence_positions(ids, images, spatial_merge_size, image_token_id, vision_start_token_id,
                                        f"row {row}")
        position_ids[:, row, valid] = positions
        deltas[row, 0] = int(positions.max()) + 1 - len(ids)
    images.check_all_used()
    return position_ids.to(input_ids.device), deltas.to(input_ids.device)


def rope_index_packed(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, segment_ids: torch.Tensor,
                      spatial_merge_size: int, image_token_id: int, vision_start_token_id: int | None = None
                      ) -> torch.Tensor:
    """position_ids [3, B, S] for rows packing several sequences: `segment_ids` [B, S] is 0 on padding and
    k >= 1 on the k-th sequence of the row (contiguous). Each sequence counts from 0 as if it stood alone
    (what rope_index gives it in a row of its own); padding gets 0."""
    b, s = input_ids.shape
    ids_cpu, seg = input_ids.detach().cpu(), segment_ids.detach().cpu()
    images = _Images(image_grid_thw)
    position_ids = torch.zeros(3, b, s, dtype=torch.long)
    for row in range(b):
        for k in sorted(set(seg[row].tolist()) - {0}):
            cols = (seg[row] == k).nonzero().flatten()
            if int(cols[-1] - cols[0]) + 1 != len(cols):
                raise ValueError(f"row {row}: sequence {k} is not contiguous")
            position_ids[:, row, cols] = _sequence_positions(ids_cpu[row, cols].tolist(), images, spatial_merge_size,
                                                             image_token_id, vision_start_token_id,
                                                             f"row {row} sequence {k}")
    images.check_all_used()
    return position_ids.to(input_ids.device)


def text_positions(input_ids: torch.Tensor) -> torch.Tensor:
    """[3, B, S] positions of text-only rows without padding: 0..S-1 on every axis."""
    b, s = input_ids.shape
    return torch.arange(s, device=input_ids.device).expand(3, b, s)


def interleave_axes(freqs: torch.Tensor, section: tuple[int, int, int]) -> torch.Tensor:
    """[3, ..., d/2] per-axis angles -> [..., d/2] in Qwen3-VL's interleaved layout."""
    out = freqs[0].clone()
    for axis in (1, 2):
        idx = slice(axis, 3 * section[axis], 3)
        out[..., idx] = freqs[axis][..., idx]
    return out


class InterleavedMRoPE(torch.nn.Module):
    """Stands in for GPTModel.rotary_pos_emb when position_embedding_type is 'mrope': GPTModel calls it
    as `rotary(position_ids [3, b, s], mrope_section, cp_group=...)` and expects the angles
    [s, b, 1, head_dim] (non-interleaved rotate-half halves, as Megatron applies them)."""

    def __init__(self, head_dim: int, theta: float, section: tuple[int, int, int]):
        super().__init__()
        if sum(section) != head_dim // 2:
            raise ValueError(f"mrope section {section} must add up to head_dim/2 = {head_dim // 2}")
        self.section = tuple(section)
        # Same expression as transformers' default rope init, so the angles agree to the last bit.
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, mrope_section=None, cp_group=None) -> torch.Tensor:
        if position_ids.dim() != 3 or position_ids.shape[0] != 3:
            raise ValueError(f"Qwen3-VL needs position_ids [3, b, s]; got {tuple(position_ids.shape)}")
        if cp_group is not None and cp_group.size() > 1:
            raise NotImplementedError("context parallelism with MRoPE")
        freqs = position_ids.float()[..., None] * self.inv_freq.to(position_ids.device)  # [3, b, s, d/2]
        angles = interleave_axes(freqs, self.section)
        emb = torch.cat((angles, angles), dim=-1)  # [b, s, d]
        return emb.transpose(0, 1)[:, :, None, :].contiguous()
