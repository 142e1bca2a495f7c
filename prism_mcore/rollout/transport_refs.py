"""Zero-copy weight transport within a node: references into the trainer's own parameters.

`share_in_place` moves a trainer rank's parameter storages to named shared memory (torch's file_system
sharing, in place: every view stays valid); from then on an HF tensor that is a view of a parameter travels
as a `SharedRef` (storage handle, element offset, shape, strides) and the engine reads it straight from
trainer memory, while the trainer waits in the sync (the CPU counterpart of passing CUDA IPC handles).
A ref may be a strided view whose HF tensor is a reshape that would copy (the QKV split of Megatron's rows
interleaved per KV group): `hf_shape` says what it becomes, and receivers copy the strided source straight
into their HF-shaped destination (`RefBucket.sources`), so no staging copy is made on the sender.
Split from transport.py (buckets that carry bytes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prism_mcore.rollout.engine import TensorEntry

# Process-wide registries, not caches of results: a storage shared here must stay alive (its address is
# the key, and the engine maps it by name) for as long as the process may send references into it.
# storage data_ptr -> (the storage, torch's file_system handle)
_SHARED: dict[int, tuple[torch.UntypedStorage, tuple[bytes, bytes, int]]] = {}


def share_in_place(tensors) -> int:
    """Move the storages of `tensors` to named shared memory in place (every view, e.g. Megatron's DDP
    parameter buffer and its parameter views, stays valid). Returns the bytes moved."""
    moved = 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() in _SHARED or storage.nbytes() == 0:
            continue
        handle = storage._share_filename_cpu_()  # torch.multiprocessing's file_system sharing, in place
        _SHARED[storage.data_ptr()] = (storage, handle)
        moved += storage.nbytes()
    return moved


@dataclass
class SharedRef:
    name: str
    dtype: str
    shape: tuple[int, ...]  # of the source view
    stride: tuple[int, ...]
    offset: int  # in elements, from the start of the storage
    handle: tuple[bytes, bytes, int]
    hf_shape: tuple[int, ...] | None = None  # the HF tensor's shape when it differs from `shape`

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.shape if self.hf_shape is None else self.hf_shape


def shared_ref(name: str, source: torch.Tensor, hf_shape=None) -> SharedRef | None:
    """A reference to `source` (its HF tensor is `source.reshape(hf_shape)`), or None when its storage was
    not shared by `share_in_place`."""
    entry = _SHARED.get(source.untyped_storage().data_ptr())
    if entry is None:
        return None
    hf = None if hf_shape is None or tuple(hf_shape) == tuple(source.shape) else tuple(hf_shape)
    return SharedRef(name, str(source.dtype).removeprefix("torch."), tuple(source.shape), tuple(source.stride()),
                     source.storage_offset(), entry[1], hf)


_REMOTE: dict[bytes, torch.UntypedStorage] = {}  # receiver side: mapped trainer storages, by shm name
_REMOTE_MAX = 4096


def _remote_storage(handle: tuple[bytes, bytes, int]) -> torch.UntypedStorage:
    manager, name, size = handle
    if name not in _REMOTE:
        if len(_REMOTE) >= _REMOTE_MAX:  # a restarted trainer has new handles; forget the oldest
            del _REMOTE[next(iter(_REMOTE))]
        _REMOTE[name] = torch.UntypedStorage._new_shared_filename_cpu(manager, name, size)
    return _REMOTE[name]


def prune_remote(buckets: list) -> None:
    """Receiver side, after a commit: unmap trainer storages this update did not use (e.g. those of a
    trainer process that has since restarted), so their memory can be freed."""
    keep = {r.handle[1] for b in buckets if isinstance(b, RefBucket) for r in b.refs}
    for name in [n for n in _REMOTE if n not in keep]:
        del _REMOTE[name]


@dataclass
class RefBucket:
    refs: list[SharedRef]
    # Set when `refs` is a sender's cached plan (sync_plan.own_refs): the same key always comes with the
    # same refs, so a receiver may keep what it derived from them (opened views, copy chunks) by key.
    key: str = ""

    def sources(self) -> list[tuple[str, torch.Tensor]]:
        """(name, source view into trainer memory); `dst.view(src.shape).copy_(src)` fills an HF-shaped,
        contiguous `dst` without an intermediate copy."""
        out = []
        for r in self.refs:
            view = torch.empty(0, dtype=getattr(torch, r.dtype))
            out.append((r.name, view.set_(_remote_storage(r.handle), r.offset, r.shape, r.stride)))
        return out

    def open(self) -> list[tuple[str, torch.Tensor]]:
        """(name, HF tensor): views, except a strided source whose HF shape needs a copy (made here)."""
        return [(n, t if t.shape == r.out_shape else t.reshape(r.out_shape))
                for (n, t), r in zip(self.sources(), self.refs)]

    def entries(self) -> list[TensorEntry]:
        return [TensorEntry(r.name, r.dtype, r.out_shape, 0) for r in self.refs]

    def release(self) -> None:
        pass
