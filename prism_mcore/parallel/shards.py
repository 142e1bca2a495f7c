"""Where each rank's piece of every model tensor sits in the full tensor.

Megatron already describes this for checkpointing: `model.sharded_state_dict()` gives, for every
local tensor, its key, the global shape and the offset of the local piece (tensor, pipeline and
expert parallel alike; layers and experts carry global indices). We use that one description to
  * walk a rank's pieces without copying them (`iter_local_shards`, views of the live tensors),
  * assemble full tensors from all ranks' pieces (`local_shards` + `assemble`, or `assemble_pieces` for
    one tensor: each element copied once, exact-once coverage checked by box arithmetic), and
  * fill a rank's pieces from full tensors without materializing anything else (`load_full`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch


@dataclass
class Shard:
    key: str
    global_shape: tuple[int, ...]
    global_offset: tuple[int, ...]
    data: torch.Tensor
    primary: bool  # the one replica that speaks for this piece (replica_id all zero)

    def region(self) -> tuple[slice, ...]:
        """The slice of the full tensor this piece covers (leading axes may be prepended, e.g. layer)."""
        shape = (1,) * (len(self.global_shape) - self.data.dim()) + tuple(self.data.shape)
        return tuple(slice(o, o + s) for o, s in zip(self.global_offset, shape))


def _sharded_tensors(model: torch.nn.Module) -> Iterator:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    state = model.sharded_state_dict()
    apply_factories(state)  # e.g. the fused SwiGLU fc1 becomes two tensors (gate, up)
    for value in nested_values(state):
        if isinstance(value, ShardedTensor) and value.flattened_range is None:
            yield value


def is_primary(replica_id) -> bool:
    """Whether a piece with this Megatron `replica_id` is the one replica that speaks for it (all zero)."""
    ids = replica_id if isinstance(replica_id, tuple) else (replica_id,)
    return all(int(i) == 0 for i in ids)


_is_primary = is_primary  # old private name


def iter_local_shards(model: torch.nn.Module, primary_only: bool = False) -> Iterator[Shard]:
    """This rank's pieces of every parameter (and persistent buffer) of `model`, in Megatron's
    `sharded_state_dict` order, *without copying*: `data` is a detached view of the live tensor, so it
    changes with the model and writing into it writes the model. With `primary_only`, replicas that do
    not speak for their piece (e.g. the copies on other DP ranks) are skipped."""
    for t in _sharded_tensors(model):
        primary = is_primary(t.replica_id)
        if primary or not primary_only:
            yield Shard(t.key, tuple(t.global_shape), tuple(t.global_offset), t.data.detach(), primary)


def local_shards(model: torch.nn.Module) -> list[Shard]:
    """This rank's pieces of every parameter (and persistent buffer) of `model`, detached copies (a
    snapshot; `iter_local_shards` gives the same pieces as views without copying)."""
    return [Shard(s.key, s.global_shape, s.global_offset, s.data.clone(), s.primary)
            for s in iter_local_shards(model)]


def check_cover(key: str, shape: tuple[int, ...], regions: list[tuple[slice, ...]]) -> None:
    """Raise ValueError unless the regions (boxes, one slice per axis) tile `shape` exactly once: every
    box inside the tensor, no two overlapping, and their volumes adding up to the whole. Box arithmetic,
    so checking costs nothing next to the copy (no per-element counter)."""
    total = 1
    for n in shape:
        total *= n
    volume = 0
    for region in regions:
        if len(region) != len(shape) or any(r.start < 0 or r.stop > n or r.start > r.stop
                                            for r, n in zip(region, shape)):
            raise ValueError(f"{key}: piece {region} lies outside the tensor of shape {tuple(shape)}")
        v = 1
        for r in region:
            v *= r.stop - r.start
        volume += v
    for i, a in enumerate(regions):
        for b in regions[i + 1:]:
            if all(x.start < y.stop and y.start < x.stop for x, y in zip(a, b)):
                raise ValueError(f"{key}: pieces {a} and {b} overlap")
    if volume != total:
        raise ValueError(f"{key}: pieces cover {volume} of {total} elements")


def assemble_pieces(key: str, shape: tuple[int, ...], pieces: list[tuple[tuple[slice, ...], torch.Tensor]],
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """One full tensor from (region, data) pieces that tile it exactly once (`check_cover`): every element
    is copied once into an uninitialized tensor (or into `out`). `data` may carry leading size-1 axes."""
    check_cover(key, shape, [r for r, _ in pieces])
    if out is None:
        out = torch.empty(shape, dtype=pieces[0][1].dtype)
    for region, data in pieces:
        dst = out[region]
        dst.copy_(data.reshape(dst.shape))
    return out


@contextlib.contextmanager
def params_swapped_with_grads(model: torch.nn.Module) -> Iterator[None]:
    """Temporarily put each parameter's gradient (Megatron's `main_grad` if present) in its place, so
    that `local_shards` describes gradients with exactly the layout of the parameters."""
    saved = []
    with torch.no_grad():
        for p in model.parameters():
            grad = getattr(p, "main_grad", None)
            grad = p.grad if grad is None else grad
            saved.append(p.detach().clone())
            p.copy_(grad.view_as(p) if grad is not None else torch.zeros_like(p))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(model.parameters(), saved):
                p.copy_(value)


def assemble(shards_per_rank: list[list[Shard]], keys: Callable[[str], bool] = lambda k: True
             ) -> dict[str, torch.Tensor]:
    """Full tensors from the primary pieces of all ranks. Every element must be covered exactly once."""
    pieces: dict[str, list] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for shards in shards_per_rank:
        for s in shards:
            if s.primary and keys(s.key):
                pieces.setdefault(s.key, []).append((s.region(), s.data))
                shapes[s.key] = s.global_shape
    return {key: assemble_pieces(key, shapes[key], ps) for key, ps in pieces.items()}


@torch.no_grad()
def load_full(model: torch.nn.Module, read: Callable[[str, tuple[slice, ...]], torch.Tensor]) -> list[str]:
    """Fill this rank's pieces from full tensors: `read(key, region)` returns the region only, so a
    lazy reader (safetensors slices) never loads more than this rank holds. `read` may return None
    to keep a tensor's current (initialized) value. Returns the keys loaded."""
    loaded = []
    for t in iter_local_shards(model):
        region = t.region()
        value = read(t.key, region)
        if value is None:
            continue
        if value.numel() != t.data.numel():
            raise ValueError(f"{t.key}: expected {tuple(t.data.shape)} for region {region}, got {tuple(value.shape)}")
        t.data.copy_(value.reshape(t.data.shape))
        loaded.append(t.key)
    return loaded
