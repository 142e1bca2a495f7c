"""Perception scored on its own: does a caption state its image's facts, and nothing else?

PRISM's discriminator has a perception stream (the caption) and a reasoning stream (think + answer); the
rule-based reward checks only the answer. To report them apart, a caption is checked against the facts its
image was drawn from (data/visual_task.py): which shapes are there, how many of each, in which colour, and
where, and which digits. A fact is a mapping, rendered to one caption line by `fact_text`:

    {"count": 2, "colour": "red", "shape": "square"}                       -> "2 red squares"
    {"count": 1, "colour": "blue", "shape": "circle", "where": "top left"}  -> "1 blue circle at top left"
    {"digit": 7}                                                            -> "digit 7"
    {"digit": 7, "where": "left"}                                           -> "digit 7 on the left"

Parsing is lenient about form (bullets, case, a trailing full stop, "the", number words, singular or plural)
and strict about content: a caption is right when the multiset of facts it states equals the image's.
Pure Python, no torch.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("square", "circle")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
SIDES = ("left", "right")
_WORDS = {w: i for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                      "nine", "ten"))}
_NUMBER = r"(\d+|" + "|".join(_WORDS) + r")"
_GROUP = re.compile(rf"^{_NUMBER}\s+({'|'.join(COLOURS)})\s+({'|'.join(SHAPES)})s?"
                    rf"(?:\s+(?:at|in)\s+(?:the\s+)?({'|'.join(QUADRANTS)}))?$")
_DIGIT = re.compile(rf"^(?:the\s+|a\s+)?digit\s+(\d)(?:\s+(?:on|at|in)\s+the\s+({'|'.join(SIDES)}))?$")
_CAPTION = re.compile(r"<caption>(.*?)</caption>", re.DOTALL)
_TAG = re.compile(r"</?[a-z_]+>")

Fact = tuple  # canonical, hashable: ("group", count, colour, shape, where|None) or ("digit", value, side|None)


def fact_text(fact: Mapping) -> str:
    """The caption line of one fact (the teacher writes exactly this)."""
    if "digit" in fact:
        where = fact.get("where")
        return f"digit {int(fact['digit'])}" + (f" on the {where}" if where else "")
    n = int(fact["count"])
    text = f"{n} {fact['colour']} {fact['shape']}{'' if n == 1 else 's'}"
    return text + (f" at {fact['where']}" if fact.get("where") else "")


def canonical(fact: Mapping) -> Fact:
    if "digit" in fact:
        return ("digit", int(fact["digit"]), fact.get("where"))
    return ("group", int(fact["count"]), fact["colour"], fact["shape"], fact.get("where"))


def parse_line(line: str) -> Fact | None:
    """The fact one caption line states, or None when it states none this checker knows."""
    text = re.sub(r"\s+", " ", line.strip().lstrip("-*•").strip().lower().rstrip("."))
    m = _GROUP.match(text)
    if m:
        count = int(m.group(1)) if m.group(1).isdigit() else _WORDS[m.group(1)]
        return ("group", count, m.group(2), m.group(3), m.group(4))
    m = _DIGIT.match(text)
    if m:
        return ("digit", int(m.group(1)), m.group(2))
    return None


def caption_body(text: str) -> str | None:
    """The inside of the first `<caption>..</caption>` block, the text itself when it has no tags at all
    (a bare caption segment), or None: a block opened but never closed, or a tagged response without one."""
    m = _CAPTION.search(text)
    if m:
        return m.group(1)
    return None if _TAG.search(text) else text


@dataclass(frozen=True)
class PerceptionScore:
    """`correct`: the caption states exactly the image's facts. `matched` / `missing` / `extra` count facts
    (an unreadable non-empty line counts as extra); `f1` is partial credit."""

    correct: bool
    matched: int
    missing: int
    extra: int

    @property
    def precision(self) -> float:
        stated = self.matched + self.extra
        return self.matched / stated if stated else 0.0

    @property
    def recall(self) -> float:
        total = self.matched + self.missing
        return self.matched / total if total else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def score_caption(caption: str | None, facts: Iterable[Mapping]) -> PerceptionScore:
    """`caption` is a whole response or its caption segment (tags or not); `facts` the image's facts."""
    truth = Counter(canonical(f) for f in facts)
    body = caption_body(caption) if isinstance(caption, str) else None
    if body is None:
        return PerceptionScore(False, 0, sum(truth.values()), 0)
    stated: Counter = Counter()
    unreadable = 0
    for line in body.splitlines():
        if not line.strip():
            continue
        fact = parse_line(line)
        if fact is None:
            unreadable += 1
        else:
            stated[fact] += 1
    matched = sum((stated & truth).values())
    missing = sum((truth - stated).values())
    extra = sum((stated - truth).values()) + unreadable
    return PerceptionScore(missing == 0 and extra == 0, matched, missing, extra)


def perception_accuracy(responses: Sequence[str], facts: Sequence[Iterable[Mapping]]) -> dict[str, float]:
    """Share of responses whose caption is exactly right, and their mean F1 (response i against facts i)."""
    if len(responses) != len(facts):
        raise ValueError(f"{len(responses)} responses, {len(facts)} fact lists")
    scores = [score_caption(r, f) for r, f in zip(responses, facts)]
    n = max(len(scores), 1)
    return {"perception_accuracy": sum(s.correct for s in scores) / n, "perception_f1": sum(s.f1 for s in scores) / n}
