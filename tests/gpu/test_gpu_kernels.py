"""The fused log-prob (csrc CUDA and Triton) and the Triton grouped GEMM against float64 torch, in bf16 on
the GPU (skipped without one). Outputs are poisoned before each run (an element never written shows)."""
import pytest
import torch

from gpu_marks import needs_cuda

pytestmark = needs_cuda


def _has_cuda_extension() -> bool:
    try:
        from prism_mcore import _C
    except ImportError:
        return False
    return bool(_C.built_with_cuda())


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_fused_logprob_matches_float64(backend, dtype, tol):
    from ops.test_logprob import assert_close, make_case, reference, run

    if backend == "cuda" and not _has_cuda_extension():
        pytest.skip("prism_mcore._C was built without CUDA kernels")
    hidden, weight, targets, g_logp, g_ent = make_case(T=300, d=256, V=5000, vocab_size=4990, seed=0, dtype=dtype)
    want = reference(hidden, weight, targets, 0.8, 4990, g_logp, g_ent)
    got = run(backend, hidden.cuda(), weight.cuda(), targets.cuda(), 0.8, 4990, g_logp.cuda(), g_ent.cuda())
    for g, w, name in zip(got, want, ("logp", "entropy", "d_hidden", "d_weight")):
        assert_close(g.cpu(), w, tol, f"{backend} {name}")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_triton_grouped_gemm_matches_float64(dtype, tol):
    from prism_mcore.ops.moe import grouped_linear

    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([37, 0, 128, 5, 90])
    x = torch.randn(int(counts.sum()), 96, generator=g)
    weights = [torch.randn(64, 96, generator=g) * 0.1 for _ in counts]
    offsets = counts.cumsum(0)
    xs = x.to(dtype).cuda().requires_grad_()
    ws = [w.to(dtype).cuda().requires_grad_() for w in weights]
    out = grouped_linear(xs, ws, offsets.cuda(), backend="triton")
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad.to(dtype).cuda())
    x64, w64 = x.double().requires_grad_(), [w.double().requires_grad_() for w in weights]
    starts = torch.cat([torch.zeros(1, dtype=torch.long), offsets[:-1]])
    want = torch.cat([x64[a:b] @ w.t() for a, b, w in zip(starts.tolist(), offsets.tolist(), w64)])
    want.backward(grad.double())
    scale = lambda t: max(1.0, float(t.abs().max()))  # noqa: E731
    assert float((out.detach().cpu().double() - want.detach()).abs().max()) <= tol * scale(want)
    assert float((xs.grad.cpu().double() - x64.grad).abs().max()) <= tol * scale(x64.grad)
    for got, ref in zip(ws, w64):
        assert float((got.grad.cpu().double() - ref.grad).abs().max()) <= tol * scale(ref.grad)
