"""`prism bench logprob`: fused token log-prob vs the naive logits -> log_softmax -> gather path.

Work is counted as 2*T*d*V FLOPs for the forward and 8*T*d*V for forward + backward (the backward recomputes
the logits), for every implementation, so TFLOP/s compare like for like. The gradient flows through logp only
(entropy is computed by the fused kernels but unused, as in a plain policy-gradient loss)."""
from __future__ import annotations

import math

import torch

from prism_mcore.bench.common import DTYPES, Case

HELP = "fused log-prob (+entropy) vs naive full logits"
REFERENCE = "naive"
QUICK = {"tokens": 64, "hidden": 32, "vocab": 1000}
DEFAULTS = {"cpu": {"tokens": 4096, "hidden": 1024, "vocab": 151936},
            "cuda": {"tokens": 16384, "hidden": 4096, "vocab": 151936}}
# The chunked pure-torch backend is a correctness reference (about 2x the naive time on CPU); add it with --impls.
IMPLS = {"cpu": ["naive", "cpp"], "cuda": ["naive", "cuda", "triton"]}
DTYPE = {"cpu": "float32", "cuda": "bfloat16"}


def add_args(p):
    p.add_argument("--tokens", type=int, help="T (default: 4096 on CPU, 16384 on CUDA)")
    p.add_argument("--hidden", type=int, help="d (default: 1024 on CPU, 4096 on CUDA)")
    p.add_argument("--vocab", type=int, help="V (default: 151936)")


def cases(args, device: str, base: dict) -> list[Case]:
    kind = "cuda" if device.startswith("cuda") else "cpu"
    shape = dict(QUICK if args.quick else DEFAULTS[kind])
    for key in shape:
        if getattr(args, key, None):
            shape[key] = getattr(args, key)
    modes = args.modes or ["fwd", "fwdbwd"]
    impls = args.impls or IMPLS[kind]
    return [Case("logprob", impl, mode, shape, args.dtype or DTYPE[kind], device, **base)
            for mode in modes for impl in impls]


def build(case: Case):
    from prism_mcore.ops import naive_token_logprobs, token_logprobs

    T, d, V = case.shape["tokens"], case.shape["hidden"], case.shape["vocab"]
    dtype, dev = DTYPES[case.dtype], torch.device(case.device)
    hidden = torch.randn(T, d, device=dev).to(dtype)
    weight = (torch.randn(V, d, device=dev) / math.sqrt(d)).to(dtype)
    targets = torch.randint(0, V, (T,), device=dev)
    grad = torch.randn(T, device=dev)

    def logp():
        if case.impl == "naive":
            return naive_token_logprobs(hidden, weight, targets, with_entropy=False)[0]
        return token_logprobs(hidden, weight, targets, backend=case.impl, with_entropy=False)[0]

    if case.mode == "fwd":
        def call():
            with torch.no_grad():
                return logp()
        return call, 2.0 * T * d * V, "flop"

    hidden.requires_grad_()
    weight.requires_grad_()

    def call_fwdbwd():
        hidden.grad = weight.grad = None
        logp().backward(grad)
    return call_fwdbwd, 8.0 * T * d * V, "flop"
