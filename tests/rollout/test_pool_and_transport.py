"""Engine pool behaviour on fake engines (no vLLM), bucket transports, probe and mismatch metrics."""
import math

import pytest
import ray
import torch

from pool_helpers import rollout_config
from prism_mcore.rollout.engine import EngineError, Prompt, SamplingParams
from prism_mcore.rollout.engine_pool import EnginePool, EngineTimeoutError, make_placement
from prism_mcore.rollout.probe import LogprobMismatch, Probe, check_probe, rollout_mismatch
from prism_mcore.rollout.transport import BucketPacker, LocalBucket, Reshaped, arena

SCHEMA = {"w": ((4,), "float32")}
ECHO = "fake_engines:EchoEngine"


def echo_pool(ray_cluster, namespace, delays=None, max_staleness=0, **rollout):
    cfg = rollout_config(**rollout)
    return EnginePool("unused", cfg, {"schema": SCHEMA, "delays": delays or {}}, namespace=namespace,
                      engine_cls=ECHO, max_staleness=max_staleness).start()


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
    # ranks' nodes given (a joined cluster): each trainer bundle is pinned to its rank's node; with no other node
    # in the cluster, disaggregated engines share it
    here = ray.get_runtime_context().get_node_id()
    pinned = make_placement(rollout_config(mode="disaggregated", num_engines=1), trainer_ranks=1,
                            trainer_nodes=[here])
    assert pinned.trainer_nodes == [here] and pinned.bundle_nodes == [here, here]
    for p in (colo, dis, pinned):
        remove_placement_group(p.group)


@pytest.mark.parametrize("transport", ["shm", "ray", "local"])
def test_packer_buckets_round_trip(transport, ray_cluster):
    tensors = [(f"t{i}", torch.randn(1000 * (i + 1))) for i in range(6)] + [("big", torch.randn(50_000))]
    tensors.append(("bf16", torch.randn(7, 3).to(torch.bfloat16)))
    # A strided view whose reshape would copy (the QKV split) is packed without materializing it first.
    qkv = torch.randn(2, 6, 5)
    lazy = Reshaped(qkv[:, :4, :], (8, 5))
    got = []
    packer = BucketPacker(got.append, bucket_bytes=12_000, transport=transport, tag="unit_test")
    for name, t in tensors:
        packer.add(name, t)
    packer.add("q", lazy)
    tensors.append(("q", lazy.materialize()))
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


@pytest.mark.timeout(120)
def test_staleness_window_from_config_and_check(ray_cluster):
    """The pool's max_staleness is its default window; results outside it are named with both versions."""
    import ray

    from prism_mcore.rollout.engine import GenerationResult, StaleWeightsError
    from prism_mcore.rollout.engine_pool import check_staleness

    pool = echo_pool(ray_cluster, "echo3", max_staleness=1)
    try:
        for v in (1, 2):
            ray.get(pool.actors[0].receive_bucket.remote(v, LocalBucket([("w", torch.ones(4))])))
            ray.get(pool.actors[0].commit_update.remote(v, 1))
        ray.get(pool.actors[1].receive_bucket.remote(1, LocalBucket([("w", torch.ones(4))])))
        ray.get(pool.actors[1].commit_update.remote(1, 1))
        ps = [Prompt([k]) for k in range(4)]
        res = pool.generate(ps, SamplingParams(), step=2)  # policy 2, engine 1 at 1: inside the window
        assert {r.engine_id for r in res} == {0, 1}
        res = pool.generate(ps, SamplingParams(), step=2, max_staleness=0)  # strictly on-policy: engine 0
        assert {(r.engine_id, r.weight_version) for r in res} == {(0, 2)}
        with pytest.raises(EngineError, match=r"no engine holds weight version 4 \(max staleness 1\): "
                                              r"prism-engine-0=2, prism-engine-1=1"):
            pool.generate(ps, SamplingParams(), step=4, version=4)
        # Rollouts kept for a later, newer policy are checked again before training on them.
        check_staleness(res, policy_version=3, max_staleness=1)
        with pytest.raises(StaleWeightsError, match=r"step 9: rollout from prism-engine-1 was sampled with weight "
                                                    r"version 1, but the policy is at version 3 and "
                                                    r"max_staleness=1 allows only 2..3"):
            check_staleness([GenerationResult([], 1, 1)], 3, 1, step=9, names=pool.names)
    finally:
        pool.shutdown()


