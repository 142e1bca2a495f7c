"""Inputs of the rollout-stage launcher tests: a tiny Qwen3 policy (HF) and an RL parquet with teacher columns."""
import pytest


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from prism_mcore.data.synthetic import make_problems, write_rl_parquet
    from tiny_policies import save_tiny_vllm_qwen3

    root = tmp_path_factory.mktemp("inputs")
    save_tiny_vllm_qwen3(root / "policy")
    write_rl_parquet(make_problems(16, seed=3), root / "rl.parquet")  # with the teacher columns align reads
    return [f"model.hf_path={root / 'policy'}", f"data.train_files=[{root / 'rl.parquet'}]"]
