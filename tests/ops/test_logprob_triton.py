"""Triton fused log-prob under TRITON_INTERPRET=1 on CPU tensors, fp32 and fp16 (bf16 tl.dot is wrong in the
interpreter), tiny shapes; outputs poisoned. Triton decides interpret-vs-compile when a kernel is decorated,
so the variable is set before prism_triton_kernels is imported (pytest imports every test module before running)."""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from test_logprob import assert_close, make_case, reference, run  # noqa: E402


def test_kernels_are_interpreted():
    from prism_triton_kernels import logprob as tk

    assert tk.INTERPRET, "prism_triton_kernels.logprob was imported before TRITON_INTERPRET was set"
    assert type(tk._dlogits_kernel.fn).__name__ == "InterpretedFunction"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 1e-2)], ids=["fp32", "fp16"])
def test_triton_matches_float64(dtype, tol):
    # T=20 and V=70 are not multiples of the 16 x 32 x 16 interpreter tiles, so every mask is exercised
    hidden, weight, targets, g_logp, g_ent = make_case(T=20, d=24, V=70, vocab_size=66, dtype=dtype)
    want = reference(hidden, weight, targets, 0.7, 66, g_logp, g_ent)
    got = run("triton", hidden, weight, targets, 0.7, 66, g_logp, g_ent, chunk_vocab=40)
    for g, w, name in zip(got, want, ("logp", "entropy", "d_hidden", "d_weight")):
        assert_close(g, w, tol if name.startswith("d_") or dtype != torch.float32 else 2e-5, f"triton {name}")
    assert (got[3][66:] == 0).all()


def test_triton_vocab_splits_merge():
    """Several vocab splits per token block (the last one partial), merged by the torch epilogue."""
    from prism_mcore.ops.backends import poison_outputs
    from prism_triton_kernels import logprob as tk

    hidden, weight, targets, _, _ = make_case(T=9, d=16, V=100, vocab_size=60)
    targets = targets.clamp(min=0)
    want_logp, want_ent = reference(hidden, weight, targets, 1.0, 60, torch.zeros(9, dtype=torch.float64),
                                    None)[:2]
    from prism_mcore.ops.logprob import combine_stats

    with poison_outputs():
        from prism_mcore.ops.backends import new_output

        stats = new_output((4, 9), torch.float32, hidden.device)
        tk.forward_stats(hidden, weight, targets, 1.0, 0, 60, stats, new_output=new_output, v_per_split=32)
    logp, ent, _, _ = combine_stats(stats, targets)
    assert_close(logp, want_logp, 2e-5, "logp")
    assert_close(ent, want_ent, 2e-5, "entropy")
