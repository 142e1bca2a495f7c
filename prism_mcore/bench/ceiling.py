"""`prism bench ceiling`: the device's own dense matmul rate and copy bandwidth, measured in the same run as the
kernels so their rows can be reported as fractions of what this device actually reaches (--ceiling FILE)."""
from __future__ import annotations

import torch

from prism_mcore.bench.common import DTYPES, Case

HELP = "measured dense matmul TFLOP/s and device copy GB/s"
REFERENCE = "none"
QUICK = {"matmul": {"n": 256}, "copy": {"mib": 16}}
DEFAULTS = {"cpu": {"matmul": {"n": 2048}, "copy": {"mib": 512}},
            "cuda": {"matmul": {"n": 8192}, "copy": {"mib": 2048}}}
DTYPE = {"cpu": "float32", "cuda": "bfloat16"}


def add_args(p):
    pass


def cases(args, device: str, base: dict) -> list[Case]:
    kind = "cuda" if device.startswith("cuda") else "cpu"
    shapes = QUICK if args.quick else DEFAULTS[kind]
    impls = args.impls or ["matmul", "copy"]
    return [Case("ceiling", impl, "fwd", dict(shapes[impl]), args.dtype or DTYPE[kind], device, **base)
            for impl in impls]


def build(case: Case):
    dev = torch.device(case.device)
    if case.impl == "matmul":
        n = case.shape["n"]
        a = torch.randn(n, n, device=dev).to(DTYPES[case.dtype])
        b = torch.randn(n, n, device=dev).to(DTYPES[case.dtype])
        return (lambda: a @ b), 2.0 * n ** 3, "flop"
    nbytes = case.shape["mib"] << 20
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).fill_(1)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2.0 * nbytes, "byte"  # read + write


def summary(rows: list[dict]) -> dict:
    """{'matmul_tflops': ..., 'copy_gbps': ...} from this bench's JSON rows."""
    out = {}
    for r in rows:
        if r.get("op") == "ceiling" and r["impl"] == "matmul":
            out["matmul_tflops"] = r["tflops"]
        elif r.get("op") == "ceiling" and r["impl"] == "copy":
            out["copy_gbps"] = r["gbps"]
    return out
