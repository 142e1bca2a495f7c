"""`prism train` stage sft on the synthetic task: the loss falls, a killed run resumes to the same
losses as an uninterrupted one, and the exported HF model loads in transformers."""
import json
import subprocess
import sys

import pytest
import torch

TINY = ["model.vocab_size=151936", "model.hidden_size=64", "model.intermediate_size=128",
        "model.num_hidden_layers=2", "model.num_attention_heads=4", "model.num_key_value_heads=2",
        "model.head_dim=16", "model.max_position_embeddings=512", "optim.lr=3e-3", "optim.weight_decay=0",
        "data.global_batch_size=8", "data.micro_batch_tokens=1200", "data.max_prompt_length=256",
        "data.max_response_length=256", "trainer.stage=sft"]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    from prism_mcore.data.synthetic import make_problems, write_sft_jsonl

    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    write_sft_jsonl(make_problems(64, seed=0), path, fmt="messages")
    return path


def prism_train(*overrides, timeout=600):
    return subprocess.run([sys.executable, "-m", "prism_mcore.cli", "train", "/dev/null", *TINY, *overrides],
                          capture_output=True, text=True, timeout=timeout)


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.timeout(900)
def test_sft_trains_resumes_and_exports(sft_data, tmp_path):
    common = [f"data.train_files=[{sft_data}]", "parallel.tp=2", "parallel.world_size=2", "trainer.save_interval=2"]
    full = prism_train(*common, "trainer.steps=4", f"trainer.output_dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr[-4000:]
    uninterrupted = losses(tmp_path / "full")
    assert uninterrupted[-1] < uninterrupted[0]

    # a run stopped after step 2 (its checkpoint) and started again with the same command
    part = prism_train(*common, "trainer.steps=2", "trainer.export_hf=false", f"trainer.output_dir={tmp_path / 'cut'}")
    assert part.returncode == 0, part.stderr[-4000:]
    again = prism_train(*common, "trainer.steps=4", f"trainer.output_dir={tmp_path / 'cut'}")
    assert again.returncode == 0, again.stderr[-4000:]
    assert losses(tmp_path / "cut") == pytest.approx(uninterrupted, rel=1e-5)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "hf")
    assert model.config.hidden_size == 64

    # `prism convert` of the last checkpoint of a model trained from scratch (no source config.json to
    # carry) gives a directory transformers loads, with the stage's own export's weights and config
    conv = subprocess.run([sys.executable, "-m", "prism_mcore.cli", "convert", "mcore-to-hf", "--ckpt",
                           str(tmp_path / "full" / "checkpoints"), "--out", str(tmp_path / "conv")],
                          capture_output=True, text=True, timeout=600)
    assert conv.returncode == 0, conv.stderr[-4000:]
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "conv")
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "conv" / name).read_text()) == \
            json.loads((tmp_path / "full" / "hf" / name).read_text()), name
    theirs = converted.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(theirs[name], tensor), name


def test_missing_training_file_is_one_line_exit_2(tmp_path):
    res = prism_train(f"data.train_files=[{tmp_path / 'nope.jsonl'}]", "trainer.steps=1",
                      f"trainer.output_dir={tmp_path}")
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "nope.jsonl" in res.stderr
