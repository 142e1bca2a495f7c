"""HF safetensors <-> a Megatron model of any family, through its model spec (models/spec.py).

Loading: every rank reads only the HF tensors (and slices) of the Megatron shards it holds (`load_hf`).
Writing: a collective that gathers one tensor (one layer of a layered tensor) at a time to rank 0, which
converts it with the spec's adapter and streams it into sharded safetensors (`write_hf`); the directory is
written as a temporary sibling and renamed into place when complete.

A discriminator is the family's backbone plus the value head: `score.weight` [1, hidden] in HF files,
`value_head.weight` in ours; its unused LM head is neither read nor written.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from prism_mcore.checkpoint.hf_io import LazyCheckpoint, ShapeMismatch, ShardedWriter, TargetExists, check_target
from prism_mcore.models.discriminator import HF_VALUE_HEAD_NAME, VALUE_HEAD_KEY

POLICY, DISCRIMINATOR = "policy", "discriminator"


def expected_hf_shapes(spec, arch, kind: str, source: LazyCheckpoint, expert_layout: str | None = None) -> dict:
    shapes = spec.hf_shapes(arch, expert_layout)
    if kind == DISCRIMINATOR:  # the LM head is unused; the value head may or may not be there yet
        hidden = spec.text_config(arch).hidden_size
        vocab = shapes.pop("lm_head.weight", None) or (spec.text_config(arch).vocab_size, hidden)
        if HF_VALUE_HEAD_NAME in source.weight_map:
            shapes[HF_VALUE_HEAD_NAME] = (1, hidden)
        elif "lm_head.weight" in source.weight_map:
            shapes["lm_head.weight"] = tuple(vocab)
    return shapes


def check_source(spec, arch, kind: str, source: LazyCheckpoint, expert_layout: str | None = None) -> None:
    """ShapeMismatch unless `source` holds exactly the model's tensors; when its experts fit another expert
    layout of the family, the message names the declaration that reads it."""
    try:
        source.check_shapes(expected_hf_shapes(spec, arch, kind, source, expert_layout))
    except ShapeMismatch as mismatch:
        declared = expert_layout or spec.expert_layouts[0]
        if getattr(spec.text_config(arch), "is_moe", False):
            for other in spec.expert_layouts:
                if other == declared:
                    continue
                try:
                    source.check_shapes(expected_hf_shapes(spec, arch, kind, source, other))
                except ShapeMismatch:
                    continue
                raise ShapeMismatch(f"{mismatch}; its experts have the {other!r} layout's shapes: pass "
                                    f"--expert-layout {other} (expert_layout={other!r})") from None
        raise


def load_hf(net, spec, arch, hf_dir: str | Path, kind: str = POLICY, expert_layout: str | None = None) -> list[str]:
    """Fill this rank's pieces of `net` from the HF checkpoint in `hf_dir`; returns the Megatron keys loaded.
    The discriminator's value head comes from `score.weight` when the source has one (an exported
    discriminator); a fresh upcycled backbone keeps the head's N(0, 0.02^2) initialization."""
    from prism_mcore.parallel.shards import load_full

    source = LazyCheckpoint(hf_dir)
    check_source(spec, arch, kind, source, expert_layout)
    read = spec.megatron_reader(arch, source.get, expert_layout)
    if kind == DISCRIMINATOR:
        plain = read

        def read(key, region):
            if key != VALUE_HEAD_KEY:
                return plain(key, region)
            return source.get(HF_VALUE_HEAD_NAME, region) if HF_VALUE_HEAD_NAME in source.weight_map else None
    return load_full(net, read)


def _assemble_one(key: str, shape: tuple, layer: int | None, pieces: list) -> torch.Tensor:
    """One tensor (or one layer of it) from its pieces; every element must be covered exactly once."""
    target_shape = shape[1:] if layer is not None else shape
    value = torch.zeros(target_shape, dtype=pieces[0][1].dtype)
    count = torch.zeros(target_shape, dtype=torch.int32)
    for region, data in pieces:
        if layer is not None:
            offset = layer - region[0].start
            data = data.reshape(tuple(r.stop - r.start for r in region))[offset]
            region = region[1:]
        value[region] = data.reshape(value[region].shape)
        count[region] += 1
    if not bool((count == 1).all()):
        raise ValueError(f"{key} layer {layer}: checkpoint pieces do not cover the tensor exactly once")
    return value


def _hf_pairs(spec, arch, kind: str, key: str, layer, value, expert_layout):
    if key == VALUE_HEAD_KEY:
        yield HF_VALUE_HEAD_NAME, value
    elif not (kind == DISCRIMINATOR and key == "output_layer.weight"):
        yield from spec.hf_tensors(arch, key, layer, value, expert_layout)


def write_hf(net, spec, arch, kind: str, out_dir: str | Path, side_files: list[Path],
             max_shard_bytes: int = 2 * 1024**3, *, overwrite: bool = False, expert_layout: str | None = None,
             side_files_for=None) -> None:
    """Collective: stream a (sharded) Megatron model into an HF directory written by rank 0, gathering one
    tensor (or one layer of it) at a time. An existing non-empty `out_dir` raises TargetExists on every rank
    (before any work) unless `overwrite`; with it, the old directory is replaced only once the new one is
    complete. `side_files_for(scratch_dir) -> [paths]` (rank 0) may replace `side_files` at the end."""
    from prism_mcore.parallel.shards import local_shards

    refusal: list = [None]
    if dist.get_rank() == 0:
        try:
            check_target(out_dir, overwrite)
        except TargetExists as e:
            refusal[0] = str(e)
    dist.broadcast_object_list(refusal, src=0)  # every rank stops, not only the writer (no hung collective)
    if refusal[0]:
        raise TargetExists(refusal[0])
    mine = [s for s in local_shards(net) if s.primary]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted({(s.key, s.global_shape) for s in mine}))
    tensors = sorted(set().union(*map(set, everyone)))
    writer = ShardedWriter(out_dir, max_shard_bytes, overwrite=overwrite) if dist.get_rank() == 0 else None
    try:
        for key, shape in tensors:
            for layer in (range(shape[0]) if spec.is_layered(key) else [None]):
                pieces = [(s.region(), s.data) for s in mine if s.key == key
                          and (layer is None or s.region()[0].start <= layer < s.region()[0].stop)]
                gathered: list = [None] * dist.get_world_size() if writer else None
                dist.gather_object(pieces, gathered, dst=0)
                if writer:
                    value = _assemble_one(key, shape, layer, [p for rank in gathered for p in rank])
                    for name, tensor in _hf_pairs(spec, arch, kind, key, layer, value, expert_layout):
                        writer.add(name, tensor)
        if writer:
            with tempfile.TemporaryDirectory() as scratch:
                files = side_files_for(Path(scratch)) if side_files_for is not None else list(side_files)
                writer.close(files)
    except BaseException:
        if writer:
            writer.abort()
        raise
    dist.barrier()
