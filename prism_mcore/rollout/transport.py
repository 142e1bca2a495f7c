"""How a bucket of HF-named tensors travels from a trainer rank to an engine.

A bucket is a byte buffer plus a table of `TensorEntry` (name, dtype, shape, offset). Transports:
  * `ShmBucket`  - within a node: a file in /dev/shm written by the sender and mapped (not copied) by
                   every engine on the node; only its path and table cross the process boundary.
  * `RayBucket`  - across nodes: the buffer is a numpy array in the Ray object store; an engine on another
                   node pulls it once and reads it zero-copy.
  * `LocalBucket`- same process (tests, in-process engines): the tensors themselves.
The sender (`BucketPacker`) holds at most one bucket's worth of tensor references before it flushes.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from prism_mcore.rollout.engine import TensorEntry

ALIGN = 64  # every tensor starts on a cache line, so dtype views of the buffer are always aligned
SHM_DIR = "/dev/shm"
SHM_PREFIX = "prism_ws_"


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


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
            # MAP_SHARED mapping of the sender's pages: no copy until load_weights reads them.
            self._buffer = torch.from_file(self.path, shared=True, size=self.size, dtype=torch.uint8)
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
        buffer = torch.frombuffer(memoryview(self._array), dtype=torch.uint8) if self.size else torch.empty(0, dtype=torch.uint8)
        return [(e.name, _view(buffer, e)) for e in self.table]

    def entries(self) -> list[TensorEntry]:
        return self.table

    def release(self) -> None:
        self._array = None

    def __getstate__(self):
        return {"refs": self.refs, "size": self.size, "table": self.table, "_array": None}


def layout_table(pairs: list[tuple[str, torch.Tensor]]) -> tuple[list[TensorEntry], int]:
    table, offset = [], 0
    for name, t in pairs:
        table.append(TensorEntry(name, _dtype_name(t), tuple(t.shape), offset))
        offset += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    return table, offset


def _fill(buffer: torch.Tensor, table: list[TensorEntry], pairs: list[tuple[str, torch.Tensor]]) -> None:
    for e, (_, t) in zip(table, pairs):
        _view(buffer, e).copy_(t)


def write_shm_bucket(pairs: list[tuple[str, torch.Tensor]], tag: str) -> ShmBucket:
    table, size = layout_table(pairs)
    path = os.path.join(SHM_DIR, f"{SHM_PREFIX}{tag}_{uuid.uuid4().hex[:12]}")
    buffer = torch.from_file(path, shared=True, size=max(size, 1), dtype=torch.uint8)
    _fill(buffer, table, pairs)
    del buffer
    return ShmBucket(path, max(size, 1), table)


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


def remove_stale_shm(tag_prefix: str) -> int:
    """Delete bucket files a crashed sync left behind (names start with SHM_PREFIX + tag_prefix)."""
    names = [n for n in os.listdir(SHM_DIR) if n.startswith(SHM_PREFIX + tag_prefix)]
    remove_shm([os.path.join(SHM_DIR, n) for n in names])
    return len(names)


class BucketPacker:
    """Groups (name, tensor) pairs into buckets of about `bucket_bytes` and hands each full bucket to `send`.

    Only references are held until a flush, so the sender's extra memory is one bucket (plus whatever
    tensor is being produced). A tensor larger than a bucket travels alone in a bucket of its own size."""

    def __init__(self, send: Callable[[Any], None], bucket_bytes: int, transport: str, tag: str):
        if transport not in ("shm", "ray", "local"):
            raise ValueError(f"unknown weight transport {transport!r} (shm, ray or local)")
        self.send, self.bucket_bytes, self.transport, self.tag = send, bucket_bytes, transport, tag
        self.pending: list[tuple[str, torch.Tensor]] = []
        self.pending_bytes = 0
        self.tensors = 0
        self.bytes = 0
        self.buckets = 0
        self.paths: list[str] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.bucket_bytes:
            self.flush()
        self.pending.append((name, tensor.detach()))
        self.pending_bytes += nbytes
        self.tensors += 1
        self.bytes += nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        pairs, self.pending, self.pending_bytes = self.pending, [], 0
        if self.transport == "shm":
            bucket = write_shm_bucket(pairs, self.tag)
            self.paths.append(bucket.path)
        elif self.transport == "ray":
            bucket = put_ray_bucket(pairs)
        else:
            bucket = LocalBucket([(n, t.clone()) for n, t in pairs])
        self.buckets += 1
        self.send(bucket)

    def cleanup(self) -> None:
        """Unlink this sender's shm files (after every engine committed or aborted; mappings stay valid)."""
        remove_shm(self.paths)
        self.paths = []
