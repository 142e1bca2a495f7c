"""What a run shows and records: progress lines on stderr, a rich progress bar, metrics.jsonl and TensorBoard,
all on rank 0."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def announce(message: str) -> None:
    """A progress line on stderr, at once."""
    print(f"prism: {message}", file=sys.stderr, flush=True)


class Metrics:
    """Rank 0 writes one JSON line per logged step (metrics.jsonl) and TensorBoard scalars (tb/). The file is
    strict JSON: a non-finite value is written as null with `<name>_nonfinite: true` beside it. A resumed run
    first drops the lines of steps after its checkpoint (the steps it is about to run again), so each step
    has one line."""

    def __init__(self, output_dir: str | Path, stage: str, resume_step: int = 0):
        self.enabled = is_rank0()
        self.stage = stage
        if not self.enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.jsonl"
        if path.exists():
            _keep_until(path, resume_step)
        self.jsonl = open(path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"), purge_step=resume_step + 1 if resume_step else None)
        except ImportError:  # tensorboard is optional
            self.tb = None

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"stage": self.stage, "step": step, "time": time.time()}
        for k, v in values.items():
            v = v.item() if torch.is_tensor(v) else v
            if isinstance(v, float) and not math.isfinite(v):
                row[k], row[f"{k}_nonfinite"] = None, True
            else:
                row[k] = v
        self.jsonl.write(json.dumps(row, allow_nan=False) + "\n")
        self.jsonl.flush()
        if self.tb:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time"):
                    self.tb.add_scalar(f"{self.stage}/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb:
                self.tb.close()


def _keep_until(path: Path, step: int) -> None:
    """Rewrite `path` (atomically) without the lines of steps after `step`; with step 0 (a fresh start) the
    old lines are all dropped. Lines that are not JSON are dropped too."""
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row_step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            continue
        if step and isinstance(row_step, int) and row_step <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)


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
