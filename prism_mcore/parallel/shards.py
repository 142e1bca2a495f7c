"""Where each rank's piece of every model tensor sits in the full tensor.

Megatron already describes this for checkpointing: `model.sharded_state_dict()` gives, for every
local tensor, its key, the global shape and the offset of the local piece (tensor, pipeline and
expert parallel alike; layers and experts carry global indices). We use that one description to
  * assemble full tensors from all ranks' pieces (`local_shards` + `assemble`), and
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


def _is_primary(replica_id) -> bool:
    ids = replica_id if isinstance(replica_id, tuple) else (replica_id,)
    return all(int(i) == 0 for i in ids)


def local_shards(model: torch.nn.Module) -> list[Shard]:
    """This rank's pieces of every parameter (and persistent buffer) of `model`, detached."""
    return [Shard(t.key, tuple(t.global_shape), tuple(t.global_offset), t.data.detach().clone(),
                  _is_primary(t.replica_id))
            for t in _sharded_tensors(model)]


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
    full: dict[str, torch.Tensor] = {}
    covered: dict[str, torch.Tensor] = {}
    for shards in shards_per_rank:
        for s in shards:
            if not s.primary or not keys(s.key):
                continue
            if s.key not in full:
                full[s.key] = torch.zeros(s.global_shape, dtype=s.data.dtype)
                covered[s.key] = torch.zeros(s.global_shape, dtype=torch.int32)
            region = s.region()
            full[s.key][region] = s.data.reshape(full[s.key][region].shape)
            covered[s.key][region] += 1
    for key, count in covered.items():
        if not bool((count == 1).all()):
            raise ValueError(f"{key}: pieces cover {int((count == 0).sum())} elements zero times and "
                             f"{int((count > 1).sum())} more than once")
    return full


@torch.no_grad()
def load_full(model: torch.nn.Module, read: Callable[[str, tuple[slice, ...]], torch.Tensor]) -> list[str]:
    """Fill this rank's pieces from full tensors: `read(key, region)` returns the region only, so a
    lazy reader (safetensors slices) never loads more than this rank holds. `read` may return None
    to keep a tensor's current (initialized) value. Returns the keys loaded."""
    loaded = []
    for t in _sharded_tensors(model):
        region = Shard(t.key, tuple(t.global_shape), tuple(t.global_offset), t.data, True).region()
        value = read(t.key, region)
        if value is None:
            continue
        if value.numel() != t.data.numel():
            raise ValueError(f"{t.key}: expected {tuple(t.data.shape)} for region {region}, got {tuple(value.shape)}")
        t.data.copy_(value.reshape(t.data.shape))
        loaded.append(t.key)
    return loaded
