"""MoE routing and expert computation: router, permute/unpermute, grouped GEMM, each one autograd op.

Layout conventions (shared by every backend):
  * `expert_idx[T, k]` int64; slot s = t * k + i is token t's i-th choice.
  * `permute_tokens` sorts the T * k slots by expert (stable, so token order is kept within an expert) and
    returns `sorted_slots[T * k]` (the slot of each sorted row) and `offsets[E]` int32 cumulative group ends,
    exactly what `torch._grouped_mm` takes. Nothing here reads offsets on the host in the triton path.
  * `grouped_gemm(x_sorted[M, K], w[E, K, N], offsets)` multiplies the rows of group e by w[e]; rows at or past
    offsets[-1] come out as zeros.
  * `grouped_linear(x_sorted[M, K], [w_e [N, K] for each expert], offsets)` is the same product in nn.Linear's
    layout over a list of per-expert weights (Megatron's experts, see models/qwen3/grouped_experts.py); the
    stack is built inside the op and not kept for backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from prism_mcore.ops import backends
from prism_mcore.ops.backends import new_output


def _resolve(backend, t: torch.Tensor) -> str:
    return backends.resolve_backend("moe", backend, t.device, t.dtype)


def _tk():
    from prism_triton_kernels import moe

    return moe


# ------------------------------------------------------------------ router
class _TritonRouter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, k, renormalize):
        probs, idx = _tk().router_forward(logits, k, renormalize, new_output=new_output)
        ctx.save_for_backward(logits, idx, probs)
        ctx.renormalize = renormalize
        ctx.mark_non_differentiable(idx)
        return probs, idx

    @staticmethod
    def backward(ctx, g_probs, _g_idx):
        logits, idx, probs = ctx.saved_tensors
        g = _tk().router_backward(logits, idx, probs, g_probs.float(), ctx.renormalize, new_output=new_output)
        return g, None, None


def topk_softmax_router(logits: torch.Tensor, k: int, renormalize: bool = True, *, backend: str | None = None):
    """softmax over experts (fp32), keep the top k per token (descending), optionally renormalised to sum to 1.

    logits [T, E] -> (probs [T, k] fp32, differentiable w.r.t. logits; expert_idx [T, k] int64)."""
    if not 0 < k <= logits.shape[-1]:
        raise ValueError(f"k must be in [1, {logits.shape[-1]}], got {k}")
    if _resolve(backend, logits) == "triton":
        return _TritonRouter.apply(logits.contiguous(), k, renormalize)
    probs, idx = torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1)
    if renormalize:
        probs = probs / probs.sum(-1, keepdim=True)
    return probs, idx


# ------------------------------------------------------------------ permute / unpermute
def _sort_slots(expert_idx: torch.Tensor, num_experts: int):
    flat = expert_idx.reshape(-1)
    sorted_slots = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))  # bincount would sync on CUDA
    return sorted_slots, torch.cumsum(counts, 0, dtype=torch.int32)


def _positions(sorted_slots: torch.Tensor) -> torch.Tensor:
    """Inverse permutation: the sorted row of each slot."""
    pos = torch.empty_like(sorted_slots)
    pos[sorted_slots] = torch.arange(sorted_slots.numel(), device=sorted_slots.device)
    return pos


class _TritonPermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sorted_slots, k):
        ctx.save_for_backward(sorted_slots)
        ctx.k = k
        return _tk().gather_rows(x, sorted_slots, k, new_output=new_output)

    @staticmethod
    def backward(ctx, g):
        (sorted_slots,) = ctx.saved_tensors
        return _tk().combine_rows(g.contiguous(), _positions(sorted_slots), ctx.k, new_output=new_output), None, None


class _TritonUnpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_sorted, sorted_slots, probs):
        pos = _positions(sorted_slots)
        ctx.save_for_backward(y_sorted, sorted_slots, pos, probs)
        return _tk().combine_rows(y_sorted, pos, probs.shape[1], probs, new_output=new_output)

    @staticmethod
    def backward(ctx, g):
        y_sorted, sorted_slots, pos, probs = ctx.saved_tensors
        g, k = g.contiguous(), probs.shape[1]
        g_sorted = _tk().gather_rows(g, sorted_slots, k, probs.reshape(-1), new_output=new_output)
        g_probs = _tk().slot_dot(g, y_sorted, pos, k, new_output=new_output).view_as(probs).to(probs.dtype)
        return g_sorted, None, g_probs


def permute_tokens(x: torch.Tensor, expert_idx: torch.Tensor, num_experts: int, *, backend: str | None = None):
    """x [T, d] -> (x_sorted [T * k, d] grouped by expert, offsets [E] int32, sorted_slots [T * k] int64)."""
    k = expert_idx.shape[1]
    sorted_slots, offsets = _sort_slots(expert_idx, num_experts)
    if _resolve(backend, x) == "triton":
        return _TritonPermute.apply(x.contiguous(), sorted_slots, k), offsets, sorted_slots
    return x.index_select(0, sorted_slots // k), offsets, sorted_slots


def unpermute_tokens(y_sorted: torch.Tensor, sorted_slots: torch.Tensor, probs: torch.Tensor, *,
                     backend: str | None = None):
    """y [T, n] = sum_i probs[t, i] * y_sorted[row of slot (t, i)]; differentiable in y_sorted and probs."""
    T, k = probs.shape
    if _resolve(backend, y_sorted) == "triton":
        return _TritonUnpermute.apply(y_sorted.contiguous(), sorted_slots, probs.contiguous())
    gathered = y_sorted.index_select(0, _positions(sorted_slots)).view(T, k, -1)
    return (gathered * probs.to(y_sorted.dtype)[..., None]).sum(1)


# ------------------------------------------------------------------ grouped GEMM
def _torch_grouped_mm_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch._grouped_mm wants fp32/bf16/fp16 and 16-byte aligned strides (checked on torch 2.13 CPU)."""
    if not hasattr(F, "grouped_mm") or a.dtype != b.dtype or a.dtype not in (torch.float32, torch.bfloat16,
                                                                              torch.float16):
        return False
    return all(s == 1 or (s * t.element_size()) % 16 == 0 for t in (a, b) for s in t.stride())


