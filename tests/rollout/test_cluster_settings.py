"""Engine settings from the config (checked against the stage's lengths at load), and per-run shm staging
names: two runs on one machine never share a file, and a run's files go with it (also after SIGKILL)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _validate(*args):
    return subprocess.run([sys.executable, "-m", "prism_mcore.cli", "validate", "--config-only", *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_lengths_beyond_engine_settings_fail_validation_naming_both():
    grpo = "configs/cluster/qwen3_4b_grpo.yaml"  # prompt 2048 + response 8192
    res = _validate(grpo, "rollout.enable_chunked_prefill=false")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "rollout.max_num_batched_tokens=8192" in lines[0] and "10240" in lines[0] and "2048 + 8192" in lines[0]
    res = _validate(grpo, "rollout.max_model_len=9000")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "rollout.max_model_len=9000" in res.stderr and "= 10240" in res.stderr
    # an SFT stage starts no engines: its rollout section is not checked
    assert _validate(grpo, "trainer.stage=sft", "rollout.max_model_len=9000").returncode == 0


def test_colocated_engines_beyond_the_trainer_ranks_fail_validation():
    """Colocated engines share the trainer ranks' devices: more engine devices than ranks fails at load (the
    config's world_size) or at start-up (the launcher's rank count), naming both numbers."""
    from prism_mcore.config import ConfigError, load_config
    from prism_mcore.config.load import check_world_size

    res = _validate("configs/cluster/qwen3_vl_4b.yaml", "trainer.stage=rl", "parallel.world_size=4")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "rollout.num_engines*rollout.engine_tp=4*2=8 must be <= the 4 trainer ranks" in res.stderr
    cfg = load_config("configs/cluster/qwen3_vl_4b.yaml", ["trainer.stage=rl"])
    check_world_size(cfg, 8)  # 4 engines of TP 2 on 8 ranks: fits
    with pytest.raises(ConfigError, match=r"4\*2=8 must be <= the 6 trainer ranks"):
        check_world_size(cfg, 6)
    check_world_size(load_config("configs/cluster/qwen3_vl_4b.yaml", ["trainer.stage=rl", "rollout.mode=disaggregated"]), 6)


def test_trainer_ranks_on_several_nodes_need_a_ray_cluster_spanning_them():
    from prism_mcore.trainer.engines import ray_scope_problem

    assert ray_scope_problem(None, 4, 4) is None  # one node: rank 0 starts a Ray for it
    assert ray_scope_problem("10.0.0.1:6379", 16, 8) is None  # a launcher's cluster spans the nodes
    problem = ray_scope_problem(None, 16, 8)  # srun/torchrun over 2 nodes, no cluster
    assert "16 ranks span nodes (8 on this one)" in problem and "launch/mlp_launch.sh" in problem


def test_cluster_configs_load_with_their_engine_settings():
    from prism_mcore.config import load_config
    from prism_mcore.rollout.cluster import engine_settings

    for path in sorted((REPO / "configs" / "cluster").glob("*.yaml")):
        cfg = load_config(path, [])
        kwargs, _ = engine_settings(cfg.rollout, cfg.data.max_prompt_length, cfg.model.dtype, "gpu")
        assert kwargs["max_model_len"] == cfg.data.max_prompt_length + cfg.rollout.max_tokens, path.name
    cfg = load_config(REPO / "configs/cluster/qwen3_vl_4b.yaml", ["trainer.stage=rl", "rollout.max_tokens=8192",
                                                                  "data.max_prompt_length=2048"])
    gpu, note = engine_settings(cfg.rollout, 2048, "bfloat16", "gpu")
    assert note is None and gpu["max_num_batched_tokens"] == 8192 and gpu["enable_chunked_prefill"]
    assert gpu["gpu_memory_utilization"] == 0.5 and gpu["max_model_len"] == 10240 and not gpu["enforce_eager"]
    # CPU engines keep whole prefills (seeded generators cannot be rewound), and say so
    cpu, note = engine_settings(cfg.rollout, 2048, "bfloat16", "cpu")
    assert not cpu["enable_chunked_prefill"] and cpu["max_num_batched_tokens"] == 10240
    assert "gpu_memory_utilization" not in cpu and "whole prefills" in note


SENDER = """
import os, sys, time, torch
from prism_mcore.rollout.transport import arena, release_arenas, sender_tag
run, value, mode = sys.argv[1], float(sys.argv[2]), sys.argv[3]
tag = sender_tag(run, 0)
for k in range(3):
    path, buf = arena(tag).slot(k, 1 << 20)
    buf.view(torch.float32).fill_(value)
print(tag, flush=True)
time.sleep(1.0)  # the other run writes its slots meanwhile
for k in range(3):  # still ours
    assert bool((arena(tag).slot(k, 1 << 20)[1].view(torch.float32) == value).all()), (run, k)
print("ok", flush=True)
if mode == "hang":
    time.sleep(600)
