"""How a bucket of HF-named tensors travels from a trainer rank to an engine.

A bucket is a byte buffer plus a table of `TensorEntry` (name, dtype, shape, offset). Transports:
  * `ShmBucket`  - within a node: a file in /dev/shm written by the sender and mapped (not copied) by
                   every engine on the node; only its path and table cross the process boundary.
  * `RayBucket`  - across nodes: the buffer is a numpy array in the Ray object store; an engine on another
                   node pulls it once and reads it zero-copy.
  * `LocalBucket`- same process (tests, in-process engines): the tensors themselves.
  * `DistBucket` - across nodes (transport_dist.py): the sender broadcasts the buffer in a torch.distributed
                   group (gloo for CPU tensors, nccl for CUDA ones) that it shares with every engine; only the
                   header goes through Ray, and each engine posts its receive when the header arrives.
  * `RefBucket`  - zero-copy within a node (transport_refs.py): references (storage handle, offset, shape,
                   strides) into the trainer's own parameters, after `share_in_place` moved them to named
                   shared memory. Engines read the live parameters while the trainer waits in the sync.
The sender (`BucketPacker`) holds at most one bucket's worth of tensor references before it flushes.
"""
from __future__ import annotations

import os
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from prism_mcore.rollout.engine import TensorEntry
from prism_mcore.rollout.transport_refs import (RefBucket, SharedRef, prune_remote,  # noqa: F401 (re-export)
                                                share_in_place, shared_ref)

REF_GROUP_BYTES = 128 * 2**20  # references per message (at most a bucket): engines start early, and
# few messages (each costs an engine ~1-2 ms of Ray task overhead)
ALIGN = 64  # every tensor starts on a cache line, so dtype views of the buffer are always aligned
SHM_DIR = "/dev/shm"
SHM_PREFIX = "prism_ws_"


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


class Reshaped:
    """`source.reshape(shape)` where that reshape would copy (e.g. the QKV split of Megatron's interleaved
    rows), not materialized: packers copy `source` straight into the bucket, one copy instead of two and no
    freshly allocated (page-faulting) tensor. `materialize()` gives the plain tensor."""

    def __init__(self, source: torch.Tensor, shape: tuple[int, ...]):
        self.source, self.shape = source, torch.Size(shape)
        self.dtype = source.dtype

    def numel(self) -> int:
        return self.source.numel()

    def element_size(self) -> int:
        return self.source.element_size()

    def detach(self) -> "Reshaped":
        return self

    def materialize(self) -> torch.Tensor:
        return self.source.reshape(self.shape)

    def clone(self) -> torch.Tensor:
        return self.source.reshape(self.shape).clone()


def _view(buffer: torch.Tensor, e: TensorEntry) -> torch.Tensor:
    return buffer[e.offset: e.offset + e.nbytes].view(getattr(torch, e.dtype)).view(e.shape)


@dataclass
class LocalBucket:
    pairs: list[tuple[str, torch.Tensor]]

    def open(self) -> list[tuple[str, torch.Tensor]]:
        return self.pairs

    def entries(self) -> list[TensorEntry]:
        return [TensorEntry(n, _dtype_name(t), tuple(t.shape), 0) for n, t in self.pairs]

    def release(self) -> None:
        self.pairs = []


@dataclass
class ShmBucket:
    path: str
    size: int
    table: list[TensorEntry]
    _buffer: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def open(self) -> list[tuple[str, torch.Tensor]]:
        if self._buffer is None:
            self._buffer = map_shm(self.path, self.size)
        return [(e.name, _view(self._buffer, e)) for e in self.table]

    def entries(self) -> list[TensorEntry]:
        return self.table

    def release(self) -> None:
        self._buffer = None

    def __getstate__(self):  # the mapping never travels, only the path and the table
        return {"path": self.path, "size": self.size, "table": self.table, "_buffer": None}


