"""MoE ops (torch backend, and the shared layout logic) against float64 references, forward and gradients."""
import pytest
import torch
import torch.nn.functional as F

from prism_mcore.ops import grouped_gemm, grouped_linear, moe_experts, permute_tokens, poison_outputs, topk_softmax_router


def gen(seed=None):
    return torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)


def ref_router(logits, k, renormalize, g_probs):
    l = logits.detach().double().clone().requires_grad_()
    probs, idx = torch.topk(torch.softmax(l, -1), k, -1)
    if renormalize:
        probs = probs / probs.sum(-1, keepdim=True)
    (probs * g_probs.double()).sum().backward()
    return probs.detach(), idx, l.grad


def ref_grouped(x, w, offsets):
    ends = offsets.tolist()
    out = torch.zeros(x.shape[0], w.shape[2], dtype=torch.float64)
    for e, (s, t) in enumerate(zip([0] + ends[:-1], ends)):
        out[s:t] = x[s:t].double() @ w[e].double()
    return out


def ref_moe(x, probs, idx, w_in, w_out):
    """Dense per-token loop: y[t] = sum_i probs[t, i] * silu(x[t] @ w_in[e]) @ w_out[e]."""
    rows = []
    for t in range(x.shape[0]):
        y = 0
        for i in range(idx.shape[1]):
            e = idx[t, i]
            y = y + probs[t, i] * (F.silu(x[t] @ w_in[e]) @ w_out[e])
        rows.append(y)
    return torch.stack(rows)


def check_router(backend, dtype=torch.float32, tol=1e-6):
    g = gen()
    for renorm in (True, False):
        logits = torch.randn(11, 6, generator=g).to(dtype)
        g_probs = torch.randn(11, 3, generator=g)
        want_p, want_i, want_g = ref_router(logits, 3, renorm, g_probs)
        l = logits.clone().requires_grad_()
        with poison_outputs():
            probs, idx = topk_softmax_router(l, 3, renorm, backend=backend)
            (probs * g_probs).sum().backward()
        assert torch.equal(idx, want_i), "expert choice differs"
        torch.testing.assert_close(probs.double(), want_p, rtol=tol, atol=tol)
        torch.testing.assert_close(l.grad.double(), want_g, rtol=tol, atol=tol)


def check_grouped(backend, dtype, K, N, tol):
    g = gen()
    M, E = 29, 5
    x = torch.randn(M, K, generator=g).to(dtype)
    w = torch.randn(E, K, N, generator=g).to(dtype)
    offsets = torch.tensor([4, 4, 15, 15, 26], dtype=torch.int32)  # groups 1 and 3 empty; rows 26.. are the tail
    dy = torch.randn(M, N, generator=g).to(dtype)
    xd, wd = x.double().clone().requires_grad_(), w.double().clone().requires_grad_()
    out_ref = ref_grouped(xd, wd, offsets)
    (out_ref * dy.double()).sum().backward()
    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    with poison_outputs():
        out = grouped_gemm(xx, ww, offsets, backend=backend)
        out.backward(dy)
    scale = max(1.0, out_ref.abs().max().item())
    torch.testing.assert_close(out.double(), out_ref.detach(), rtol=tol, atol=tol * scale)
    assert (out[26:] == 0).all(), "rows past offsets[-1] must be zeros"
    torch.testing.assert_close(xx.grad.double(), xd.grad, rtol=tol, atol=tol * scale)
    torch.testing.assert_close(ww.grad.double(), wd.grad, rtol=tol, atol=tol * scale)
    assert (ww.grad[1] == 0).all() and (ww.grad[3] == 0).all(), "empty groups get zero weight gradient"


def check_grouped_linear(backend, dtype, K, N, tol):
    """Per-expert nn.Linear weights [N, K] (a list, as Megatron's experts hold them) against float64 loops."""
    g = gen()
    M, E = 29, 5
    x = torch.randn(M, K, generator=g).to(dtype)
    ws = [torch.randn(N, K, generator=g).to(dtype) for _ in range(E)]
    offsets = torch.tensor([4, 4, 15, 15, 26], dtype=torch.int32)  # groups 1 and 3 empty; rows 26.. are the tail
    dy = torch.randn(M, N, generator=g).to(dtype)
    xd = x.double().clone().requires_grad_()
    wd = torch.stack(ws).double().clone().requires_grad_()
    out_ref = ref_grouped(xd, wd.transpose(1, 2), offsets)
    (out_ref * dy.double()).sum().backward()
    xx, ww = x.clone().requires_grad_(), [w.clone().requires_grad_() for w in ws]
    with poison_outputs():
        out = grouped_linear(xx, ww, offsets, backend=backend)
        out.backward(dy)
    scale = max(1.0, out_ref.abs().max().item())
    torch.testing.assert_close(out.double(), out_ref.detach(), rtol=tol, atol=tol * scale)
    assert (out[26:] == 0).all(), "rows past offsets[-1] must be zeros"
    torch.testing.assert_close(xx.grad.double(), xd.grad, rtol=tol, atol=tol * scale)
    for e, w in enumerate(ww):
        assert w.grad.shape == w.shape
        torch.testing.assert_close(w.grad.double(), wd.grad[e], rtol=tol, atol=tol * scale)
    assert (ww[1].grad == 0).all() and (ww[3].grad == 0).all(), "empty groups get zero weight gradient"


