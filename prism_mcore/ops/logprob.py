"""Fused token log-prob + entropy: `token_logprobs(hidden, weight, targets)` without the [T, V] logits.

Every backend produces per-token stats of z = logits / temperature over its vocab shard,
(max m, sum exp(z - m), sum exp(z - m) * (z - m), target z), in fp32 (fp64 for fp64 inputs). Shards combine
them with one MAX and one SUM all-reduce; the forward saves only lse and E_p[z] per token, and the backward
recomputes the logits tile by tile. d(hidden) is a per-shard partial sum, all-reduced over the TP group.

Recomputing is what bounds memory, and it costs one GEMM of the four. When the step's logits are small (a CPU
micro-batch of a few hundred response tokens) and the hidden size makes that GEMM dear, the C++ kernel keeps
them instead: the forward writes its tiles to a [T, V_local] store, the backward reads them back. On a 2-core
x86 CPU that is 25-30% faster from d = 256 up, break-even at d = 128 and 13% slower at d = 64, where streaming
the store through memory costs more than the K = 64 GEMM (docs/benchmarks.md).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from prism_mcore.ops import backends
from prism_mcore.ops.backends import new_output

EMPTY_MAX = -1e30  # finite on purpose: (m - M) * s must be 0, not NaN, for a shard that saw no vocab rows

# (chunk_tokens, chunk_vocab) per (backend, device type): the workspace is chunk_tokens * chunk_vocab floats.
_CHUNKS = {("cpu", "cpp"): (1024, 1024), ("cpu", "torch"): (1024, 8192), ("cpu", "triton"): (1024, 1024),
           ("cuda", "cuda"): (16384, 4096), ("cuda", "torch"): (8192, 8192), ("cuda", "triton"): (16384, 8192)}


# Largest logits store (bytes, per rank) the C++ kernel keeps for its backward, per device type, and the
# smallest hidden size for which it does. On GPU the memory is worth more than the GEMM.
KEEP_LOGITS_BYTES = {"cpu": 512 * 1024**2, "cuda": 0}
KEEP_LOGITS_MIN_HIDDEN = 256


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_shard_stats(parts: torch.Tensor) -> torch.Tensor:
    """[4, S, T] stats of S vocab shards -> [4, T]: locally, what the TP all-reduces in combine_stats do."""
    m, s, a, tz = parts.unbind(0)
    m_all = m.amax(0)
    scale = torch.exp(m - m_all)
    return torch.stack([m_all, (s * scale).sum(0), ((a + (m - m_all) * s) * scale).sum(0), tz.sum(0)])


def combine_stats(stats: torch.Tensor, targets: torch.Tensor, tp_group=None):
    """[4, T] shard stats -> (logp, entropy, lse, E_p[z]); with a TP group, merges the shards first."""
    m, s, a, tz = stats.unbind(0)
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        m_all = m.clone()
        dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=tp_group)
        scale = torch.exp(m - m_all)
        parts = torch.stack([s * scale, (a + (m - m_all) * s) * scale, tz])
        dist.all_reduce(parts, op=dist.ReduceOp.SUM, group=tp_group)
        m = m_all
        s, a, tz = parts.unbind(0)
    log_s = torch.log(s)
    lse = m + log_s
    entropy = log_s - a / s
    logp = torch.where(targets >= 0, tz - lse, torch.zeros_like(lse))
    return logp, entropy, lse, m + a / s


class _TorchImpl:
    """Plain torch, same tiling as the kernels: the reference that runs everywhere with bounded memory."""

    @staticmethod
    def forward_stats(h, w, y, inv_temp, vocab_start, valid, chunk_t, chunk_v, stats, store=None):
        acc = stats.dtype
        if valid == 0:
            stats[0].fill_(EMPTY_MAX)
            stats[1:].zero_()
            return
        for t0 in range(0, h.shape[0], chunk_t):
            hc, yc = h[t0:t0 + chunk_t].to(acc), y[t0:t0 + chunk_t] - vocab_start
            m = s = a = tz = None
            for v0 in range(0, valid, chunk_v):
                z = (hc @ w[v0:min(v0 + chunk_v, valid)].to(acc).t()) * inv_temp
                tm = z.amax(1)
                zc = z - tm[:, None]
                e = zc.exp()
                ts, ta = e.sum(1), (e * zc).sum(1)
                local = yc - v0
                owned = (local >= 0) & (local < z.shape[1])
                ttz = torch.where(owned, z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1), 0.0)
                if m is None:
                    m, s, a, tz = tm, ts, ta, ttz
                    continue
                new_m = torch.maximum(m, tm)
                c_old, c_new = torch.exp(m - new_m), torch.exp(tm - new_m)
                a = (a + (m - new_m) * s) * c_old + (ta + (tm - new_m) * ts) * c_new
                s = s * c_old + ts * c_new
                m, tz = new_m, tz + ttz
            stats[:, t0:t0 + chunk_t] = torch.stack([m, s, a, tz])

    @staticmethod
    def backward(h, w, y, inv_temp, vocab_start, valid, lse, mean_z, g_lp, g_ent, chunk_t, chunk_v, dh, dw,
                 store=None):
        acc = lse.dtype
        T = h.shape[0]
        if valid == 0 or T == 0:
            dh.zero_()
            dw.zero_()
            return
        dw[valid:] = 0
        dh_acc = torch.zeros(h.shape, dtype=acc, device=h.device)
        c1 = (inv_temp * (g_ent * mean_z - g_lp))[:, None]
        c2 = (-inv_temp * g_ent)[:, None]
        for v0 in range(0, valid, chunk_v):
            v1 = min(v0 + chunk_v, valid)
            wv = w[v0:v1].to(acc)
            dwv = torch.zeros(wv.shape, dtype=acc, device=w.device)
            for t0 in range(0, T, chunk_t):
                t1 = min(t0 + chunk_t, T)
                hc = h[t0:t1].to(acc)
                z = (hc @ wv.t()) * inv_temp
                dz = torch.exp(z - lse[t0:t1, None]) * (c1[t0:t1] + c2[t0:t1] * z)
                local = y[t0:t1] - vocab_start - v0
                owned = (local >= 0) & (local < v1 - v0)
                rows = torch.nonzero(owned).squeeze(1)
                dz[rows, local[rows]] += inv_temp * g_lp[t0:t1][rows]
                dh_acc[t0:t1] += dz @ wv
                dwv += dz.t() @ hc
            dw[v0:v1] = dwv
        dh.copy_(dh_acc)


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


class _CppImpl:
    """prism_mcore._C: the C++ CPU kernel, or with CUDA tensors cuBLAS tiles + the CUDA epilogue. The only
    backend that can keep its logits for the backward (`store`, see the module docstring)."""

    keeps_logits = True

    @staticmethod
    def forward_stats(h, w, y, inv_temp, vocab_start, valid, chunk_t, chunk_v, stats, store=None):
        store = _NO_STORE if store is None else store
        backends.extension().logprob_forward_stats(h, w, y, inv_temp, vocab_start, valid, chunk_t, chunk_v, stats,
                                                   store, _stream(h))

    @staticmethod
    def backward(h, w, y, inv_temp, vocab_start, valid, lse, mean_z, g_lp, g_ent, chunk_t, chunk_v, dh, dw,
                 store=None):
        store = _NO_STORE if store is None else store
        backends.extension().logprob_backward(h, w, y, inv_temp, vocab_start, valid, lse, mean_z, g_lp, g_ent,
                                              chunk_t, chunk_v, dh, dw, store, _stream(h))


_NO_STORE = torch.empty(0)


class _TritonImpl:
    @staticmethod
    def forward_stats(h, w, y, inv_temp, vocab_start, valid, chunk_t, chunk_v, stats, store=None):
        from prism_triton_kernels import logprob as tk

        tk.forward_stats(h, w, y, inv_temp, vocab_start, valid, stats, new_output=new_output)

    @staticmethod
    def backward(h, w, y, inv_temp, vocab_start, valid, lse, mean_z, g_lp, g_ent, chunk_t, chunk_v, dh, dw,
                 store=None):
        from prism_triton_kernels import logprob as tk

        tk.backward(h, w, y, inv_temp, vocab_start, valid, lse, mean_z, g_lp, g_ent, chunk_v, dh, dw,
                    new_output=new_output)


_IMPLS = {"torch": _TorchImpl, "cpp": _CppImpl, "cuda": _CppImpl, "triton": _TritonImpl}


class _FusedLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temp, vocab_start, valid, tp_group, impl, chunk_t, chunk_v,
                keep_bytes):
        acc = _acc_dtype(hidden.dtype)
        stats = new_output((4, hidden.shape[0]), acc, hidden.device)
        store_numel = hidden.shape[0] * valid
        keep = (getattr(impl, "keeps_logits", False) and any(ctx.needs_input_grad[:2]) and store_numel > 0
                and store_numel * torch.finfo(acc).bits // 8 <= keep_bytes)
        store = torch.empty(store_numel, dtype=acc, device=hidden.device) if keep else None
        impl.forward_stats(hidden, weight, targets, inv_temp, vocab_start, valid, chunk_t, chunk_v, stats, store)
        logp, entropy, lse, mean_z = combine_stats(stats, targets, tp_group)
        ctx.save_for_backward(hidden, weight, targets, lse, mean_z)
        ctx.store = store  # an intermediate, not an input or output: held on ctx, consumed by the backward
        ctx.args = (inv_temp, vocab_start, valid, tp_group, impl, chunk_t, chunk_v)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        hidden, weight, targets, lse, mean_z = ctx.saved_tensors
        inv_temp, vocab_start, valid, tp_group, impl, chunk_t, chunk_v = ctx.args
        zeros = torch.zeros_like(lse)
        g_lp = zeros if g_logp is None else torch.where(targets >= 0, g_logp.to(lse.dtype), zeros).contiguous()
        g_ent = zeros if g_entropy is None else g_entropy.to(lse.dtype).contiguous()
        dh = new_output(hidden.shape, hidden.dtype, hidden.device)
        dw = new_output(weight.shape, weight.dtype, weight.device)
        # The backward overwrites the store with d(logits): a second backward (retain_graph) recomputes.
        store, ctx.store = ctx.store, None
        impl.backward(hidden, weight, targets, inv_temp, vocab_start, valid, lse, mean_z, g_lp, g_ent, chunk_t,
                      chunk_v, dh, dw, store)
        if tp_group is not None and dist.get_world_size(tp_group) > 1:
            dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=tp_group)
        return dh, dw, None, None, None, None, None, None, None, None, None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, *,
                   vocab_size: int | None = None, tp_group=None, backend: str | None = "auto",
                   chunk_tokens: int | None = None, chunk_vocab: int | None = None, with_entropy: bool = True,
                   keep_logits_bytes: int | None = None):
    """log p(target) and entropy of softmax(hidden @ weight.T / temperature), per token, never materialising
    the [T, V] logits. Differentiable w.r.t. hidden and weight through both outputs (entropy bonus included).

    hidden [..., d]; weight [V_local, d] (with `tp_group`, this rank's rows [rank * V_local, (rank+1) * V_local)
    of the LM head); targets [...] int, global vocab ids in [0, vocab_size), or < 0 to ignore (logp 0, no grad).
    `vocab_size` is the true vocab: rows at or past it (Megatron's padding) never take probability mass.
    Returns (logp, entropy) shaped like targets, fp32 (fp64 for fp64 inputs); entropy is None unless
    `with_entropy`. `backend`: "auto" | "torch" | "cpp" | "cuda" | "triton" (None: `set_default_backend`).
    `keep_logits_bytes`: keep this rank's logits for the backward when they take at most this many bytes
    (C++/CUDA backend; 0: always recompute; None: `KEEP_LOGITS_BYTES` of the device type when d is at least
    `KEEP_LOGITS_MIN_HIDDEN`, else 0).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    d = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"weight must be [V, {d}], got {tuple(weight.shape)}")
    out_shape = targets.shape
    h = hidden.reshape(-1, d).contiguous()
    y = targets.reshape(-1).to(torch.long).contiguous()
    if h.shape[0] != y.shape[0]:
        raise ValueError(f"hidden has {h.shape[0]} tokens but targets has {y.shape[0]}")
    tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
    rank = dist.get_rank(tp_group) if tp_group is not None else 0
    v_local = weight.shape[0]
    vocab_start = rank * v_local
    vocab_size = v_local * tp_size if vocab_size is None else vocab_size
    if not 0 < vocab_size <= v_local * tp_size:
        raise ValueError(f"vocab_size {vocab_size} must be in (0, {v_local * tp_size}] for this LM head")
    valid = max(0, min(v_local, vocab_size - vocab_start))
    name = backends.resolve_backend("logprob", backend, h.device, h.dtype)
    default_t, default_v = _CHUNKS.get((h.device.type, name), (1024, 8192))
    keep = keep_logits_bytes
    if keep is None:
        keep = KEEP_LOGITS_BYTES.get(h.device.type, 0) if d >= KEEP_LOGITS_MIN_HIDDEN else 0
    logp, entropy = _FusedLogprob.apply(h, weight.contiguous(), y, 1.0 / temperature, vocab_start, valid, tp_group,
                                        _IMPLS[name], chunk_tokens or default_t, chunk_vocab or default_v, keep)
    return logp.reshape(out_shape), (entropy.reshape(out_shape) if with_entropy else None)


def naive_token_logprobs(hidden, weight, targets, temperature: float = 1.0, *, vocab_size: int | None = None,
                         with_entropy: bool = True):
    """The path the fused op replaces: full logits -> log_softmax -> gather (no TP). Reference and baseline."""
    logits = (hidden @ weight.t()).float() if hidden.dtype != torch.float64 else hidden @ weight.t()
    if vocab_size is not None and vocab_size < weight.shape[0]:
        logits = logits[:, :vocab_size]
    if temperature != 1.0:  # in place, as a careful naive implementation would: no second [T, V] copy
        logits = logits.div_(temperature)
    logprobs = torch.log_softmax(logits, dim=-1)
    logp = logprobs.gather(1, targets.clamp(min=0).long()[:, None]).squeeze(1)
    logp = torch.where(targets >= 0, logp, torch.zeros_like(logp))
    entropy = -(logprobs.exp() * logprobs).sum(-1) if with_entropy else None
    return logp, entropy
