"""SFT data: both file formats and the assistant-only loss mask (micro-batching is parallel/microbatch.py)."""
import json
from collections import Counter

import pytest

from prism_mcore.data import synthetic as syn
from prism_mcore.data.errors import DataError
from prism_mcore.data.sft_dataset import load_chat_jsonl, tokenize_chat
from prism_mcore.data.tokenizer import qwen3_tokenizer

IM_START, IM_END, NL = 151644, 151645, 198


@pytest.fixture(scope="module")
def tok():
    return qwen3_tokenizer()


def test_mask_on_a_hand_checked_conversation(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"},
                {"role": "assistant", "content": "ok then"}]
    sample = tokenize_chat(messages, tok, max_length=1000)
    system, user, assistant = 8948, 872, 77091
    expected = [  # (id, trained?)
        (IM_START, 0), (system, 0), (NL, 0), (3430, 0), (9814, 0), (13, 0), (IM_END, 0), (NL, 0),
        (IM_START, 0), (user, 0), (NL, 0), (6023, 0), (IM_END, 0), (NL, 0),
        (IM_START, 0), (assistant, 0), (NL, 0), (16032, 1), (IM_END, 1), (NL, 0),        # "yo"
        (IM_START, 0), (user, 0), (NL, 0), (32771, 0), (IM_END, 0), (NL, 0),
        (IM_START, 0), (assistant, 0), (NL, 0), (562, 1), (1221, 1), (IM_END, 1), (NL, 0),  # "ok then"
    ]
    assert list(zip(sample.input_ids, sample.loss_mask)) == expected
    assert sample.input_ids == tok.apply_chat_template(messages, tokenize=True)["input_ids"]


def test_mask_on_teacher_demonstrations_matches_the_template(tok):
    for p in syn.make_problems(20, seed=0, difficulty=2):
        messages = syn.prompt_messages(p) + [{"role": "assistant", "content": syn.teacher_response(p)}]
        sample = tokenize_chat(messages, tok, max_length=4096)
        assert sample.input_ids == tok.apply_chat_template(messages, tokenize=True)["input_ids"]
        trained = [t for t, m in zip(sample.input_ids, sample.loss_mask) if m]
        assert tok.decode(trained) == syn.teacher_response(p) + "<|im_end|>"
        # The prompt ends with the generation header; everything up to it is context.
        prompt = tok.apply_chat_template(messages[:2], tokenize=True, add_generation_prompt=True)["input_ids"]
        assert sample.input_ids[:len(prompt)] == prompt and not any(sample.loss_mask[:len(prompt)])


def test_truncation(tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo " * 50}]
    full = tokenize_chat(messages, tok, max_length=10_000)
    cut = tokenize_chat(messages, tok, max_length=20)
    assert cut.input_ids == full.input_ids[:20] and cut.loss_mask == full.loss_mask[:20]


def test_both_file_formats_round_trip(tmp_path):
    problems = syn.make_problems(12, seed=2)
    plain, _ = load_chat_jsonl(syn.write_sft_jsonl(problems, tmp_path / "m.jsonl", fmt="messages"))
    share, skipped = load_chat_jsonl(syn.write_sft_jsonl(problems, tmp_path / "s.jsonl", fmt="sharegpt"))
    assert plain == share and not skipped and len(plain) == 12
    assert plain[0] == syn.prompt_messages(problems[0]) + [
        {"role": "assistant", "content": syn.teacher_response(problems[0])}]
    with pytest.raises(ValueError, match="unknown SFT format"):
        syn.write_sft_jsonl(problems, tmp_path / "x.jsonl", fmt="alpaca")


def test_sharegpt_system_turn_and_json_array(tmp_path):
    record = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                                {"from": "gpt", "value": "A"}], "images": []}
    path = tmp_path / "a.json"
    path.write_text(json.dumps([record, record]))
    convs, _ = load_chat_jsonl(path)
    assert convs == [[{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                      {"role": "assistant", "content": "A"}]] * 2


def test_malformed_lines_are_skipped_and_counted(tmp_path):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    lines = [json.dumps(good), "{not json", json.dumps([1, 2]), json.dumps({"text": "x"}),
             json.dumps({"messages": [{"role": "user", "content": "q"}]}),
             json.dumps({"conversations": [{"from": "function_call", "value": "f"}, {"from": "gpt", "value": "a"}]}),
             json.dumps({"messages": [{"role": "user"}]}), "", json.dumps(good)]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    convs, skipped = load_chat_jsonl(path)
    assert len(convs) == 2
    assert skipped == Counter(invalid_json=1, not_an_object=1, no_messages=1, no_assistant=1,
                              unknown_role=1, bad_message=1)


def test_a_file_with_nothing_usable_is_a_data_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad\.jsonl.*line 1: no_messages"):
        load_chat_jsonl(path)
    with pytest.raises(DataError, match="missing.jsonl"):
        load_chat_jsonl(tmp_path / "missing.jsonl")
    assert DataError("x").exit_code == 2

