import multiprocessing
import os
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from reward_table import ROWS  # noqa: E402

from prism_mcore.algorithms.answer_match import (answer_accuracy, extract_choice, gold_choice,  # noqa: E402
                                                 normalize_text, split_parts)
from prism_mcore.algorithms.answer_numbers import Quantity, parse_quantity, quantities_equal  # noqa: E402
from prism_mcore.algorithms.reward import AnswerChecker, compute_reward, compute_rewards  # noqa: E402
from prism_mcore.algorithms.sandbox import TimeoutSandbox  # noqa: E402


def wrap(answer: str) -> str:
    return f"<caption>\n- a figure\n</caption>\n<think>\nreasoning\n</think>\n<answer>\n{answer}\n</answer>"


def as_response(item: str) -> str:
    return item[4:] if item.startswith("RAW:") else wrap(item)


@pytest.fixture(scope="module")
def checker():
    c = AnswerChecker(timeout_s=10.0, math_verify_timeout_s=1)
    yield c
    c.close()


@pytest.mark.timeout(120)
def test_reward_table(checker):
    assert len(ROWS) >= 60
    wrong = []
    for item, gold, expected in ROWS:
        result = compute_reward(as_response(item), gold, checker=checker)
        if result.score != pytest.approx(expected):
            wrong.append((item[:50], gold, expected, result.score))
    assert not wrong


def test_gates_and_weights(checker):
    assert compute_reward(wrap("3"), "3", checker=checker).score == pytest.approx(1.0)
    r = compute_reward(wrap("3"), "3", w_acc=0.5, w_fmt=0.1, checker=checker)
    assert (r.score, r.acc, r.fmt, r.answer) == (pytest.approx(0.6), 1.0, 1.0, "3")
    assert compute_reward(wrap("x" * 20), "3", max_answer_chars=10, checker=checker).score == pytest.approx(0.2)
    invalid = compute_reward("<answer>3</answer>", "3", checker=checker)
    assert (invalid.score, invalid.acc, invalid.fmt) == (0.0, 0.0, 0.0)
    boxed = compute_reward("<think>t</think> so \\boxed{\\frac12}", "0.5", fmt="think_boxed", checker=checker)
    assert boxed.score == pytest.approx(1.0)


def test_equivalent_answers_and_batch(checker):
    assert compute_reward(wrap("2^{1/2}"), "1.41", ["\\sqrt{2}"], checker=checker).acc == 1.0
    assert compute_reward(wrap("7"), ["6", "7"], checker=checker).acc == 1.0
    results = compute_rewards([wrap("1"), wrap("2"), "bad"], ["1", "1", "1"], checker=checker)
    assert [r.score for r in results] == [pytest.approx(1.0), pytest.approx(0.2), 0.0]


@pytest.mark.parametrize("response,gold", [(None, "3"), (wrap("3"), None), (wrap("3"), 3), (123, "3"),
                                           (wrap("\x00\ud800"), "3"), (wrap("3"), "")])
def test_never_raises_on_odd_inputs(checker, response, gold):
    r = compute_reward(response, gold, checker=checker)
    assert r.score in (0.0, pytest.approx(0.2), pytest.approx(1.0))


@pytest.mark.timeout(60)
def test_sandbox_kills_a_hung_call_and_recovers():
    sandbox = TimeoutSandbox()
    try:
        first = sandbox.pid if sandbox.available() else None
        start = time.monotonic()
        assert sandbox.call("time:sleep", [30], timeout_s=0.5, default="timed out") == "timed out"
        assert time.monotonic() - start < 5
        assert sandbox.call("math:sqrt", [16.0], timeout_s=30) == 4.0
        assert sandbox.pid != first
        assert sandbox.call("math:sqrt", [-1.0], timeout_s=30, default="err") == "err"  # exception -> default
        assert sandbox.call("no.such.module:f", [], timeout_s=30, default="err") == "err"
        assert sandbox.call("math:sqrt", [object()], timeout_s=30, default="err") == "err"  # not JSON
    finally:
        sandbox.close()


@pytest.mark.timeout(60)
def test_sandbox_memory_cap():
    sandbox = TimeoutSandbox(memory_limit_mb=256)
    try:
        assert sandbox.call("operator:mul", ["x", 600 << 20], timeout_s=30, default="capped") == "capped"
        assert sandbox.call("operator:mul", ["x", 3], timeout_s=30) == "xxx"
    finally:
        sandbox.close()


@pytest.mark.timeout(60)
def test_checker_from_a_non_main_thread(checker):
    out = []
    thread = threading.Thread(target=lambda: out.append(checker.accuracy("2\\sqrt{2}", "\\sqrt{8}")))
    thread.start()
    thread.join()
    assert out == [1.0]


def _score_in_worker(_):
    checker = AnswerChecker(timeout_s=20.0)
    try:
        return checker.accuracy("\\frac{\\pi}{2}", "\\pi/2"), os.getpid()
    finally:
        checker.close()


@pytest.mark.timeout(120)
def test_checker_inside_a_daemonic_pool_worker():
    with multiprocessing.get_context("fork").Pool(1) as pool:
        value, pid = pool.map(_score_in_worker, [0])[0]
    assert value == 1.0 and pid != os.getpid()


def test_in_process_checker_matches_rules():
    checker = AnswerChecker(sandboxed=False)
    assert checker.accuracy("0.5", "\\frac{1}{2}") == 1.0
    assert checker.accuracy("0.6", "\\frac{1}{2}") == 0.0


def test_answer_accuracy_rules_without_math_verify():
    assert answer_accuracy("1/2", "0.5", use_math_verify=False) == 1.0
    assert answer_accuracy("x^2+2x+1", "(x+1)^2", use_math_verify=False) == 0.0
    assert answer_accuracy("3", ["4", "3"], use_math_verify=False) == 1.0


def test_split_parts():
    assert split_parts("(1) 3 (2) 4, 5") == (["3", "4, 5"], True)
    assert split_parts("1; 2") == (["1", "2"], False)
    assert split_parts("1,000") == (["1,000"], True)  # a thousands separator is not a list
    assert split_parts("f(1, 2), 3") == (["f(1, 2)", "3"], False)
    assert split_parts("f(1) = 3; f(2) = 4") == (["f(1) = 3", "f(2) = 4"], False)
    assert split_parts("\\frac{1,2}{3}") == (["\\frac{1,2}{3}"], True)


def test_choice_extraction():
    assert gold_choice("B") == ("B", "") and gold_choice("(C) 12") == ("C", "12")
    assert gold_choice("Apple") is None and gold_choice("12") is None
    assert extract_choice("the answer is (D).") == "D"
    assert extract_choice("(A) and (B)") is None
    assert extract_choice("a square") is None
    assert extract_choice("B. because x") == "B"


def test_normalize_and_numbers():
    assert normalize_text("The  Answer.") == "the answer"
    assert normalize_text("x = 1.5") == "x=1.5"
    assert parse_quantity("1,234.5 cm") == Quantity(1234.5, "cm")
    assert parse_quantity("3x") is None and parse_quantity("1/0") is None
    assert quantities_equal(Quantity(120, "min"), Quantity(2, "hours"))
    assert not quantities_equal(Quantity(5, "cm"), Quantity(5, "kg"))