@dataclass
class RayBucket:
    refs: list  # [ObjectRef of a uint8 numpy array]; nested in a list so Ray does not resolve it on the way
    size: int
    table: list[TensorEntry]
    _array: Any = field(default=None, repr=False, compare=False)

    def open(self) -> list[tuple[str, torch.Tensor]]:
        if self._array is None:
            import ray

            self._array = ray.get(self.refs[0])  # read-only, zero-copy view of the object store
        if not self.size:
            return []
        with warnings.catch_warnings():  # read-only on purpose: we only ever read the buffer
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            buffer = torch.frombuffer(memoryview(self._array), dtype=torch.uint8)
        return [(e.name, _view(buffer, e)) for e in self.table]

    def entries(self) -> list[TensorEntry]:
        return self.table

    def release(self) -> None:
        self._array = None

    def __getstate__(self):
        return {"refs": self.refs, "size": self.size, "table": self.table, "_array": None}


# Mapping a file costs a page fault per 4 KiB page on first touch (on VMs slower than the copy itself:
# measured 0.6 GB/s vs 4 GB/s here), so both ends keep their mappings of the reused staging slots.
_MAPPINGS: dict[str, tuple[tuple[int, int], torch.Tensor]] = {}


def map_shm(path: str, size: int) -> torch.Tensor:
    """A MAP_SHARED uint8 view of a /dev/shm file, cached per path while the file is the same file."""
    st = os.stat(path)
    key = (st.st_ino, st.st_size)
    cached = _MAPPINGS.get(path)
    if cached is None or cached[0] != key or cached[1].numel() < size:
        _MAPPINGS[path] = (key, torch.from_file(path, shared=True, size=st.st_size, dtype=torch.uint8))
    return _MAPPINGS[path][1][:size]


def forget_mappings(prefix: str = "") -> None:
    for path in [p for p in _MAPPINGS if os.path.basename(p).startswith(SHM_PREFIX + prefix)]:
        del _MAPPINGS[path]


class ShmArena:
    """A sender's staging slots in /dev/shm, reused by every sync of a session: slot k holds bucket k.

    Bucket layouts repeat from one version to the next, so after the first sync every write lands on
    already-faulted pages that every engine on the node already has mapped. Peak shm use equals the
    sender's share of the model, as it would with fresh files (a staged update keeps every bucket until
    commit); the difference is that the slots stay allocated between syncs until `release()`."""

    def __init__(self, tag: str):
        self.tag = tag
        self.slots: list[str] = []

    def slot(self, k: int, size: int) -> tuple[str, torch.Tensor]:
        path = os.path.join(SHM_DIR, f"{SHM_PREFIX}{self.tag}_{k}")
        while len(self.slots) <= k:
            self.slots.append(os.path.join(SHM_DIR, f"{SHM_PREFIX}{self.tag}_{len(self.slots)}"))
        if os.path.exists(path) and os.stat(path).st_size < size:
            os.unlink(path)  # grew: a new inode, so receivers re-map it
        if not os.path.exists(path):
            torch.from_file(path, shared=True, size=size, dtype=torch.uint8)  # creates it at this size
        return path, map_shm(path, size)

    def release(self) -> None:
        forget_mappings(self.tag)
        remove_shm(self.slots)
        self.slots = []


_ARENAS: dict[str, ShmArena] = {}


def arena(tag: str) -> ShmArena:
    return _ARENAS.setdefault(tag, ShmArena(tag))


def release_arenas() -> None:
    for a in _ARENAS.values():
        a.release()
    _ARENAS.clear()


# ---- packing --------------------------------------------------------------------------------------------

def layout_table(pairs: list[tuple[str, torch.Tensor]]) -> tuple[list[TensorEntry], int]:
    table, offset = [], 0
    for name, t in pairs:
        table.append(TensorEntry(name, _dtype_name(t), tuple(t.shape), offset))
        offset += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    return table, offset


def _fill(buffer: torch.Tensor, table: list[TensorEntry], pairs: list[tuple[str, torch.Tensor]]) -> None:
    """Copy every tensor into its place in `buffer`. Host tensors go as one planned copy on this thread with
    streaming stores (platform/host_copy.py: the engines read the bucket later, from other processes, so
    caching its lines here only evicts the sender's data); anything else (GPU tensors, views without
    contiguous rows) through torch."""
    from prism_mcore.platform.host_copy import HostCopier, contiguous_runs

    runs, other = [], []
    for e, (_, t) in zip(table, pairs):
        dst, src = _view(buffer, e), t
        if isinstance(t, Reshaped):
            dst, src = dst.view(t.source.shape), t.source
        try:
            runs += contiguous_runs(dst, src)
        except ValueError:
            other.append((dst, src))
    HostCopier(threads=1).copy_runs(runs)  # the tensors stay alive in `pairs` meanwhile
    for dst, src in other:
        dst.copy_(src)


