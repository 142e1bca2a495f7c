"""Weight sync, part 1: Megatron's training layout (TP/PP/EP shards over ranks) -> HF-named tensors, unit by
unit (one layer of one tensor, or a non-layered tensor), each on one sender rank (weight_sync.py, steps 1-2).

Plan (one metadata all-gather, cached on the model with, where possible, the rank's HF tensors as references
into shared parameter memory: `own_refs`): every Megatron tensor is cut into units; each unit gets
one *sender*, a rank that holds a piece of it, rotating over the holders so TP ranks share the work and each
PP stage sends its own layers. Stream: units in the same order on every rank; holders send their pieces of a
unit to its sender (point-to-point), which assembles it (a unit it holds whole is used in place) and converts
it with the family adapter's `hf_views`.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist


@dataclass
class _Piece:
    rank: int
    index: int  # position in that rank's list of primary shards
    region: tuple[slice, ...]
    dtype: torch.dtype


@dataclass
class _Unit:
    key: str
    shape: tuple[int, ...]
    layer: int | None
    pieces: list[_Piece]
    sender: int


def _layer_region(region: tuple[slice, ...], layer: int) -> tuple[slice, ...]:
    return (slice(layer, layer + 1),) + tuple(region[1:])


def _unit_order(key: str, layer: int | None) -> tuple:
    # Embedding first, then layer by layer (vLLM's layerwise reload buffers a layer until it is complete),
    # then final norm and output layer.
    if layer is None:
        return (0 if key.startswith("embedding") else 2, -1, key)
    return (1, layer, key)


# A model's plan lives on the model (attribute below). The shards are views of the parameters, so a plan stays
# right for as long as the parameters keep their memory (the fingerprint) and layout.
_PLAN_ATTR = "_prism_weight_sync_plan"


@dataclass
class _Plan:
    fingerprint: tuple
    mine: list  # this rank's primary shards (views of the parameters)
    units: list[_Unit]
    # This rank's whole share as references into shared parameter memory, (refs, bytes, key), once
    # `own_refs` worked it out; False when some of it needs assembly or staging.
    refs: Any = None


def _fingerprint(model: torch.nn.Module, model_cfg) -> tuple:
    return (dist.get_world_size(), bool(model_cfg.tie_word_embeddings),
            tuple((p.data_ptr(), tuple(p.shape), p.dtype) for p in model.parameters()))


def _cached_plan(model: torch.nn.Module, model_cfg) -> _Plan:
    """`_plan`, computed once per model: Megatron's sharded_state_dict and the metadata all-gather cost
    tens of ms per sync. Whether the cached plan is still valid is agreed on by all ranks (one tiny
    all-reduce), so either every rank re-plans or none."""
    fingerprint = _fingerprint(model, model_cfg)
    cached = getattr(model, _PLAN_ATTR, None)
    valid = torch.tensor([1 if cached is not None and cached.fingerprint == fingerprint else 0])
    dist.all_reduce(valid, op=dist.ReduceOp.MIN)
    if bool(valid.item()):
        return cached
    plan = _Plan(fingerprint, *_plan(model, model_cfg))
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    # only views can be reused (a plan whose shards are copies is made again on every sync)
    keep = all(s.data.untyped_storage().data_ptr() in storages for s in plan.mine)
    object.__setattr__(model, _PLAN_ATTR, plan if keep else None)  # a plain attribute, not a submodule
    return plan


def own_refs(model_cfg, plan: _Plan) -> tuple[list, int, str] | None:
    """This rank's HF tensors as references into its shared parameter memory (transport_refs), worked out
    once per plan, when every unit this rank holds a piece of is held by it alone (no point-to-point
    traffic, so other ranks expect nothing from it), is one view of its memory (no assembly) and every
    parameter storage was shared (`share_weights_memory`). None otherwise: the sync streams as usual.
    With refs, a steady-state sync costs this rank one message per engine; the values are read when the
    engines copy, so the plan stays right across optimizer steps (in-place updates)."""
    if plan.refs is None:
        plan.refs = _own_refs(model_cfg, plan.mine, plan.units) or False
    return plan.refs or None


def _own_refs(model_cfg, mine: list, units: list[_Unit]) -> tuple[list, int, str] | None:
    from prism_mcore.rollout.transport import Reshaped
    from prism_mcore.rollout.transport_refs import shared_ref

    me = dist.get_rank()
    refs, nbytes = [], 0
    for unit in units:
        holders = {p.rank for p in unit.pieces}
        if me not in holders:
            continue
        if holders != {me}:
            return None
        value = _in_place(unit, me, mine)
        if value is None:
            return None
        for name, t in _hf_sources(model_cfg, unit.key, unit.layer, value):
            ref = shared_ref(name, t.source, t.shape) if isinstance(t, Reshaped) else shared_ref(name, t)
            if ref is None:
                return None
            refs.append(ref)
            nbytes += t.numel() * t.element_size()
    return refs, nbytes, uuid.uuid4().hex  # the key: new for every plan, so receivers never mix two


def _plan(model: torch.nn.Module, model_cfg) -> tuple[list, list[_Unit]]:
    from prism_mcore.models.spec import spec_for
    from prism_mcore.parallel.shards import iter_local_shards

    is_layered = spec_for(model_cfg).is_layered

    mine = list(iter_local_shards(model, primary_only=True))  # views of the live parameters, no copies
    meta = [(t.key, t.global_shape, t.region(), t.data.dtype) for t in mine]
    world = dist.get_world_size()
    everyone: list = [None] * world
    dist.all_gather_object(everyone, meta)
    units: dict[tuple, _Unit] = {}
    for rank, rows in enumerate(everyone):
        for index, (key, shape, region, dtype) in enumerate(rows):
            if key == "output_layer.weight" and model_cfg.tie_word_embeddings:
                continue  # the tied head has no HF tensor of its own
            layers = range(region[0].start, region[0].stop) if is_layered(key) else [None]
            for layer in layers:
                unit = units.setdefault((key, layer), _Unit(key, shape, layer, [], -1))
                unit.pieces.append(_Piece(rank, index, region if layer is None else _layer_region(region, layer),
                                          dtype))
    ordered = sorted(units.values(), key=lambda u: _unit_order(u.key, u.layer))
    for i, unit in enumerate(ordered):
        holders = sorted({p.rank for p in unit.pieces})
        unit.sender = holders[i % len(holders)]
    return mine, ordered


def _local_piece(shard, layer: int | None) -> torch.Tensor:
    """This rank's piece of one unit: the whole shard, or its one-layer slice (a view, with the layer axis)."""
    if layer is None:
        return shard.data
    region = shard.region()
    full = shard.data.reshape(tuple(r.stop - r.start for r in region))
    return full[layer - region[0].start: layer - region[0].start + 1]