def _loop_bounds(offsets):
    ends = offsets.tolist()  # host sync: the loop reference is for CPU and odd dtypes only
    return zip([0] + ends[:-1], ends)


def _torch_grouped_mm(x, w, offsets):
    M = x.shape[0]
    if _torch_grouped_mm_ok(x, w):
        out = F.grouped_mm(x, w, offs=offsets)
    else:
        out = torch.empty(M, w.shape[2], dtype=x.dtype, device=x.device)
        for e, (s, t) in enumerate(_loop_bounds(offsets)):
            out[s:t] = x[s:t] @ w[e]
    # torch leaves rows past offsets[-1] uninitialised; ours are defined as zeros
    tail = torch.arange(M, device=x.device) >= offsets[-1]
    return out.masked_fill_(tail[:, None], 0)


def _torch_grouped_wgrad(x, dy, offsets):
    xt = x.t()
    if _torch_grouped_mm_ok(xt, dy):
        return F.grouped_mm(xt, dy, offs=offsets)
    dw = torch.zeros(offsets.shape[0], x.shape[1], dy.shape[1], dtype=x.dtype, device=x.device)
    for e, (s, t) in enumerate(_loop_bounds(offsets)):
        dw[e] = x[s:t].t() @ dy[s:t]
    return dw


class _GroupedGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offsets, use_triton):
        ctx.save_for_backward(x, w, offsets)
        ctx.use_triton = use_triton
        if use_triton:
            return _tk().grouped_mm(x, w, offsets, new_output=new_output)
        return _torch_grouped_mm(x, w, offsets)

    @staticmethod
    def backward(ctx, g):
        x, w, offsets = ctx.saved_tensors
        g = g.contiguous()
        dx = dw = None
        if ctx.use_triton:
            if ctx.needs_input_grad[0]:
                dx = _tk().grouped_mm(g, w, offsets, transpose_w=True, new_output=new_output)
            if ctx.needs_input_grad[1]:
                dw = _tk().grouped_wgrad(x, g, offsets, new_output=new_output)
        else:
            if ctx.needs_input_grad[0]:
                dx = _torch_grouped_mm(g, w.transpose(1, 2).contiguous(), offsets)
            if ctx.needs_input_grad[1]:
                dw = _torch_grouped_wgrad(x, g, offsets)
        return dx, dw, None, None


def grouped_gemm(x_sorted: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, *, backend: str | None = None):
    """[M, K] rows grouped by `offsets` (int32 [E] cumulative ends) times w [E, K, N] -> [M, N]."""
    if w.dim() != 3 or x_sorted.shape[1] != w.shape[1] or offsets.shape[0] != w.shape[0]:
        raise ValueError(f"shapes disagree: x {tuple(x_sorted.shape)}, w {tuple(w.shape)}, "
                         f"offsets {tuple(offsets.shape)}")
    use_triton = _resolve(backend, x_sorted) == "triton"
    return _GroupedGemm.apply(x_sorted.contiguous(), w.contiguous(), offsets.to(torch.int32).contiguous(),
                              use_triton)


