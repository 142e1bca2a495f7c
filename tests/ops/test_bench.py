"""`prism bench` smoke tests at --quick shapes: the table prints and --json rows carry the documented fields."""
import json

import pytest

from prism_mcore.bench import main

REQUIRED = {"op", "impl", "shape", "dtype", "device", "median_s", "peak_mem_bytes", "time_ratio_to_reference",
            "mem_ratio_to_reference"}


def run_bench(tmp_path, *argv):
    out = tmp_path / "rows.json"
    assert main([*argv, "--quick", "--reps", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    for row in rows:
        assert REQUIRED <= row.keys(), REQUIRED - row.keys()
        assert row["median_s"] > 0 and isinstance(row["shape"], dict)
    return rows


def test_logprob_bench(tmp_path, capsys):
    rows = run_bench(tmp_path, "logprob", "--in-process", "--impls", "naive,torch,cpp")
    assert {(r["impl"], r["mode"]) for r in rows} == {(i, m) for i in ("naive", "torch", "cpp")
                                                      for m in ("fwd", "fwdbwd")}
    assert all(r["time_ratio_to_reference"] == 1.0 for r in rows if r["impl"] == "naive")
    assert all("tflops" in r for r in rows)
    assert "prism bench logprob" in capsys.readouterr().out


def test_grouped_gemm_and_router_bench(tmp_path):
    rows = run_bench(tmp_path, "grouped-gemm", "--in-process")
    assert {r["impl"] for r in rows} == {"torch", "loop"} and {r["mode"] for r in rows} == {"fwd", "bwd"}
    rows = run_bench(tmp_path, "router", "--in-process")
    assert all("gbps" in r for r in rows)


def test_isolated_case_and_ceiling(tmp_path):
    """On CPU each case runs in a fresh process by default (the worker path), here for one small case."""
    ceiling = run_bench(tmp_path, "ceiling", "--in-process")
    path = tmp_path / "ceiling.json"
    path.write_text(json.dumps(ceiling))
    rows = run_bench(tmp_path, "router", "--modes", "fwd", "--ceiling", str(path))
    assert len(rows) == 1 and rows[0]["peak_mem_bytes"] >= 0 and "fraction_of_copy_ceiling" in rows[0]


def test_unknown_op_is_a_usage_error():
    with pytest.raises(SystemExit):
        main(["softmax"])


def test_expert_layer_bench_rows(tmp_path):
    """`--modes layer-fwd,layer-fwdbwd`: Megatron's SequentialMLP vs our grouped experts. In a subprocess, since
    building the layer joins a world-1 process group and Megatron's parallel state."""
    import subprocess
    import sys

    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "-m", "prism_mcore.bench", "grouped-gemm", "--quick", "--in-process",
                           "--reps", "1", "--modes", "layer-fwd,layer-fwdbwd", "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert {(r["impl"], r["mode"]) for r in rows} == {(i, m) for i in ("sequential", "grouped")
                                                      for m in ("layer-fwd", "layer-fwdbwd")}
    assert all(REQUIRED <= r.keys() and r["median_s"] > 0 and r["tflops"] > 0 for r in rows)
