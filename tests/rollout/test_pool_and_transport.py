"""Engine pool behaviour on fake engines (no vLLM), bucket transports, probe and mismatch metrics."""
import math

import pytest
import torch

from pool_helpers import rollout_config
from prism_mcore.rollout.engine import EngineError, Prompt, SamplingParams
from prism_mcore.rollout.engine_pool import EnginePool, EngineTimeoutError, make_placement
from prism_mcore.rollout.probe import LogprobMismatch, Probe, check_probe, rollout_mismatch
from prism_mcore.rollout.transport import BucketPacker, LocalBucket, arena

SCHEMA = {"w": ((4,), "float32")}
ECHO = "fake_engines:EchoEngine"


def echo_pool(ray_cluster, namespace, delays=None, **rollout):
    cfg = rollout_config(**rollout)
    return EnginePool("unused", cfg, {"schema": SCHEMA, "delays": delays or {}}, namespace=namespace,
                      engine_cls=ECHO).start()


@pytest.mark.timeout(120)
def test_prompts_spread_in_order_and_stale_engines_skipped(ray_cluster):
    pool = echo_pool(ray_cluster, "echo1")
    try:
        ps = [Prompt(list(range(k + 1))) for k in range(5)]
        res = pool.generate(ps, SamplingParams(n=2), step=0)
        assert [r.completions[0].token_ids[1] for r in res] == [1, 2, 3, 4, 5]
        assert {r.engine_id for r in res} == {0, 1} and all(len(r.completions) == 2 for r in res)
        import ray

        ray.get(pool.actors[0].receive_bucket.remote(1, LocalBucket([("w", torch.ones(4))])))
        ray.get(pool.actors[0].commit_update.remote(1, 1))
        res = pool.generate(ps, SamplingParams(), step=1)  # newest version is 1: only engine 0 has it
        assert {r.engine_id for r in res} == {0} and all(r.weight_version == 1 for r in res)
        res = pool.generate(ps, SamplingParams(), step=1, max_staleness=1)  # async mode may use engine 1
        assert {r.engine_id for r in res} == {0, 1}
        with pytest.raises(EngineError, match="no engine holds weight version 2"):
            pool.generate(ps, SamplingParams(), step=2, version=2)
    finally:
        pool.shutdown()


@pytest.mark.timeout(120)
def test_timeout_names_engine_and_step(ray_cluster):
    pool = echo_pool(ray_cluster, "echo2", delays={1: 30.0}, timeout_s=3)
    try:
        with pytest.raises(EngineTimeoutError, match=r"step 5: generate on engines \['prism-engine-1'\] timed out"):
            pool.generate([Prompt([1]), Prompt([2])], SamplingParams(), step=5)
    finally:
        pool.shutdown()


def test_placement_bundles(ray_cluster):
    from ray.util.placement_group import remove_placement_group

    with pytest.raises(ValueError, match="colocated needs"):
        make_placement(rollout_config(mode="colocated", num_engines=3), trainer_ranks=2)
    colo = make_placement(rollout_config(mode="colocated", num_engines=2), trainer_ranks=2)
    assert len(colo.group.bundle_specs) == 2 and colo.engine_bundles == [0, 1]
    assert colo.engine_options(1)["num_cpus"] == 0.5 and colo.trainer_options(0)["num_cpus"] == 0.5
    dis = make_placement(rollout_config(mode="disaggregated", num_engines=2), trainer_ranks=2)
    assert len(dis.group.bundle_specs) == 4 and dis.engine_bundles == [2, 3]
    for p in (colo, dis):
        remove_placement_group(p.group)


@pytest.mark.parametrize("transport", ["shm", "ray", "local"])
def test_packer_buckets_round_trip(transport, ray_cluster):
    tensors = [(f"t{i}", torch.randn(1000 * (i + 1))) for i in range(6)] + [("big", torch.randn(50_000))]
    tensors.append(("bf16", torch.randn(7, 3).to(torch.bfloat16)))
    got = []
    packer = BucketPacker(got.append, bucket_bytes=12_000, transport=transport, tag="unit_test")
    for name, t in tensors:
        packer.add(name, t)
    packer.flush()
    try:
        out = dict(pair for b in got for pair in b.open())
        assert list(out) == [n for n, _ in tensors]
        for name, t in tensors:
            assert torch.equal(out[name], t), name
        sizes = [sum(e.nbytes for e in b.entries()) for b in got]
        assert all(s <= 12_000 for s, b in zip(sizes, got) if len(b.entries()) > 1)  # only "big" travels alone
        assert packer.tensors == len(tensors) and packer.buckets == len(got)
    finally:
        arena("unit_test").release()


def test_shm_staging_slots_are_reused_across_syncs():
    paths = []
    for version in range(2):
        packer = BucketPacker(lambda b: paths.append(b.path), bucket_bytes=4096, transport="shm", tag="reuse_test")
        for i in range(3):
            packer.add(f"t{i}", torch.full((1000,), float(version)))
        packer.flush()
    try:
        assert paths[:3] == paths[3:]
    finally:
        arena("reuse_test").release()


def test_probe_tolerance_by_dtype():
    trainer = [[-1.0, -2.0, -3.0]]
    probe = Probe([[1, 2, 3, 4]], trainer, "float32")
    assert check_probe([[-1.0, -2.0, -3.0001]], probe, "e0", 1) < 1e-4
    with pytest.raises(LogprobMismatch, match=r"engine e0, weight version 4, step 9: .* float32 tolerance 1e-04"):
        check_probe([[-1.0, -2.0, -3.01]], probe, "e0", 4, step=9)
    assert check_probe([[-1.0, -2.0, -3.05]], Probe(probe.sequences, trainer, "bfloat16"), "e0", 1) < 3e-2
    with pytest.raises(LogprobMismatch):
        check_probe([[-1.0, -2.0]], probe, "e0", 1)  # a missing token is a mismatch, not a pass


def test_rollout_mismatch_metrics():
    train = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, -9.0]])
    roll = train + torch.tensor([[0.1, -0.1, 0.0], [0.0, 0.2, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    m = rollout_mismatch(train, roll, mask, step=3)
    assert m["tokens"] == 5 and math.isclose(m["max_abs"], 0.2, rel_tol=1e-6)
    assert math.isclose(m["mean_abs"], 0.4 / 5, rel_tol=1e-6) and m["kl_k3"] > 0
    assert rollout_mismatch(train, train, mask)["kl_k3"] == 0.0
