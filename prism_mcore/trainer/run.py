"""What every training stage shares: building the policy, resuming, checkpointing, metrics, HF export."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from prism_mcore.config import OptimConfig, PrismConfig


def is_rank0() -> bool:
    return dist.get_rank() == 0


def build_policy(cfg: PrismConfig):
    """The local stage of the policy, initialized from `model.hf_path` when given (each rank reads only
    its own slices), with the fused log-prob head."""
    from prism_mcore.models.qwen3.logprob_head import use_fused_logprob_head
    from prism_mcore.models.qwen3.model import build_qwen3

    policy = build_qwen3(cfg.model, cfg.parallel)
    if cfg.model.hf_path:
        load_hf_weights(policy, cfg)
    use_fused_logprob_head(policy)
    return policy


def load_hf_weights(net, cfg: PrismConfig, kind: str = "policy") -> None:
    from prism_mcore.checkpoint.convert import _with_head, expected_hf_shapes
    from prism_mcore.checkpoint.hf_io import LazyCheckpoint
    from prism_mcore.models.qwen3.hf_adapter import megatron_reader
    from prism_mcore.parallel.shards import load_full

    source = LazyCheckpoint(cfg.model.hf_path)
    source.check_shapes(expected_hf_shapes(kind, cfg.model, source))
    load_full(net, _with_head(kind, megatron_reader(cfg.model, source.get), source.get, source))


@dataclass
class Trainable:
    """One Megatron model being trained: the bare module, its DDP wrapper, its optimizer and schedule."""

    net: torch.nn.Module
    ddp: Any
    optimizer: Any
    optim: OptimConfig

    def train(self, forward_step, micro: list, seq_length: int, micro_batch_size: int, step: int, total_steps: int):
        """One optimizer step over `micro` (this rank's micro-batches) at the schedule's lr for `step`."""
        from prism_mcore.trainer.megatron_step import lr_at, train_step

        return train_step([self.ddp], self.optimizer, forward_step, micro, len(micro), seq_length=seq_length,
                          micro_batch_size=micro_batch_size, lr=lr_at(step, total_steps, self.optim))


def trainable(net: torch.nn.Module, optim: OptimConfig) -> Trainable:
    from prism_mcore.trainer.megatron_step import build_optimizer, wrap_ddp

    ddp = wrap_ddp(net, use_distributed_optimizer=optim.use_distributed_optimizer)
    return Trainable(net, ddp, build_optimizer([ddp], optim), optim)


class Checkpointer:
    """`ROOT/checkpoints/step_*` every `interval` steps; resume from the newest complete one. `parts`
    names the trained models ({"": one model} for single-model stages; align saves policy and
    discriminator together, so a crash never leaves them at different steps)."""

    def __init__(self, output_dir: str | Path, interval: int, keep: int = 0):
        self.root = Path(output_dir) / "checkpoints"
        self.interval, self.keep = interval, keep

    @staticmethod
    def _parts(parts: dict[str, Trainable]) -> dict:
        return {name: ([t.ddp], t.optimizer) for name, t in parts.items()}

    def resume(self, parts: dict[str, Trainable]) -> dict | None:
        from prism_mcore.checkpoint.dist_ckpt import latest_checkpoint, load_checkpoint

        path = latest_checkpoint(self.root)
        return None if path is None else load_checkpoint(path, parts=self._parts(parts))

    def maybe_save(self, step: int, parts: dict[str, Trainable], meta: dict, force: bool = False) -> None:
        from prism_mcore.checkpoint.dist_ckpt import save_checkpoint

        if force or (self.interval and step % self.interval == 0):
            save_checkpoint(self.root, step, parts=self._parts(parts), meta=meta, keep=self.keep)


class StageRun:
    """The bookkeeping every stage loop shares: resume from the latest checkpoint, then per step log
    metrics (JSONL + TensorBoard), checkpoint every `save_interval` steps and at the end, advance the
    progress bar. `start` is the first step to run; `resumed` the checkpoint's metadata (or None)."""

    def __init__(self, cfg: PrismConfig, parts: dict[str, Trainable]):
        self.cfg, self.parts = cfg, parts
        self.stage = cfg.trainer.stage
        self.ckpt = Checkpointer(cfg.trainer.output_dir, cfg.trainer.save_interval, cfg.trainer.keep_checkpoints)
        self.resumed = self.ckpt.resume(parts)
        self.start = self.resumed["step"] if self.resumed else 0
        self.metrics = Metrics(cfg.trainer.output_dir, self.stage)
        self.bar = progress(cfg.trainer.steps, self.stage, self.start)

    def steps(self) -> range:
        return range(self.start, self.cfg.trainer.steps)

    def end_step(self, step: int, values: dict, meta: dict | None = None, summary: str = "") -> None:
        """After step `step` (0-based): log as step+1, checkpoint, show `summary` on the bar."""
        done = step + 1
        self.metrics.log(done, values)
        self.ckpt.maybe_save(done, self.parts, {"stage": self.stage, "model": self.cfg.model.model_dump(),
                                                **(meta or {})}, force=done == self.cfg.trainer.steps)
        if self.bar:
            self.bar.update(self.bar.task_ids[0], advance=1, description=f"{self.stage} {summary}".strip())

    def log(self, step: int, values: dict) -> None:
        self.metrics.log(step, values)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()
        self.metrics.close()


class Metrics:
    """Rank 0 writes one JSON line per step (metrics.jsonl) and TensorBoard scalars (tb/)."""

    def __init__(self, output_dir: str | Path, stage: str):
        self.enabled = is_rank0()
        self.stage = stage
        if not self.enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out / "metrics.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))
        except ImportError:  # tensorboard is optional
            self.tb = None

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"stage": self.stage, "step": step, "time": time.time(), **{k: _plain(v) for k, v in values.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self.tb.add_scalar(f"{self.stage}/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb:
                self.tb.close()


def _plain(v):
    return v.item() if torch.is_tensor(v) else v


def progress(total: int, description: str, start: int = 0):
    """A rich progress bar on rank 0 (None elsewhere)."""
    if not is_rank0():
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn())
    bar.start()
    bar.add_task(description, total=total, completed=start)
    return bar


def export_hf(net, cfg: PrismConfig, out_dir: str | Path, kind: str = "policy") -> None:
    """Collective: write the trained model as an HF checkpoint (tokenizer and generation config included)."""
    from prism_mcore.checkpoint.convert import write_hf
    from prism_mcore.checkpoint.hf_io import side_files

    write_hf(net, cfg.model, kind, out_dir, side_files(cfg.model.hf_path) if cfg.model.hf_path else [])