@pytest.mark.timeout(120)
def test_torch_distributed_buckets_to_fake_engines(ray_cluster):
    """Buckets broadcast over a gloo group shared with two engine actors arrive bit-exact (incl. bf16 and an
    oversize tensor); the group is reused by the next sync; a bucket an engine rejects does not hang the
    broadcast, and the group still works afterwards."""
    import ray

    from prism_mcore.rollout.weight_sync import _dist_sender, _wait

    tensors = {f"t{i}": torch.randn(1000 * (i + 1)) for i in range(5)}
    tensors["big"] = torch.randn(50_000)
    tensors["bf16"] = torch.randn(7, 3).to(torch.bfloat16)
    schema = {n: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in tensors.items()}
    cfg = rollout_config(timeout_s=60)
    pool = EnginePool("unused", cfg, {"schema": schema}, namespace="echo_dist", engine_cls=ECHO).start()
    try:
        endpoints = pool.endpoints  # the sender group is cached on this object (as the trainer holds one)
        sender = _dist_sender(endpoints, "echo_dist_r0", pool.actors, endpoints.names, 60, 0)
        assert _dist_sender(endpoints, "echo_dist_r0", pool.actors, endpoints.names, 60, 0) is sender  # reused

        def sync(version, pairs):
            refs = []
            packer = BucketPacker(lambda b: refs.append([a.receive_bucket.remote(version, b) for a in pool.actors]),
                                  12_000, "torch_distributed", "echo_dist", dist_sender=sender)
            for n, t in pairs:
                packer.add(n, t)
            packer.flush()
            for r in refs:
                _wait(r, pool.names, "receive", 60, version)
            return packer

        for version in (1, 2):
            packer = sync(version, [(n, t + version) for n, t in tensors.items()])
            assert packer.buckets >= 5
            for summary in ray.get([a.commit_update.remote(version, len(tensors), True) for a in pool.actors]):
                got = summary.extra["tensors"]
                assert all(torch.equal(got[n], t + version) for n, t in tensors.items())
        from prism_mcore.rollout.weight_sync import WeightSyncError

        with pytest.raises(WeightSyncError, match=r"t0 has shape \(7,\), the model expects \(1000,\)"):
            sync(3, [("t0", torch.zeros(7))])
        sync(3, list(tensors.items()))
        for summary in ray.get([a.commit_update.remote(3, len(tensors), True) for a in pool.actors]):
            assert torch.equal(summary.extra["tensors"]["big"], tensors["big"])
    finally:
        pool.shutdown()


def test_sync_options_resolution():
    from prism_mcore.rollout.probe import Probe
    from prism_mcore.rollout.weight_sync import _options, probe_due

    probe = Probe([[1, 2]], [[-1.0]])
    assert _options(None, None).__dict__ == dict(bucket_mb=512, transport="auto", timeout_s=600.0, zero_copy=False,
                                                 probe_every=0)
    assert _options(None, probe).probe_every == 1  # an explicit probe without a config: every sync, as before
    cfg = rollout_config(transport="torch_distributed", weight_bucket_mb=64, probe_every=3, timeout_s=30)
    opts = _options(cfg, probe, bucket_mb=8)
    assert (opts.bucket_mb, opts.transport, opts.timeout_s, opts.probe_every) == (8, "torch_distributed", 30, 3)
    assert [v for v in range(1, 10) if probe_due(v, 3)] == [3, 6, 9] and not probe_due(3, 0)
    with pytest.raises(ValueError, match="unknown weight transport"):
        _options(None, None, transport="nccl")


@pytest.mark.timeout(120)
def test_engines_keep_their_temp_files_in_a_dir_that_goes_with_them(ray_cluster, tmp_path):
    """vLLM leaves its rendezvous file (vllm_dist_<uuid>) in the temp dir: each engine's temp dir is its own,
    removed by the pool's shutdown; one left by an engine that was killed is reaped by the next run's start."""
    import os
    import tempfile

    from prism_mcore.rollout.engine_actor import ENGINE_SCRATCH_PREFIX, reap_orphaned_engine_scratch

    def temp_of(actor):
        return ray.get(actor.__ray_call__.remote(lambda self: (tempfile.gettempdir(), os.environ["TMPDIR"])))

    pool = echo_pool(ray_cluster, "echo_scratch")
    try:
        dirs = [temp_of(a) for a in pool.actors]
        assert all(d == e and os.path.basename(d).startswith(ENGINE_SCRATCH_PREFIX) and os.path.isdir(d)
                   for d, e in dirs) and len({d for d, _ in dirs}) == 2
        ray.get(pool.actors[0].__ray_call__.remote(lambda self: open(os.path.join(self.scratch, "vllm_dist_x"), "w").close()))
    finally:
        pool.shutdown()
    assert not any(os.path.exists(d) for d, _ in dirs)
    # a dir whose engine process is gone (pid 2**22 + 1 is above Linux's pid_max) is reaped; a live one stays
    dead, live = tmp_path / f"{ENGINE_SCRATCH_PREFIX}{2**22 + 1}_ab", tmp_path / f"{ENGINE_SCRATCH_PREFIX}{os.getpid()}_cd"
    for d in (dead, live):
        d.mkdir()
        (d / "vllm_dist_y").write_text("x")
    assert reap_orphaned_engine_scratch(str(tmp_path)) == 1 and not dead.exists() and live.exists()
