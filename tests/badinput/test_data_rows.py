"""Bad data rows are skipped and counted, never fatal and never silently kept: invalid UTF-8 or JSON lines,
conversations and prompts too long for the configured lengths, NaN / None ground truths. A file with no usable
row at all is a one-line error naming it. One tiny SFT run shows a whole stage surviving such a file."""
from __future__ import annotations

import json
import math
import re

import pytest
from badinput_cli import ok, one_line_error, prism, prism_many

TINY = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
        "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.head_dim=16",
        "model.max_position_embeddings=512", "data.max_prompt_length=256", "data.max_response_length=256",
        "data.micro_batch_tokens=1200", "data.global_batch_size=4"]
BAD_UTF8 = b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "ok"}]}\n'


def _lines(path):
    return path.read_bytes().splitlines(keepends=True)


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    """16 good conversations, then line 17 with a Latin-1 byte, line 18 cut-off JSON, and line 19 whose
    assistant turn starts past 512 tokens."""
    from prism_mcore.data.synthetic import make_problems, write_sft_jsonl

    path = tmp_path_factory.mktemp("sft") / "sft.jsonl"
    write_sft_jsonl(make_problems(16, seed=0), path)
    long_user = {"messages": [{"role": "user", "content": "count the sheep " * 300},
                              {"role": "assistant", "content": "many"}]}
    path.write_bytes(b"".join(_lines(path)) + BAD_UTF8 + b'{"messages": [\n' + json.dumps(long_user).encode() + b"\n")
    return path


def _rl_parquet(path, problems, truths, long_prompt_rows=()):
    """verl-style rows with `prompt` and `reward_model` stored as JSON text, so a ground truth can be any JSON
    value (NaN included: Python's json writes and reads it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from prism_mcore.data.synthetic import prompt_messages

    rows = []
    for i, (p, truth) in enumerate(zip(problems, truths)):
        messages = prompt_messages(p)
        if i in long_prompt_rows:
            messages[-1]["content"] += " and again" * 400
        rows.append({"prompt": json.dumps(messages), "reward_model": json.dumps({"ground_truth": truth})})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def hf_config_dir(tmp_path_factory):
    """An HF directory with only config.json: what `model.hf_path` needs for the rl stage's preflight."""
    from prism_mcore.checkpoint.hf_config import hf_config_dict
    from prism_mcore.config import ModelConfig

    path = tmp_path_factory.mktemp("hf")
    (path / "config.json").write_text(json.dumps(hf_config_dict(ModelConfig())))
    return path


def _warmup_file(path):
    from prism_mcore.data.synthetic import make_problems, write_warmup_jsonl

    lines = _lines(write_warmup_jsonl(make_problems(4, seed=1), path, seed=0))
    path.write_bytes(b"".join(lines[:2]) + b'{"prompt": "\xff\xfe"}\n' + b"".join(lines[2:]))
    return path


def _validate(stage, files, *extra):
    return ("validate", "/dev/null", *TINY, f"trainer.stage={stage}", f"data.train_files=[{','.join(map(str, files))}]",
            *extra)


def test_bad_rows_are_skipped_and_counted(sft_file, hf_config_dir, tmp_path):
    """SFT: a bad-UTF-8 line, a cut-off JSON line and a conversation too long for 512 tokens. Warm-up pairs: a
    bad-UTF-8 line. RL: NaN, None, "nan" and "None" ground truths and a prompt too long."""
    from prism_mcore.data.synthetic import make_problems

    pairs = _warmup_file(tmp_path / "pairs.jsonl")
    problems = make_problems(10, seed=2)
    truths = [p.answer for p in problems]
    truths[1], truths[3], truths[5], truths[7] = math.nan, None, "nan", "None"
    rl = _rl_parquet(tmp_path / "rl.parquet", problems, truths, long_prompt_rows=(8,))
    sft, warmup, rl_res = map(ok, prism_many(
        _validate("sft", [sft_file]), _validate("disc-warmup", [pairs], "model.num_experts=4"),
        _validate("rl", [rl], f"model.hf_path={hf_config_dir}")))
    assert f"{sft_file}: skipped 2 malformed lines (first at line 17: invalid_utf8): " \
           "{'invalid_utf8': 1, 'invalid_json': 1}" in sft.stderr
    assert f"{sft_file}: dropped 1 of 17 conversations with no assistant token within 512 tokens" in sft.stderr
    assert f"{pairs}: skipped 1 lines: {{'invalid_utf8': 1}}" in warmup.stderr
    counts = re.search(r"RL data: kept (\d+) rows, skipped (\d+): (\{.*\})", rl_res.stderr)
    assert counts, rl_res.stderr
    assert counts.group(1, 2) == ("5", "5")
    assert counts.group(3) == "{'ground_truth_missing': 4, 'prompt_too_long': 1}"