def counts_to_offsets(tokens_per_expert: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Tokens per expert (host or device, any int dtype) -> int32 cumulative group ends on `device`, without
    waiting for the device: a host tensor is pinned and copied asynchronously, the cumsum runs on `device`."""
    counts = tokens_per_expert
    if not torch.is_tensor(counts):
        counts = torch.as_tensor(counts, dtype=torch.int64)
    if counts.device != device:
        if counts.device.type == "cpu" and device.type == "cuda" and not counts.is_pinned():
            counts = counts.pin_memory()
        counts = counts.to(device, non_blocking=True)
    return torch.cumsum(counts, 0, dtype=torch.int32)


def gmm(x: torch.Tensor, w: torch.Tensor, batch_sizes: torch.Tensor, trans_b: bool = False, *,
        backend: str | None = None):
    """Same call as `grouped_gemm.ops.gmm`, which Megatron's GroupedMLP uses: `batch_sizes` are tokens per
    expert (CPU or device); w is [E, K, N], or [E, N, K] with trans_b. Offsets are built on x's device."""
    offsets = counts_to_offsets(batch_sizes, x.device)
    return grouped_gemm(x, w.transpose(1, 2) if trans_b else w, offsets, backend=backend)


class _GroupedLinear(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ weights[e]^T over a *list* of per-expert [N, K] weights.

    The [E, N, K] stack is built in forward and again in backward, and never saved: autograd keeps only the
    weights themselves (parameters, no copy), so activation memory is what one Linear per expert would keep.
    The weight gradient is one [E, N, K] grouped wgrad, handed back as per-expert views."""

    @staticmethod
    def forward(ctx, x, offsets, use_triton, *weights):
        w = torch.stack(weights)
        ctx.save_for_backward(x, offsets, *weights)
        ctx.use_triton = use_triton
        if use_triton:
            return _tk().grouped_mm(x, w, offsets, transpose_w=True, new_output=new_output)
        return _torch_grouped_mm(x, w.transpose(1, 2), offsets)

    @staticmethod
    def backward(ctx, g):
        x, offsets, *weights = ctx.saved_tensors
        g = g.contiguous()
        dx, dws = None, [None] * len(weights)
        if ctx.needs_input_grad[0]:
            w = torch.stack(weights)  # [E, N, K]: dx = g @ w[e]
            dx = _tk().grouped_mm(g, w, offsets, new_output=new_output) if ctx.use_triton \
                else _torch_grouped_mm(g, w, offsets)
        if any(ctx.needs_input_grad[3:]):  # dw[e] = g[rows of e]^T @ x[rows of e], [E, N, K]
            dw = _tk().grouped_wgrad(g, x, offsets, new_output=new_output) if ctx.use_triton \
                else _torch_grouped_wgrad(g, x, offsets)
            dws = list(dw.unbind(0))
        return (dx, None, None, *dws)


def grouped_linear(x_sorted: torch.Tensor, weights, offsets: torch.Tensor, *, backend: str | None = None):
    """Grouped GEMM in nn.Linear's layout: rows of group e times `weights[e]`^T, weights a sequence of E [N, K]
    tensors (e.g. the `linear_fc1.weight` of each local expert). [M, K] -> [M, N]; rows at or past offsets[-1]
    are zeros. Gradients flow to every weight (zeros for an empty group) without a stacked copy being kept."""
    weights = list(weights)
    if not weights or x_sorted.shape[1] != weights[0].shape[1] or offsets.shape[0] != len(weights) \
            or any(w.shape != weights[0].shape for w in weights):
        raise ValueError(f"shapes disagree: x {tuple(x_sorted.shape)}, weights "
                         f"{[tuple(w.shape) for w in weights]}, offsets {tuple(offsets.shape)}")
    use_triton = _resolve(backend, x_sorted) == "triton"
    return _GroupedLinear.apply(x_sorted.contiguous(), offsets.to(torch.int32).contiguous(), use_triton, *weights)


def moe_experts(x, probs, expert_idx, w_in, w_out, activation=F.silu, *, backend: str | None = None):
    """Dropless MoE expert MLP: permute -> grouped GEMM -> activation -> grouped GEMM -> weighted unpermute.

    w_in [E, d, ffn] (or [E, d, 2 * ffn] for a gated activation handled by `activation`), w_out [E, ffn, d]."""
    x_sorted, offsets, slots = permute_tokens(x, expert_idx, w_in.shape[0], backend=backend)
    h = activation(grouped_gemm(x_sorted, w_in, offsets, backend=backend))
    y_sorted = grouped_gemm(h, w_out, offsets, backend=backend)
    return unpermute_tokens(y_sorted, slots, probs, backend=backend)
