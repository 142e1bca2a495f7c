"""The synthetic visual task: the facts are in the image (read back from its pixels), the question alone does not
give the answer, the teacher is right and short, students are flawed in the way they say; the perception checker
on hand-written captions; every writer read back by its reader."""
import random
from collections import Counter

import numpy as np
import pytest

from prism_mcore.algorithms.perception import fact_text, perception_accuracy, score_caption
from prism_mcore.algorithms.response_format import get_format
from prism_mcore.algorithms.reward import AnswerChecker, compute_reward
from prism_mcore.data import visual_task as vt
from prism_mcore.data import visual_writers as vw
from prism_mcore.data.images import ImageProcessor
from prism_mcore.data.multimodal import VisionTokens, sft_batch
from prism_mcore.data.rl_dataset import RLDataset
from prism_mcore.data.sft_dataset import load_chat_jsonl, tokenize_chats
from prism_mcore.data.tokenizer import qwen3_tokenizer
from prism_mcore.data.warmup_pairs import load_warmup_pairs

CHECKER = AnswerChecker(sandboxed=False, use_math_verify=False)
FMT = get_format()


@pytest.fixture(scope="module")
def tok():
    return qwen3_tokenizer()


def problems(n=60, seed=0):
    return [p for d in (0, 1, 2) for p in vt.make_problems(n, seed, d)]


def test_deterministic_and_independent_of_n():
    a = vt.make_problems(40, seed=3, difficulty=1)
    assert a == vt.make_problems(40, seed=3, difficulty=1) and a[:7] == vt.make_problems(7, seed=3, difficulty=1)
    assert vt.png_bytes(a[5]) == vt.png_bytes(vt.make_problems(6, seed=3, difficulty=1)[5])
    assert [p.question for p in a] != [p.question for p in vt.make_problems(40, seed=4, difficulty=1)]
    for d, names in vt.BY_DIFFICULTY.items():
        assert {p.template for p in vt.make_problems(100, 0, d)} == set(names)
    with pytest.raises(ValueError, match="difficulty"):
        vt.make_problems(1, 0, 5)


