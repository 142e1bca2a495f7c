"""The embedded CPU demo: a tiny Qwen3 policy, tensor-parallel over 2 gloo ranks, trained for a few
AdamW steps on a tiny batch of chat text tokenized with the real Qwen3 tokenizer. Its loss falls.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from prism_mcore.config import PrismConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo" / "demo.yaml"

DEMO_CHATS = [
    [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "12 + 30 = 42."}],
    [{"role": "user", "content": "Name the capital of France."}, {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "Describe the image."},
     {"role": "assistant", "content": "<caption>A red square above a blue circle.</caption>"}],
    [{"role": "user", "content": "Is 7 prime?"}, {"role": "assistant", "content": "Yes, 7 is prime."}],
]


def demo_batch(seq_len: int = 32) -> dict[str, torch.Tensor]:
    """Token ids, next-token labels and a loss mask (1 on real tokens) for DEMO_CHATS."""
    from prism_mcore.data.tokenizer import qwen3_tokenizer

    tok = qwen3_tokenizer()
    rows = [tok.apply_chat_template(chat, tokenize=True, return_dict=False) for chat in DEMO_CHATS]
    rows = [list(r["input_ids"] if isinstance(r, dict) else r)[: seq_len + 1] for r in rows]
    tokens = torch.full((len(rows), seq_len + 1), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), seq_len, dtype=torch.float32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r) - 1] = 1.0
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(), "loss_mask": mask}


def _forward_step(batch: dict[str, torch.Tensor], model):
    b, s = batch["tokens"].shape
    positions = torch.arange(s).unsqueeze(0).expand(b, s)
    per_token = model(batch["tokens"], positions, None, labels=batch["labels"])  # [b, s] cross-entropy

    def loss_fn(output: torch.Tensor):
        loss = (output.float() * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
        return loss, {"loss": loss.detach().clone()}

    return per_token, loss_fn


def demo_rank(cfg_tree: dict) -> list[dict]:
    """Runs on every rank; returns the per-step metrics (identical on all ranks)."""
    import torch.distributed as dist

    from prism_mcore.models.qwen3.model import build_qwen3
    from prism_mcore.parallel.layout import init_model_parallel
    from prism_mcore.trainer.megatron_step import build_optimizer, lr_at, train_step, wrap_ddp

    cfg = PrismConfig.model_validate(cfg_tree)
    init_model_parallel(cfg)
    model = wrap_ddp(build_qwen3(cfg.model, cfg.parallel))
    optimizer = build_optimizer([model], cfg.optim)
    batch = demo_batch()
    rank0 = dist.get_rank() == 0
    history = []
    progress = _progress() if rank0 else None
    task = progress.add_task("demo: TP=2 Qwen3 AdamW", total=cfg.trainer.steps) if progress else None
    for step in range(cfg.trainer.steps):
        t0 = time.perf_counter()
        result = train_step([model], optimizer, _forward_step, [batch], num_microbatches=1,
                            seq_length=batch["tokens"].shape[1], micro_batch_size=batch["tokens"].shape[0],
                            lr=lr_at(step, cfg.trainer.steps, cfg.optim))
        loss = torch.tensor(result.losses[-1]["loss"] if result.losses else 0.0)
        dist.broadcast(loss, src=dist.get_world_size() - 1)  # the last pipeline stage owns the loss
        row = {"step": step, "loss": loss.item(), "grad_norm": result.grad_norm,
               "lr": lr_at(step, cfg.trainer.steps, cfg.optim), "seconds": time.perf_counter() - t0}
        history.append(row)
        if progress:
            progress.update(task, advance=1, description=f"demo: step {step} loss {row['loss']:.3f}")
    if progress:
        progress.stop()
    return history


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    progress.start()
    return progress


def run_demo(cfg: PrismConfig) -> int:
    from rich.console import Console
    from rich.table import Table

    from prism_mcore.platform.multiproc import run_on_ranks

    world = cfg.parallel.world_size or cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp
    history = run_on_ranks(demo_rank, world, cfg.model_dump(), timeout=600)[0]
    out = Path(cfg.trainer.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.jsonl", "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    table = Table(title=f"demo: tiny Qwen3, {world} gloo ranks, tp={cfg.parallel.tp}")
    for col in ("step", "loss", "grad norm", "lr", "s"):
        table.add_column(col, justify="right")
    for row in history:
        table.add_row(str(row["step"]), f"{row['loss']:.4f}", f"{row['grad_norm']:.3f}", f"{row['lr']:.2e}",
                      f"{row['seconds']:.2f}")
    console = Console()
    console.print(table)
    first, last = history[0]["loss"], history[-1]["loss"]
    console.print(f"loss {first:.4f} -> {last:.4f} ({'falling' if last < first else 'NOT falling'}); "
                  f"metrics in {out / 'metrics.jsonl'}")
    return 0 if last < first else 1
