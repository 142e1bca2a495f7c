"""`prism convert hf-to-mcore` and `prism convert mcore-to-hf`.

Import: every rank builds its piece of the model at the requested layout and reads only the HF
tensors (and slices) that piece needs, then all ranks write one Megatron dist checkpoint.
Export: the checkpoint is loaded at its own layout; tensors are gathered to rank 0 one (layer of
a) tensor at a time and streamed into sharded safetensors, so no process holds the whole model.
The source config.json / tokenizer files travel inside the checkpoint (ROOT/hf/) and come back
unchanged on export.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from prism_mcore.checkpoint.hf_io import LazyCheckpoint, ShapeMismatch, ShardedWriter, side_files
from prism_mcore.config import ConfigError, ModelConfig, PrismConfig
from prism_mcore.config.load import build_config

HF_SIDE_DIR = "hf"


def minimal_world(tp: int, pp: int, ep: int) -> int:
    """Fewest ranks that host the layout: experts split over data-parallel replicas of the TP group."""
    return tp * pp * ep


def _config(model: dict, tp: int, pp: int, ep: int, world: int) -> PrismConfig:
    return build_config({"model": model, "parallel": {
        "tp": tp, "pp": pp, "ep": ep, "world_size": world, "sequence_parallel": tp > 1 and model.get("num_experts", 0) > 0}})


def import_rank(hf_dir: str, out: str, model: dict, tp: int, pp: int, ep: int) -> int:
    from prism_mcore.checkpoint.dist_ckpt import save_checkpoint
    from prism_mcore.models.qwen3.hf_adapter import hf_shapes, megatron_reader
    from prism_mcore.models.qwen3.model import build_qwen3
    from prism_mcore.parallel.layout import init_model_parallel
    from prism_mcore.parallel.shards import load_full

    cfg = _config(model, tp, pp, ep, dist.get_world_size())
    init_model_parallel(cfg)
    gpt = build_qwen3(cfg.model, cfg.parallel)
    source = LazyCheckpoint(hf_dir)
    source.check_shapes(hf_shapes(cfg.model))
    loaded = load_full(gpt, megatron_reader(cfg.model, source.get))
    save_checkpoint(out, 0, [gpt], meta={"model": cfg.model.model_dump(), "source": str(hf_dir)})
    if dist.get_rank() == 0:
        side = Path(out) / HF_SIDE_DIR
        side.mkdir(parents=True, exist_ok=True)
        for f in side_files(hf_dir):
            shutil.copy2(f, side / f.name)
    return len(loaded)


def export_rank(ckpt_root: str, out_dir: str, max_shard_bytes: int) -> int:
    from prism_mcore.checkpoint.dist_ckpt import latest_checkpoint, load_checkpoint
    from prism_mcore.models.qwen3.hf_adapter import hf_tensors, is_layered
    from prism_mcore.models.qwen3.model import build_qwen3
    from prism_mcore.parallel.layout import init_model_parallel
    from prism_mcore.parallel.shards import local_shards

    ckpt = latest_checkpoint(ckpt_root)
    meta = json.loads((ckpt / "prism_meta.json").read_text())
    layout = meta["layout"]
    cfg = _config(meta["model"], layout["tp"], layout["pp"], layout["ep"], dist.get_world_size())
    init_model_parallel(cfg)
    gpt = build_qwen3(cfg.model, cfg.parallel)
    load_checkpoint(ckpt, [gpt])
    mine = [s for s in local_shards(gpt) if s.primary]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted({(s.key, s.global_shape) for s in mine}))
    tensors = sorted(set().union(*map(set, everyone)))
    writer = ShardedWriter(out_dir, max_shard_bytes) if dist.get_rank() == 0 else None
    for key, shape in tensors:
        for layer in (range(shape[0]) if is_layered(key) else [None]):
            pieces = [(s.region(), s.data) for s in mine if s.key == key
                      and (layer is None or s.region()[0].start <= layer < s.region()[0].stop)]
            gathered: list = [None] * dist.get_world_size() if writer else None
            dist.gather_object(pieces, gathered, dst=0)
            if writer:
                value = _assemble_one(key, shape, layer, [p for rank in gathered for p in rank])
                for name, tensor in hf_tensors(cfg.model, key, layer, value):
                    writer.add(name, tensor)
    if writer:
        side = latest_checkpoint(ckpt_root).parent / HF_SIDE_DIR
        writer.close(sorted(side.iterdir()) if side.exists() else [])
    dist.barrier()
    return 0


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


def hf_to_mcore(hf_dir: str, out: str, tp: int = 1, pp: int = 1, ep: int = 1, overrides: dict | None = None) -> int:
    from prism_mcore.models.qwen3.hf_adapter import hf_shapes, model_fields_from_hf, read_hf_config
    from prism_mcore.platform.multiproc import run_on_ranks

    model = ModelConfig.model_validate({**model_fields_from_hf(read_hf_config(hf_dir)), **(overrides or {})})
    world = minimal_world(tp, pp, ep)
    _config(model.model_dump(), tp, pp, ep, world)  # layout errors surface here, before any rank starts
    LazyCheckpoint(hf_dir).check_shapes(hf_shapes(model))  # shape errors too
    run_on_ranks(import_rank, world, hf_dir, out, model.model_dump(), tp, pp, ep, timeout=3600)
    return 0


def mcore_to_hf(ckpt_root: str, out_dir: str, max_shard_bytes: int = 2 * 1024**3) -> int:
    from prism_mcore.checkpoint.dist_ckpt import latest_checkpoint
    from prism_mcore.platform.multiproc import run_on_ranks

    ckpt = latest_checkpoint(ckpt_root)
    if ckpt is None:
        raise FileNotFoundError(f"{ckpt_root}: no complete checkpoint (no step_*/prism_meta.json)")
    layout = json.loads((ckpt / "prism_meta.json").read_text())["layout"]
    run_on_ranks(export_rank, layout["world"], ckpt_root, out_dir, max_shard_bytes, timeout=3600)
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="prism convert")
    sub = parser.add_subparsers(dest="direction", required=True)
    p = sub.add_parser("hf-to-mcore", help="HF safetensors -> Megatron dist checkpoint at a TP/PP/EP layout")
    p.add_argument("--hf", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p = sub.add_parser("mcore-to-hf", help="Megatron dist checkpoint -> HF safetensors directory")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-shard-gb", type=float, default=2.0)
    args = parser.parse_args(argv)
    try:
        if args.direction == "hf-to-mcore":
            return hf_to_mcore(args.hf, args.out, args.tp, args.pp, args.ep)
        return mcore_to_hf(args.ckpt, args.out, int(args.max_shard_gb * 1024**3))
    except (ConfigError, ShapeMismatch, FileNotFoundError, ValueError) as e:
        print(f"convert: {e}".splitlines()[0], file=sys.stderr)
        return 2
