"""Merge a GPU suite's JSON files (benchmarks/gpu.sh) into all.json and print the issue's targets as PASS/MISS.

    python -m prism_mcore.bench.targets DIR
Targets: fused log-prob fwd+bwd >= 60% of the measured dense matmul rate and <= 1/10 of the naive peak
memory; grouped GEMM >= 90% of torch._grouped_mm throughput (time ratio <= 1/0.9), forward and backward.
"""
from __future__ import annotations

import json
import os
import sys


def _load(directory: str, name: str) -> list[dict]:
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def check(directory: str) -> list[str]:
    lines = []
    for row in _load(directory, "logprob.json"):
        if row["impl"] == "naive" or row["mode"] != "fwdbwd":
            continue
        frac, mem = row.get("fraction_of_matmul_ceiling"), row.get("mem_ratio_to_reference")
        ok = frac is not None and frac >= 0.6 and mem is not None and mem <= 0.1
        lines.append(f"{'PASS' if ok else 'MISS'} logprob {row['impl']} {row['dtype']} {row['shape']}: "
                     f"{row['tflops']:.0f} TFLOP/s = {100 * (frac or 0):.0f}% of measured matmul (target 60%), "
                     f"memory {mem if mem is None else round(mem, 3)}x naive (target <= 0.1)")
    for row in _load(directory, "grouped_gemm.json"):
        if row["impl"] == "torch":
            continue
        ratio = row.get("time_ratio_to_reference")
        ok = ratio is not None and ratio <= 1 / 0.9
        lines.append(f"{'PASS' if ok else 'MISS'} grouped-gemm {row['impl']} {row['mode']} {row['shape']}: "
                     f"{row['tflops']:.0f} TFLOP/s, {100 / ratio if ratio else 0:.0f}% of torch._grouped_mm "
                     f"(target 90%)")
    return lines


def main(argv: list[str]) -> int:
    directory = argv[0]
    merged = []
    for name in ("ceiling.json", "logprob.json", "grouped_gemm.json", "router.json", "ceiling_after.json"):
        merged += _load(directory, name)
    with open(os.path.join(directory, "all.json"), "w") as f:
        json.dump(merged, f, indent=1)
    lines = check(directory)
    print("\n".join(lines) if lines else "no target rows found")
    with open(os.path.join(directory, "targets.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
