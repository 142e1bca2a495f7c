"""Discriminator warm-up pairs (spec section 2): teacher vs student segments for the pairwise BT loss.

Each JSON line holds `prompt` (or `question`), optional `image`, and `teacher_caption`, `teacher_cot`,
`student_caption`, `student_cot`. It becomes two comparisons scored separately by the discriminator:
the captions (perception stream) and the cots (reasoning stream). A line with only
`teacher_response` / `student_response` gives one whole-response comparison. A line missing a field
is skipped and counted, as in the original.

With `images=ImageProcessor` (the discriminator takes images) a line's `image` is read and checked: a missing,
undecodable or too large one skips the line, counted by reason (data/images.py); the user turn is then
(image, prompt) as in the original (or the image takes the place of an `<image>` placeholder in the prompt), and
a file in which no line has an `image` is a DataError. Relative paths are read against `image_base_path` (the
original's IMAGE_BASE_PATH), by default the file's directory.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prism_mcore.data.errors import DataError
from prism_mcore.data.images import IMAGE_MISSING, ImageError, ImageProcessor, ImageSource
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

    prompt_messages: list[dict[str, Any]]  # with images: the user turn's image part carries its ImageSource
    chosen: str
    rejected: str
    stream: str  # one of STREAMS
    image: str | None = None  # the line's `image` path or URL (base path applied), as written
    line: int = 0  # 1-based line in the source file, for error reports
    images: list[ImageSource] = field(default_factory=list)  # checked, when loaded with an ImageProcessor


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


def _user_turn(prompt: str, raw_image: Any, images: ImageProcessor, base_dir: str | None
               ) -> tuple[dict | None, list[ImageSource], str | None]:
    """(user message, its images, None) or (None, [], reason)."""
    from prism_mcore.data.multimodal import PLACEHOLDER, with_image_parts

    if raw_image is None or raw_image == "":
        if PLACEHOLDER in prompt:
            return None, [], "image_count_mismatch"
        return {"role": "user", "content": prompt}, [], None
    if not isinstance(raw_image, (str, dict)):
        return None, [], IMAGE_MISSING
    try:
        source = images.load(raw_image, base_dir)
        text = prompt if PLACEHOLDER in prompt else PLACEHOLDER + prompt  # the original: (image, prompt)
        user = with_image_parts([{"role": "user", "content": text}], [source])[0]
    except ImageError as e:
        return None, [], e.reason
    return user, [source], None


def pairs_from_record(record: Any, system_prompt: str = SYSTEM_PROMPT, image_base_path: str | None = None,
                      line: int = 0, images: ImageProcessor | None = None, base_dir: str | None = None
                      ) -> tuple[list[PairExample], str | None]:
    """(pairs, None) for a usable record, else ([], reason). The system turn is the record's `system` when it
    has one ("" = none), else `system_prompt`. With `images`, the line's image is checked and put in the user
    turn; relative paths are read against `image_base_path`, else `base_dir`."""
    if not isinstance(record, dict):
        return [], "not_an_object"
    prompt = _text(record, "prompt") or _text(record, "question")
    if prompt is None:
        return [], "missing_prompt"
    image = _resolve_image(record.get("image"), image_base_path)
    seg = {k: _text(record, k) for k in SEGMENT_FIELDS}
    whole = {k: _text(record, k) for k in RESPONSE_FIELDS}
    if None in seg.values() and None in whole.values():
        return [], "missing_field"  # before reading the image
    user, sources = {"role": "user", "content": prompt}, []
    if images is not None:
        raw = record.get("image")
        user, sources, reason = _user_turn(prompt, image if isinstance(raw, str) else raw, images,
                                           None if image_base_path else base_dir)
        if user is None:
            return [], reason
    # a line's own "system" (as LLaMA-Factory records carry it) wins; "" means no system turn at all
    system = record.get("system", system_prompt)
    if not isinstance(system, str):
        return [], "bad_system"
    messages = ([{"role": "system", "content": system}] if system else []) + [user]
    if None not in seg.values():
        return [PairExample(messages, seg["teacher_caption"], seg["student_caption"], "perception", image, line,
                            sources),
                PairExample(messages, seg["teacher_cot"], seg["student_cot"], "reasoning", image, line,
                            sources)], None
    return [PairExample(messages, whole["teacher_response"], whole["student_response"], "response",
                        image, line, sources)], None


def load_warmup_pairs(path: str | os.PathLike, system_prompt: str = SYSTEM_PROMPT,
                      image_base_path: str | None = None, images: ImageProcessor | None = None
                      ) -> tuple[list[PairExample], Counter]:
    """All comparisons in the file, in line order, and a Counter of skipped lines by reason.
    `image_base_path` (the original's IMAGE_BASE_PATH) is prepended to relative image paths; with `images`
    they are read (relative ones against the file's directory when no base path is given)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: warm-up pairs file not found")
    pairs: list[PairExample] = []
    skipped: Counter = Counter()
    with_image = 0
    for lineno, record, reason in read_jsonl(path):  # a line with invalid UTF-8 or JSON is skipped, counted
        if reason is None:
            with_image += isinstance(record, dict) and "image" in record
            found, reason = pairs_from_record(record, system_prompt, image_base_path, lineno, images,
                                              str(path.parent))
            pairs.extend(found)
        if reason:
            skipped[reason] += 1
    if images is not None and not with_image:
        raise DataError(f"{path}: no line has an 'image' field, but the discriminator takes images (model.vision)")
    if not pairs:
        raise DataError(f"{path}: no usable pair: each line needs prompt and "
                        f"{'/'.join(SEGMENT_FIELDS)} (or {'/'.join(RESPONSE_FIELDS)}); skipped: {dict(skipped)}")
    if skipped:
        logger.warning("%s: skipped %d lines: %s", path, sum(skipped.values()), dict(skipped))
    return pairs, skipped
