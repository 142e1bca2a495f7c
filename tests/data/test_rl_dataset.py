"""RL parquet reader: schema errors up front, bad rows skipped and counted, resumable shuffled batches."""
import itertools
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prism_mcore.data import synthetic as syn
from prism_mcore.data.errors import DataError
from prism_mcore.data.rl_dataset import RLDataset
from prism_mcore.data.tokenizer import qwen3_tokenizer

MAX_PROMPT = 512


@pytest.fixture(scope="module")
def tok():
    return qwen3_tokenizer()


@pytest.fixture(scope="module")
def problems():
    return syn.make_problems(100, seed=21, difficulty=2)


class NoTokenizer:
    """Fails on any use: proves that schema checks run before any row is loaded."""

    def __getattr__(self, name):
        raise AssertionError(f"tokenizer used ({name}) before the schema check")


def test_round_trip_with_teacher(tmp_path, tok, problems):
    path = syn.write_rl_parquet(problems, tmp_path / "rl.parquet")
    ds = RLDataset([str(path)], tok, MAX_PROMPT, require_teacher=True)
    assert len(ds) == 100 and not ds.skipped
    for i, (ex, p) in enumerate(zip(ds, problems)):
        expected = tok.apply_chat_template(syn.prompt_messages(p), tokenize=True, add_generation_prompt=True)
        assert ex.prompt_ids == expected["input_ids"]
        assert ex.index == i and ex.extra_info == {"index": i} and ex.data_source == syn.DATA_SOURCE
        assert ex.ground_truth == p.answer and ex.equivalent_answers == [] and ex.images == []
        assert ex.teacher_caption == syn.teacher_caption(p) and ex.teacher_cot == syn.teacher_cot(p)
        assert ex.teacher_caption + "\n" + ex.teacher_cot == syn.teacher_response(p)
    table = pq.read_table(path)
    assert table.schema.field("reward_model").type.get_field_index("equivalent_answers") >= 0
    assert table.column("ability").to_pylist()[0] == "math"


def test_rlvr_file_without_teacher(tmp_path, tok, problems):
    path = syn.write_rl_parquet(problems[:10], tmp_path / "rlvr.parquet", with_teacher=False)
    ds = RLDataset(path, tok, MAX_PROMPT)
    assert len(ds) == 10 and ds[0].teacher_caption is None and ds[0].teacher_cot is None
    with pytest.raises(DataError, match=r"rlvr\.parquet: missing required column 'teacher_caption'"):
        RLDataset(path, tok, MAX_PROMPT, require_teacher=True)


def test_missing_column_is_raised_before_loading(tmp_path, problems):
    good = syn.write_rl_parquet(problems[:5], tmp_path / "good.parquet")
    table = pq.read_table(good).drop_columns(["reward_model"])
    pq.write_table(table, tmp_path / "no_reward.parquet")
    with pytest.raises(DataError) as err:
        RLDataset([good, tmp_path / "no_reward.parquet"], NoTokenizer(), MAX_PROMPT)
    assert str(err.value) == f"{tmp_path / 'no_reward.parquet'}: missing required column 'reward_model'"
    assert err.value.exit_code == 2
    with pytest.raises(DataError, match="nothing.parquet: RL parquet file not found"):
        RLDataset([good, tmp_path / "nothing.parquet"], NoTokenizer(), MAX_PROMPT)
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="junk.parquet: not a readable parquet"):
        RLDataset([tmp_path / "junk.parquet"], NoTokenizer(), MAX_PROMPT)


def test_three_bad_rows_of_a_hundred_are_skipped_and_counted(tmp_path, tok, problems):
    path = syn.write_rl_parquet(problems, tmp_path / "rl.parquet")
    rows = pq.read_table(path).to_pylist()
    rows[10]["prompt"] = []                                     # empty prompt
    rows[50]["reward_model"]["ground_truth"] = "  "             # no ground truth
    rows[90]["prompt"][1]["content"] = "How many? " * 400       # too long after the chat template
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=syn.rl_schema()), bad)
    ds = RLDataset([bad], tok, MAX_PROMPT, require_teacher=True)
    assert len(ds) == 97
    assert ds.skipped == Counter(prompt_empty=1, ground_truth_missing=1, prompt_too_long=1)
    assert {ex.index for ex in ds}.isdisjoint({10, 50, 90})


