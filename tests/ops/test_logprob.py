"""Fused log-prob + entropy (torch and C++ backends) against a float64 full-logits reference, forward and
gradients, with outputs poisoned (NaN) before the kernels write them."""
import pytest
import torch

from prism_mcore.ops import backends, naive_token_logprobs, poison_outputs, token_logprobs

needs_cpp = pytest.mark.skipif(backends.extension() is None, reason="prism_mcore._C not built")
CPU_BACKENDS = ["torch", pytest.param("cpp", marks=needs_cpp)]


def make_case(T=37, d=24, V=200, vocab_size=187, seed=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    hidden = torch.randn(T, d, generator=g).to(dtype)
    weight = (torch.randn(V, d, generator=g) * 0.5).to(dtype)
    targets = torch.randint(0, vocab_size, (T,), generator=g)
    targets[::7] = -100  # ignored positions
    g_logp, g_ent = torch.randn(T, generator=g, dtype=torch.float64), torch.randn(T, generator=g, dtype=torch.float64)
    return hidden, weight, targets, g_logp, g_ent


def reference(hidden, weight, targets, temperature, vocab_size, g_logp, g_ent):
    h = hidden.double().clone().requires_grad_()
    w = weight.double().clone().requires_grad_()
    logp, ent = naive_token_logprobs(h, w, targets, temperature, vocab_size=vocab_size)
    loss = (logp * g_logp).sum() + (ent * g_ent if g_ent is not None else 0 * ent).sum()
    loss.backward()
    return logp.detach(), ent.detach(), h.grad, w.grad


def run(backend, hidden, weight, targets, temperature, vocab_size, g_logp, g_ent, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    with poison_outputs():
        logp, ent = token_logprobs(h, w, targets, temperature, vocab_size=vocab_size, backend=backend, **kw)
        loss = (logp * g_logp.to(logp.dtype)).sum()
        if g_ent is not None:
            loss = loss + (ent * g_ent.to(ent.dtype)).sum()
        loss.backward()
    return logp.detach(), ent.detach(), h.grad, w.grad


def assert_close(got, want, tol, what):
    got = got.double()
    scale = max(1.0, want.abs().max().item())
    err = (got - want).abs().max().item()
    assert torch.isfinite(got).all(), f"{what}: non-finite values (an element was never written?)"
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} * {scale:.3g}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("chunks", [(8, 48), (1024, 8192)], ids=["many-chunks", "one-chunk"])
@pytest.mark.parametrize("keep", [1 << 30, 0], ids=["keep-logits", "recompute"])
def test_forward_and_grads_match_float64(backend, chunks, keep):
    hidden, weight, targets, g_logp, g_ent = make_case()
    want = reference(hidden, weight, targets, 0.7, 187, g_logp, g_ent)
    got = run(backend, hidden, weight, targets, 0.7, 187, g_logp, g_ent, chunk_tokens=chunks[0],
              chunk_vocab=chunks[1], keep_logits_bytes=keep)
    for g, w, name in zip(got, want, ("logp", "entropy", "d_hidden", "d_weight")):
        assert_close(g, w, 2e-5, f"{backend} {name}")
    assert (got[3][187:] == 0).all(), "padded vocab rows must get exactly zero gradient"
    assert (got[0][targets < 0] == 0).all()


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_kept_logits_equal_recomputed_ones(dtype):
    """The C++ kernel keeps a small step's logits for the backward instead of recomputing them: same tiles,
    so bit-identical results; a second backward through the graph (the store is consumed) recomputes."""
    hidden, weight, targets, g_logp, g_ent = make_case(T=29, V=150, vocab_size=140, dtype=dtype)
    recomputed = run("cpp", hidden, weight, targets, 0.8, 140, g_logp, g_ent, chunk_tokens=8, chunk_vocab=32,
                     keep_logits_bytes=0)
    kept = run("cpp", hidden, weight, targets, 0.8, 140, g_logp, g_ent, chunk_tokens=8, chunk_vocab=32,
               keep_logits_bytes=1 << 20)
    for a, b, name in zip(kept, recomputed, ("logp", "entropy", "d_hidden", "d_weight")):
        assert torch.equal(a, b), name

    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    logp, ent = token_logprobs(h, w, targets, 0.8, vocab_size=140, backend="cpp", chunk_tokens=8, chunk_vocab=32,
                               keep_logits_bytes=1 << 20)
    loss = (logp * g_logp.to(logp.dtype)).sum() + (ent * g_ent.to(ent.dtype)).sum()
    first = torch.autograd.grad(loss, (h, w), retain_graph=True)
    second = torch.autograd.grad(loss, (h, w))
    for a, b in zip(first + second, recomputed[2:] * 2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float64_inputs_are_exact(backend):
    hidden, weight, targets, g_logp, g_ent = make_case(T=19, V=77, vocab_size=70, dtype=torch.float64)
    want = reference(hidden, weight, targets, 1.3, 70, g_logp, g_ent)
    got = run(backend, hidden, weight, targets, 1.3, 70, g_logp, g_ent, chunk_tokens=5, chunk_vocab=16)
    for g, w, name in zip(got, want, ("logp", "entropy", "d_hidden", "d_weight")):
        assert got[0].dtype == torch.float64
        assert_close(g, w, 1e-11, f"{backend} {name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_logp_gradient_alone(backend):
    """Entropy unused (the common PPO loss): its gradient is None and must not leak into the result."""
    hidden, weight, targets, g_logp, _ = make_case(T=16, V=96, vocab_size=96)
    want = reference(hidden, weight, targets, 1.0, 96, g_logp, None)
    got = run(backend, hidden, weight, targets, 1.0, 96, g_logp, None, chunk_tokens=6, chunk_vocab=40)
    for g, w, name in zip(got[2:], want[2:], ("d_hidden", "d_weight")):
        assert_close(g, w, 2e-5, f"{backend} {name}")


@needs_cpp
def test_cpp_bf16_inputs():
    hidden, weight, targets, g_logp, g_ent = make_case(T=24, V=130, vocab_size=128, dtype=torch.bfloat16)
    want = reference(hidden, weight, targets, 0.9, 128, g_logp, g_ent)
    got = run("cpp", hidden, weight, targets, 0.9, 128, g_logp, g_ent, chunk_tokens=7, chunk_vocab=33)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.bfloat16
    for g, w, name, tol in zip(got, want, ("logp", "entropy", "d_hidden", "d_weight"), (1e-5, 1e-5, 1e-2, 1e-2)):
        assert_close(g, w, tol, f"bf16 {name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_extreme_logits_stay_finite(backend):
    """Large-magnitude logits (|z| ~ 1e3) must not overflow the online log-sum-exp."""
    hidden, weight, targets, g_logp, g_ent = make_case(T=10, d=8, V=64, vocab_size=64)
    weight = weight * 200
    want = reference(hidden, weight, targets, 0.5, 64, g_logp, g_ent)
    got = run(backend, hidden, weight, targets, 0.5, 64, g_logp, g_ent, chunk_tokens=4, chunk_vocab=16)
    assert_close(got[0], want[0], 1e-5, "logp")
    assert_close(got[1], want[1], 1e-3, "entropy")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch(backend):
    weight = torch.randn(40, 8, requires_grad=True)
    hidden = torch.zeros(0, 8, requires_grad=True)
    with poison_outputs():
        logp, ent = token_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long), vocab_size=30, backend=backend)
        (logp.sum() + ent.sum()).backward()
    assert logp.shape == (0,) and (weight.grad == 0).all()


def test_leading_dims_and_default_backend():
    hidden, weight, targets, _, _ = make_case(T=12, V=50, vocab_size=50)
    logp, ent = token_logprobs(hidden.view(3, 4, -1), weight, targets.view(3, 4))
    want_logp, want_ent = naive_token_logprobs(hidden.double(), weight.double(), targets)
    assert logp.shape == (3, 4) and ent.shape == (3, 4)
    assert_close(logp.reshape(-1), want_logp, 2e-5, "logp")
    assert token_logprobs(hidden, weight, targets, with_entropy=False)[1] is None


def test_backend_names_are_checked():
    hidden, weight, targets, _, _ = make_case(T=4, V=16, vocab_size=16)
    with pytest.raises(ValueError, match="valid choices: auto, torch, cpp, cuda, triton"):
        token_logprobs(hidden, weight, targets, backend="cublas")
    with pytest.raises(RuntimeError, match="cuda backend"):
        token_logprobs(hidden, weight, targets, backend="cuda")
    with pytest.raises(ValueError, match="vocab_size"):
        token_logprobs(hidden, weight, targets, vocab_size=17)
    backends.set_default_backend("logprob", "torch")
    try:
        assert backends.resolve_backend("logprob", None, hidden.device) == "torch"
    finally:
        backends.set_default_backend("logprob", "auto")
    expected = "cpp" if backends.extension() is not None else "torch"
    assert backends.resolve_backend("logprob", "auto", torch.device("cpu")) == expected
