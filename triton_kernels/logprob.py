"""Triton fused log-prob + entropy (see prism_mcore.ops.logprob for the math and the stats layout).

Forward: one kernel, grid (token blocks, vocab splits); each program streams its vocab split in BLOCK_V tiles,
computing each logits tile with tl.dot and folding it into an online (max, sum e, sum e*(z-m), target z)
that never leaves registers. Splits are merged by a tiny torch epilogue over [4, splits, T].
Backward: per vocab chunk, a kernel recomputes the logits tile and writes d(logit) in the input dtype into a
[T, chunk] workspace; cuBLAS then does d(hidden) += dz @ W_chunk (fp32) and d(W_chunk) = dz^T @ hidden.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
EMPTY_MAX = -1e30


def _configs():
    if INTERPRET:  # multi-config autotune needs a GPU; the interpreter only checks semantics
        return [triton.Config({"BLOCK_T": 16, "BLOCK_V": 32, "BLOCK_K": 16})]
    return [triton.Config({"BLOCK_T": bt, "BLOCK_V": bv, "BLOCK_K": 64}, num_warps=w, num_stages=s)
            for bt, bv, w, s in ((128, 128, 8, 3), (128, 256, 8, 3), (128, 128, 4, 4), (64, 128, 4, 4))]


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w, inv_temp,
                 BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    ks = tl.arange(0, BLOCK_K)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h  # int64: V * d passes 2^31 for large heads
    w_rows = w_ptr + cols.to(tl.int64)[None, :] * stride_w
    acc = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = (k0 + ks) < D
        hb = tl.load(h_rows + (k0 + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wb = tl.load(w_rows + (k0 + ks)[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(hb, wb, acc, input_precision=PRECISION)
    return acc * inv_temp


@triton.autotune(configs=_configs(), key=["D", "V_PER_SPLIT"])
@triton.jit
def _stats_kernel(h_ptr, w_ptr, y_ptr, out_ptr, T, D, valid_rows, vocab_start, inv_temp, V_PER_SPLIT, n_splits,
                  stride_h, stride_w, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                  PRECISION: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    tgt = tl.load(y_ptr + rows, mask=row_ok, other=-1) - vocab_start
    m = tl.full([BLOCK_T], EMPTY_MAX, tl.float32)
    s = tl.zeros([BLOCK_T], tl.float32)
    a = tl.zeros([BLOCK_T], tl.float32)
    tz = tl.zeros([BLOCK_T], tl.float32)
    v_begin = pid_s * V_PER_SPLIT
    v_end = tl.minimum(v_begin + V_PER_SPLIT, valid_rows)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w, inv_temp,
                         BLOCK_T, BLOCK_V, BLOCK_K, PRECISION)
        new_m = tl.maximum(m, tl.max(tl.where(col_ok[None, :], z, float("-inf")), axis=1))
        zc = tl.where(col_ok[None, :], z - new_m[:, None], 0.0)
        e = tl.where(col_ok[None, :], tl.exp(zc), 0.0)
        scale = tl.exp(m - new_m)
        a = (a + (m - new_m) * s) * scale + tl.sum(e * zc, axis=1)
        s = s * scale + tl.sum(e, axis=1)
        m = new_m
        hit = (cols[None, :] == tgt[:, None]) & col_ok[None, :]
        tz += tl.sum(tl.where(hit, z, 0.0), axis=1)
    plane = n_splits * T
    base = out_ptr + pid_s * T + rows
    tl.store(base, m, mask=row_ok)
    tl.store(base + plane, s, mask=row_ok)
    tl.store(base + 2 * plane, a, mask=row_ok)
    tl.store(base + 3 * plane, tz, mask=row_ok)


@triton.autotune(configs=_configs(), key=["D", "n_cols"])
@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, y_ptr, lse_ptr, mz_ptr, glp_ptr, gh_ptr, dz_ptr, T, D, n_cols, col0, inv_temp,
                    stride_h, stride_w, stride_dz, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < T
    col_ok = cols < n_cols
    z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w, inv_temp,
                     BLOCK_T, BLOCK_V, BLOCK_K, PRECISION)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    mz = tl.load(mz_ptr + rows, mask=row_ok, other=0.0)
    g_lp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
    g_h = tl.load(gh_ptr + rows, mask=row_ok, other=0.0)
    tgt = tl.load(y_ptr + rows, mask=row_ok, other=-1) - col0
    # dz = g_lp * (onehot - p) + g_H * p * (E_p[z] - z), times 1/temperature for d(logit)
    c1 = inv_temp * (g_h * mz - g_lp)
    c2 = -inv_temp * g_h
    dz = tl.exp(z - lse[:, None]) * (c1[:, None] + c2[:, None] * z)
    dz += tl.where(cols[None, :] == tgt[:, None], (inv_temp * g_lp)[:, None], 0.0)
    tl.store(dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + cols[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs must not silently drop to tf32


def merge_splits(part: torch.Tensor) -> torch.Tensor:
    """[4, S, T] per-split stats -> [4, T], the same merge TP ranks do with all-reduces."""
    m, s, a, tz = part.unbind(0)
    m_all = m.amax(0)
    scale = torch.exp(m - m_all)
    return torch.stack([m_all, (s * scale).sum(0), ((a + (m - m_all) * s) * scale).sum(0), tz.sum(0)])


def forward_stats(h, w, y, inv_temp, vocab_start, valid, stats, *, new_output=None, v_per_split=None):
    T, D = h.shape
    if valid == 0 or T == 0:
        stats[0].fill_(EMPTY_MAX)
        stats[1:].zero_()
        return
    if v_per_split is None:  # enough (token block, split) programs to fill the GPU
        v_per_split = 256 if INTERPRET else max(1024, triton.cdiv(triton.cdiv(valid, 64), 256) * 256)
    n_splits = triton.cdiv(valid, v_per_split)
    alloc = new_output or (lambda shape, dtype, device: torch.empty(shape, dtype=dtype, device=device))
    part = alloc((4, n_splits, T), torch.float32, h.device)

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_T"]), n_splits)

    _stats_kernel[grid](h, w, y, part, T, D, valid, vocab_start, inv_temp, v_per_split, n_splits, h.stride(0),
                        w.stride(0), PRECISION=_precision(h.dtype))
    stats.copy_(merge_splits(part))


def _mm_into(out, a, b, accumulate):
    """out (+)= a @ b with out possibly fp32 while a, b are bf16/fp16 (fp32 accumulation on CUDA)."""
    if a.dtype == out.dtype:
        return out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
    if a.is_cuda:
        if accumulate:
            return torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
        return torch.mm(a, b, out_dtype=out.dtype, out=out)
    prod = a.to(out.dtype) @ b.to(out.dtype)  # CPU (interpreter tests): no mixed-precision GEMM there
    return out.add_(prod) if accumulate else out.copy_(prod)


def backward(h, w, y, inv_temp, vocab_start, valid, lse, mean_z, g_lp, g_ent, chunk_v, dh, dw, *, new_output=None):
    T, D = h.shape
    if valid == 0 or T == 0:
        dh.zero_()
        dw.zero_()
        return
    dw[valid:] = 0
    alloc = new_output or (lambda shape, dtype, device: torch.empty(shape, dtype=dtype, device=device))
    dh_acc = dh if dh.dtype == torch.float32 else alloc((T, D), torch.float32, h.device)
    cv = min(chunk_v, valid, max(256, (1 << 27) // T))  # the dz workspace stays <= 128M elements for any T
    dz_buf = alloc((T * cv,), h.dtype, h.device)
    for v0 in range(0, valid, cv):
        vc = min(cv, valid - v0)
        wv = w[v0:v0 + vc]
        dz = dz_buf[:T * vc].view(T, vc)

        def grid(meta):
            return (triton.cdiv(T, meta["BLOCK_T"]), triton.cdiv(vc, meta["BLOCK_V"]))

        _dlogits_kernel[grid](h, wv, y, lse, mean_z, g_lp, g_ent, dz, T, D, vc, vocab_start + v0, inv_temp,
                              h.stride(0), wv.stride(0), dz.stride(0), PRECISION=_precision(h.dtype))
        _mm_into(dh_acc, dz, wv, accumulate=v0 > 0)
        torch.mm(dz.t(), h, out=dw[v0:v0 + vc])
    if dh_acc is not dh:
        dh.copy_(dh_acc)
