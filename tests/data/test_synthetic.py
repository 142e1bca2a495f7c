"""The synthetic task: deterministic, hard to guess, teacher right and well-formed, students flawed."""
import random
import re
from collections import Counter

import pytest

from prism_mcore.algorithms.response_format import get_format
from prism_mcore.algorithms.reward import AnswerChecker, compute_reward
from prism_mcore.data import synthetic as syn

CHECKER = AnswerChecker(sandboxed=False, use_math_verify=False)  # integers: the rule matchers decide


def reward(response, answer):
    return compute_reward(response, answer, checker=CHECKER)


def test_deterministic_by_seed_and_independent_of_n():
    a = syn.make_problems(30, seed=7)
    assert a == syn.make_problems(30, seed=7)
    assert a[:10] == syn.make_problems(10, seed=7)
    assert [p.question for p in a] != [p.question for p in syn.make_problems(30, seed=8)]
    assert len({p.template for p in a}) == len(syn.TEMPLATES)


@pytest.mark.parametrize("difficulty", [0, 1, 2, 3])
def test_answers_are_small_integers_and_the_scene_holds_the_facts(difficulty):
    for p in syn.make_problems(200, seed=1, difficulty=difficulty):
        assert 0 <= int(p.answer) <= syn.MAX_ANSWER and str(int(p.answer)) == p.answer
        # Perception: every count in the caption is read off the question.
        for fact in p.facts:
            assert re.match(r"\d+", fact).group() in re.findall(r"\d+", p.question)
        assert re.search(rf"= {p.answer} ", p.steps[-1])  # the last step computes the answer


def test_difficulty_adds_objects_and_steps():
    def mean(problems, attr):
        return sum(len(getattr(p, attr)) for p in problems) / len(problems)

    easy, hard = syn.make_problems(300, 0, 1), syn.make_problems(300, 0, 3)
    assert mean(hard, "steps") > mean(easy, "steps") + 1.5
    assert mean(hard, "facts") > mean(easy, "facts") + 1
    assert all(len(p.steps) == 1 for p in syn.make_problems(300, 0, 0))


@pytest.mark.parametrize("difficulty,most_common,distinct", [(0, 0.06, 40), (1, 0.05, 50), (2, 0.05, 50)])
def test_chance_accuracy_is_low(difficulty, most_common, distinct):
    problems = syn.make_problems(1000, seed=3, difficulty=difficulty)
    answers = Counter(p.answer for p in problems)
    # A model that learned the format and always writes the most common answer:
    assert answers.most_common(1)[0][1] / len(problems) < most_common
    # Uniform guessing over 0..99:
    rng = random.Random(0)
    hits = sum(str(rng.randint(0, 99)) == p.answer for p in problems)
    assert hits / len(problems) < 0.05
    assert len(answers) >= distinct


def test_teacher_is_well_formed_and_correct():
    fmt = get_format()
    for p in syn.make_problems(100, seed=5, difficulty=2):
        response = syn.teacher_response(p)
        parsed = fmt.parse(response)
        assert parsed.valid and parsed.answer == p.answer
        # The perception segment is exactly the caption column.
        assert response[:parsed.perception_end] == syn.teacher_caption(p)
        assert response == syn.teacher_caption(p) + "\n" + syn.teacher_cot(p)
        assert reward(response, p.answer).score == pytest.approx(1.0)


@pytest.mark.parametrize("kind", syn.STUDENT_KINDS)
def test_students_are_flawed_and_score_lower(kind):
    rng = random.Random(11)
    for p in syn.make_problems(60, seed=9, difficulty=2):
        response = syn.student_response(p, rng, kind)
        assert response != syn.teacher_response(p)
        result = reward(response, p.answer)
        assert result.score < 1.0
        if kind == "missing_tags":
            assert result.score == 0.0
        else:  # well-formed, wrong answer
            assert result.fmt == 1.0 and result.acc == 0.0
        caption, cot = syn.student_segments(p, random.Random(p.question), kind)
        if kind == "wrong_fact":
            assert caption != syn.teacher_caption(p) and cot != syn.teacher_cot(p)
        if kind in ("wrong_step", "wrong_answer"):
            assert caption == syn.teacher_caption(p) and cot != syn.teacher_cot(p)


def test_random_student_kind_and_unknown_kind():
    p = syn.make_problems(1, seed=0)[0]
    assert syn.student_response(p, random.Random(0)) != syn.teacher_response(p)
    with pytest.raises(ValueError, match="unknown student kind"):
        syn.student_response(p, random.Random(0), "lazy")


def test_prompt_messages():
    p = syn.make_problems(1, seed=0)[0]
    assert syn.prompt_messages(p) == [{"role": "system", "content": syn.SYSTEM_PROMPT},
                                      {"role": "user", "content": p.question}]
    for tag in ("<caption>", "</caption>", "<think>", "</think>", "<answer>", "</answer>"):
        assert tag in syn.SYSTEM_PROMPT


def test_warmup_records_differ_in_both_segments():
    rng = random.Random(2)
    for p in syn.make_problems(100, seed=4):
        rec = syn.warmup_record(p, rng)
        assert rec["student_caption"] and rec["student_caption"] != rec["teacher_caption"]
        assert rec["student_cot"] != rec["teacher_cot"]
        assert rec["student_kind"] in syn.STUDENT_KINDS
