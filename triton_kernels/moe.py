"""Triton MoE kernels: top-k softmax router, permute/unpermute, grouped GEMM (forward, d(input), d(weight)).

Group offsets (int32 cumulative ends, as torch._grouped_mm takes them) are only ever read by the kernels, so
nothing here synchronises with the host: the grouped GEMM launches an upper bound of M-tiles
(cdiv(M, BLOCK_M) + E + 1) and each program finds its (group, tile) by walking the offsets on the device.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _alloc(new_output):
    return new_output or (lambda shape, dtype, device: torch.empty(shape, dtype=dtype, device=device))


# ------------------------------------------------------------------ router
@triton.jit
def _softmax_rows(l_ptr, rows, row_ok, E, BLOCK_E: tl.constexpr):
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    logits = tl.load(l_ptr + rows[:, None] * E + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                     other=0.0).to(tl.float32)
    logits = tl.where(col_ok[None, :], logits, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None], cols, col_ok


@triton.jit
def _router_fwd_kernel(l_ptr, probs_ptr, idx_ptr, T, E, K: tl.constexpr, RENORM: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    p, cols, col_ok = _softmax_rows(l_ptr, rows, row_ok, E, BLOCK_E)
    # Two passes of K argmaxes (cheap next to the loads): the first finds the renormaliser, the second stores,
    # so no value is ever read back from memory this program just wrote.
    remaining = tl.where(col_ok[None, :], p, -1.0)  # probabilities are >= 0, so -1 marks "taken"
    total = tl.zeros([BLOCK_T], tl.float32)
    for i in tl.static_range(K):
        best = tl.argmax(remaining, axis=1)
        total += tl.max(remaining, axis=1)
        remaining = tl.where(cols[None, :] == best[:, None], -1.0, remaining)
    if not RENORM:
        total = tl.full([BLOCK_T], 1.0, tl.float32)
    remaining = tl.where(col_ok[None, :], p, -1.0)
    for i in tl.static_range(K):
        best = tl.argmax(remaining, axis=1)
        tl.store(probs_ptr + rows * K + i, tl.max(remaining, axis=1) / total, mask=row_ok)
        tl.store(idx_ptr + rows * K + i, best.to(tl.int64), mask=row_ok)
        remaining = tl.where(cols[None, :] == best[:, None], -1.0, remaining)


@triton.jit
def _router_bwd_kernel(l_ptr, idx_ptr, probs_ptr, gprobs_ptr, glogits_ptr, T, E, K: tl.constexpr,
                       RENORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    p, cols, col_ok = _softmax_rows(l_ptr, rows, row_ok, E, BLOCK_E)
    # renormalised r_i = q_i / S:  dL/dq_i = (g_i - sum_j g_j r_j) / S;  softmax: dL/dl = p * (g_p - sum_i g_q_i q_i)
    total = tl.zeros([BLOCK_T], tl.float32)
    g_dot_r = tl.zeros([BLOCK_T], tl.float32)
    for i in tl.static_range(K):
        idx = tl.load(idx_ptr + rows * K + i, mask=row_ok, other=0)
        total += tl.sum(tl.where(cols[None, :] == idx[:, None], p, 0.0), axis=1)
        g_dot_r += tl.load(gprobs_ptr + rows * K + i, mask=row_ok, other=0.0) * \
            tl.load(probs_ptr + rows * K + i, mask=row_ok, other=0.0)
    g_p = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
    for i in tl.static_range(K):
        idx = tl.load(idx_ptr + rows * K + i, mask=row_ok, other=0)
        g = tl.load(gprobs_ptr + rows * K + i, mask=row_ok, other=0.0)
        if RENORM:
            g = (g - g_dot_r) / total
        g_p += tl.where(cols[None, :] == idx[:, None], g[:, None], 0.0)
    g_l = p * (g_p - tl.sum(g_p * p, axis=1)[:, None])
    tl.store(glogits_ptr + rows[:, None] * E + cols[None, :], g_l.to(glogits_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _router_block_t(E):
    return max(1, min(64, 4096 // triton.next_power_of_2(E)))


def router_forward(logits, k, renormalize, *, new_output=None):
    T, E = logits.shape
    alloc = _alloc(new_output)
    probs = alloc((T, k), torch.float32, logits.device)
    idx = alloc((T, k), torch.int64, logits.device)
    bt = _router_block_t(E)
    _router_fwd_kernel[(triton.cdiv(T, bt),)](logits, probs, idx, T, E, K=k, RENORM=renormalize, BLOCK_T=bt,
                                              BLOCK_E=triton.next_power_of_2(E))
    return probs, idx


def router_backward(logits, idx, probs, grad_probs, renormalize, *, new_output=None):
    T, E = logits.shape
    g_logits = _alloc(new_output)((T, E), logits.dtype, logits.device)
    bt = _router_block_t(E)
    _router_bwd_kernel[(triton.cdiv(T, bt),)](logits, idx, probs, grad_probs.contiguous(), g_logits, T, E,
                                              K=idx.shape[1], RENORM=renormalize, BLOCK_T=bt,
                                              BLOCK_E=triton.next_power_of_2(E))
    return g_logits


# ------------------------------------------------------------------ permute / unpermute
@triton.jit
def _gather_rows_kernel(src_ptr, idx_ptr, scale_ptr, out_ptr, R, D, DIV: tl.constexpr, HAS_SCALE: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[r] = src[idx[r] // DIV] * (scale[idx[r]] if HAS_SCALE)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < R
    mask = row_ok[:, None] & (cols < D)[None, :]
    slot = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    vals = tl.load(src_ptr + (slot // DIV)[:, None] * D + cols[None, :], mask=mask, other=0.0)
    if HAS_SCALE:
        vals = vals.to(tl.float32) * tl.load(scale_ptr + slot, mask=row_ok, other=0.0)[:, None]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], vals.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _combine_rows_kernel(src_ptr, pos_ptr, w_ptr, out_ptr, T, D, K: tl.constexpr, HAS_W: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t] = sum_i w[t, i] * src[pos[t * K + i]]: a gather-reduce, so no atomics and a fixed summation order."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < T
    mask = row_ok[:, None] & (cols < D)[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for i in tl.static_range(K):
        pos = tl.load(pos_ptr + rows * K + i, mask=row_ok, other=0).to(tl.int64)
        vals = tl.load(src_ptr + pos[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            vals *= tl.load(w_ptr + rows * K + i, mask=row_ok, other=0.0)[:, None]
        acc += vals
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _slot_dot_kernel(a_ptr, b_ptr, pos_ptr, out_ptr, TK, D, K: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """out[s] = <a[s // K], b[pos[s]]> for every (token, choice) slot s: the routing-weight gradient."""
    slots = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = slots < TK
    pos = tl.load(pos_ptr + slots, mask=ok, other=0).to(tl.int64)
    tok = (slots // K).to(tl.int64)
    acc = tl.zeros([BLOCK_R], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = ok[:, None] & (cols < D)[None, :]
        a = tl.load(a_ptr + tok[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + pos[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(a * b, axis=1)
    tl.store(out_ptr + slots, acc, mask=ok)


_ROWS, _COLS = (16, 32) if INTERPRET else (16, 256)


def gather_rows(src, idx, div, scale=None, *, new_output=None):
    R, D = idx.shape[0], src.shape[1]
    out = _alloc(new_output)((R, D), src.dtype, src.device)
    grid = (triton.cdiv(R, _ROWS), triton.cdiv(D, _COLS))
    _gather_rows_kernel[grid](src, idx, scale if scale is not None else src, out, R, D, DIV=div,
                              HAS_SCALE=scale is not None, BLOCK_R=_ROWS, BLOCK_D=_COLS)
    return out


def combine_rows(src, pos, k, weights=None, *, new_output=None):
    T, D = pos.shape[0] // k, src.shape[1]
    out = _alloc(new_output)((T, D), src.dtype, src.device)
    grid = (triton.cdiv(T, _ROWS), triton.cdiv(D, _COLS))
    _combine_rows_kernel[grid](src, pos, weights if weights is not None else src, out, T, D, K=k,
                               HAS_W=weights is not None, BLOCK_T=_ROWS, BLOCK_D=_COLS)
    return out


def slot_dot(a, b, pos, k, *, new_output=None):
    TK, D = pos.shape[0], a.shape[1]
    out = _alloc(new_output)((TK,), torch.float32, a.device)
    _slot_dot_kernel[(triton.cdiv(TK, _ROWS),)](a, b, pos, out, TK, D, K=k, BLOCK_R=_ROWS, BLOCK_D=_COLS)
    return out


# ------------------------------------------------------------------ grouped GEMM
def _gemm_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16})]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
                                     (128, 64, 64, 4, 4))]


@triton.autotune(configs=_gemm_configs(), key=["N", "K", "E"])
@triton.jit
def _grouped_mm_kernel(x_ptr, w_ptr, out_ptr, offs_ptr, M, N, K, E, stride_xm, stride_xk, stride_we, stride_wk,
                       stride_wn, stride_om, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # Which (group, tile) is this? Group E is the tail past offs[E-1], written as zeros.
    zero = pid_m * 0  # loop-carried scalars must start as tensors, not constexprs
    group = zero - 1
    row0 = zero
    row_end = zero
    tiles_before = zero
    prev_end = zero
    for e in range(0, E + 1):
        g_end = tl.where(e < E, tl.load(offs_ptr + tl.minimum(e, E - 1)), M)
        n_tiles = tl.cdiv(g_end - prev_end, BLOCK_M)
        found = (pid_m >= tiles_before) & (pid_m < tiles_before + n_tiles)
        group = tl.where(found, e, group)
        row0 = tl.where(found, prev_end + (pid_m - tiles_before) * BLOCK_M, row0)
        row_end = tl.where(found, g_end, row_end)
        tiles_before += n_tiles
        prev_end = g_end
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < row_end
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    k_end = tl.where((group >= 0) & (group < E), K, 0)
    w_base = w_ptr + tl.maximum(group, 0).to(tl.int64) * stride_we
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        k_ok = (k0 + ks) < K
        xb = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + (k0 + ks)[None, :] * stride_xk,
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wb = tl.load(w_base + (k0 + ks)[:, None] * stride_wk + cols[None, :] * stride_wn,
                     mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(xb, wb, acc, input_precision=PRECISION)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.autotune(configs=_gemm_configs(), key=["N", "K", "E"])
@triton.jit
def _grouped_wgrad_kernel(x_ptr, dy_ptr, dw_ptr, offs_ptr, K, N, E, stride_xm, stride_dym, stride_we,
                          PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    """dw[e] = x[rows of e]^T @ dy[rows of e]; an empty group writes zeros."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.program_id(2)
    start = tl.where(e > 0, tl.load(offs_ptr + tl.maximum(e - 1, 0)), 0)
    end = tl.load(offs_ptr + e)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = ks < K
    col_ok = cols < N
    acc = tl.zeros([BLOCK_K, BLOCK_N], tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        xb = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :],
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        dyb = tl.load(dy_ptr + rows[:, None].to(tl.int64) * stride_dym + cols[None, :],
                      mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(xb), dyb, acc, input_precision=PRECISION)
    tl.store(dw_ptr + e.to(tl.int64) * stride_we + ks[:, None] * N + cols[None, :],
             acc.to(dw_ptr.dtype.element_ty), mask=k_ok[:, None] & col_ok[None, :])


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def grouped_mm(x, w, offsets, *, transpose_w=False, new_output=None):
    """out[rows of e] = x[rows of e] @ w[e] (or @ w[e]^T); rows past offsets[-1] are written as zeros."""
    M, E = x.shape[0], w.shape[0]
    K, N = (w.shape[2], w.shape[1]) if transpose_w else (w.shape[1], w.shape[2])
    s_e, s_k, s_n = (w.stride(0), w.stride(2), w.stride(1)) if transpose_w else w.stride()
    out = _alloc(new_output)((M, N), x.dtype, x.device)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) + E + 1, triton.cdiv(N, meta["BLOCK_N"]))

    _grouped_mm_kernel[grid](x, w, out, offsets, M, N, K, E, x.stride(0), x.stride(1), s_e, s_k, s_n,
                             out.stride(0), PRECISION=_precision(x.dtype))
    return out


def grouped_wgrad(x, dy, offsets, *, new_output=None):
    K, N, E = x.shape[1], dy.shape[1], offsets.shape[0]
    dw = _alloc(new_output)((E, K, N), x.dtype, x.device)

    def grid(meta):
        return (triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(N, meta["BLOCK_N"]), E)

    _grouped_wgrad_kernel[grid](x, dy, dw, offsets, K, N, E, x.stride(0), dy.stride(0), dw.stride(0),
                                PRECISION=_precision(x.dtype))
    return dw