def _in_place(unit: _Unit, me: int, mine: list) -> torch.Tensor | None:
    """The unit as a view of this rank's memory when its local pieces are exactly the regions of one
    contiguous tensor (a whole shard, or e.g. the gate and up halves of Megatron's fused fc1 at TP1), so
    no assembly copy is needed. None otherwise."""
    if any(p.rank != me for p in unit.pieces):
        return None
    target = unit.shape[1:] if unit.layer is not None else unit.shape
    datas = [_local_piece(mine[p.index], unit.layer) for p in unit.pieces]
    datas = [d[0] for d in datas] if unit.layer is not None else datas
    regions = [p.region[1:] if unit.layer is not None else p.region for p in unit.pieces]
    if len(datas) == 1:  # the common case: one whole shard
        whole = all(r.start == 0 and r.stop == n for r, n in zip(regions[0], target))
        return datas[0].reshape(target) if whole else None
    first = min(range(len(datas)), key=lambda i: tuple(r.start for r in regions[i]))
    if any(r.start for r in regions[first]):
        return None
    base = datas[first]
    if base.untyped_storage().data_ptr() != datas[first].untyped_storage().data_ptr():
        return None
    strides = torch.empty(target, device="meta").stride()
    whole = torch.as_strided(base, target, strides, base.storage_offset())
    if whole.storage_offset() + whole.numel() > base.untyped_storage().nbytes() // base.element_size():
        return None
    covered = 0
    for data, region in zip(datas, regions):
        view = whole[region]
        if (data.untyped_storage().data_ptr() != base.untyped_storage().data_ptr() or data.shape != view.shape
                or data.stride() != view.stride() or data.storage_offset() != view.storage_offset()):
            return None
        covered += view.numel()
    return whole if covered == whole.numel() else None


