"""Response formats: is a decoded response well-formed, where does its perception part end, what is its answer.

The default format is PRISM's `<caption>..</caption><think>..</think><answer>..</answer>` (the whole
response, in that order, whitespace between blocks allowed). `think_boxed` is the usual
`<think>..</think>` followed by a final `\\boxed{..}`; it has no perception segment.

The validity checks are written as linear scans instead of one DOTALL regex with three lazy
groups: that regex backtracks through every combination of repeated closing tags, and a
degenerate rollout that loops the tags thousands of times would stall the reward for minutes.
"""
from __future__ import annotations

import abc

import re
from dataclasses import dataclass

_LEADING_WS = re.compile(r"\s*")


@dataclass(frozen=True)
class ParsedResponse:
    """`perception_end` is the char offset just past the perception block's closing tag (None when the
    format has no perception block or the response is malformed)."""

    valid: bool
    answer: str | None = None
    perception_end: int | None = None


def _strip_span(text: str) -> tuple[int, int]:
    start = _LEADING_WS.match(text).end()
    end = len(text)
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


class ResponseFormat(abc.ABC):
    """Interface: `parse(text)`; `perception_close` names the tag that ends the perception segment."""

    name: str = ""
    perception_close: str | None = None

    @abc.abstractmethod
    def parse(self, text: str) -> ParsedResponse:
        """The response's validity, answer and where its perception segment ends."""

    def is_valid(self, text: str) -> bool:
        return self.parse(text).valid

    def extract_answer(self, text: str) -> str | None:
        return self.parse(text).answer


class TaggedFormat(ResponseFormat):
    """`^\\s*<t1>.*?</t1>\\s*<t2>.*?</t2>...\\s*$` (DOTALL), decided in linear time.

    A chain of blocks exists iff the greedy earliest choice of each `</t_k>\\s*<t_k+1>` junction
    succeeds, because an earlier junction never leaves less room for the rest. This is also the
    split the lazy regex would pick. The last block's body runs to the final closing tag."""

    def __init__(self, name: str, tags: tuple[str, ...], perception_tag: str | None):
        self.name = name
        self.tags = tags
        self.perception_close = f"</{perception_tag}>" if perception_tag else None
        self._perception_index = tags.index(perception_tag) if perception_tag else None
        self._junctions = [(re.compile(rf"</{re.escape(a)}>\s*<{re.escape(b)}>"), len(f"</{a}>"))
                           for a, b in zip(tags, tags[1:])]

    def parse(self, text: str) -> ParsedResponse:
        start, end = _strip_span(text)
        first_open, last_close = f"<{self.tags[0]}>", f"</{self.tags[-1]}>"
        if not text.startswith(first_open, start) or end - start < len(first_open) + len(last_close):
            return ParsedResponse(False)
        if not text.endswith(last_close, start, end):
            return ParsedResponse(False)
        body_end = end - len(last_close)
        pos, block_ends = start + len(first_open), []
        for junction, close_len in self._junctions:
            m = junction.search(text, pos, body_end)
            if m is None:
                return ParsedResponse(False)
            block_ends.append(m.start() + close_len)
            pos = m.end()
        if pos > body_end:
            return ParsedResponse(False)
        perception_end = None if self._perception_index is None else block_ends[self._perception_index]
        return ParsedResponse(True, text[pos:body_end].strip(), perception_end)


def last_boxed(text: str) -> str | None:
    """Content of the last balanced `\\boxed{...}` (None when there is none or it is unclosed)."""
    idx = text.rfind("\\boxed")
    while idx != -1:
        i = idx + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1:j]
        idx = text.rfind("\\boxed", 0, idx)
    return None


class ThinkBoxedFormat(ResponseFormat):
    """Exactly one leading `<think>..</think>` block, then text containing a final `\\boxed{answer}`."""

    name = "think_boxed"

    def parse(self, text: str) -> ParsedResponse:
        start, _ = _strip_span(text)
        if not text.startswith("<think>", start) or text.count("<think>") != 1 or text.count("</think>") != 1:
            return ParsedResponse(False)
        close = text.find("</think>")
        answer = last_boxed(text[close + len("</think>"):])
        if answer is None:
            return ParsedResponse(False)
        return ParsedResponse(True, answer.strip(), None)


CAPTION_THINK_ANSWER = TaggedFormat("caption_think_answer", ("caption", "think", "answer"), "caption")
THINK_BOXED = ThinkBoxedFormat()
FORMATS: dict[str, ResponseFormat] = {f.name: f for f in (CAPTION_THINK_ANSWER, THINK_BOXED)}
DEFAULT_FORMAT = CAPTION_THINK_ANSWER


def get_format(fmt: str | ResponseFormat | None = None) -> ResponseFormat:
    if fmt is None:
        return DEFAULT_FORMAT
    if isinstance(fmt, ResponseFormat):
        return fmt
    try:
        return FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown response format {fmt!r}; known: {sorted(FORMATS)}") from None