def test_json_string_columns_and_other_bad_rows(tmp_path, tok, problems):
    def row(p, **over):
        base = {"prompt": json.dumps(syn.prompt_messages(p)),
                "reward_model": json.dumps({"style": "rule", "ground_truth": int(p.answer)}),
                "teacher_caption": syn.teacher_caption(p), "teacher_cot": syn.teacher_cot(p)}
        return {**base, **over}

    rows = [row(p) for p in problems[:6]]
    rows[1]["prompt"] = "[{'role': 'user'"                                # unparseable
    rows[2]["prompt"] = json.dumps(["just a string"])                     # not role/content messages
    rows[3]["teacher_cot"] = None                                         # no teacher text
    rows[4]["reward_model"] = json.dumps({"style": "rule"})               # no ground_truth key
    path = tmp_path / "strings.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)  # every column a plain string
    ds = RLDataset(path, tok, MAX_PROMPT, require_teacher=True)
    assert [ex.index for ex in ds] == [0, 5]
    assert ds[0].ground_truth == problems[0].answer  # integer ground truth read as a string
    assert ds.skipped == Counter(prompt_unparseable=1, prompt_malformed=1, teacher_missing=1,
                                 ground_truth_missing=1)
    # Without the teacher requirement the row without teacher text is usable.
    assert len(RLDataset(path, tok, MAX_PROMPT)) == 3


def test_all_rows_bad_is_a_data_error(tmp_path, tok, problems):
    path = syn.write_rl_parquet(problems[:3], tmp_path / "rl.parquet")
    with pytest.raises(DataError, match=r"rl\.parquet: no usable row .*prompt_too_long"):
        RLDataset(path, tok, max_prompt_length=5)


def test_batches_shuffle_and_resume_deterministically(tmp_path, tok, problems):
    path = syn.write_rl_parquet(problems[:50], tmp_path / "rl.parquet")

    def ids(batch):
        return [ex.index for ex in batch]

    ds = RLDataset(path, tok, MAX_PROMPT)
    epoch0 = [ids(b) for b in ds.batches(8, seed=5)]
    assert len(epoch0) == 6 and all(len(b) == 8 for b in epoch0)         # drop_last: 50 -> 6 x 8
    assert len(set(itertools.chain(*epoch0))) == 48
    assert epoch0 != [list(range(i, i + 8)) for i in range(0, 48, 8)]    # shuffled
    assert ds.state_dict()["epoch"] == 1 and ds.state_dict()["offset"] == 0
    epoch1 = [ids(b) for b in ds.batches(8, seed=5)]
    assert epoch1 != epoch0
    assert [ids(b) for b in ds.batches(8, seed=5, epoch=0)] == epoch0    # a pure function of (seed, epoch)

    # Interrupt epoch 1 after 2 batches; a fresh dataset resumed from the state sees the rest.
    run = RLDataset(path, tok, MAX_PROMPT)
    first = [ids(b) for b in itertools.islice(run.batches(8, seed=5, epoch=1), 2)]
    state = json.loads(json.dumps(run.state_dict()))  # survives a checkpoint round trip
    assert first == epoch1[:2] and state == {"epoch": 1, "offset": 16, "seed": 5, "num_examples": 50}
    resumed = RLDataset(path, tok, MAX_PROMPT)
    resumed.load_state_dict(state)
    assert [ids(b) for b in resumed.batches(8, seed=5)] == epoch1[2:]
    assert resumed.state_dict()["epoch"] == 2

    last = [ids(b) for b in RLDataset(path, tok, MAX_PROMPT).batches(8, seed=5, drop_last=False)]
    assert len(last) == 7 and len(last[-1]) == 2 and sorted(itertools.chain(*last)) == list(range(50))

    other = RLDataset(path, tok, MAX_PROMPT)
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="shuffled with seed 5"):
        next(other.batches(8, seed=6))
    with pytest.raises(DataError, match="usable rows"):
        RLDataset(path, tok, MAX_PROMPT).load_state_dict({**state, "num_examples": 49})



def test_endless_batches_cross_epochs_and_resume(tmp_path):
    from prism_mcore.data.rl_dataset import RLDataset
    from prism_mcore.data.synthetic import make_problems, write_rl_parquet
    from prism_mcore.data.tokenizer import qwen3_tokenizer

    write_rl_parquet(make_problems(5, seed=0), tmp_path / "rl.parquet")
    data = RLDataset(tmp_path / "rl.parquet", qwen3_tokenizer(), 512)
    stream = data.endless(2, seed=7)
    first = [[e.index for e in next(stream)] for _ in range(3)]  # 2 per epoch (drop_last), then epoch 1
    assert all(len(b) == 2 for b in first) and len(set(first[0] + first[1])) == 4  # one epoch, no repeats
    assert data.state_dict()["epoch"] == 1  # the third batch came from the next epoch
    state = data.state_dict()
    again = RLDataset(tmp_path / "rl.parquet", qwen3_tokenizer(), 512)
    again.load_state_dict(state)
    assert [e.index for e in next(again.endless(2, seed=7))] == [e.index for e in next(stream)]
