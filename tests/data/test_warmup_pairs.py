"""Warm-up pairs: two comparisons per line, the whole-response fallback, skipped lines counted."""
import json
from collections import Counter

import pytest

from prism_mcore.data import synthetic as syn
from prism_mcore.data.errors import DataError
from prism_mcore.data.warmup_pairs import load_warmup_pairs


def test_written_pairs_load_as_two_streams(tmp_path):
    problems = syn.make_problems(20, seed=6)
    path = syn.write_warmup_jsonl(problems, tmp_path / "warmup.jsonl", seed=1)
    assert path.read_text() == syn.write_warmup_jsonl(problems, tmp_path / "again.jsonl", seed=1).read_text()
    pairs, skipped = load_warmup_pairs(path)
    assert not skipped and len(pairs) == 40
    for p, (caption, cot) in zip(problems, zip(pairs[::2], pairs[1::2])):
        assert caption.stream == "perception" and cot.stream == "reasoning"
        assert caption.prompt_messages == syn.prompt_messages(p) == cot.prompt_messages
        assert caption.chosen == syn.teacher_caption(p) and cot.chosen == syn.teacher_cot(p)
        assert caption.rejected != caption.chosen and cot.rejected != cot.chosen
        assert caption.image is None


def test_fallback_missing_fields_and_images(tmp_path):
    full = {"question": "Q1", "image": "img/a.png", "teacher_caption": "tc", "teacher_cot": "tr",
            "student_caption": "sc", "student_cot": "sr"}
    lines = [
        json.dumps(full),
        json.dumps({"prompt": "Q2", "teacher_response": "T", "student_response": "S",
                    "image": "https://x/b.png"}),
        json.dumps({**full, "student_cot": ""}),              # empty counts as missing
        json.dumps({k: v for k, v in full.items() if k != "teacher_caption"}),
        json.dumps({k: v for k, v in full.items() if k != "question"}),
        "not json",
        json.dumps(["a list"]),
        "",
        json.dumps({**full, "question": "Q3", "system": "own"}),  # a line's own system prompt wins
        json.dumps({**full, "question": "Q4", "system": ""}),     # "" = no system turn
        json.dumps({**full, "system": 3}),
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines))
    pairs, skipped = load_warmup_pairs(path, system_prompt="SYS", image_base_path="/data")
    assert [(p.stream, p.chosen, p.rejected, p.line) for p in pairs[:3]] == [
        ("perception", "tc", "sc", 1), ("reasoning", "tr", "sr", 1), ("response", "T", "S", 2)]
    assert pairs[3].prompt_messages == [{"role": "system", "content": "own"}, {"role": "user", "content": "Q3"}]
    assert pairs[5].prompt_messages == [{"role": "user", "content": "Q4"}] and len(pairs) == 7
    assert pairs[0].prompt_messages == [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Q1"}]
    assert pairs[0].image == "/data/img/a.png" and pairs[2].image == "https://x/b.png"
    assert skipped == Counter(missing_field=2, missing_prompt=1, invalid_json=1, not_an_object=1, bad_system=1)


def test_unusable_file_is_a_data_error(tmp_path):
    path = tmp_path / "empty_pairs.jsonl"
    path.write_text(json.dumps({"prompt": "q"}) + "\n")
    with pytest.raises(DataError, match=r"empty_pairs\.jsonl: no usable pair.*missing_field"):
        load_warmup_pairs(path)
    with pytest.raises(DataError, match="absent.jsonl"):
        load_warmup_pairs(tmp_path / "absent.jsonl")
