"""Triton MoE kernels under TRITON_INTERPRET=1 (CPU tensors, tiny shapes, fp32 and fp16), outputs poisoned.
The variable must be set before prism_triton_kernels is imported; see test_logprob_triton.py."""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from test_moe import check_grouped, check_grouped_linear, check_moe, check_router  # noqa: E402


def test_router_triton():
    check_router("triton")


@pytest.mark.parametrize("dtype,K,N,tol", [(torch.float32, 24, 20, 1e-5), (torch.float16, 16, 24, 2e-2)],
                         ids=["fp32", "fp16"])
def test_grouped_gemm_triton(dtype, K, N, tol):
    check_grouped("triton", dtype, K, N, tol)


def test_grouped_linear_triton():
    """The per-expert-weight GEMM (transposed weight strides in forward, [E, N, K] wgrad) in Triton; fp16 goes
    through the same kernels as test_grouped_gemm_triton[fp16]."""
    check_grouped_linear("triton", torch.float32, 24, 20, 1e-5)


def test_moe_experts_triton():
    """permute (gather) -> grouped GEMM -> unpermute (weighted gather-reduce), all Triton, with an empty expert."""
    check_moe("triton")


def test_grouped_gemm_launch_needs_no_host_offsets():
    """The grid depends only on M and E, so offsets can change on the device without a relaunch decision."""
    from prism_triton_kernels import moe as tk

    x, w = torch.randn(12, 16), torch.randn(3, 16, 16)
    for offsets in ([0, 0, 12], [12, 12, 12], [5, 9, 9]):
        offs = torch.tensor(offsets, dtype=torch.int32)
        out = tk.grouped_mm(x, w, offs)
        ends = [0] + offsets
        want = torch.zeros(12, 16)
        for e in range(3):
            want[ends[e]:ends[e + 1]] = x[ends[e]:ends[e + 1]] @ w[e]
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
