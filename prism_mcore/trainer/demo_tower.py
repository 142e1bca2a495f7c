"""The multimodal demo's starting policy: a random tiny Qwen3-VL whose vision tower has been pretrained on
the visual task's scenes, standing in for the pretrained SigLIP-2 tower every released Qwen3-VL starts with.

Why: a tiny policy whose tower is random does not learn to read the image within the demo's SFT budget. If the
tower trains with the policy it collapses to a constant (mean |x| 0.04 -> 1.9 within 50 steps, spread 0.02);
if it is frozen, reading starts only near 1,000 SFT steps (docs/pipeline.md, "Multimodal demo"). Real
recipes never start from a random tower, and neither does this demo: the tower (and its mergers) first learn
what the scenes are made of, with no language model involved, then stay frozen through every stage.

What the tower learns (supervised by the scene layout `data/visual_task.py` drew, never by the questions):
  * per LLM image token (one 32-px block = 2 x 2 patches): what each of its four 16-px cells holds (nothing,
    or one of colour x shape) and which digit the block shows (or none);
  * per image, from the mean of its tokens: how many shapes of each colour x shape (regression) and the left
    and right digits. Means of tokens are what an attention head that spreads over the image reads, so
    counts become linear in what the language model sees.
Each read-out is a linear probe on the final merger's output and on each deepstack merger's output (the
deepstack features are added into the language model too). The probes are dropped afterwards.

The result is an HF checkpoint directory (transformers' own Qwen3-VL class, random language model, trained
tower) that SFT starts from via `model.hf_path`. Metrics: `metrics.jsonl` / `tb/` beside it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from prism_mcore.algorithms.perception import COLOURS, SHAPES
from prism_mcore.data import visual_task as task

NONE = 0
CELL_CLASSES = 1 + len(COLOURS) * len(SHAPES)  # nothing, or one colour x shape
DIGIT_CLASSES = 1 + 10  # no digit, or 0-9
KINDS = len(COLOURS) * len(SHAPES)


@dataclass
class TowerPretraining:
    steps: int = 500
    images_per_step: int = 32
    lr: float = 1.0e-3
    seed: int = 0
    num_train: int = 20000  # problems per difficulty to draw images from (a disjoint seed from the demo data)
    num_val: int = 128  # per difficulty


def _kind(colour: str, shape: str) -> int:
    return COLOURS.index(colour) * len(SHAPES) + SHAPES.index(shape)


def block_labels(p: task.VisualProblem, merge: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(cells [blocks, merge^2] long, digits [blocks] long) for the image's LLM tokens in their order (row-major
    blocks, as transformers' processor flattens the merge windows), cells row-major within each block."""
    n = p.size // task.BLOCK
    cells = torch.zeros(n, n, merge * merge, dtype=torch.long)
    digits = torch.zeros(n, n, dtype=torch.long)
    for shape, colour, x, y in p.shapes:  # a shape sits inside one cell: its top-left corner is in it
        col, row = x // task.CELL, y // task.CELL
        cells[row // merge, col // merge, (row % merge) * merge + col % merge] = 1 + _kind(colour, shape)
    for value, x, y in p.digits:
        digits[y // task.BLOCK, x // task.BLOCK] = 1 + value
    return cells.reshape(n * n, merge * merge), digits.reshape(n * n)


def image_labels(p: task.VisualProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts [KINDS] float: shapes of each colour x shape, digits [2] long: left then right, 0 = none)."""
    counts = torch.zeros(KINDS)
    for shape, colour, _x, _y in p.shapes:
        counts[_kind(colour, shape)] += 1
    digits = torch.zeros(2, dtype=torch.long)
    for i, (value, _x, _y) in enumerate(sorted(p.digits, key=lambda d: d[1])[:2]):
        digits[i] = 1 + value
    return counts, digits


class _Probes(nn.Module):
    def __init__(self, hidden: int, outputs: int, merge: int):
        super().__init__()
        self.merge2 = merge * merge
        self.blocks = nn.ModuleList(nn.Linear(hidden, self.merge2 * CELL_CLASSES + DIGIT_CLASSES)
                                    for _ in range(outputs))
        self.image = nn.Linear(hidden, KINDS + 2 * DIGIT_CLASSES)

    def forward(self, features: list[torch.Tensor], tokens_per_image: list[int], labels) -> tuple[torch.Tensor, dict]:
        cells, digits, counts, image_digits = labels
        ce = nn.functional.cross_entropy
        loss, stats = 0.0, {}
        for i, (probe, f) in enumerate(zip(self.blocks, features)):
            out = probe(f)
            cell_logits = out[:, :self.merge2 * CELL_CLASSES].reshape(-1, CELL_CLASSES)
            digit_logits = out[:, self.merge2 * CELL_CLASSES:]
            loss = loss + ce(cell_logits, cells.reshape(-1)) + ce(digit_logits, digits)
            if i == 0:
                drawn = cells.reshape(-1) != NONE  # most cells are empty: score the drawn ones
                stats["cell_acc"] = (cell_logits.argmax(-1) == cells.reshape(-1))[drawn].float().mean().item()
                has = digits != NONE
                stats["digit_acc"] = (digit_logits.argmax(-1) == digits)[has].float().mean().item() if has.any() else 1.0
        pooled = torch.stack([f.mean(0) for f in features[0].split(tokens_per_image)])
        out = self.image(pooled)
        loss = loss + nn.functional.mse_loss(out[:, :KINDS], counts) + \
            ce(out[:, KINDS:].reshape(-1, DIGIT_CLASSES), image_digits.reshape(-1))
        stats["counts_exact"] = (out[:, :KINDS].round() == counts).all(-1).float().mean().item()
        return loss, stats


def _inputs(problems: Sequence[task.VisualProblem], processor, merge: int):
    images = processor([task.render(p) for p in problems])
    blocks = [block_labels(p, merge) for p in problems]
    whole = [image_labels(p) for p in problems]
    labels = (torch.cat([b[0] for b in blocks]), torch.cat([b[1] for b in blocks]),
              torch.stack([w[0] for w in whole]), torch.stack([w[1] for w in whole]))
    tokens = [int(g.prod()) // (merge * merge) for g in images.image_grid_thw]
    return images, tokens, labels


def pretrain_tower(spec, arch, settings: TowerPretraining, difficulties: Sequence[int], metrics=None,
                   progress=None, train_tower: bool = True) -> tuple[nn.Module, dict]:
    """The trained tower (transformers' vision module of `arch`) and its held-out read-out accuracies.
    `train_tower=False` trains the probes alone: what the random tower already tells apart."""
    from prism_mcore.models.qwen3_vl.vision import build_vision_tower, encode_images

    merge = arch.spatial_merge_size
    processor = spec.processor(arch)
    # seeds far from the demo's data seeds (10-13, 99): the held-out problems' scenes are never trained on
    train = [p for d in difficulties for p in task.make_problems(settings.num_train, 1000 + settings.seed, d)]
    val = _inputs([p for d in difficulties for p in task.make_problems(settings.num_val, 2000 + settings.seed, d)],
                  processor, merge)
    rng = random.Random(settings.seed)
    with torch.random.fork_rng(devices=[]):  # the same tower and probes whatever ran before in this process
        torch.manual_seed(settings.seed)
        tower = build_vision_tower(arch, torch.float32, sequence_parallel=False, seed=settings.seed)
        tower.train()
        probes = _Probes(arch.text.hidden_size, 1 + arch.num_deepstack, merge)
        params = [*tower.parameters(), *probes.parameters()] if train_tower else list(probes.parameters())
        optim = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)

        def run(batch):
            images, tokens, labels = batch
            features, deepstack = encode_images(tower, images.pixel_values, images.image_grid_thw)
            return probes([features, *deepstack], tokens, labels)

        for step in range(1, settings.steps + 1):
            loss, stats = run(_inputs(rng.sample(train, settings.images_per_step), processor, merge))
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            if metrics is not None and (step % 25 == 0 or step == settings.steps):
                metrics.log(step, {"loss": loss.item(), **stats})
            if progress is not None:
                progress(step, loss.item())
    tower.eval()
    with torch.no_grad():
        val_loss, val_stats = run(val)
    return tower, {"val_loss": val_loss.item(), **{f"val_{k}": v for k, v in val_stats.items()}}


def write_initial_policy(model_cfg, out: str | Path, settings: TowerPretraining, difficulties: Sequence[int],
                         console=None) -> dict:
    """Pretrain the tower of the policy `model_cfg` describes and write the starting checkpoint to `out`
    (atomically); returns the held-out read-out accuracies (also in out/../vision/metrics.jsonl)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from prism_mcore.checkpoint.hf_config import write_scratch_side_files
    from prism_mcore.checkpoint.hf_io import atomic_dir
    from prism_mcore.models.spec import resolve
    from prism_mcore.trainer.metrics import Metrics

    spec, arch = resolve(model_cfg)
    if getattr(arch, "is_moe", True) or not hasattr(arch, "vision"):
        raise ValueError("the demo's starting policy is a dense Qwen3-VL (model.vision set, no experts)")
    out = Path(out)
    metrics = Metrics(out.parent / "vision", "vision")
    try:
        from rich.progress import Progress

        with Progress(console=console, transient=True, disable=console is None) as bar:
            task_id = bar.add_task("vision tower", total=settings.steps)
            tower, result = pretrain_tower(
                spec, arch, settings, difficulties, metrics,
                lambda step, loss: bar.update(task_id, completed=step, description=f"vision tower loss {loss:.3f}"))
        metrics.log(settings.steps, result)
    finally:
        metrics.close()
    config = Qwen3VLConfig.from_dict(spec.hf_config(arch))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = Qwen3VLForConditionalGeneration(config)  # transformers' init: normal(0, 0.02), as Megatron's
    model.model.visual.load_state_dict(tower.state_dict())
    with atomic_dir(out, overwrite=True) as tmp:
        write_scratch_side_files(spec, arch, tmp)  # config.json, tokenizer, preprocessor_config.json
        model.save_pretrained(str(tmp))  # safetensors; rewrites config.json as transformers' own
    return result