def read_image(p):
    """The facts an image shows, read from its pixels: per 16-px cell, which colour and how many of its pixels
    (a 12-px square fills 144, the circle fewer); digits as light pixels in a half."""
    pixels = np.asarray(vt.render(p))
    found = Counter()
    for row in range(p.size // vt.CELL):
        for col in range(p.size // vt.CELL):
            cell = pixels[row * 16:(row + 1) * 16, col * 16:(col + 1) * 16]
            for colour, rgb in vt.RGB.items():
                n = int((cell == rgb).all(-1).sum())
                if n:
                    where = None
                    if "where" in str(p.facts):
                        half = p.size // 32
                        where = f"{'top' if row < half else 'bottom'} {'left' if col < half else 'right'}"
                    found[(colour, "square" if n == 144 else "circle", where)] += 1
    light = (pixels > 200).all(-1)
    sides = {"left": bool(light[:, :p.size // 2].any()), "right": bool(light[:, p.size // 2:].any())}
    return found, sides


def test_the_image_holds_the_facts_and_blind_images_hold_nothing():
    for p in problems():
        shapes, sides = read_image(p)
        expected = Counter()
        for f in p.facts:
            if "count" in f:
                expected[(f["colour"], f["shape"], f.get("where"))] += f["count"]
        assert shapes == expected, (p.question, p.facts)
        digits = [f for f in p.facts if "digit" in f]
        for f in digits:
            if f.get("where"):
                assert sides[f["where"]]
        assert any(sides.values()) == bool(digits)
        blind = np.asarray(vt.render(p, blind=True))
        assert blind.shape == (p.size, p.size, 3) and (blind == vt.BACKGROUND).all()


@pytest.mark.parametrize("difficulty,most_common,distinct", [(0, 0.21, 19), (1, 0.16, 25), (2, 0.28, 7)])
def test_the_question_alone_does_not_give_the_answer(difficulty, most_common, distinct):
    ps = vt.make_problems(1000, seed=5, difficulty=difficulty)
    answers = Counter(p.answer for p in ps)
    assert answers.most_common(1)[0][1] / len(ps) < most_common and len(answers) >= distinct
    for question in {p.question for p in ps}:  # every question text has several answers
        assert len({p.answer for p in ps if p.question == question}) >= 4


def test_teacher_is_right_well_formed_and_short(tok):
    ip = ImageProcessor()
    lengths = {0: [], 1: [], 2: []}
    for p in problems(100):
        response = vt.teacher_response(p)
        assert FMT.parse(response).valid and compute_reward(response, p.answer, checker=CHECKER).score == 1.0
        assert score_caption(response, p.facts).correct
        assert response == vt.teacher_caption(p) + "\n" + vt.teacher_cot(p)
        lengths[p.difficulty].append(len(tok(response, add_special_tokens=False)["input_ids"]))
    assert max(lengths[0]) <= 48 and max(lengths[1]) <= 60 and max(lengths[2]) <= 66
    # image tokens: 64 px -> 2 x 2 = 4, 96 px -> 3 x 3 = 9
    assert [ip.num_tokens(ip.grid(s, s)) for s in (64, 96)] == [4, 9]


@pytest.mark.parametrize("kind", vt.STUDENT_KINDS)
def test_students_are_flawed_as_they_say(kind):
    rng = random.Random(0)
    for p in problems(30):
        caption, cot = vt.student_segments(p, rng, kind)
        response = f"{caption}\n{cot}" if caption else cot
        score = compute_reward(response, p.answer, checker=CHECKER).score
        if kind == "missing_tags":
            assert not FMT.parse(response).valid
            continue
        assert FMT.parse(response).valid and score < 1.0
        perceived = score_caption(caption, p.facts).correct
        if kind == "wrong_fact" and not perceived:  # a misread fact, carried through to a wrong answer
            continue
        assert perceived and caption == vt.teacher_caption(p)
        if kind == "wrong_answer":
            assert cot.split("</think>")[0] == vt.teacher_cot(p).split("</think>")[0]


def test_warmup_records_compare_both_segments():
    rng = random.Random(1)
    for p in problems(30):
        r = vt.warmup_record(p, rng)
        assert r["student_caption"] != r["teacher_caption"] and r["student_cot"] != r["teacher_cot"]


FACTS = [{"count": 2, "colour": "red", "shape": "square"}, {"count": 1, "colour": "blue", "shape": "circle"},
         {"digit": 7, "where": "left"}]


@pytest.mark.parametrize("caption,correct,matched,missing,extra", [
    ("<caption>\n- 2 red squares\n- 1 blue circle\n- digit 7 on the left\n</caption>", True, 3, 0, 0),
    # order, bullets, case, number words, plural, "the", full stops: form is free
    ("<caption>\n* Digit 7 on the left.\n- one blue circles\n  - two RED square\n</caption>\n<think>", True, 3, 0, 0),
    ("- 2 red squares\n- 1 blue circle\n- the digit 7 on the left", True, 3, 0, 0),  # a bare caption segment
    ("<caption>\n- 3 red squares\n- 1 blue circle\n- digit 7 on the left\n</caption>", False, 2, 1, 1),  # count
    ("<caption>\n- 2 green squares\n- 1 blue circle\n- digit 7 on the left\n</caption>", False, 2, 1, 1),  # colour
    ("<caption>\n- 2 red circles\n- 1 blue circle\n- digit 7 on the left\n</caption>", False, 2, 1, 1),  # shape
    ("<caption>\n- 2 red squares\n- digit 7 on the left\n</caption>", False, 2, 1, 0),  # a group left out
    ("<caption>\n- 2 red squares\n- 1 blue circle\n- digit 7 on the right\n</caption>", False, 2, 1, 1),  # side
    ("<caption>\n- 2 red squares\n- 1 blue circle\n- digit 7 on the left\n- 1 yellow square\n</caption>",
     False, 3, 0, 1),
    ("<caption>\n- 2 red squares\n- 1 blue circle\n- digit 7 on the left\n- a nice picture\n</caption>",
     False, 3, 0, 1),  # an unreadable line is an extra claim
    ("<caption>\n- 2 red squares\n- 2 red squares\n- 1 blue circle\n- digit 7 on the left\n</caption>",
     False, 3, 0, 1),  # said twice
    ("<caption>\n- 2 red squares\n- 1 blue circle\n- digit 7 on the left\n", False, 0, 3, 0),  # never closed
    ("<think>\n2 + 1 = 3 shapes\n</think>\n<answer>\n3\n</answer>", False, 0, 3, 0),  # a response without one
    ("", False, 0, 3, 0),
    (None, False, 0, 3, 0),
])
def test_perception_checker_on_hand_written_captions(caption, correct, matched, missing, extra):
    s = score_caption(caption, FACTS)
    assert (s.correct, s.matched, s.missing, s.extra) == (correct, matched, missing, extra)


def test_perception_positions_and_accuracy():
    facts = [{"count": 1, "colour": "green", "shape": "circle", "where": "top left"},
             {"count": 3, "colour": "blue", "shape": "square", "where": "bottom right"}]
    assert [fact_text(f) for f in facts] == ["1 green circle at top left", "3 blue squares at bottom right"]
    good = "<caption>\n- 1 green circle in the top left\n- 3 blue squares at bottom right\n</caption>"
    bad = "<caption>\n- 1 green circle at top right\n- 3 blue squares at bottom right\n</caption>"
    assert score_caption(good, facts).correct and not score_caption(bad, facts).correct
    assert score_caption(bad, facts).f1 == pytest.approx(0.5)
    assert perception_accuracy([good, bad], [facts, facts]) == {"perception_accuracy": 0.5,
                                                                "perception_f1": pytest.approx(0.75)}
    with pytest.raises(ValueError):
        perception_accuracy([good], [])


def test_writers_read_back_by_the_readers(tmp_path, tok):
    ip, vtoks = ImageProcessor(), VisionTokens.from_tokenizer(tok)
    ps = vt.make_problems(6, 1, 0) + vt.make_problems(6, 1, 1)

    sft = vw.write_sft_jsonl(ps, tmp_path / "sft.jsonl")
    convs, skipped = load_chat_jsonl(sft, images=ip)
    samples, dropped = tokenize_chats(convs, tok, 512, images=ip)
    assert not skipped and not dropped and len(samples) == 12
    assert [sum(t == vtoks.image_pad for t in s.input_ids) for s in samples] == [4] * 6 + [9] * 6
    trained = [tok.decode([t for t, m in zip(s.input_ids, s.loss_mask) if m]) for s in samples]
    assert trained == [vt.teacher_response(p) + "<|im_end|>" for p in ps]
    batch = sft_batch(samples, tok.pad_token_id, ip, vtoks)
    assert batch.pixel_values.shape == (6 * 16 + 6 * 36, 1536) and batch.images_per_row.tolist() == [1] * 12
    assert (tmp_path / "sft_images" / "000011.png").read_bytes() == vt.png_bytes(ps[11])

    rl = vw.write_rl_parquet(ps, tmp_path / "rl.parquet")
    ds = RLDataset(rl, tok, 512, require_teacher=True, images=ip)
    assert len(ds) == 12 and not ds.skipped
    for ex, p in zip(ds, ps):
        assert ex.ground_truth == p.answer and ex.teacher_caption == vt.teacher_caption(p)
        assert ex.images[0].data == vt.png_bytes(p) and vw.facts_of(ex.extra_info) == p.facts
    import datasets  # `datasets` reads our column as a list of images, as if it had written it

    hf = datasets.Dataset.from_parquet(str(rl))
    assert np.array_equal(np.asarray(hf[3]["images"][0]), np.asarray(vt.render(ps[3])))

    val, blind = vw.write_heldout(ps, tmp_path / "val.parquet")
    assert blind.name == "val_blind.parquet"
    seen, unseen = RLDataset(val, tok, 512, images=ip), RLDataset(blind, tok, 512, images=ip)
    assert [e.prompt_ids for e in seen] == [e.prompt_ids for e in unseen]
    assert all(e.images[0].data == vt.png_bytes(p, blind=True) for e, p in zip(unseen, ps))
    assert seen[0].teacher_caption is None

    pairs_path = vw.write_warmup_jsonl(ps, tmp_path / "pairs.jsonl", seed=2)
    pairs, skipped = load_warmup_pairs(pairs_path, images=ip)
    assert len(pairs) == 24 and not skipped
    assert pairs[0].images[0].open().tobytes() == vt.render(ps[0]).tobytes()
    assert pairs[1].chosen == vt.teacher_cot(ps[0]) and pairs[0].prompt_messages[0]["content"][1]["text"] == \
        ps[0].question
    # no system turn, as in the task's own prompts: the discriminator sees what the policy sees
    assert [m["role"] for m in pairs[0].prompt_messages] == [m["role"] for m in vt.prompt_messages(ps[0])] == ["user"]
