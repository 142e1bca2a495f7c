"""`prism convert hf-to-mcore` and `prism convert mcore-to-hf`.

Import: every rank builds its piece of the model at the requested layout and reads only the HF
tensors (and slices) that piece needs, then all ranks write one Megatron dist checkpoint.
Export: the checkpoint is loaded at its own layout; tensors are gathered to rank 0 one (layer of
a) tensor at a time and streamed into sharded safetensors, so no process holds the whole model.
The source config.json / tokenizer files travel inside the checkpoint (ROOT/hf/) and come back
unchanged on export (config.json gains `transformers_version` when it lacks one).

Both directions write a hidden temporary sibling of `--out` and rename it into place when complete; an
existing non-empty `--out` is refused in one line unless `--overwrite`, and then replaced only after the
new output is complete. Unusable inputs (a truncated safetensors file, a malformed JSON file, a pickle
where safetensors belong) are one line naming the file, exit 2.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from prism_mcore.checkpoint import hf_weights
from prism_mcore.checkpoint.hf_config import transformers_version, write_scratch_side_files
from prism_mcore.checkpoint.hf_io import (CheckpointError, LazyCheckpoint, atomic_dir, check_target, read_json,
                                          side_files)
from prism_mcore.config import ConfigError, ModelConfig, PrismConfig
from prism_mcore.config.load import build_config
from prism_mcore.models.spec import resolve

HF_SIDE_DIR = "hf"


POLICY, DISCRIMINATOR = hf_weights.POLICY, hf_weights.DISCRIMINATOR


def _build(kind: str, cfg: PrismConfig):
    if kind == DISCRIMINATOR:
        from prism_mcore.models.discriminator import build_discriminator

        return build_discriminator(cfg.model, cfg.parallel)
    spec, arch = resolve(cfg.model)
    return spec.build(arch, cfg.parallel)


def expected_hf_shapes(kind: str, model: ModelConfig, source: LazyCheckpoint, expert_layout: str | None = None) -> dict:
    spec, arch = resolve(model)
    return hf_weights.expected_hf_shapes(spec, arch, kind, source, expert_layout)


def minimal_world(tp: int, pp: int, ep: int) -> int:
    """Fewest ranks that host the layout: experts split over data-parallel replicas of the TP group."""
    return tp * pp * ep


def _config(model: dict, tp: int, pp: int, ep: int, world: int) -> PrismConfig:
    return build_config({"model": model, "parallel": {
        "tp": tp, "pp": pp, "ep": ep, "world_size": world, "sequence_parallel": tp > 1 and model.get("num_experts", 0) > 0}})


def import_rank(hf_dir: str, out: str, model: dict, tp: int, pp: int, ep: int, kind: str = POLICY,
                expert_layout: str | None = None) -> int:
    from prism_mcore.checkpoint.dist_ckpt import save_checkpoint
    from prism_mcore.parallel.layout import init_model_parallel

    cfg = _config(model, tp, pp, ep, dist.get_world_size())
    init_model_parallel(cfg)
    net = _build(kind, cfg)
    spec, arch = resolve(cfg.model)
    loaded = hf_weights.load_hf(net, spec, arch, hf_dir, kind, expert_layout)
    save_checkpoint(out, 0, [net], meta={"model": cfg.model.model_dump(), "source": str(hf_dir), "kind": kind,
                                         "family": spec.name})
    if dist.get_rank() == 0:
        side = Path(out) / HF_SIDE_DIR
        side.mkdir(parents=True, exist_ok=True)
        for f in side_files(hf_dir):
            shutil.copy2(f, side / f.name)
    return len(loaded)


def export_rank(ckpt_root: str, out_dir: str, max_shard_bytes: int, overwrite: bool = False) -> int:
    from prism_mcore.checkpoint.dist_ckpt import latest_checkpoint, load_checkpoint
    from prism_mcore.parallel.layout import init_model_parallel

    ckpt = latest_checkpoint(ckpt_root)
    meta = json.loads((ckpt / "prism_meta.json").read_text())
    layout, kind = meta["layout"], meta.get("kind", POLICY)
    cfg = _config(meta["model"], layout["tp"], layout["pp"], layout["ep"], dist.get_world_size())
    init_model_parallel(cfg)
    net = _build(kind, cfg)
    load_checkpoint(ckpt, [net])
    side = latest_checkpoint(ckpt_root).parent / HF_SIDE_DIR
    write_hf(net, cfg.model, kind, out_dir, sorted(side.iterdir()) if side.exists() else [], max_shard_bytes,
             overwrite=overwrite)
    dist.barrier()
    return 0


def write_hf(net, model: ModelConfig, kind: str, out_dir: str | Path, side_files: list[Path],
             max_shard_bytes: int = 2 * 1024**3, *, overwrite: bool = False) -> None:
    """Collective: stream a (sharded) Megatron model of `model`'s family into an HF directory written by rank
    0 (checkpoint/hf_weights.py), with the side files (config.json, tokenizer) published beside it. An
    existing non-empty `out_dir` raises TargetExists on every rank unless `overwrite`."""
    spec, arch = resolve(model)
    hf_weights.write_hf(net, spec, arch, kind, out_dir, side_files, max_shard_bytes, overwrite=overwrite,
                        side_files_for=lambda scratch: _release_side_files(kind, spec, arch, side_files, scratch))


def _release_side_files(kind: str, spec, arch, side_files: list[Path], scratch: Path) -> list[Path]:
    """The side files to publish: the source's (or, for a model trained from scratch, ones built from the
    architecture), with config.json copied into `scratch` when it needs a change: `transformers_version` when
    absent (transformers and vLLM read it), the discriminator's identity."""
    if not any(f.name == "config.json" for f in side_files):  # built from `model:` fields, no source
        side_files = write_scratch_side_files(spec, arch, scratch / "built")
    source = next(f for f in side_files if f.name == "config.json")
    cfg = read_json(source)
    changed = dict(cfg)
    changed.setdefault("transformers_version", transformers_version())
    if kind == DISCRIMINATOR:
        spec.as_sequence_classifier(changed)
    if changed == cfg:
        return side_files
    edited = scratch / "config.json"
    edited.write_text(json.dumps(changed, indent=2, sort_keys=kind == DISCRIMINATOR) + "\n")
    return [f for f in side_files if f.name != "config.json"] + [edited]