release_arenas()
"""


def _shm(tag):
    return sorted(p for p in os.listdir("/dev/shm") if p.startswith(f"prism_ws_{tag}_"))


@pytest.mark.timeout(120)
def test_two_runs_never_share_staging_files_and_remove_theirs():
    from prism_mcore.rollout.transport import reap_orphaned_shm

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    a = subprocess.Popen([sys.executable, "-c", SENDER, "prism_runA", "1.0", "exit"], stdout=subprocess.PIPE,
                         text=True, env=env)
    b = subprocess.Popen([sys.executable, "-c", SENDER, "prism_runB", "2.0", "hang"], stdout=subprocess.PIPE,
                         text=True, env=env)
    try:
        tag_a, tag_b = a.stdout.readline().strip(), b.stdout.readline().strip()
        assert tag_a.startswith("prism_runA_r0p") and tag_b.startswith("prism_runB_r0p") and tag_a != tag_b
        assert len(_shm(tag_b)) == 3
        assert a.stdout.readline().strip() == "ok" and b.stdout.readline().strip() == "ok"
        assert a.wait(timeout=60) == 0
        assert _shm(tag_a) == []  # a normal exit removes its own files ...
        assert len(_shm(tag_b)) == 3  # ... and nobody else's
        assert reap_orphaned_shm() >= 0 and len(_shm(tag_b)) == 3  # a live sender's files are not reaped
        os.kill(b.pid, signal.SIGKILL)
        b.wait(timeout=30)
        assert len(_shm(tag_b)) == 3  # SIGKILL leaves them behind; the next run's start reaps them
        deadline = time.monotonic() + 10
        while _shm(tag_b) and time.monotonic() < deadline:
            reap_orphaned_shm()
        assert _shm(tag_b) == []
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
                p.wait()
        for name in _shm("prism_runA") + _shm("prism_runB"):
            os.unlink(f"/dev/shm/{name}")


def test_engine_gpus_on_the_trainers_node_follow_the_ranks_local_numbering():
    """Trainer ranks take GPU LOCAL_RANK outside Ray, so engines on their node get GPUs by the same numbering;
    elsewhere Ray's assignment (a disaggregated bundle holds engine_tp GPUs) stands."""
    from prism_mcore.rollout.engine_pool import Placement

    a, b = "node-a", "node-b"
    # 8 trainer ranks, 4 colocated engines of TP 2: engine i shares (and uses) GPUs 2i, 2i+1
    colo = Placement(None, list(range(8)), [0, 2, 4, 6], 0.5, "gpu", 2, [a] * 8, [a] * 8)
    assert [colo.cuda_devices(i) for i in range(4)] == ["0,1", "2,3", "4,5", "6,7"]
    assert colo.engine_options(1)["num_gpus"] == 0.5 and colo.engine_options(1)["num_cpus"] == 0
    # 4 trainer ranks and 2 TP-2 engines on one node: the engines take GPUs 4-5 and 6-7, never a rank's
    one = Placement(None, [0, 1, 2, 3], [4, 5], 1.0, "gpu", 2, [a] * 4, [a] * 6)
    assert [one.cuda_devices(i) for i in range(2)] == ["4,5", "6,7"] and one.engine_options(0)["num_gpus"] == 2.0
    # two nodes: engines on the other node keep Ray's GPUs; one left on the trainer's node follows the ranks
    two = Placement(None, [0, 1, 2, 3], [4, 5, 6], 1.0, "gpu", 2, [a] * 4, [a] * 4 + [b, a, b])
    assert [two.cuda_devices(i) for i in range(3)] == [None, "4,5", None]
    assert Placement(None, [0], [1], 1.0, "cpu", 1, [a], [a, a]).cuda_devices(0) is None  # CPU: nothing to pin
    # the trainer spans two nodes of 4 GPUs (ranks 0-3 on a, 4-7 on b): colocated engines of TP 2 use the local
    # GPUs of the ranks they share on each node
    span = Placement(None, list(range(8)), [0, 2, 4, 6], 0.5, "gpu", 2, [a] * 4 + [b] * 4, [a] * 4 + [b] * 4)
    assert [span.cuda_devices(i) for i in range(4)] == ["0,1", "2,3", "0,1", "2,3"]
    # ... and disaggregated engines left on those nodes take the GPUs after each node's ranks
    apart = Placement(None, [0, 1, 2, 3], [4, 5, 6], 1.0, "gpu", 1, [a, a, b, b], [a, a, b, b, b, a, b])
    assert [apart.cuda_devices(i) for i in range(3)] == ["2", "2", "3"]


def test_colocated_engines_never_span_trainer_nodes():
    """An engine of engine_tp GPUs shares engine_tp consecutive trainer ranks: they must be on one node
    (checked before anything is placed)."""
    from prism_mcore.config.schema import RolloutConfig
    from prism_mcore.rollout.engine_pool import make_placement

    rollout = RolloutConfig(mode="colocated", num_engines=2, engine_tp=2)
    with pytest.raises(ValueError, match=r"engine 0 \(rollout.engine_tp=2\) would share trainer ranks 0..1, which "
                                         r"are on different nodes"):
        make_placement(rollout, 4, trainer_nodes=["a", "b", "b", "b"])
    with pytest.raises(ValueError, match="trainer_nodes names 3 nodes for 4 trainer ranks"):
        make_placement(rollout, 4, trainer_nodes=["a", "a", "b"])


def test_engine_dtype_follows_rollout_dtype():
    from prism_mcore.config import load_config
    from prism_mcore.config.memory import estimate_memory
    from prism_mcore.rollout.cluster import engine_settings
    from prism_mcore.rollout.probe import coarser_dtype

    same = load_config(None, ["model.dtype=float32", "trainer.stage=rl"])
    half = load_config(None, ["model.dtype=float32", "trainer.stage=rl", "rollout.dtype=bfloat16"])
    assert engine_settings(same.rollout, 64, same.model.dtype, "cpu")[0]["dtype"] == "float32"
    assert engine_settings(half.rollout, 64, half.model.dtype, "cpu")[0]["dtype"] == "bfloat16"
    # the colocated engine's weights in the memory estimate are counted in the engine's dtype
    assert estimate_memory(half).rollout_weights * 2 == estimate_memory(same).rollout_weights > 0
    assert coarser_dtype("float32", "bfloat16") == coarser_dtype("bfloat16", "float32") == "bfloat16"
    assert coarser_dtype("float32", "float32") == "float32"