def write_shm_bucket(pairs: list[tuple[str, torch.Tensor]], tag: str, slot: int | None = None) -> ShmBucket:
    """Pack into a fresh file, or into staging slot `slot` of the arena `tag` (reused across versions)."""
    table, size = layout_table(pairs)
    size = max(size, 1)
    if slot is None:
        path = os.path.join(SHM_DIR, f"{SHM_PREFIX}{tag}_{uuid.uuid4().hex[:12]}")
        buffer = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
    else:
        path, buffer = arena(tag).slot(slot, size)
    _fill(buffer, table, pairs)
    return ShmBucket(path, size, table)


def put_ray_bucket(pairs: list[tuple[str, torch.Tensor]]) -> RayBucket:
    import ray

    table, size = layout_table(pairs)
    array = np.empty(size, dtype=np.uint8)
    if size:
        _fill(torch.from_numpy(array), table, pairs)
    return RayBucket([ray.put(array)], size, table)


def remove_shm(paths: list[str]) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def sender_tag(run: str, rank: int) -> str:
    """The staging-file tag of trainer rank `rank` of run `run` (EngineEndpoints.namespace, unique per run):
    two runs on one machine never share a file, and the owning process's pid in the name lets
    `reap_orphaned_shm` find the files of a sender that was killed (SIGKILL, OOM) before it could remove them."""
    return f"{run}_r{rank}p{os.getpid()}"


def reap_orphaned_shm() -> int:
    """Delete staging files whose owning sender (the pid in `sender_tag`) is gone. Files of live senders, and
    names without an owner, are left alone. Returns how many were deleted."""
    import re

    from prism_mcore.platform.processes import alive

    doomed = []
    for name in os.listdir(SHM_DIR):
        owner = re.search(r"_r\d+p(\d+)_", name) if name.startswith(SHM_PREFIX) else None
        if owner and not alive(int(owner.group(1))):
            doomed.append(os.path.join(SHM_DIR, name))
    remove_shm(doomed)
    return len(doomed)


def remove_stale_shm(tag_prefix: str) -> int:
    """Delete bucket files a crashed sync left behind (names start with SHM_PREFIX + tag_prefix)."""
    names = [n for n in os.listdir(SHM_DIR) if n.startswith(SHM_PREFIX + tag_prefix)]
    remove_shm([os.path.join(SHM_DIR, n) for n in names])
    return len(names)


