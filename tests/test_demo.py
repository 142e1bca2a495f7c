"""`prism demo` (what `make demo` runs): TP=2 on two gloo ranks, the loss falls."""
import json
import subprocess
import sys

import pytest


@pytest.mark.timeout(400)
def test_demo_loss_falls(tmp_path):
    out = tmp_path / "demo"
    res = subprocess.run([sys.executable, "-m", "prism_mcore.cli", "demo", "trainer.steps=6",
                          f"trainer.output_dir={out}"], capture_output=True, text=True, timeout=380)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(6))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    assert "falling" in res.stdout
