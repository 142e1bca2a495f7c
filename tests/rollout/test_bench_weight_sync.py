"""`prism bench weight-sync` runs end to end and writes the required JSON keys (tiny model, no vLLM)."""
import json
import os
import subprocess
import sys

import pytest


@pytest.mark.skipif(os.environ.get("PRISM_RUN_SLOW") != "1", reason="slow: set PRISM_RUN_SLOW=1 to run (make test's 25 minutes)")
@pytest.mark.timeout(300)
def test_bench_weight_sync_json(tmp_path):
    out = tmp_path / "ws.json"
    cmd = [sys.executable, "-m", "prism_mcore.bench.weight_sync", "--engine", "receiver", "--reps", "1",
           "--vocab", "1000", "--hidden", "64", "--layers", "2", "--intermediate", "128", "--heads", "2",
           "--kv-heads", "1", "--bucket-mb", "0.1", "--memcpy-mb", "64", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("bytes", "seconds", "gbps", "memcpy_gbps", "ratio_to_memcpy"):
        assert result[key] > 0, key
    per_layer = 64 * (64 + 2 * 32) + 64 * 64 + 3 * 128 * 64 + 2 * 64 + 2 * 32  # attn, mlp, norms
    assert result["bytes"] == 4 * (2 * 1000 * 64 + 2 * per_layer + 64)
    assert result["mode"] == "zero_copy" and result["detail"]["receiver"]["zero_copy"]["ref_bytes"] > 0
