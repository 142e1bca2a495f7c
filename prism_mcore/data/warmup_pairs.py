"""Discriminator warm-up pairs (spec section 2): teacher vs student segments for the pairwise BT loss.

Each JSON line holds `prompt` (or `question`), optional `image`, and `teacher_caption`, `teacher_cot`,
`student_caption`, `student_cot`. It becomes two comparisons scored separately by the discriminator:
the captions (perception stream) and the cots (reasoning stream). A line with only
`teacher_response` / `student_response` gives one whole-response comparison. A line missing a field
is skipped and counted, as in the original.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prism_mcore.data.errors import DataError
from prism_mcore.data.jsonl import read_jsonl
from prism_mcore.data.synthetic import SYSTEM_PROMPT

logger = logging.getLogger(__name__)

SEGMENT_FIELDS = ("teacher_caption", "teacher_cot", "student_caption", "student_cot")
RESPONSE_FIELDS = ("teacher_response", "student_response")
STREAMS = ("perception", "reasoning", "response")


@dataclass
class PairExample:
    """`chosen` (teacher) should score above `rejected` (student) given the prompt. The discriminator
    input is the chat template of prompt_messages + [assistant: segment], turn closed."""

    prompt_messages: list[dict[str, str]]
    chosen: str
    rejected: str
    stream: str  # one of STREAMS
    image: str | None = None  # resolved path or URL, for the multimodal processor
    line: int = 0  # 1-based line in the source file, for error reports


def _text(record: dict, name: str) -> str | None:
    # The original skips a line when a field is absent or empty.
    value = record.get(name)
    return value if isinstance(value, str) and value.strip() else None


def _resolve_image(image: Any, base: str | None) -> str | None:
    if not isinstance(image, str) or not image:
        return None
    if base and "://" not in image and not os.path.isabs(image):
        return os.path.join(base, image)
    return image


def pairs_from_record(record: Any, system_prompt: str = SYSTEM_PROMPT, image_base_path: str | None = None,
                      line: int = 0) -> tuple[list[PairExample], str | None]:
    """(pairs, None) for a usable record, else ([], reason)."""
    if not isinstance(record, dict):
        return [], "not_an_object"
    prompt = _text(record, "prompt") or _text(record, "question")
    if prompt is None:
        return [], "missing_prompt"
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt}]
    image = _resolve_image(record.get("image"), image_base_path)
    seg = {k: _text(record, k) for k in SEGMENT_FIELDS}
    if None not in seg.values():
        return [PairExample(messages, seg["teacher_caption"], seg["student_caption"], "perception", image, line),
                PairExample(messages, seg["teacher_cot"], seg["student_cot"], "reasoning", image, line)], None
    whole = {k: _text(record, k) for k in RESPONSE_FIELDS}
    if None not in whole.values():
        return [PairExample(messages, whole["teacher_response"], whole["student_response"], "response",
                            image, line)], None
    return [], "missing_field"


def load_warmup_pairs(path: str | os.PathLike, system_prompt: str = SYSTEM_PROMPT,
                      image_base_path: str | None = None) -> tuple[list[PairExample], Counter]:
    """All comparisons in the file, in line order, and a Counter of skipped lines by reason.
    `image_base_path` (the original's IMAGE_BASE_PATH) is prepended to relative image paths."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: warm-up pairs file not found")
    pairs: list[PairExample] = []
    skipped: Counter = Counter()
    for lineno, record, reason in read_jsonl(path):  # a line with invalid UTF-8 or JSON is skipped, counted
        if reason is None:
            found, reason = pairs_from_record(record, system_prompt, image_base_path, lineno)
            pairs.extend(found)
        if reason:
            skipped[reason] += 1
    if not pairs:
        raise DataError(f"{path}: no usable pair: each line needs prompt and "
                        f"{'/'.join(SEGMENT_FIELDS)} (or {'/'.join(RESPONSE_FIELDS)}); skipped: {dict(skipped)}")
    if skipped:
        logger.warning("%s: skipped %d lines: %s", path, sum(skipped.values()), dict(skipped))
    return pairs, skipped
