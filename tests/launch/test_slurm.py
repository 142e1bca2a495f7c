"""launch/slurm_train.sbatch under a real SLURM controller: launch/slurm_local.sh starts munged, slurmctld and
two slurmd emulating nodes n1, n2 on 127.0.0.1 (their names do not resolve, so the launcher must take the
rendezvous address from the controller). A tiny TP2 SFT stage submitted with `sbatch --wait` on one node and
across both logs the same per-step metrics as plain `prism train` (spawned ranks); a config error fails the job
with its one-line message. With PRISM_RUN_SLOW=1, launch/slurm_ray.sbatch brings Ray up over both nodes and runs
an rl stage whose engine is on n2."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "launch" / "slurm_local.sh"
SBATCH = REPO / "launch" / "slurm_train.sbatch"
SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
TINY = ["trainer.stage=sft", "model.vocab_size=151936", "model.hidden_size=64", "model.intermediate_size=128",
        "model.num_hidden_layers=2", "model.num_attention_heads=4", "model.num_key_value_heads=2",
        "model.head_dim=16", "model.max_position_embeddings=512", "optim.lr=3e-3", "optim.weight_decay=0",
        "data.global_batch_size=8", "data.micro_batch_tokens=1200", "data.max_prompt_length=256",
        "data.max_response_length=256", "parallel.tp=2", "trainer.steps=3", "trainer.export_hf=false"]
# The spawner gives each of its 2 ranks this many threads; the SLURM tasks get as many CPUs (-> OMP_NUM_THREADS).
CPUS_PER_TASK = max(1, (os.cpu_count() or 1) // 2)


def _clean_env(**extra) -> dict:
    """No SLURM_* / torch rendezvous variables from whatever runs pytest (it may itself be a SLURM job)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                        "MASTER_PORT", "OMP_NUM_THREADS")}
    return {**env, "PATH": SBIN_PATH, **extra}


def _free_port_block(n: int) -> int:
    """A base port with base..base+n-1 free, below the ephemeral range and the launcher's MASTER_PORTs (20000+)."""
    for _ in range(50):
        base = random.randrange(10000, 19900)
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port block for the local SLURM cluster")


def _tail(path: Path, n: int = 40) -> str:
    if not path.is_file():
        return f"--- {path}: missing\n"
    return f"--- tail of {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-n:]) + "\n"


class Cluster:
    def __init__(self, root: Path, env: dict):
        self.root, self.env = root, env

    def logs(self) -> str:
        return "".join(_tail(p) for p in sorted((self.root / "log").glob("*.log")))

    def run(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, **kw)

    def job_state(self, job_id: str) -> str:
        """The final state: `sbatch --wait` returns while the job may still be COMPLETING."""
        deadline = time.monotonic() + 30
        while True:
            info = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
            state = m.group(1) if (m := re.search(r"JobState=(\S+)", info)) else f"unknown ({info.strip()!r})"
            if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING") or time.monotonic() > deadline:
                return state
            time.sleep(0.5)

    def sbatch(self, out: Path, *args: str) -> tuple[int, str, str]:
        """`sbatch --wait` the launcher from the repository root; (exit code, final state, job output)."""
        res = self.run(["sbatch", "--wait", "--parsable", "--time=5", f"--cpus-per-task={CPUS_PER_TASK}",
                        f"--output={out}", *args], cwd=REPO, timeout=240)
        job_id = res.stdout.strip().split(";")[0]
        assert job_id.isdigit(), f"sbatch: {res.stdout}{res.stderr}\n{self.logs()}"
        return res.returncode, self.job_state(job_id), out.read_text(errors="replace") if out.is_file() else ""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    for binary in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo"):
        if shutil.which(binary, path=SBIN_PATH) is None:
            pytest.skip(f"{binary} not found (`make slurm-deps` installs SLURM as root with apt-get)")
    if os.geteuid() != 0:
        pytest.skip("slurmd runs job steps as the submitting user only when started as root")
    root = tmp_path_factory.mktemp("slurm")
    env = _clean_env(SLURM_LOCAL_PORT=str(_free_port_block(3)), SLURM_CONF=str(root / "slurm.conf"))
    try:
        up = subprocess.run([str(LOCAL), "up", str(root), "2"], env=env, capture_output=True, text=True, timeout=90)
        assert up.returncode == 0, f"slurm_local.sh up failed:\n{up.stdout}{up.stderr}"
        yield Cluster(root, env)
    finally:
        down = subprocess.run([str(LOCAL), "down", str(root)], env=env, capture_output=True, text=True, timeout=90)
        assert down.returncode == 0, f"slurm_local.sh down failed:\n{down.stdout}{down.stderr}"


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    from prism_mcore.data.synthetic import make_problems, write_sft_jsonl

    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    write_sft_jsonl(make_problems(32, seed=0), path, fmt="messages")
    return path


def metrics(out_dir: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows]