def _source_model(hf_dir: str) -> tuple[dict, ModelConfig]:
    """The HF config.json and the ModelConfig it describes; any problem is one line naming the file."""
    from pydantic import ValidationError

    from prism_mcore.config.hf import model_fields_from_hf, read_hf_config
    from prism_mcore.config.load import _one_line

    path = Path(hf_dir) / "config.json"
    try:
        hf_config = read_hf_config(hf_dir)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    try:
        return hf_config, ModelConfig.model_validate(model_fields_from_hf(hf_config))
    except ValidationError as e:
        raise CheckpointError(f"{path}: {_one_line(e).removeprefix('config error: ')}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def hf_to_mcore(hf_dir: str, out: str, tp: int = 1, pp: int = 1, ep: int = 1, kind: str = POLICY,
                overwrite: bool = False, expert_layout: str | None = None) -> int:
    from prism_mcore.platform.multiproc import run_on_ranks

    hf_config, model = _source_model(hf_dir)
    spec, arch = resolve(model)
    if spec.is_discriminator_config(hf_config):
        kind = DISCRIMINATOR
    if expert_layout is not None and expert_layout not in spec.expert_layouts:
        raise ValueError(f"--expert-layout {expert_layout}: {spec.name} checkpoints have "
                         f"{', '.join(spec.expert_layouts)}")
    world = minimal_world(tp, pp, ep)
    _config(model.model_dump(), tp, pp, ep, world)  # layout errors surface here, before any rank starts
    source = LazyCheckpoint(hf_dir)
    hf_weights.check_source(spec, arch, kind, source, expert_layout)  # shape and unreadable-file errors too
    with atomic_dir(out, overwrite) as tmp:  # refused here, before any rank starts, when --out holds data
        run_on_ranks(import_rank, world, hf_dir, str(tmp), model.model_dump(), tp, pp, ep, kind, expert_layout,
                     timeout=3600)
    return 0


def mcore_to_hf(ckpt_root: str, out_dir: str, max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False) -> int:
    from prism_mcore.checkpoint.dist_ckpt import latest_checkpoint
    from prism_mcore.platform.multiproc import run_on_ranks

    ckpt = latest_checkpoint(ckpt_root)
    if ckpt is None:
        raise FileNotFoundError(f"{ckpt_root}: no complete checkpoint (no step_*/prism_meta.json)")
    meta = read_json(ckpt / "prism_meta.json")
    layout = meta.get("layout")
    if not (isinstance(layout, dict) and all(isinstance(layout.get(k), int) and not isinstance(layout.get(k), bool)
                                             and layout.get(k) > 0 for k in ("tp", "pp", "ep", "world"))):
        raise CheckpointError(f"{ckpt / 'prism_meta.json'}: no valid 'layout' (positive tp, pp, ep, world)")
    if not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{ckpt / 'prism_meta.json'}: no 'model' section")
    check_target(out_dir, overwrite)  # the ranks check again; this makes the refusal one line, before they start
    run_on_ranks(export_rank, layout["world"], ckpt_root, out_dir, max_shard_bytes, overwrite, timeout=3600)
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
    p.add_argument("--discriminator", action="store_true",
                   help="import as the PRISM discriminator (backbone + value head `score.weight`)")
    p.add_argument("--expert-layout", default=None,
                   help="MoE expert layout on disk when the family has several (Qwen3-VL-MoE: released = Qwen's "
                        "checkpoints, the default; transformers = a save_pretrained directory)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty "
                   "(only once the new checkpoint is complete)")
    p = sub.add_parser("mcore-to-hf", help="Megatron dist checkpoint -> HF safetensors directory")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-shard-gb", type=float, default=2.0)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty "
                   "(only once the new directory is complete)")
    args = parser.parse_args(argv)
    try:
        if args.direction == "hf-to-mcore":
            kind = DISCRIMINATOR if args.discriminator else POLICY
            return hf_to_mcore(args.hf, args.out, args.tp, args.pp, args.ep, kind, overwrite=args.overwrite,
                               expert_layout=args.expert_layout)
        return mcore_to_hf(args.ckpt, args.out, int(args.max_shard_gb * 1024**3), overwrite=args.overwrite)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"convert: {e}".splitlines()[0], file=sys.stderr)
        return 2
