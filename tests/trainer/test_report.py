"""The demo report's reference level: always answering the most common training answer."""
from prism_mcore.data.synthetic import Problem, write_rl_parquet
from prism_mcore.trainer.report import prior_accuracy


def _problems(answers):
    return [Problem(f"q{i}", ["a fact"], ["1 + 1 = 2 things."], a) for i, a in enumerate(answers)]


def test_prior_accuracy_is_the_most_common_training_answers_held_out_rate(tmp_path):
    write_rl_parquet(_problems(["4", "7", "4", "12", "4", "7"]), tmp_path / "rl.parquet")
    write_rl_parquet(_problems(["4", "9", "7", "4", "1"]), tmp_path / "val.parquet", with_teacher=False)
    assert prior_accuracy(tmp_path / "rl.parquet", tmp_path / "val.parquet") == 2 / 5
    assert prior_accuracy(tmp_path / "missing.parquet", tmp_path / "val.parquet") is None
