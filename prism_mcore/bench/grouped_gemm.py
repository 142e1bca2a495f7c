"""`prism bench grouped-gemm`: MoE grouped GEMM x[M, d] @ w[E, d, ffn] over variable-size expert groups.

Rows are spread over experts by a uniform random routing (so groups differ in size). "fwd" times the forward;
"bwd" times torch.autograd.grad of an already-built forward (d(input) + d(weight), 4*M*d*ffn FLOPs).

Opt-in (`--modes layer-fwd,layer-fwdbwd`): the whole MoE expert layer of a Qwen3-MoE model as Megatron runs it,
permuted tokens in, expert outputs out (SwiGLU fc1 [E, 2*ffn, d], fc2 [E, d, ffn], routing-probability scale),
with impls `sequential` (Megatron's SequentialMLP: a host split and two Linears per expert) and `grouped`
(`model.moe_expert_backend: grouped`, prism_mcore/models/qwen3/grouped_experts.py: two grouped GEMMs).
Work: fwd 6*M*d*ffn FLOPs, fwd+bwd 18*M*d*ffn. These rows have no torch reference (compare the two rows);
the tokens per expert arrive on the host, as from Megatron's all-to-all dispatcher."""
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
LAYER_MODES = ("layer-fwd", "layer-fwdbwd")
LAYER_IMPLS = ["sequential", "grouped"]
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
    def impls_for(mode):
        if mode in LAYER_MODES:
            return [i for i in impls if i in LAYER_IMPLS] or LAYER_IMPLS
        return [i for i in impls if i not in LAYER_IMPLS]

    return [Case("grouped-gemm", impl, mode, shape, args.dtype or DTYPE[kind], device, **base)
            for shape in shapes for mode in modes for impl in impls_for(mode)]


def _loop(x, w, offsets):
    ends = offsets.tolist()
    return torch.cat([x[s:t] @ w[e] for e, (s, t) in enumerate(zip([0] + ends[:-1], ends))])


def _expert_layer(case: Case):
    """Megatron's experts module for this shape, built as build_qwen3 builds it (world size 1)."""
    import tempfile

    import torch.distributed as dist

    from prism_mcore.config import load_config
    from prism_mcore.models.qwen3.model import layer_spec, transformer_config
    from prism_mcore.parallel.layout import init_model_parallel

    if not dist.is_initialized():
        store = dist.FileStore(tempfile.NamedTemporaryFile(delete=False).name, 1)
        dist.init_process_group("nccl" if case.device.startswith("cuda") else "gloo", store=store, rank=0,
                                world_size=1)
    E, K, N = (case.shape[k] for k in ("experts", "hidden", "ffn"))
    cfg = load_config(None, [f"model.hidden_size={K}", f"model.num_experts={E}", f"model.moe_intermediate_size={N}",
                             f"model.dtype={case.dtype}", f"model.moe_expert_backend={case.impl}",
                             "parallel.world_size=1"])
    init_model_parallel(cfg, seed=case.seed)
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module

    config = transformer_config(cfg.model, cfg.parallel)
    spec = layer_spec(cfg.model, config).submodules.mlp.submodules.experts
    return build_module(spec, E, config, pg_collection=ProcessGroupCollection.use_mpu_process_groups()).to(
        torch.device(case.device))


def _build_layer(case: Case):
    E, M, K, N = (case.shape[k] for k in ("experts", "tokens", "hidden", "ffn"))
    dtype, dev = DTYPES[case.dtype], torch.device(case.device)
    experts = _expert_layer(case)
    counts = torch.bincount(torch.randint(0, E, (M,)), minlength=E)  # on the host, as the dispatcher gives them
    x = torch.randn(M, K, device=dev).to(dtype)
    probs = torch.rand(M, device=dev)
    if case.mode == "layer-fwd":
        def call():
            with torch.no_grad():
                return experts(x, counts, probs)[0]
        return call, 6.0 * M * K * N, "flop"
    x.requires_grad_()
    dy = torch.randn(M, K, device=dev).to(dtype)
    params = list(experts.parameters())

    def call_fwdbwd():
        y = experts(x, counts, probs)[0]
        return torch.autograd.grad(y, [x, *params], dy)
    return call_fwdbwd, 18.0 * M * K * N, "flop"


def build(case: Case):
    from prism_mcore.ops import grouped_gemm

    if case.mode in LAYER_MODES:
        return _build_layer(case)
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
