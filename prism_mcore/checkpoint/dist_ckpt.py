"""Training checkpoints with Megatron `dist_checkpointing`: model, optimizer, RNG, step and data position.

Layout on disk:  ROOT/step_00000010/  (a torch_dist checkpoint + `prism_meta.json`)  and  ROOT/latest
A step directory is written as `ROOT/.step_00000010.partial` and renamed only after every rank has
finished and the metadata is on disk, so a crash mid-save never leaves a directory that looks
complete; `latest` is replaced atomically afterwards. Loading works at another TP/PP/EP layout
(the model and a fully-sharded optimizer state are resharded by Megatron); RNG state is restored
only when the layout is unchanged.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

META = "prism_meta.json"


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint to resume or convert from: what `newest_loadable` finds; None when root holds no
    checkpoint at all. When every one is unusable, a CheckpointError names the newest one's problem (a run
    never silently starts over from nothing past checkpoints it cannot read)."""
    path, skipped = newest_loadable(root)
    if path is None and any(bad.name != "latest" for bad, _ in skipped):
        bad, why = next((b, w) for b, w in skipped if b.name != "latest")
        from prism_mcore.checkpoint.hf_io import CheckpointError

        raise CheckpointError(f"{why if why.startswith(str(bad)) else f'{bad}: {why}'} (no usable checkpoint "
                              f"under {root}; move the broken ones away to start over)")
    return path


def _step_of(path: Path) -> int:
    try:
        return int(path.name.removeprefix("step_"))
    except ValueError:
        return -1


