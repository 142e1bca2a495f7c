"""`prism bench grouped-gemm`: MoE grouped GEMM x[M, d] @ w[E, d, ffn] over variable-size expert groups.

Rows are spread over experts by a uniform random routing (so groups differ in size). "fwd" times the forward;
"bwd" times torch.autograd.grad of an already-built forward (d(input) + d(weight), 4*M*d*ffn FLOPs)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from prism_mcore.bench.common import DTYPES, Case

HELP = "grouped GEMM (MoE experts) vs torch._grouped_mm"
REFERENCE = "torch"
QUICK = [{"experts": 4, "tokens": 256, "hidden": 64, "ffn": 32}]
DEFAULTS = {
    "cpu": [{"experts": 8, "tokens": 4096, "hidden": 1024, "ffn": 768}],
    "cuda": [{"experts": e, "tokens": t, "hidden": 2048, "ffn": f}
             for e in (8, 64) for t in (16384, 65536) for f in (768, 1536)],
}
IMPLS = {"cpu": ["torch", "loop"], "cuda": ["torch", "triton"]}
DTYPE = {"cpu": "float32", "cuda": "bfloat16"}


def add_args(p):
    p.add_argument("--experts", type=int)
    p.add_argument("--tokens", type=int, help="rows M after routing")
    p.add_argument("--hidden", type=int)
    p.add_argument("--ffn", type=int)


def cases(args, device: str, base: dict) -> list[Case]:
    kind = "cuda" if device.startswith("cuda") else "cpu"
    shapes = [dict(s) for s in (QUICK if args.quick else DEFAULTS[kind])]
    for shape in shapes:
        for key in shape:
            if getattr(args, key, None):
                shape[key] = getattr(args, key)
    shapes = [dict(t) for t in {tuple(s.items()) for s in shapes}]
    shapes.sort(key=lambda s: tuple(s.values()))
    modes = args.modes or ["fwd", "bwd"]
    impls = args.impls or IMPLS[kind]
    return [Case("grouped-gemm", impl, mode, shape, args.dtype or DTYPE[kind], device, **base)
            for shape in shapes for mode in modes for impl in impls]


def _loop(x, w, offsets):
    ends = offsets.tolist()
    return torch.cat([x[s:t] @ w[e] for e, (s, t) in enumerate(zip([0] + ends[:-1], ends))])


def build(case: Case):
    from prism_mcore.ops import grouped_gemm

    E, M, K, N = (case.shape[k] for k in ("experts", "tokens", "hidden", "ffn"))
    dtype, dev = DTYPES[case.dtype], torch.device(case.device)
    counts = torch.bincount(torch.randint(0, E, (M,)), minlength=E)
    offsets = torch.cumsum(counts, 0).to(torch.int32).to(dev)
    x = torch.randn(M, K, device=dev).to(dtype)
    w = (torch.randn(E, K, N, device=dev) / math.sqrt(K)).to(dtype)
    fn = {"torch": lambda a, b: F.grouped_mm(a, b, offs=offsets),
          "loop": lambda a, b: _loop(a, b, offsets),
          "triton": lambda a, b: grouped_gemm(a, b, offsets, backend="triton")}[case.impl]
    if case.mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(x, w)
        return call, 2.0 * M * K * N, "flop"
    x.requires_grad_()
    w.requires_grad_()
    y = fn(x, w)
    dy = torch.randn_like(y)

    def call_bwd():
        return torch.autograd.grad(y, (x, w), dy, retain_graph=True)
    return call_bwd, 4.0 * M * K * N, "flop"