def check_moe(backend, dtype=torch.float32, tol=1e-5):
    g = gen()
    T, d, ffn, E, k = 10, 8, 12, 6, 2
    x = torch.randn(T, d, generator=g).to(dtype)
    logits = torch.randn(T, E, generator=g)
    logits[:, 3] = -30  # expert 3 never chosen: an empty group in the middle
    probs, idx = topk_softmax_router(logits, k, backend="torch")
    w_in = (torch.randn(E, d, ffn, generator=g) * 0.3).to(dtype)
    w_out = (torch.randn(E, ffn, d, generator=g) * 0.3).to(dtype)
    dy = torch.randn(T, d, generator=g)
    leaves_ref = [t.double().clone().requires_grad_() for t in (x, probs, w_in, w_out)]
    (ref_moe(leaves_ref[0], leaves_ref[1], idx, leaves_ref[2], leaves_ref[3]) * dy.double()).sum().backward()
    want = ref_moe(*[t.detach() for t in leaves_ref[:2]], idx, *[t.detach() for t in leaves_ref[2:]])
    leaves = [t.clone().requires_grad_() for t in (x, probs, w_in, w_out)]
    with poison_outputs():
        y = moe_experts(leaves[0], leaves[1], idx, leaves[2], leaves[3], backend=backend)
        y.backward(dy.to(y.dtype))
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)
    for got, ref, name in zip(leaves, leaves_ref, ("x", "probs", "w_in", "w_out")):
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=tol, atol=tol, msg=f"d {name}")


def test_router_torch():
    check_router("torch")


@pytest.mark.parametrize("dtype,K,N", [(torch.float32, 8, 12), (torch.float64, 8, 12), (torch.float32, 6, 5)],
                         ids=["fp32-grouped_mm", "fp64-loop", "fp32-unaligned-loop"])
def test_grouped_gemm_torch(dtype, K, N):
    check_grouped("torch", dtype, K, N, 1e-5)


@pytest.mark.parametrize("dtype,K,N", [(torch.float32, 8, 12), (torch.float64, 8, 12), (torch.float32, 6, 5)],
                         ids=["fp32-grouped_mm", "fp64-loop", "fp32-unaligned-loop"])
def test_grouped_linear_torch(dtype, K, N):
    check_grouped_linear("torch", dtype, K, N, 1e-5)


def test_counts_to_offsets_host_or_device():
    from prism_mcore.ops import counts_to_offsets

    for counts in (torch.tensor([3, 0, 5]), torch.tensor([3, 0, 5], dtype=torch.int32), [3, 0, 5]):
        offs = counts_to_offsets(counts, torch.device("cpu"))
        assert offs.dtype == torch.int32 and offs.tolist() == [3, 3, 8]


def test_moe_experts_torch():
    check_moe("torch")


def test_permute_offsets_stay_on_device_and_sorted():
    idx = torch.tensor([[2, 0], [0, 1], [2, 1]])
    x = torch.arange(3.0)[:, None].expand(3, 4).contiguous()
    x_sorted, offsets, slots = permute_tokens(x, idx, 4, backend="torch")
    assert offsets.dtype == torch.int32 and offsets.tolist() == [2, 4, 6, 6]
    assert slots.tolist() == [1, 2, 3, 5, 0, 4]  # stable: token order kept within each expert
    assert x_sorted[:, 0].tolist() == [0, 1, 1, 2, 0, 2]


@pytest.mark.parametrize("trans_b", [False, True])
def test_gmm_megatron_call(trans_b):
    """grouped_gemm.ops.gmm's signature (tokens per expert, optional trans_b), as Megatron's GroupedMLP calls it."""
    from prism_mcore.ops import gmm

    g = gen()
    counts = torch.tensor([3, 0, 5])
    x, w = torch.randn(8, 4, generator=g), torch.randn(3, 4, 6, generator=g)
    out = gmm(x, w.transpose(1, 2).contiguous() if trans_b else w, counts, trans_b=trans_b)
    torch.testing.assert_close(out.double(), ref_grouped(x, w, torch.cumsum(counts, 0)), rtol=1e-5, atol=1e-5)


def test_moe_backend_names_are_checked():
    with pytest.raises(ValueError, match="valid choices: auto, torch, triton"):
        grouped_gemm(torch.zeros(2, 4), torch.zeros(1, 4, 4), torch.tensor([2], dtype=torch.int32), backend="cutlass")
