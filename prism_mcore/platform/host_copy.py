"""Many host-memory copies run as one: `HostCopier(threads).run(plan)` copies every (dst, src) pair of a plan.

Why not `dst.copy_(src)` per pair: a weight sync copies a few hundred tensors (some of them strided views, such
as the QKV split of Megatron's interleaved rows) between processes' memory. Per-pair copies pay Python and
dispatch overhead per tensor and leave the cores unevenly loaded (a thread pool hands out whole tensors),
and torch's intra-op copy splits each tensor with an OpenMP barrier that stalls whenever another process holds
a core. Here the pairs are cut once into contiguous byte runs, the runs into `threads` parts of equal bytes,
and each part is one thread's loop of copies with the GIL released, so every core copies
at memory speed from the first byte to the last. Runs of 1 MB and more are written with streaming stores
(csrc/host_copy.cpp, when prism_mcore._C is built; libc memmove otherwise). The plan is made once and reused:
the pairs are views whose contents change between runs, not their addresses.
"""
from __future__ import annotations

import ctypes
import itertools
import os
from concurrent.futures import ThreadPoolExecutor

import torch

Run = tuple[int, int, int]  # (destination address, source address, bytes)


def contiguous_runs(dst: torch.Tensor, src: torch.Tensor) -> list[Run]:
    """Byte runs that copy `src` into `dst` (same dtype and element count; `dst` contiguous, `src` any view
    whose innermost dims are contiguous, in row-major order). Raises ValueError for anything else."""
    if dst.dtype != src.dtype or dst.numel() != src.numel():
        raise ValueError(f"host copy: {tuple(src.shape)} {src.dtype} into {tuple(dst.shape)} {dst.dtype}")
    if not dst.is_contiguous():
        raise ValueError("host copy: the destination must be contiguous")
    if dst.device.type != "cpu" or src.device.type != "cpu":
        raise ValueError("host copy: both tensors must be in host memory")
    size = src.element_size()
    if src.numel() == 0:
        return []
    if src.is_contiguous():
        return [(dst.data_ptr(), src.data_ptr(), src.numel() * size)]
    # The longest suffix of dims laid out contiguously is one run; the dims before it are iterated.
    shape, stride = list(src.shape), list(src.stride())
    inner, expected, split = 1, 1, len(shape)
    for d in range(len(shape) - 1, -1, -1):
        if shape[d] != 1 and stride[d] != expected:
            break
        expected *= shape[d]
        inner *= shape[d]
        split = d
    if inner == 1:
        raise ValueError(f"host copy: source view {tuple(shape)} / {tuple(stride)} has no contiguous rows")
    runs, out, nbytes = [], dst.data_ptr(), inner * size
    for index in itertools.product(*(range(n) for n in shape[:split])):
        offset = sum(i * s for i, s in zip(index, stride))
        runs.append((out, src.data_ptr() + offset * size, nbytes))
        out += nbytes
    return runs


def split_runs(runs: list[Run], parts: int) -> list[list[Run]]:
    """`runs` cut into `parts` lists of equal bytes (a run may be cut in two), in order."""
    total = sum(n for _, _, n in runs)
    share = -(-total // parts) if total else 0
    out: list[list[Run]] = [[] for _ in range(parts)]
    part, room = 0, share
    for d, s, n in runs:
        while n > 0:
            take = min(n, room) if part < parts - 1 else n
            out[part].append((d, s, take))
            d, s, n, room = d + take, s + take, n - take, room - take
            if room == 0 and part < parts - 1:
                part, room = part + 1, share
    return [p for p in out if p]


STREAM_MIN_BYTES = 1 << 20  # runs this long are written with streaming stores (when _C is built)


def streaming_extension():
    """prism_mcore._C (csrc/host_copy.cpp: streaming-store copies), or None when it was not built."""
    try:
        from prism_mcore import _C
    except ImportError:
        return None
    return _C if hasattr(_C, "copy_runs") else None


def _memmove_part(part: list[Run]) -> None:
    move = ctypes.memmove
    for d, s, n in part:
        move(d, s, n)


class CopyPlan:
    """A fixed set of (dst, src) copies cut into `parts` equal-byte lists of runs (as [k, 3] int64 tensors
    for the streaming copy). It keeps the tensors referenced: their addresses must stay valid while the plan
    is used."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], parts: int, tensors: bool,
                 runs: list[Run] | None = None):
        self._keep = list(pairs)
        if runs is None:
            runs = [r for dst, src in self._keep for r in contiguous_runs(dst, src)]
        self.nbytes = sum(n for _, _, n in runs)
        self.parts = split_runs(runs, parts)
        if tensors:
            self.parts = [torch.tensor(p, dtype=torch.int64).reshape(-1, 3) for p in self.parts]


class HostCopier:
    """Runs copy plans over `threads` threads (default: the cores this process may use). `streaming`: write
    runs of >= 1 MB with non-temporal stores (csrc/host_copy.cpp says why); default: when prism_mcore._C is
    built, else libc memmove. `method` names what runs."""

    def __init__(self, threads: int = 0, streaming: bool | None = None):
        ext = streaming_extension()
        if streaming and ext is None:
            raise RuntimeError("streaming host copies need prism_mcore._C (python setup.py build_ext --inplace)")
        self._ext = ext if streaming or streaming is None else None
        self.method = "stream" if self._ext is not None else "memmove"
        self.threads = max(1, threads or len(os.sched_getaffinity(0)))
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="host_copy") if self.threads > 1 else None

    def plan(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> CopyPlan:
        return CopyPlan(pairs, self.threads, tensors=self._ext is not None)

    def _copy_part(self, part) -> None:
        if self._ext is None:
            _memmove_part(part)
        else:  # releases the GIL for the whole part
            self._ext.copy_runs(part, STREAM_MIN_BYTES)

    def run(self, plan: CopyPlan) -> None:
        if self._pool is None or len(plan.parts) < 2:
            for part in plan.parts:
                self._copy_part(part)
        else:
            list(self._pool.map(self._copy_part, plan.parts))

    def copy_runs(self, runs: list[Run]) -> int:
        """Copy raw runs (from `contiguous_runs`) once; the caller keeps their tensors alive. Returns bytes."""
        plan = CopyPlan([], self.threads, tensors=self._ext is not None, runs=runs)
        self.run(plan)
        return plan.nbytes

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
