"""`prism bench router`: top-k softmax router (with renormalisation), forward and forward + backward.

Memory-bound, so the rate is GB/s of compulsory traffic: read the [T, E] logits and write [T, k] probs and
int64 indices; the backward adds a re-read of the logits, the [T, k] inputs and the [T, E] gradient write."""
from __future__ import annotations

import torch

from prism_mcore.bench.common import DTYPES, Case

HELP = "top-k softmax router vs torch softmax + topk"
REFERENCE = "torch"
QUICK = {"tokens": 512, "experts": 16, "topk": 4}
DEFAULTS = {"cpu": {"tokens": 16384, "experts": 64, "topk": 8}, "cuda": {"tokens": 65536, "experts": 128, "topk": 8}}
IMPLS = {"cpu": ["torch"], "cuda": ["torch", "triton"]}


def add_args(p):
    p.add_argument("--tokens", type=int)
    p.add_argument("--experts", type=int)
    p.add_argument("--topk", type=int)


def cases(args, device: str, base: dict) -> list[Case]:
    kind = "cuda" if device.startswith("cuda") else "cpu"
    shape = dict(QUICK if args.quick else DEFAULTS[kind])
    for key in shape:
        if getattr(args, key, None):
            shape[key] = getattr(args, key)
    modes = args.modes or ["fwd", "fwdbwd"]
    impls = args.impls or IMPLS[kind]
    return [Case("router", impl, mode, shape, args.dtype or "float32", device, **base)
            for mode in modes for impl in impls]


def build(case: Case):
    from prism_mcore.ops import topk_softmax_router

    T, E, k = case.shape["tokens"], case.shape["experts"], case.shape["topk"]
    dtype, dev = DTYPES[case.dtype], torch.device(case.device)
    logits = torch.randn(T, E, device=dev).to(dtype)
    size = logits.element_size()
    fwd_bytes = T * E * size + T * k * (4 + 8)
    if case.mode == "fwd":
        def call():
            with torch.no_grad():
                return topk_softmax_router(logits, k, backend=case.impl)
        return call, float(fwd_bytes), "byte"
    logits.requires_grad_()
    grad = torch.randn(T, k, device=dev)

    def call_fwdbwd():
        logits.grad = None
        probs, _ = topk_softmax_router(logits, k, backend=case.impl)
        probs.backward(grad)
    return call_fwdbwd, float(fwd_bytes + T * E * size * 2 + T * k * (4 + 4 + 8)), "byte"
