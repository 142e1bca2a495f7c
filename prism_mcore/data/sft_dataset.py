"""SFT chat data: read conversations, tokenize them with an assistant-only loss mask, pack and pad.

Accepted line formats (JSON Lines, or one JSON array of records):
- plain: `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`;
- LLaMA-Factory sharegpt: `{"conversations": [{"from": "human"|"gpt", "value": ...}], "system": ...}`,
  where the system prompt may also be a first `{"from": "system"}` turn. `images` is ignored here
  (text-only until the vision tower lands).

The loss covers each assistant turn's content and the `<|im_end|>` that closes it: that end token is
what teaches the model to stop. The `<|im_start|>assistant\\n` header, the newline after the end
token and all system/user turns are context only.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from prism_mcore.data.errors import DataError
from prism_mcore.data.jsonl import first_char, read_jsonl

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
# LLaMA-Factory's default sharegpt tags. Tool turns (`observation`, `function_call`) are not used by
# PRISM, so a conversation with them is skipped rather than trained with a guessed role.
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


@dataclass
class SFTSample:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is a training target

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


def load_chat_jsonl(path: str | Path) -> tuple[list[list[dict[str, Any]]], Counter]:
    """All usable conversations and a Counter of skipped lines by reason. A file with no usable line is
    a DataError naming the file (usually the wrong file or the wrong format)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: SFT file not found")
    conversations, skipped = [], Counter()
    first_bad = None
    for lineno, record, error in _records(path):
        messages, error = (None, error) if error else normalize_record(record)
        if messages is None:
            skipped[error] += 1
            first_bad = first_bad or f"line {lineno}: {error}"
            continue
        conversations.append(messages)
    if not conversations:
        detail = f"; first problem at {first_bad}" if first_bad else " (empty file)"
        raise DataError(f"{path}: no usable conversation: expected 'messages' or sharegpt 'conversations'{detail}")
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


def tokenize_chat(messages: Sequence[dict], tokenizer, max_length: int) -> SFTSample:
    """Token ids exactly as `tokenizer.apply_chat_template(messages, tokenize=True)` gives them (the
    whole text is encoded at once, so no merge differs at turn boundaries), truncated to
    `max_length`. A token is a target when it starts inside an assistant span."""
    text, spans = assistant_char_spans(messages, tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask, j = [], 0
    for start, _end in offsets:  # offsets and spans are both increasing: one merge-like pass
        while j < len(spans) and start >= spans[j][1]:
            j += 1
        mask.append(int(j < len(spans) and spans[j][0] <= start))
    return SFTSample(list(ids[:max_length]), mask[:max_length])


def tokenize_chats(conversations: Sequence[Sequence[dict]], tokenizer, max_length: int,
                   source: str = "SFT data") -> tuple[list[SFTSample], Counter]:
    """`tokenize_chat` for each conversation, without those left with no target token once truncated to
    `max_length` (the first assistant turn starts past it): they are counted in the Counter as `too_long`,
    and a warning names how many. None left is a DataError naming `source` and the limit."""
    samples, dropped = [], Counter()
    for messages in conversations:
        sample = tokenize_chat(messages, tokenizer, max_length)
        if sum(sample.loss_mask) > 0:
            samples.append(sample)
        else:
            dropped["too_long"] += 1
    if conversations and not samples:
        raise DataError(f"{source}: no conversation has an assistant token within {max_length} tokens "
                        f"(data.max_prompt_length + data.max_response_length)")
    if dropped:
        logger.warning("%s: dropped %d of %d conversations with no assistant token within %d tokens",
                       source, dropped["too_long"], len(conversations), max_length)
    return samples, dropped


# ---- batching
