"""SFT chat data: read conversations, tokenize them with an assistant-only loss mask, pack and pad.

Accepted line formats (JSON Lines, or one JSON array of records):
- plain: `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`;
- LLaMA-Factory sharegpt: `{"conversations": [{"from": "human"|"gpt", "value": ...}], "system": ...}`,
  where the system prompt may also be a first `{"from": "system"}` turn.

Images (LLaMA-Factory's sharegpt multimodal): a record's `images` list (paths, relative ones against the
file's directory as LLaMA-Factory's media_dir, or HF-datasets {bytes, path} dicts) fills the `<image>`
placeholders of its string contents (or its `{"type": "image"}` parts) in order. They are read only when the
model takes images (`images=ImageProcessor`): then a row whose image is missing, undecodable or too large,
or whose placeholders and images differ in number, is skipped and counted by reason (data/images.py), and a
file in which no row has an `images` field is a DataError. Without a processor (a text model) the field is
ignored and the text kept as it is, as before images existed.

The loss covers each assistant turn's content and the `<|im_end|>` that closes it: that end token is
what teaches the model to stop. The `<|im_start|>assistant\\n` header, the newline after the end
token and all system/user turns are context only.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from prism_mcore.data.errors import DataError
from prism_mcore.data.images import ImageError, ImageProcessor, ImageSource
from prism_mcore.data.jsonl import first_char, read_jsonl
from prism_mcore.data.multimodal import (VisionTokens, count_image_parts, expand_image_pads, message_images,
                                         truncate_with_images, with_image_parts)

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
# LLaMA-Factory's default sharegpt tags. Tool turns (`observation`, `function_call`) are not used by
# PRISM, so a conversation with them is skipped rather than trained with a guessed role.
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


@dataclass
class SFTSample:
    input_ids: list[int]  # image pads expanded (one per LLM token of each image)
    loss_mask: list[int]  # 1 where the token is a training target
    images: list[ImageSource] = field(default_factory=list)  # in the order of their pads
    image_grid_thw: list[tuple[int, int, int]] = field(default_factory=list)  # one per image, in patches

    def __len__(self) -> int:
        return len(self.input_ids)


# ---- reading

def _content_ok(content: Any) -> bool:
    # A string, or a list of {"type": "text"|"image", ...} parts that the chat template renders.
    if isinstance(content, str):
        return True
    return isinstance(content, list) and all(isinstance(part, dict) and part.get("type") in ("text", "image")
                                             for part in content)


def normalize_record(record: Any) -> tuple[list[dict[str, Any]] | None, str | None]:
    """(messages, None) for a usable record, else (None, reason)."""
    if not isinstance(record, dict):
        return None, "not_an_object"
    if "messages" in record:
        raw = record["messages"]
        if not isinstance(raw, list):
            return None, "bad_messages"
        messages = []
        for m in raw:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                return None, "bad_message"
            messages.append({"role": m["role"], "content": m["content"]})
    elif "conversations" in record:
        raw = record["conversations"]
        if not isinstance(raw, list):
            return None, "bad_conversations"
        messages = []
        system = record.get("system")
        if system:
            if not isinstance(system, str):
                return None, "bad_system"
            messages.append({"role": "system", "content": system})
        for m in raw:
            if not isinstance(m, dict) or "from" not in m or "value" not in m:
                return None, "bad_message"
            role = SHAREGPT_ROLES.get(m["from"])
            if role is None:
                return None, "unknown_role"
            messages.append({"role": role, "content": m["value"]})
    else:
        return None, "no_messages"
    if any(m["role"] not in ROLES for m in messages):
        return None, "unknown_role"
    if any(not _content_ok(m["content"]) for m in messages):
        return None, "bad_content"
    if sum(m["role"] == "system" for m in messages) > 1 or any(m["role"] == "system" for m in messages[1:]):
        return None, "misplaced_system"
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        return None, "no_assistant"  # nothing to learn from
    return messages, None


def _records(path: Path) -> Iterable[tuple[int, Any, str | None]]:
    """(line number, record, parse error) for each line, or each item of a top-level JSON array. JSON Lines
    are decoded line by line, so a line with invalid UTF-8 is one skipped row (`invalid_utf8`); a JSON
    array is one document, so a bad byte or bracket in it is a DataError naming its line."""
    if first_char(path) != "[":
        yield from read_jsonl(path)
        return
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        items = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: line {line}: invalid UTF-8 in a JSON array (JSON Lines would skip just that "
                        f"line)") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno}: invalid JSON array ({e.msg})") from None
    except (ValueError, RecursionError) as e:
        raise DataError(f"{path}: invalid JSON array ({str(e).splitlines()[0][:200]})") from None
    for i, item in enumerate(items, 1):
        yield i, item, None


def record_images(record: dict, messages: list[dict], images: ImageProcessor, base_dir: str
                  ) -> tuple[list[dict] | None, str | None]:
    """(messages whose image parts carry their checked ImageSource, None), or (None, reason)."""
    raw = record.get("images")
    raw = [] if raw is None else raw
    if isinstance(raw, (str, dict)):  # one image given bare instead of in a list
        raw = [raw]
    if not isinstance(raw, list):
        return None, "bad_images"
    if count_image_parts(messages) != len(raw):  # before decoding anything
        return None, "image_count_mismatch"
    try:
        return with_image_parts(messages, [images.load(x, base_dir) for x in raw]), None
    except ImageError as e:
        return None, e.reason


def load_chat_jsonl(path: str | Path, images: ImageProcessor | None = None, image_base_path: str | None = None
                    ) -> tuple[list[list[dict[str, Any]]], Counter]:
    """All usable conversations and a Counter of skipped lines by reason. A file with no usable line is
    a DataError naming the file (usually the wrong file or the wrong format). With `images`, each record's
    images are checked and put into its messages (`{"type": "image", "image": ImageSource}` parts); relative
    paths are read against `image_base_path`, by default the file's directory."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: SFT file not found")
    base_dir = image_base_path or str(path.parent)
    conversations, skipped = [], Counter()
    first_bad, with_images, ignored_images = None, 0, 0
    for lineno, record, error in _records(path):
        messages, error = (None, error) if error else normalize_record(record)
        if messages is not None and isinstance(record, dict) and "images" in record:
            with_images += 1
            if images is not None:
                messages, error = record_images(record, messages, images, base_dir)
            elif record["images"]:
                ignored_images += 1
        if messages is None:
            skipped[error] += 1
            first_bad = first_bad or f"line {lineno}: {error}"
            continue
        conversations.append(messages)
    if images is not None and not with_images:
        raise DataError(f"{path}: no row has an 'images' field, but the model takes images (model.vision); "
                        f"for text-only chats train without images")
    if not conversations:
        detail = f"; first problem at {first_bad}" if first_bad else " (empty file)"
        raise DataError(f"{path}: no usable conversation: expected 'messages' or sharegpt 'conversations'{detail}")
    if ignored_images:
        logger.warning("%s: %d rows carry images, which a text model ignores (their <image> tags stay text)",
                       path, ignored_images)
    if skipped:
        logger.warning("%s: skipped %d malformed lines (first at %s): %s", path, sum(skipped.values()), first_bad,
                       dict(skipped))
    return conversations, skipped