def _assemble(unit: _Unit, me: int, mine: list) -> torch.Tensor:
    """The sender's copy of a unit gathered from its holders: every element is written once into an
    uninitialized tensor (coverage checked by box arithmetic, `shards.check_cover`); a remote piece whose
    place in the result is contiguous (TP splits along the first axis, experts, layers) is received
    straight into it, others through a buffer of their size."""
    from prism_mcore.parallel.shards import check_cover

    layered = unit.layer is not None
    target = unit.shape[1:] if layered else unit.shape
    regions = [p.region[1:] if layered else p.region for p in unit.pieces]
    check_cover(f"{unit.key} layer {unit.layer}" if layered else unit.key, target, regions)
    value = torch.empty(target, dtype=unit.pieces[0].dtype)
    for piece, region in zip(unit.pieces, regions):
        dst = value[region]
        if piece.rank == me:
            dst.copy_(_local_piece(mine[piece.index], unit.layer).reshape(dst.shape))
        elif dst.is_contiguous():
            dist.recv(dst, src=piece.rank)
        else:
            buf = torch.empty(tuple(r.stop - r.start for r in piece.region), dtype=piece.dtype)
            dist.recv(buf, src=piece.rank)
            dst.copy_(buf.reshape(dst.shape))
    return value


def _hf_sources(model_cfg, key: str, layer: int | None, value: torch.Tensor) -> Iterator[tuple[str, Any]]:
    """The family adapter's HF tensors for one unit (models/spec.py `hf_views`): a view where the HF tensor
    is one (in place, transposed, or reshaped without a copy), else `Reshaped(source, HF shape)` so the packer
    copies the source straight into the bucket (e.g. the QKV split of Megatron's rows interleaved per KV
    group) instead of materializing a reshaped copy first."""
    from prism_mcore.models.spec import resolve
    from prism_mcore.rollout.transport import Reshaped

    spec, arch = resolve(model_cfg)
    for name, source, shape in spec.hf_views(arch, key, layer, value):
        if tuple(source.shape) == tuple(shape):
            yield name, source
            continue
        try:
            yield name, source.view(shape)
        except RuntimeError:
            yield name, Reshaped(source, shape)


def _iter_sources(model_cfg, mine: list, units: list[_Unit]) -> Iterator[tuple[str, Any]]:
    me = dist.get_rank()
    for unit in units:
        if unit.sender != me:
            for piece in unit.pieces:
                if piece.rank == me:
                    dist.send(_local_piece(mine[piece.index], unit.layer).contiguous(), dst=unit.sender)
            continue
        value = _in_place(unit, me, mine)
        if value is None:
            value = _assemble(unit, me, mine)
        yield from _hf_sources(model_cfg, unit.key, unit.layer, value)


def iter_hf_tensors(model: torch.nn.Module, model_cfg) -> Iterator[tuple[str, torch.Tensor]]:
    """Collective over the default process group: yields, on each unit's sender, the HF (name, tensor)
    pairs of that unit. Every rank must drain the iterator. Tensors may be views of live parameters."""
    from prism_mcore.rollout.transport import Reshaped

    plan = _cached_plan(model, model_cfg)
    for name, t in _iter_sources(model_cfg, plan.mine, plan.units):
        yield name, t.materialize() if isinstance(t, Reshaped) else t
