"""Split a response's token ids into the perception segment (caption) and the reasoning segment
(think + answer, through the generated EOS), at token boundaries.

The boundary is the smallest token prefix whose decoded text (special tokens skipped) contains the
perception block's closing tag, as in the original. Byte-level BPE tokens can merge the tag with
the next characters (`>\\n` is one Qwen token), so the boundary cannot be found by re-tokenising
the text; prefixes are decoded instead. Because "the prefix contains the tag" is monotone in the
prefix length, a galloping search finds it in O(log k) decodes of at most 2k tokens, where k is the
caption length, instead of the original's k decodes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from prism_mcore.algorithms.response_format import ResponseFormat, get_format


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass(frozen=True)
class SegmentSplit:
    """Half-open token spans into the response ids. `valid` is format validity F(y); for invalid
    responses the spans are a best-effort split (after the caption's closing tag if it exists, else
    half/half like the original) so that every sample still yields two scoring passes. Formats
    without a perception block give an empty caption span and the whole response as reasoning."""

    valid: bool
    caption: tuple[int, int]
    reasoning: tuple[int, int]
    text: str
    answer: str | None


def _first_prefix_containing(ids: Sequence[int], decoder: Decoder, tag: str, char_pos: int) -> int:
    """Smallest k such that decode(ids[:k]) has `tag` at `char_pos` (the full decode has it)."""

    def has_tag(k: int) -> bool:
        return decoder.decode(list(ids[:k]), skip_special_tokens=True).startswith(tag, char_pos)

    n, hi = len(ids), 1
    while hi < n and not has_tag(hi):
        hi *= 2
    hi = min(hi, n)
    lo = hi // 2  # has_tag(lo) is False (or lo == 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if has_tag(mid):
            hi = mid
        else:
            lo = mid
    return hi


def split_response(ids: Sequence[int], decoder: Decoder, fmt: str | ResponseFormat | None = None) -> SegmentSplit:
    """`ids` are the response's valid tokens (padding removed, generated EOS kept)."""
    fmt = get_format(fmt)
    ids = [int(i) for i in ids]
    n = len(ids)
    text = decoder.decode(ids, skip_special_tokens=True)
    parsed = fmt.parse(text)
    tag = fmt.perception_close
    if tag is None:
        return SegmentSplit(parsed.valid, (0, 0), (0, n), text, parsed.answer)
    if parsed.valid:
        tag_pos = parsed.perception_end - len(tag)
    else:
        tag_pos = text.find(tag)
    boundary = _first_prefix_containing(ids, decoder, tag, tag_pos) if tag_pos >= 0 else n // 2
    if not parsed.valid and boundary >= n:
        boundary = n // 2  # keep a non-empty reasoning pass for malformed output ending in the tag
    return SegmentSplit(parsed.valid, (0, boundary), (boundary, n), text, parsed.answer)


def split_batch(response_ids: torch.Tensor, response_mask: torch.Tensor, decoder: Decoder,
                fmt: str | ResponseFormat | None = None) -> list[SegmentSplit]:
    """response_ids, response_mask: [B, T] right-padded responses."""
    lengths = response_mask.to(torch.long).sum(-1).tolist()
    rows = response_ids.tolist()
    return [split_response(row[:length], decoder, fmt) for row, length in zip(rows, lengths)]


def segment_masks(splits: Sequence[SegmentSplit], width: int,
                  device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(caption_mask [B, width], reasoning_mask [B, width], valid [B]) as bool tensors."""
    pos = torch.arange(width, device=device)
    cap = torch.tensor([s.caption for s in splits], dtype=torch.long, device=device).view(-1, 2)
    rea = torch.tensor([s.reasoning for s in splits], dtype=torch.long, device=device).view(-1, 2)
    caption_mask = (pos >= cap[:, :1]) & (pos < cap[:, 1:])
    reasoning_mask = (pos >= rea[:, :1]) & (pos < rea[:, 1:])
    valid = torch.tensor([s.valid for s in splits], dtype=torch.bool, device=device)
    return caption_mask, reasoning_mask, valid


def with_terminator(ids: Sequence[int], terminator_id: int, strip_ids: Sequence[int] = ()) -> list[int]:
    """Segment ids that end in exactly one `terminator_id`, so the discriminator reads every score
    (teacher or student, caption or reasoning) at the same kind of token. Trailing ids in
    `strip_ids` (EOS, pad) are dropped first; an empty segment becomes just the terminator."""
    out = [int(i) for i in ids]
    drop = set(int(i) for i in strip_ids) | {int(terminator_id)}
    while out and out[-1] in drop:
        out.pop()
    return out + [int(terminator_id)]