# ---- tokenizing

def _render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_char_spans(messages: Sequence[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans to train on: for each assistant turn, from
    the end of its header to the end of its first end-of-turn token (eos). Spans come from rendering
    growing prefixes, so they follow whatever template the tokenizer carries, as long as rendering
    is prefix-stable (true of Qwen's template; checked here)."""
    text = _render(tokenizer, messages)
    eos = tokenizer.eos_token
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        header = _render(tokenizer, messages[:i], add_generation_prompt=True)
        turn = _render(tokenizer, messages[:i + 1])
        if not text.startswith(turn) or not turn.startswith(header):
            raise ValueError("chat template is not prefix-stable; cannot locate assistant turns")
        start = len(header)
        end = turn.find(eos, start) if eos else -1
        spans.append((start, end + len(eos) if end >= 0 else len(turn)))
    return text, spans


def tokenize_chat(messages: Sequence[dict], tokenizer, max_length: int, images: ImageProcessor | None = None,
                  tokens: VisionTokens | None = None) -> SFTSample:
    """Token ids exactly as `tokenizer.apply_chat_template(messages, tokenize=True)` gives them (the
    whole text is encoded at once, so no merge differs at turn boundaries), truncated to
    `max_length`. A token is a target when it starts inside an assistant span.

    With image parts (`load_chat_jsonl(..., images=)`), each image's pad is expanded to its LLM tokens (never
    targets), and truncation never cuts an image: images past the cut are dropped with their tokens. Raises
    ImageError (image_count_mismatch) when the text holds image pads that no image fills."""
    text, spans = assistant_char_spans(messages, tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask, j = [], 0
    for start, _end in offsets:  # offsets and spans are both increasing: one merge-like pass
        while j < len(spans) and start >= spans[j][1]:
            j += 1
        mask.append(int(j < len(spans) and spans[j][0] <= start))
    if images is None:
        return SFTSample(list(ids[:max_length]), mask[:max_length])
    tokens = tokens or VisionTokens.from_tokenizer(tokenizer)
    sources = message_images(messages)
    grids = [images.grid(s.width, s.height) for s in sources]
    ids, mask = expand_image_pads(list(ids), grids, images, tokens, mask)
    ids, mask, kept = truncate_with_images(ids, mask, len(sources), max_length, tokens)
    return SFTSample(ids, mask, sources[:kept], grids[:kept])


def tokenize_chats(conversations: Sequence[Sequence[dict]], tokenizer, max_length: int,
                   source: str = "SFT data", images: ImageProcessor | None = None) -> tuple[list[SFTSample], Counter]:
    """`tokenize_chat` for each conversation, without those left with no target token once truncated to
    `max_length` (the first assistant turn starts past it): they are counted in the Counter as `too_long`,
    and a warning names how many. None left is a DataError naming `source` and the limit. With `images`,
    a conversation whose text holds stray image pads is counted as `image_count_mismatch`."""
    samples, dropped = [], Counter()
    tokens = VisionTokens.from_tokenizer(tokenizer) if images is not None else None
    for messages in conversations:
        try:
            sample = tokenize_chat(messages, tokenizer, max_length, images, tokens)
        except ImageError as e:
            dropped[e.reason] += 1
            continue
        if sum(sample.loss_mask) > 0:
            samples.append(sample)
        else:
            dropped["too_long"] += 1
    if conversations and not samples and set(dropped) == {"too_long"}:
        raise DataError(f"{source}: no conversation has an assistant token within {max_length} tokens "
                        f"(data.max_prompt_length + data.max_response_length)")
    if conversations and not samples:
        raise DataError(f"{source}: no usable conversation (dropped: {dict(dropped)})")
    if dropped["too_long"]:
        logger.warning("%s: dropped %d of %d conversations with no assistant token within %d tokens",
                       source, dropped["too_long"], len(conversations), max_length)
    if set(dropped) - {"too_long"}:
        logger.warning("%s: dropped conversations: %s", source, dict(dropped))
    return samples, dropped
