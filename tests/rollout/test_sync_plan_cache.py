"""Zero-copy syncs through the cached plan (sync_plan.own_refs): after an optimizer step the engines get the
new values bit for bit from one message per rank, and a layout change invalidates the plan. Real Megatron
trainer ranks, fake engines (no vLLM) that hand back what they applied."""
import os

import pytest

from pool_helpers import rollout_config
from rollout_models import write_tiny_hf
from sync_jobs import sync_cached_plan

ECHO = "fake_engines:EchoEngine"


@pytest.fixture(scope="module")
def echo_pool(ray_cluster, tmp_path_factory):
    from prism_mcore.rollout.engine_pool import EnginePool
    from prism_mcore.rollout.vllm_engine import checkpoint_schema

    hf = tmp_path_factory.mktemp("plan") / "hf"
    write_tiny_hf(hf, tied=False)
    pool = EnginePool("unused", rollout_config(timeout_s=120), {"schema": checkpoint_schema(str(hf))},
                      namespace="echo_plan", engine_cls=ECHO).start()
    yield str(hf), pool
    pool.shutdown()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world,layout,first", [(1, {}, 1), (2, {"pp": 2}, 11)])
def test_cached_plan_after_optimizer_step_and_layout_change(echo_pool, ranks, world, layout, first):
    hf, pool = echo_pool
    runs = ranks(sync_cached_plan, world, hf, layout, pool.endpoints, first, timeout=240)[0]
    for run in runs:
        assert run["bad"] == [], run["bad"]  # every HF tensor bit-exact on both engines
        assert run["stats"].tensors == run["names"] == 3 + 2 * 11  # embed, norm, lm_head; 11 per layer
    first, step, moved, reshared = runs
    assert step["changed"] == step["names"] and reshared["changed"] == reshared["names"]  # new values each time
    for run in (first, step, reshared):  # every rank sent only its plan's references, one message each
        assert run["stats"].planned_ranks == world and run["stats"].buckets == world
        assert run["stats"].ref_bytes == run["stats"].bytes
    assert step["same_plan"]  # the optimizer step kept the plan
    assert not moved["same_plan"] and not reshared["same_plan"]  # new memory: planned again, twice
    # rank 0's moved parameter is not shared memory: that rank streams (its tensor through staging)
    assert moved["stats"].planned_ranks == world - 1 and 0 < moved["stats"].ref_bytes < moved["stats"].bytes


@pytest.mark.skipif(os.environ.get("PRISM_RUN_SLOW") != "1", reason="slow: set PRISM_RUN_SLOW=1 to run (make test's 25 minutes)")
@pytest.mark.timeout(300)
def test_tp2_ranks_stream_their_pieces(echo_pool, ranks):
    """TP2: most units are split over both ranks, so neither rank has a plan of references; the sync streams
    (references where a unit is whole on one rank, staging for assembled ones) and stays bit-exact."""
    hf, pool = echo_pool
    runs = ranks(sync_cached_plan, 2, hf, {"tp": 2}, pool.endpoints, 21, timeout=240)[0]
    for run in runs:
        assert run["bad"] == [], run["bad"]
        assert run["stats"].planned_ranks == 0 and 0 < run["stats"].ref_bytes < run["stats"].bytes
    assert runs[1]["changed"] == runs[1]["names"]
