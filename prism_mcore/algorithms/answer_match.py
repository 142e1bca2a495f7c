"""Rule-based answer checking: is the extracted answer equal to the reference?

Order of checks (first decisive one wins): multiple choice (letters), multi-part answers split on
`(1)..(2)..`, semicolons or top-level commas (thousands separators are not split), then per value:
tuples element-wise, exact string, numbers (tolerance, thousands separators, units converted),
normalised strings, and `math_verify` as the fallback.

Stdlib plus a lazy `math_verify` import only: `reward.py` runs this in a sandbox process that must
start fast and must not import torch. `math_verify`'s own timeouts use SIGALRM, which only works
in a main thread; elsewhere they are turned off and the caller's sandbox is the guard.
"""
from __future__ import annotations

import math
import re
import threading
from typing import Sequence

from prism_mcore.algorithms.answer_numbers import parse_quantity, quantities_equal

MAX_CHARS = 4096  # longer strings are never equal to a reference answer; skip the work
_MAX_UNORDERED_PARTS = 8

_DELIMS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_BOXED = re.compile(r"^\\boxed\s*\{(.*)\}$", re.DOTALL)
_NUMBERED = re.compile(r"\(\d{1,2}\)\s*")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_GT_LETTER = re.compile(r"^\s*(?:\(([A-H])\)|([A-H])(?:[.):]|$))\s*(.*)$", re.DOTALL)
_PRED_ONLY_LETTER = re.compile(r"^\s*[(\[]?\s*([A-Ha-h])\s*[)\]]?\s*[.:]?\s*$")
_PRED_PHRASE = re.compile(r"\b(?i:answer|option|choice)\s*(?i:is|:)?\s*[(\[]?\s*([A-H])\s*[)\]]?(?=$|[\s,;:.!?])")
_PRED_PAREN = re.compile(r"(?:^|[\s,;:])\(([A-H])\)(?=$|[\s,;:.!?])")
_PRED_DOT = re.compile(r"(?:^|[\s,;:])([A-H])[.)](?=$|[\s,;:.!?])")
_TEX_WRAP = re.compile(r"\\(?:text|mathrm|textbf|mbox)\s*\{([^{}]*)\}")
_NORM_DROP = re.compile(r"[\"'`“”‘’;:!?，。；：！？、*]|\\left|\\right|(?<!\d)[.,]|[.,](?!\d)")
_NORM_SPACE = re.compile(r"(?<!\w) | (?!\w)")


def clean(text: str) -> str:
    """Strip whitespace, one pair of math delimiters, a whole-answer `\\boxed{}` and a final period."""
    t = text.strip()
    for left, right in _DELIMS:
        if len(t) > len(left) + len(right) and t.startswith(left) and t.endswith(right):
            t = t[len(left):-len(right)].strip()
            break
    m = _BOXED.match(t)
    if m:
        t = m.group(1).strip()
    return t[:-1].rstrip() if t.endswith(".") and not t.endswith("..") else t