def test_a_file_without_a_usable_row_is_one_line(sft_file, hf_config_dir, tmp_path):
    from prism_mcore.data.synthetic import make_problems

    clean = tmp_path / "clean.jsonl"
    clean.write_bytes(b"".join(_lines(sft_file)[:16]))
    array = tmp_path / "chats.json"  # one JSON document: a bad byte cannot be skipped, so it is named
    array.write_bytes(b'[\n{"messages": [{"role": "user", "content": "hi"}]},\n' + BAD_UTF8.rstrip(b"\n") + b"\n]\n")
    rl = _rl_parquet(tmp_path / "rl.parquet", make_problems(3, seed=3), [math.nan, None, "nan"])
    too_short, bad_array, no_rl = prism_many(
        _validate("sft", [clean], "data.max_prompt_length=8", "data.max_response_length=8"),
        _validate("sft", [array]), _validate("rl", [rl], f"model.hf_path={hf_config_dir}"))
    one_line_error(too_short, str(clean), "no conversation has an assistant token within 16 tokens")
    one_line_error(bad_array, f"{array}: line 3: invalid UTF-8")
    one_line_error(no_rl, str(rl), "no usable row", "ground_truth_missing")


ODD = [None, 3, 3.0, math.nan, math.inf, b"3", ["3"], {"a": 1}, object(), "", " ", "\x00\ud800", "(" * 5000,
       "\\frac{" * 300, "1" * 5000, "nan", "NaN", "None", "null", "\\boxed{}", "(A) and (B)", "1,2,3," * 200]


def test_answer_accuracy_never_raises_and_never_scores_a_missing_reference():
    from prism_mcore.algorithms.answer_match import answer_accuracy

    for pred in ODD:
        for golds in ODD + [ODD, iter(["3"]), 12]:
            assert answer_accuracy(pred, golds, use_math_verify=False) in (0.0, 1.0)
    for missing in ("nan", "NaN", " nan ", "None", "null", math.nan, None):
        assert answer_accuracy("nan", [missing]) == 0.0 and answer_accuracy("None", missing) == 0.0
    assert answer_accuracy("3", ["nan", "3"]) == 1.0  # a real answer beside a missing one still counts


def test_reward_of_a_nan_ground_truth_is_zero():
    from prism_mcore.algorithms.reward import AnswerChecker, compute_reward

    checker = AnswerChecker(sandboxed=False)
    answer = "<caption>\n- x\n</caption>\n<think>\ny\n</think>\n<answer>\nnan\n</answer>"
    for truth in (math.nan, "nan", None, [math.nan]):
        assert compute_reward(answer, truth, checker=checker).acc == 0.0
    assert checker.accuracy("3", 12) == 0.0  # a non-iterable reference list is odd input, not a crash


@pytest.mark.timeout(300)
def test_sft_stage_trains_through_bad_rows_and_exports_for_release(sft_file, tmp_path):
    """A real (tiny) `prism train` on the file with bad rows: the run finishes, counts the skipped rows, and
    its HF export is world-readable with transformers_version in config.json."""
    out = tmp_path / "run"
    res = ok(prism("train", "/dev/null", *TINY, "trainer.stage=sft", "trainer.steps=1", "optim.lr=1e-3",
                   f"data.train_files=[{sft_file}]", f"trainer.output_dir={out}", timeout=280))
    assert "skipped 2 malformed lines" in res.stderr and "dropped 1 of 17" in res.stderr
    final = res.stdout.strip().splitlines()[-1]
    assert int(re.search(r"skipped_rows=(\d+)", final).group(1)) >= 2, final
    hf = out / "hf"
    assert json.loads((hf / "config.json").read_text())["transformers_version"]
    assert (hf.stat().st_mode & 0o777) == 0o755
    assert {f.name: f.stat().st_mode & 0o777 for f in hf.iterdir()} == {f.name: 0o644 for f in hf.iterdir()}
    assert not [p.name for p in out.iterdir() if p.name.startswith(".hf.")]  # no temp sibling left behind