def checkpoint_problem(path: Path) -> str | None:
    """Why the step directory `path` cannot be loaded, or None: its metadata must parse, and every shard
    file must hold the bytes its index says (a copy or save cut short leaves a truncated .distcp)."""
    meta_path = path / META
    try:
        meta = json.loads(meta_path.read_text())
        int(meta["step"])
    except FileNotFoundError:
        return f"no {META} (a save that never finished)"
    except json.JSONDecodeError as e:
        return f"{meta_path}: malformed JSON at line {e.lineno} column {e.colno} ({e.msg})"
    except (ValueError, KeyError, TypeError, OSError):
        return f"{META} is not valid checkpoint metadata"
    try:
        from torch.distributed.checkpoint import FileSystemReader

        index = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - any unreadable index means the same thing here
        return f"its shard index (.metadata) cannot be read ({type(e).__name__})"
    needed: dict[str, int] = {}
    for info in (index.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(needed.items()):
        size = (path / name).stat().st_size if (path / name).exists() else -1
        if size < end:
            return f"{name} is {'missing' if size < 0 else f'truncated ({size} of {end} bytes)'}"
    return None


def newest_loadable(root: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the checkpoint `latest` names if it passes `checkpoint_problem`, else the newest step directory that
    does; [(those skipped, why)]). A corrupt `latest` pointer is reported and otherwise ignored."""
    root = Path(root)
    skipped: list[tuple[Path, str]] = []
    pointer = root / "latest"
    named = None
    if pointer.exists():
        text = pointer.read_text(errors="replace").strip()
        if text.startswith("step_") and "/" not in text and (root / text).is_dir():
            named = root / text
        else:
            skipped.append((pointer, f"does not name a checkpoint ({text[:40]!r})"))
    candidates = sorted(root.glob("step_*"), key=_step_of, reverse=True)
    if named is not None:
        candidates = [named] + [c for c in candidates if c != named]
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "ep": ps.get_expert_model_parallel_world_size(), "world": dist.get_world_size()}


def _rng_object():
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_expert_model_parallel_world_size())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_expert_model_parallel_rank())
    replica = ps.get_data_parallel_rank(with_context_parallel=True) if ps.get_expert_model_parallel_world_size() == 1 \
        else ps.get_expert_data_parallel_rank()
    return ShardedObject("prism_rng_state", state, shape, offset, replica_id=replica)


def _unwrap_ddp(model):
    # Only DDP is unwrapped: other wrappers (the discriminator) expose `.module` for Megatron's
    # schedules but define their own sharded state.
    return model.module if hasattr(model, "ddp_config") else model


Parts = dict[str, tuple[list, Any]]  # key prefix -> (models, optimizer or None); "" = one unprefixed model set


def as_parts(models: list | None, optimizer=None, parts: Parts | None = None) -> Parts:
    """One model set (the single-model stages' checkpoints) or several named ones (align: policy and
    discriminator, each with its own optimizer). Names prefix every sharded key, so two GPT models
    with the same parameter names share one checkpoint directory, saved and renamed atomically."""
    if parts is not None:
        return parts
    return {"": (models or [], optimizer)}


def _sharded_state(parts: Parts, with_optimizer: bool, with_rng: bool, loading: bool) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for prefix, (models, optimizer) in parts.items():
        model_state = {}
        for i, model in enumerate(models):
            shard = _unwrap_ddp(model).sharded_state_dict(prefix=prefix) if prefix else \
                _unwrap_ddp(model).sharded_state_dict()
            state[f"{prefix}model{i}"] = shard
            model_state.update(shard)
        if optimizer is not None and with_optimizer:
            # fully_reshardable: optimizer state saved per parameter in its canonical shape, so it loads
            # at another TP/PP/DP layout (the other 0.16.1 formats reshard only along DP).
            state[f"{prefix}optimizer"] = optimizer.sharded_state_dict(
                model_state, is_loading=loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"})
    if with_rng:
        state["rng"] = _rng_object()
    return state


def prune_checkpoints(root: str | Path, keep: int) -> list[Path]:
    """Removes all but the `keep` newest complete step directories (never the one `latest` names) and
    returns what it removed. Runs only after a save has completed, so a crash while pruning still
    leaves a loadable checkpoint."""
    root = Path(root)
    newest = latest_checkpoint(root)
    complete = sorted((p for p in root.glob("step_*") if (p / META).exists()), key=_step_of)
    stale = [p for p in complete[:-keep] if p != newest] if keep > 0 else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def save_checkpoint(root: str | Path, step: int, models: list | None = None, optimizer=None, meta: dict | None = None,
                    parts: Parts | None = None, keep: int = 0) -> Path:
    """Collective: every rank calls it. Returns the final step directory. keep > 0 then removes all
    but the `keep` newest checkpoints (0 keeps every one)."""
    from megatron.core import dist_checkpointing

    parts = as_parts(models, optimizer, parts)
    root = Path(root)
    final, partial = step_dir(root, step), root / f".step_{step:08d}.partial"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    dist.barrier()
    dist_checkpointing.save(_sharded_state(parts, with_optimizer=True, with_rng=True, loading=False), str(partial))
    dist.barrier()
    if dist.get_rank() == 0:
        has_optimizer = all(opt is not None for _, opt in parts.values())
        body = {"step": step, "layout": _layout(), "has_optimizer": has_optimizer, "parts": sorted(parts),
                **(meta or {})}
        _write_atomic(partial / META, json.dumps(body, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.rename(partial, final)
        _write_atomic(root / "latest", final.name)
        prune_checkpoints(root, keep)
    dist.barrier()
    return final


def load_checkpoint(path: str | Path, models: list | None = None, optimizer=None, parts: Parts | None = None) -> dict:
    """Collective. Loads into the given (already built) models/optimizers; returns the saved metadata."""
    from megatron.core import dist_checkpointing

    parts = as_parts(models, optimizer, parts)
    path = Path(path)
    meta = json.loads((path / META).read_text())
    saved_parts = meta.get("parts", [""])
    if sorted(parts) != sorted(saved_parts):
        raise ValueError(f"{path}: holds models {saved_parts}, asked to load {sorted(parts)}")
    same_layout = meta["layout"] == _layout()
    with_optimizer = meta["has_optimizer"]
    for _, optimizer_ in parts.values():
        if optimizer_ is not None and with_optimizer:
            _materialize_optimizer_state(optimizer_)
    state = dist_checkpointing.load(
        _sharded_state(parts, with_optimizer=with_optimizer, with_rng=same_layout, loading=True), str(path))
    for prefix, (models_, optimizer_) in parts.items():
        for i, model in enumerate(models_):
            loaded = state[f"{prefix}model{i}"]
            if prefix:
                loaded = {k.removeprefix(prefix): v for k, v in loaded.items()}
            _unwrap_ddp(model).load_state_dict(loaded)
        if optimizer_ is not None and with_optimizer:
            optimizer_.load_state_dict(state[f"{prefix}optimizer"])
    if same_layout:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        torch.set_rng_state(state["rng"]["torch"])
        get_cuda_rng_tracker().set_states(state["rng"]["tracker"])
    return meta


def _materialize_optimizer_state(optimizer) -> None:
    """A fresh torch Adam has no per-parameter state until its first step, and Megatron's optimizer
    (without apex/TE) cannot describe an empty state for loading. Take one zero-learning-rate step
    on zero gradients, a no-op on the weights, so that the state exists to be overwritten."""
    inner = [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    if all(len(o.state) for o in inner):
        return
    saved_lr = [g["lr"] for g in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    for model_chunk in getattr(optimizer, "model_chunks", []):
        model_chunk.zero_grad_buffer()
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, saved_lr):
        group["lr"] = lr


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
