"""Inputs of the rollout-stage launcher tests: a tiny Qwen3 policy (HF) and an RL parquet with teacher columns."""
import pytest
import torch


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from prism_mcore.data.synthetic import make_problems, write_rl_parquet
    from prism_mcore.data.tokenizer import qwen3_tokenizer

    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=64,  # vLLM-CPU head sizes
                                 max_position_embeddings=512, tie_word_embeddings=True,
                                 eos_token_id=151645)).save_pretrained(root / "policy")
    qwen3_tokenizer().save_pretrained(str(root / "policy"))
    write_rl_parquet(make_problems(16, seed=3), root / "rl.parquet")  # with the teacher columns align reads
    return [f"model.hf_path={root / 'policy'}", f"data.train_files=[{root / 'rl.parquet'}]"]
