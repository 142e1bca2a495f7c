"""Never lose work, never leave orphans, always a clear error (issue 15, trainer side), through `prism train`:
SIGTERM checkpoints and stops, and a rerun resumes from it with one metrics line per step; the output
directory's lock refuses a second run; a checkpoint of another stage is refused; corrupt checkpoints fall
back to the newest good one; non-finite steps are skipped, counted, and stop the run after
trainer.max_bad_steps with the last good checkpoint intact and strict JSON metrics."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TINY = ["model.vocab_size=151936", "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=2",
        "model.num_attention_heads=2", "model.num_key_value_heads=1", "model.head_dim=16",
        "model.max_position_embeddings=512", "optim.lr=3e-3", "optim.weight_decay=0", "data.global_batch_size=4",
        "data.micro_batch_tokens=4096", "data.max_prompt_length=256", "data.max_response_length=256",
        "trainer.stage=sft", "trainer.export_hf=false", "parallel.world_size=1"]


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    from prism_mcore.data.synthetic import make_problems, write_sft_jsonl

    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    write_sft_jsonl(make_problems(64, seed=0), path, fmt="messages")
    return path


def command(sft_file, out, *extra):
    return [sys.executable, "-m", "prism_mcore.cli", "train", "/dev/null", *TINY, f"data.train_files=[{sft_file}]",
            f"trainer.output_dir={out}", *extra]


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def wait_for_steps(out: Path, n: int, proc, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if (out / "metrics.jsonl").exists():
            done = [r["step"] for r in rows(out)]
            if len(done) >= n:
                return done[-1]
        time.sleep(0.2)
    raise AssertionError(f"no {n} steps logged in {timeout} s")


@pytest.mark.timeout(900)
def test_sigterm_checkpoints_then_resumes_and_the_lock_refuses_a_second_run(sft_file, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(command(sft_file, out, "trainer.steps=400"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_steps(out, 2, proc)
        second = subprocess.run(command(sft_file, out, "trainer.steps=400"), capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [
            f"{out}: another prism run (PID {proc.pid}) is using this trainer.output_dir; wait for it, choose another "
            f"directory, or remove {out / '.prism.lock'} if that run is gone"]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert "stopped by SIGTERM after step" in last and "run the same command to resume" in last, err[-3000:]
    stopped_at = int(last.split("after step ")[1].split()[0])
    assert (out / "checkpoints" / f"step_{stopped_at:08d}" / "prism_meta.json").exists()
    assert not (out / ".prism.lock").exists()
    assert [r["step"] for r in rows(out)] == list(range(1, stopped_at + 1))

    total = stopped_at + 2
    again = subprocess.run(command(sft_file, out, f"trainer.steps={total}"), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from step {stopped_at} of {total}" in again.stderr
    assert f"outputs in {out}" in again.stderr
    assert [r["step"] for r in rows(out)] == list(range(1, total + 1))  # one line per step


@pytest.mark.timeout(900)
def test_bad_checkpoints_fall_back_and_another_stage_is_refused(sft_file, tmp_path):
    out = tmp_path / "run"
    first = subprocess.run(command(sft_file, out, "trainer.steps=3", "trainer.save_interval=1"), capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts = out / "checkpoints"
    (ckpts / "latest").write_text("garbage\x00")
    shard = sorted((ckpts / "step_00000003").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])   # truncated
    (ckpts / "step_00000002" / "prism_meta.json").write_text("{not json")  # corrupt
    again = subprocess.run(command(sft_file, out, "trainer.steps=4", "trainer.save_interval=1"), capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    err = again.stderr
    assert "warning: skipping checkpoint" in err and "latest: does not name a checkpoint" in err
    assert f"step_00000003: {shard.name} is truncated" in err
    assert f"step_00000002: {ckpts / 'step_00000002' / 'prism_meta.json'}: malformed JSON at line 1" in err
    assert "resuming from step 1 of 4" in err
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4]

    # a disc-warmup run pointed at this SFT directory is refused, in one line, before it trains
    from prism_mcore.data.synthetic import make_problems, write_warmup_jsonl

    write_warmup_jsonl(make_problems(8, seed=1), tmp_path / "pairs.jsonl", seed=2)
    other = subprocess.run([sys.executable, "-m", "prism_mcore.cli", "train", "/dev/null",
                            *[a for a in TINY if not a.startswith("trainer.stage")], "trainer.stage=disc-warmup",
                            "model.num_experts=2", "model.num_experts_per_tok=2", "model.moe_intermediate_size=32",
                            f"data.train_files=[{tmp_path / 'pairs.jsonl'}]", f"trainer.output_dir={out}",
                            "trainer.steps=5"], capture_output=True, text=True, timeout=600)
    assert other.returncode == 2, other.stderr[-3000:]
    assert len(other.stderr.strip().splitlines()) == 1 and other.stderr.strip().endswith(
        "holds a 'sft' checkpoint; this run is stage 'disc-warmup' (trainer.output_dir belongs to another stage's "
        "run: choose another directory)"), other.stderr[-3000:]


@pytest.mark.timeout(900)
def test_non_finite_steps_are_skipped_then_stop_the_run(sft_file, tmp_path):
    out = tmp_path / "run"
    # lr 1e30: step 1 is fine, its update overflows the weights: every later gradient norm is infinite
    res = subprocess.run(command(sft_file, out, "trainer.steps=10", "trainer.save_interval=1", "optim.lr=1e30",
                                 "trainer.max_bad_steps=2", "trainer.export_hf=true"), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 1, res.stderr[-3000:]
    line = res.stderr.strip().splitlines()[-1]
    assert "2 steps in a row (to step 3) had a non-finite loss or gradient norm" in line, res.stderr[-3000:]
    assert line.endswith(f"last good checkpoint: {out / 'checkpoints' / 'step_00000001'}")
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000001"]
    assert not (out / "hf").exists()  # nothing non-finite is exported
    text = (out / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    logged = rows(out)
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert logged[0]["nonfinite_steps"] == 0 and logged[0]["loss"] > 0
    assert logged[1]["grad_norm"] is None and logged[1]["grad_norm_nonfinite"] is True  # strict JSON: null + flag
    assert logged[2]["nonfinite_steps"] == 2 and logged[2]["update_skipped"] is True


def test_stale_lock_is_taken_over_and_a_live_one_refused(tmp_path):
    from prism_mcore.config import ConfigError
    from prism_mcore.trainer.run_lock import RunLock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".prism.lock").write_text(f"{dead.pid} {os.uname().nodename}\n")
    with RunLock(tmp_path):
        assert (tmp_path / ".prism.lock").read_text().split()[0] == str(os.getpid())
    assert not (tmp_path / ".prism.lock").exists()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".prism.lock").write_text(f"{live.pid} {os.uname().nodename}\n")
        with pytest.raises(ConfigError, match=f"another prism run \\(PID {live.pid}\\)"):
            RunLock(tmp_path).acquire()
    finally:
        live.kill()
