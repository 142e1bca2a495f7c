"""Verifiable reward R = w_acc * acc + w_fmt * fmt, with the original's gates:

- the response is not well-formed          -> R = 0 (accuracy is not checked);
- the answer is empty or >= 1024 characters -> R = w_fmt;
- otherwise                                 -> R = w_acc * acc + w_fmt, acc in {0, 1}.

Accuracy runs under a hard per-answer time limit in a sandbox process (see `sandbox.py`), so no
answer can hang or crash the trainer; any failure, timeout included, scores acc = 0.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Sequence

from prism_mcore.algorithms.answer_match import answer_accuracy, is_missing_answer
from prism_mcore.algorithms.response_format import ResponseFormat, get_format
from prism_mcore.algorithms.sandbox import TimeoutSandbox

logger = logging.getLogger(__name__)
_TARGET = "prism_mcore.algorithms.answer_match:answer_accuracy"
_WARM_UP = "prism_mcore.algorithms.answer_match:warm_up"


@dataclass(frozen=True)
class RewardResult:
    score: float
    acc: float
    fmt: float
    answer: str | None


class AnswerChecker:
    """`accuracy(pred, golds)` in {0.0, 1.0}. `sandboxed=False` checks in-process (tests, trusted
    input); then math_verify keeps its own SIGALRM timeouts only when called from the main thread."""

    def __init__(self, timeout_s: float = 10.0, math_verify_timeout_s: int = 2, sandboxed: bool = True,
                 use_math_verify: bool = True):
        self.timeout_s = timeout_s
        self.math_verify_timeout_s = max(1, int(math_verify_timeout_s))
        self.use_math_verify = use_math_verify
        self._sandbox = TimeoutSandbox(preload=[_WARM_UP] if use_math_verify else []) if sandboxed else None
        self._checked = False

    def accuracy(self, pred: str, golds: str | Sequence[str]) -> float:
        """Never raises: odd input (a non-iterable `golds`, a NaN or None reference) scores 0."""
        try:  # numbers are fine references (an int column); a NaN or None one is missing, never converted
            golds = [golds] if isinstance(golds, str) else [str(g) for g in golds if not is_missing_answer(g)]
        except Exception:  # noqa: BLE001
            return 0.0
        args = [str(pred), golds, self.use_math_verify, self.math_verify_timeout_s]
        if self._sandbox is not None and not self._checked:
            self._checked = True
            if not self._sandbox.available():
                logger.warning("answer-check sandbox unavailable; checking in-process (rules only off the main thread)")
                self._sandbox = None
        if self._sandbox is None:
            if threading.current_thread() is not threading.main_thread():
                args[2] = False  # no way to bound math_verify here
            return answer_accuracy(*args)
        value = self._sandbox.call(_TARGET, args, self.timeout_s, default=0.0)
        return float(value) if value in (0.0, 1.0) else 0.0

    def close(self) -> None:
        if self._sandbox is not None:
            self._sandbox.close()


_default_checker: AnswerChecker | None = None
_default_lock = threading.Lock()


def default_checker() -> AnswerChecker:
    global _default_checker
    with _default_lock:
        if _default_checker is None:
            _default_checker = AnswerChecker()
        return _default_checker


def compute_reward(response: str, ground_truth: str | Sequence[str], equivalent_answers: Sequence[str] = (), *,
                   fmt: str | ResponseFormat | None = None, w_acc: float = 0.8, w_fmt: float = 0.2,
                   max_answer_chars: int = 1024, checker: AnswerChecker | None = None) -> RewardResult:
    """`response` is the decoded response (special tokens skipped); `ground_truth` may be a list of
    accepted answers. Never raises."""
    try:
        parsed = get_format(fmt).parse(response if isinstance(response, str) else "")
    except Exception:  # noqa: BLE001
        return RewardResult(0.0, 0.0, 0.0, None)
    if not parsed.valid:
        return RewardResult(0.0, 0.0, 0.0, None)
    answer = parsed.answer or ""
    if not answer or len(answer) >= max_answer_chars:
        return RewardResult(w_fmt, 0.0, 1.0, answer)
    golds = list(ground_truth) if isinstance(ground_truth, (list, tuple)) else [ground_truth]
    try:
        acc = (checker or default_checker()).accuracy(answer, [*golds, *(equivalent_answers or ())])
    except Exception:  # noqa: BLE001
        acc = 0.0
    return RewardResult(w_acc * acc + w_fmt, acc, 1.0, answer)


def compute_rewards(responses: Sequence[str], ground_truths: Sequence[str],
                    equivalent_answers: Sequence[Sequence[str]] | None = None, **kwargs) -> list[RewardResult]:
    equivalents = equivalent_answers if equivalent_answers is not None else [()] * len(responses)
    return [compute_reward(r, g, e, **kwargs) for r, g, e in zip(responses, ground_truths, equivalents, strict=True)]