def _split_top_level(text: str, sep: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def split_parts(text: str) -> tuple[list[str], bool]:
    """(parts, ordered): `(1) a (2) b` parts are ordered; `;`/`,` lists may match in any order."""
    markers = list(_NUMBERED.finditer(text))
    if len(markers) >= 2 and markers[0].start() == 0:  # `f(1) = 3, f(2) = 4` is not numbered
        parts = []
        for i, m in enumerate(markers):
            end = markers[i + 1].start() if i + 1 < len(markers) else len(text)
            part = text[m.end():end].strip().rstrip(",;，；").strip()
            if part:
                parts.append(part)
        if len(parts) >= 2:
            return parts, True
    for sep_text, sep in ((text.replace("；", ";"), ";"), (_THOUSANDS_COMMA.sub("", text).replace("，", ","), ",")):
        parts = _split_top_level(sep_text, sep)
        if len(parts) >= 2:
            return parts, False
    return [text], True


def gold_choice(gold: str) -> tuple[str, str] | None:
    """(letter, option text) when the reference is a multiple-choice label: `B`, `(B)`, `B.`, `(B) 12`."""
    m = _GT_LETTER.match(gold)
    if not m:
        return None
    return m.group(1) or m.group(2), m.group(3).strip()


def extract_choice(pred: str) -> str | None:
    """Predicted letter by priority: the whole answer is a letter > an answer phrase (`answer is C`)
    > `(X)` > `X.`/`X)`. Within the first level that finds letters the letter must be unique: an
    answer that names two options (`(A) and (B)`) is a hedge and gets no letter."""
    m = _PRED_ONLY_LETTER.match(pred)
    if m:
        return m.group(1).upper()
    for pattern in (_PRED_PHRASE, _PRED_PAREN, _PRED_DOT):
        letters = {x.upper() for x in pattern.findall(pred)}
        if letters:
            return letters.pop() if len(letters) == 1 else None
    return None


def _tuple_items(text: str) -> tuple[str, list[str]] | None:
    t = text.strip()
    if len(t) >= 2 and (t[0], t[-1]) in (("(", ")"), ("[", "]")):
        depth = 0
        for i, ch in enumerate(t):
            depth += ch in "([{"
            depth -= ch in ")]}"
            if depth == 0 and i < len(t) - 1:
                return None  # `(a)+(b)` is not a tuple
        items = _split_top_level(t[1:-1], ",")
        return (t[0], items) if len(items) >= 2 else None
    return None


def normalize_text(text: str) -> str:
    """Lower-case, unwrap `\\text{}`, drop spaces, quotes and punctuation, but keep signs, decimal
    points, digit-separating commas and spaces between words or digits, and operators (the original dropped every `.`, so `x=1.5` matched `x=15`)."""
    t = _NORM_DROP.sub("", _TEX_WRAP.sub(r"\1", text.lower()))
    return _NORM_SPACE.sub("", " ".join(t.split()))


def _math_verify_equal(pred: str, gold: str, timeout_s: int) -> bool:
    from math_verify import parse, verify

    t = timeout_s if threading.current_thread() is threading.main_thread() else None

    def variants(s: str) -> list[str]:
        plain = _TEX_WRAP.sub(r"\1", s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac"))
        plain = plain.replace("\\left", "").replace("\\right", "")
        return list(dict.fromkeys([f"${s}$", f"${plain}$"]))

    for g in variants(gold):
        parsed_gold = parse(g, parsing_timeout=t)
        if not parsed_gold:
            continue
        for p in variants(pred):
            parsed_pred = parse(p, parsing_timeout=t)
            if parsed_pred and verify(parsed_gold, parsed_pred, timeout_seconds=t):
                return True
    return False


def values_equal(pred: str, gold: str, use_math_verify: bool = True, timeout_s: int = 2) -> bool:
    pred, gold = clean(pred), clean(gold)
    if not pred or not gold:
        return False
    gt_tuple, pred_tuple = _tuple_items(gold), _tuple_items(pred)
    if gt_tuple and pred_tuple and gt_tuple[0] == pred_tuple[0] and len(gt_tuple[1]) == len(pred_tuple[1]):
        return all(values_equal(p, g, use_math_verify, timeout_s) for p, g in zip(pred_tuple[1], gt_tuple[1]))
    if pred == gold:
        return True
    gq, pq = parse_quantity(gold), parse_quantity(pred)
    if gq is not None and pq is not None:
        return quantities_equal(pq, gq)
    if normalize_text(pred) == normalize_text(gold) != "":
        return True
    return use_math_verify and _math_verify_equal(pred, gold, timeout_s)


def _all_parts_match(pred_parts: list[str], gold_parts: list[str], ordered: bool, **kw) -> bool:
    if len(pred_parts) != len(gold_parts):
        return False
    if all(values_equal(p, g, **kw) for p, g in zip(pred_parts, gold_parts)):
        return True
    if ordered or len(gold_parts) > _MAX_UNORDERED_PARTS:
        return False
    # Unordered one-to-one matching (augmenting paths; lists are short).
    ok = [[values_equal(p, g, **kw) for g in gold_parts] for p in pred_parts]
    owner: dict[int, int] = {}

    def assign(i: int, seen: set[int]) -> bool:
        for j, good in enumerate(ok[i]):
            if good and j not in seen:
                seen.add(j)
                if j not in owner or assign(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return all(assign(i, set()) for i in range(len(pred_parts)))


def answer_matches(pred: str, gold: str, use_math_verify: bool = True, timeout_s: int = 2) -> bool:
    kw = dict(use_math_verify=use_math_verify, timeout_s=timeout_s)
    pred, gold = clean(pred), clean(gold)
    if not pred or not gold or len(pred) > MAX_CHARS or len(gold) > MAX_CHARS:
        return False
    choice = gold_choice(gold)
    if choice is not None:
        letter = extract_choice(pred)
        if letter is not None:
            return letter == choice[0]
        return bool(choice[1]) and answer_matches(pred, choice[1], **kw)
    gold_parts, ordered = split_parts(gold)
    pred_parts, _ = split_parts(pred)
    if len(gold_parts) == 1 and len(pred_parts) == 1:
        return values_equal(pred, gold, **kw)
    if len(gold_parts) == len(pred_parts):
        return _all_parts_match(pred_parts, gold_parts, ordered, **kw)
    # `1, 2` against `(1, 2)`: compare as tuples. Any other part-count mismatch is a miss and is
    # never handed to math_verify, which would read `3, 4` as `4`.
    if len(gold_parts) == 1 and _tuple_items(gold) and len(pred_parts) > 1:
        return values_equal(f"{gold.strip()[0]}{pred}{gold.strip()[-1]}", gold, **kw)
    if len(pred_parts) == 1 and _tuple_items(pred) and len(gold_parts) > 1:
        return values_equal(pred, f"{pred.strip()[0]}{gold}{pred.strip()[-1]}", **kw)
    return False


# How converters spell a missing value once it is text: str(float("nan")), str(None), JSON null. Such a
# reference would give full marks to a model that answers "nan".
_MISSING_TEXT = {"nan", "None", "null"}


def is_missing_answer(value: object) -> bool:
    """True for a reference answer that stands for "no answer": None, a non-finite float, or its text."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return True
    if isinstance(value, str):
        text = value.strip()
        return not text or text in _MISSING_TEXT or text.lower() == "nan"
    return False


def answer_accuracy(pred: str, golds: str | Sequence[str], use_math_verify: bool = True, timeout_s: int = 2) -> float:
    """1.0 when `pred` matches the reference or any equivalent answer, else 0.0. Never raises, whatever it is
    given (None, numbers, non-iterables, huge or malformed strings): a reward must not kill a training step.
    A missing reference (`is_missing_answer`) matches nothing."""
    try:
        if not isinstance(pred, str):
            return 0.0
        golds = [golds] if isinstance(golds, str) else list(golds)
    except Exception:  # noqa: BLE001 - golds is not iterable
        return 0.0
    for gold in golds:
        try:
            if isinstance(gold, str) and not is_missing_answer(gold) and \
                    answer_matches(pred, gold, use_math_verify, timeout_s):
                return 1.0
        except Exception:  # noqa: BLE001 - any failure in a checker means "not verified"
            continue
    return 0.0


def warm_up() -> None:
    """Import math_verify and build its parsers once, so that a sandbox's first call is not slow."""
    answer_accuracy("\\frac{1}{2}", "\\sqrt{x}")
