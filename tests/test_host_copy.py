"""platform/host_copy.py: planned multi-threaded memmove copies equal torch's copies bit for bit."""
import pytest
import torch

from prism_mcore.platform.host_copy import (STREAM_MIN_BYTES, HostCopier, contiguous_runs, split_runs,
                                            streaming_extension)

NO_EXTENSION = pytest.mark.skipif(streaming_extension() is None, reason="prism_mcore._C not built")
METHODS = [False, pytest.param(True, marks=NO_EXTENSION)]


def _qkv_views(groups=4, q=3, head_dim=5, hidden=7):
    """Megatron's fused QKV rows, interleaved per KV group: [groups * (q + 2) * head_dim, hidden]."""
    fused = torch.randn(groups, (q + 2) * head_dim, hidden)
    return fused, [fused[:, :q * head_dim], fused[:, q * head_dim:(q + 1) * head_dim], fused[:, (q + 1) * head_dim:]]


@pytest.mark.parametrize("streaming", METHODS)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_copies_equal_torch_copies(threads, streaming):
    fused, (qv, kv, vv) = _qkv_views()
    sources = [torch.randn(1001), torch.randn(33, 17).to(torch.bfloat16), qv, kv, vv, torch.randn(0),
               torch.randn(2, 1, 6)[:, :, :3]]  # a size-1 dim between non-contiguous ones
    dests = [torch.full(s.shape, float("nan"), dtype=s.dtype) for s in sources]
    copier = HostCopier(threads, streaming=streaming)
    assert copier.method == ("stream" if streaming else "memmove")
    plan = copier.plan(list(zip(dests, sources)))
    assert plan.nbytes == sum(s.numel() * s.element_size() for s in sources)
    for _ in range(2):  # a plan is reused: new source values, same addresses
        copier.run(plan)
        for d, s in zip(dests, sources):
            assert torch.equal(d, s.contiguous())
        for s in sources:
            s.add_(1) if s.dtype != torch.bfloat16 else s.mul_(2)
    copier.close()


@pytest.mark.parametrize("streaming", METHODS)
def test_long_runs_at_odd_alignments(streaming):
    """Runs long enough for streaming stores, with destinations and sources off 16-byte alignment and
    lengths that leave a head and a tail; the bytes around each destination stay untouched."""
    n = STREAM_MIN_BYTES // 2 * 3 + 7  # bf16 elements: 3 MB + 14 bytes
    src_buf = torch.randn(n + 8).to(torch.bfloat16)
    dst_buf = torch.zeros(n + 8, dtype=torch.bfloat16)
    copier = HostCopier(2, streaming=streaming)
    for d_off, s_off in [(1, 3), (0, 5), (7, 0)]:
        dst_buf.zero_()
        copier.run(copier.plan([(dst_buf[d_off:d_off + n], src_buf[s_off:s_off + n])]))
        assert torch.equal(dst_buf[d_off:d_off + n], src_buf[s_off:s_off + n])
        assert not dst_buf[:d_off].any() and not dst_buf[d_off + n:].any()


def test_strided_source_runs_are_its_contiguous_rows():
    fused, (qv, _, _) = _qkv_views(groups=4, q=3, head_dim=5, hidden=7)
    dst = torch.empty(qv.shape)
    runs = contiguous_runs(dst, qv)
    assert len(runs) == 4 and all(n == 3 * 5 * 7 * 4 for _, _, n in runs)  # one run per KV group
    assert [s for _, s, _ in runs] == [fused[g].data_ptr() for g in range(4)]


def test_split_runs_gives_equal_shares_in_order():
    runs = [(1000, 0, 10), (2000, 100, 1), (3000, 200, 7)]
    parts = split_runs(runs, 3)
    assert [sum(n for _, _, n in p) for p in parts] == [6, 6, 6]
    flat = [r for p in parts for r in p]
    assert flat[0] == (1000, 0, 6) and flat[1] == (1006, 6, 4)  # the first run cut at its share
    assert sum(n for _, _, n in flat) == 18 and flat[-1] == (3001, 201, 6)


@pytest.mark.parametrize("dst,src,msg", [
    (torch.empty(4), torch.empty(4, dtype=torch.float64), "float64"),
    (torch.empty(4, 4).t(), torch.empty(4, 4), "destination must be contiguous"),
    (torch.empty(4, 4), torch.empty(4, 4).t(), "no contiguous rows"),
    (torch.empty(5), torch.empty(4), "into (5,)"),
])
def test_rejects_what_it_cannot_copy(dst, src, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        contiguous_runs(dst, src)