class BucketPacker:
    """Groups (name, tensor) pairs into buckets of about `bucket_bytes` and hands each full bucket to `send`.

    Only references are held until a flush, so the sender's extra memory is one bucket (plus whatever
    tensor is being produced). A tensor larger than a bucket travels alone in a bucket of its own size."""

    def __init__(self, send: Callable[[Any], None], bucket_bytes: int, transport: str, tag: str,
                 reuse_staging: bool = True, dist_sender=None):
        if transport not in ("shm", "ray", "local", "torch_distributed"):
            raise ValueError(f"unknown weight transport {transport!r} (shm, ray, torch_distributed or local)")
        if transport == "torch_distributed" and dist_sender is None:
            raise ValueError("the torch_distributed transport needs a DistSender (the sender's weight group)")
        self.send, self.bucket_bytes, self.transport, self.tag = send, bucket_bytes, transport, tag
        self.dist_sender = dist_sender
        self.reuse_staging = reuse_staging
        self.slots_used = 0
        self.pending: list[tuple[str, torch.Tensor]] = []
        self.pending_refs: list[SharedRef] = []
        self.pending_bytes = 0
        self.pending_ref_bytes = 0
        self.tensors = 0
        self.bytes = 0
        self.buckets = 0
        self.paths: list[str] = []
        self.ref_bytes = 0  # bytes sent as references to shared trainer memory (not copied)
        self.pack_s = 0.0  # time spent copying tensors into buckets
        self.send_s = 0.0  # time spent handing buckets over (including waiting for the previous one)

    def add(self, name: str, tensor: "torch.Tensor | Reshaped") -> None:
        nbytes = tensor.numel() * tensor.element_size()
        ref = None
        if self.transport == "shm":  # a view of shared trainer memory travels as a reference (transport_refs)
            ref = shared_ref(name, tensor.source, tensor.shape) if isinstance(tensor, Reshaped) else \
                shared_ref(name, tensor)
        if ref is not None:
            # References cost no staging memory: send them in small groups so engines start reading early.
            # Copies pending since the last group go first, so buckets stay in (layer) order: vLLM's layerwise
            # reload buffers a layer until it is complete, and the engine copies while the next group packs.
            if self.pending_refs and self.pending_ref_bytes + nbytes > min(self.bucket_bytes, REF_GROUP_BYTES):
                self._flush_copies()
                self._flush_refs()
            self.pending_refs.append(ref)
            self.pending_ref_bytes += nbytes
            self.ref_bytes += nbytes
        else:
            if self.pending and self.pending_bytes + nbytes > self.bucket_bytes:
                self._flush_copies()
            self.pending.append((name, tensor.detach()))
            self.pending_bytes += nbytes
        self.tensors += 1
        self.bytes += nbytes

    def add_refs(self, refs: list[SharedRef], nbytes: int, key: str) -> None:
        """A cached plan's references (`nbytes` in all, plan `key`; weight_sync's steady state), sent as one
        bucket: with nothing to pack on this side, one message per engine lets the engine copy everything
        with all its threads."""
        self._flush_copies()
        self._flush_refs()
        self.tensors += len(refs)
        self.bytes += nbytes
        self.ref_bytes += nbytes
        self.buckets += 1
        t0 = time.perf_counter()
        self.send(RefBucket(refs, key))
        self.send_s += time.perf_counter() - t0

    def flush(self) -> None:
        """Send what is pending; with torch_distributed, also wait until every broadcast completed."""
        self._flush_copies()
        self._flush_refs()
        if self.dist_sender is not None:
            t0 = time.perf_counter()
            self.dist_sender.finish()
            self.send_s += time.perf_counter() - t0

    def _flush_refs(self) -> None:
        if not self.pending_refs:
            return
        refs, self.pending_refs, self.pending_ref_bytes = self.pending_refs, [], 0
        self.buckets += 1
        t0 = time.perf_counter()
        self.send(RefBucket(refs))
        self.send_s += time.perf_counter() - t0

    def _flush_copies(self) -> None:
        if not self.pending:
            return
        pairs, self.pending, self.pending_bytes = self.pending, [], 0
        t0 = time.perf_counter()
        if self.transport == "shm":
            bucket = write_shm_bucket(pairs, self.tag, self.slots_used if self.reuse_staging else None)
            self.slots_used += 1
            if not self.reuse_staging:
                self.paths.append(bucket.path)
        elif self.transport == "ray":
            bucket = put_ray_bucket(pairs)
        elif self.transport == "torch_distributed":
            bucket, k = self.dist_sender.pack(pairs)
        else:
            bucket = LocalBucket([(n, t.clone()) for n, t in pairs])
        self.buckets += 1
        t1 = time.perf_counter()
        self.send(bucket)  # the header first: each engine posts its receive when the header arrives
        if self.transport == "torch_distributed":
            self.dist_sender.broadcast(k, bucket.size)
        self.pack_s += t1 - t0
        self.send_s += time.perf_counter() - t1

    def cleanup(self) -> None:
        """Unlink this sender's one-off shm files (after every engine committed or aborted); reused staging
        slots stay for the next sync. Broadcasts still in flight (after a failure) are waited for."""
        remove_shm(self.paths)
        self.paths = []
        if self.dist_sender is not None:
            try:
                self.dist_sender.finish()
            except RuntimeError:
                pass  # the group was dropped; the next sync builds a new one