@pytest.fixture(scope="module")
def local_metrics(cluster, sft_data, tmp_path_factory):
    """The reference: the same stage with `prism train` spawning its 2 ranks (after the cluster check, so a
    machine without SLURM skips without training)."""
    out = tmp_path_factory.mktemp("local")
    res = subprocess.run([sys.executable, "-m", "prism_mcore.cli", "train", "/dev/null", *TINY,
                          f"data.train_files=[{sft_data}]", "parallel.world_size=2", f"trainer.output_dir={out}"],
                         env=_clean_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = metrics(out)
    assert [r[0] for r in rows] == [1, 2, 3] and rows[-1][1] < rows[0][1], rows
    return rows


# Both layouts (~45-60 s each) run with PRISM_RUN_SLOW=1 only (make test's 25 minutes); the one-line failure
# tests below stay in make test.
_SLOW = pytest.mark.skipif(os.environ.get("PRISM_RUN_SLOW") != "1", reason="slow: set PRISM_RUN_SLOW=1 to run")


@pytest.mark.parametrize("layout", [pytest.param(["--nodes=1", "--ntasks-per-node=2"], marks=_SLOW),
                                    pytest.param(["--nodes=2", "--ntasks-per-node=1"], marks=_SLOW)],
                         ids=["1node", "2nodes"])
def test_sbatch_matches_local_train(cluster, sft_data, local_metrics, tmp_path, layout):
    code, state, output = cluster.sbatch(tmp_path / "job.out", *layout, str(SBATCH), "/dev/null", *TINY,
                                         f"data.train_files=[{sft_data}]", f"trainer.output_dir={tmp_path / 'run'}")
    why = f"exit {code}, state {state}\n--- job output\n{output[-6000:]}\n{cluster.logs()}"
    assert code == 0 and state == "COMPLETED", why
    # n1 does not resolve: the rendezvous is the head node's NodeAddr from the controller
    assert "rendezvous 127.0.0.1:" in output, why
    # same ranks, same threads per rank, same data order: the same numbers, not just close ones
    got = metrics(tmp_path / "run")
    assert got == local_metrics, f"(step, loss, grad_norm) job {got} != local {local_metrics}\n{why}"


def test_config_error_fails_job_with_one_line(cluster, tmp_path):
    code, state, output = cluster.sbatch(tmp_path / "job.out", "--nodes=1", "--ntasks-per-node=2", str(SBATCH),
                                         "/dev/null", *TINY, "parallel.tp=3", f"trainer.output_dir={tmp_path}")
    why = f"exit {code}, state {state}\n--- job output\n{output[-6000:]}\n{cluster.logs()}"
    assert code == 2 and state == "FAILED", why
    assert "config error: parallel.tp=3 must divide model.num_attention_heads=4\n" in output, why
    assert "Traceback" not in output, why


SLURM_RAY = REPO / "launch" / "slurm_ray.sbatch"
RL_TINY = ["trainer.stage=rl", "trainer.steps=1", "model.max_position_embeddings=512", "optim.lr=1e-3",
           "data.global_batch_size=2", "data.micro_batch_tokens=2048", "data.max_prompt_length=256", "rollout.n=2",
           "rollout.max_tokens=16", "rollout.num_engines=1", "rollout.mode=disaggregated", "trainer.export_hf=false",
           "trainer.eval_at_start=false"]


@pytest.mark.skipif(os.environ.get("PRISM_RUN_SLOW") != "1", reason="slow (~75 s each): set PRISM_RUN_SLOW=1 to "
                    "run; tests/launch/test_ray_launch.py runs the launcher it wraps on every `make test`")
@pytest.mark.parametrize("layout", ["engines_on_n2", "trainer_on_both"])
def test_slurm_ray_runs_rl_on_two_nodes(cluster, inputs, tmp_path, layout):
    """launch/slurm_ray.sbatch: Ray head on n1, a worker on n2. engines_on_n2: the trainer on n1, the
    disaggregated engine on n2 takes its weights over torch_distributed. trainer_on_both
    (PRISM_TRAINER_NODES=2): a trainer rank and a colocated engine on each node."""
    out = tmp_path / "run"
    both = layout == "trainer_on_both"
    code, state, output = cluster.sbatch(
        tmp_path / "job.out", "--nodes=2", "--ntasks-per-node=1", *(["--export=ALL,PRISM_TRAINER_NODES=2"] * both),
        str(SLURM_RAY), "/dev/null", *RL_TINY, *inputs, f"trainer.output_dir={out}",
        *(["rollout.mode=colocated", "rollout.num_engines=2", "rollout.probe_every=1"] * both))
    why = f"exit {code}, state {state}\n--- job output\n{output[-6000:]}\n{cluster.logs()}"
    assert code == 0 and state == "COMPLETED", why
    assert "2 nodes in the Ray cluster" in output and "node 1 joined the Ray cluster" in output, why
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1], why
    if both:
        assert rows[0]["rollout/trainer_nodes"] == 2 and rows[0]["rollout/engines_off_trainer_node"] == 0, why
        assert rows[0]["rollout/transport"] == "shm+torch_distributed" and rows[0]["probe_error"] < 1e-3, why
    else:
        assert rows[0]["rollout/engines_off_trainer_node"] == 1 and rows[0]["rollout/transport"] == "torch_distributed"


@pytest.mark.skipif(os.environ.get("PRISM_RUN_SLOW") != "1", reason="slow (~40 s): set PRISM_RUN_SLOW=1 to run")
def test_rollout_stage_over_srun_on_two_nodes_without_ray_fails_in_one_line(cluster, inputs, tmp_path):
    """slurm_train.sbatch puts one rank on each node but starts no Ray there: the rollout stage stops before it
    starts an engine, pointing at the launchers that bring Ray up on every node."""
    code, state, output = cluster.sbatch(tmp_path / "job.out", "--nodes=2", "--ntasks-per-node=1", str(SBATCH),
                                         "/dev/null", *RL_TINY, *inputs, f"trainer.output_dir={tmp_path / 'run'}")
    why = f"exit {code}, state {state}\n--- job output\n{output[-6000:]}\n{cluster.logs()}"
    assert code == 2 and state == "FAILED", why
    assert "the trainer's 2 ranks span nodes (1 on this one) but no Ray cluster was given" in output, why
    assert "Traceback" not in output, why
