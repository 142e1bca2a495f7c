"""`prism train` stage disc-warmup: an upcycled tiny MoE discriminator learns to prefer the teacher's
segments on synthetic pairs (loss falls, accuracy rises) at EP2, and exports as an HF classifier."""
import json
import subprocess
import sys

import pytest
import torch

TINY_MOE = ["model.max_position_embeddings=512", "optim.lr=1e-3", "optim.weight_decay=0", "data.global_batch_size=16",
            "data.micro_batch_tokens=4096", "data.max_prompt_length=192", "data.max_response_length=192",
            "trainer.stage=disc-warmup", "parallel.ep=2", "parallel.world_size=2"]


@pytest.mark.timeout(900)
def test_disc_warmup_prefers_teacher(tmp_path):
    from transformers import AutoModelForSequenceClassification, Qwen3Config, Qwen3ForCausalLM

    from prism_mcore.data.synthetic import make_problems, write_warmup_jsonl
    from prism_mcore.data.tokenizer import qwen3_tokenizer
    from prism_mcore.models.qwen3.upcycle import upcycle

    torch.manual_seed(0)
    dense = Qwen3ForCausalLM(Qwen3Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         max_position_embeddings=512, tie_word_embeddings=True))
    dense.save_pretrained(tmp_path / "dense")
    qwen3_tokenizer().save_pretrained(str(tmp_path / "dense"))
    upcycle(tmp_path / "dense", tmp_path / "moe", num_experts=4, top_k=2, noise_std=0.01, seed=0)
    write_warmup_jsonl(make_problems(32, seed=1), tmp_path / "pairs.jsonl", seed=2)

    res = subprocess.run([sys.executable, "-m", "prism_mcore.cli", "train", "/dev/null", *TINY_MOE,
                          f"model.hf_path={tmp_path / 'moe'}", f"data.train_files=[{tmp_path / 'pairs.jsonl'}]",
                          "trainer.steps=16", f"trainer.output_dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, timeout=850)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # One step sees 16 of the 32 pairs, so single-step losses are noisy: compare the first and last 4 steps.
    def mean(key, part):
        return sum(r[key] for r in part) / len(part)
    first, last = rows[:4], rows[-4:]
    assert mean("loss", last) < mean("loss", first) - 0.03, [r["loss"] for r in rows]
    assert mean("score_gap", last) > mean("score_gap", first) + 0.05, [r["score_gap"] for r in rows]
    clf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "hf")
    assert type(clf).__name__ == "Qwen3MoeForSequenceClassification"
