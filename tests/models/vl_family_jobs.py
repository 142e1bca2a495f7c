"""Rank functions of tests/models/test_qwen3_vl_family.py: the Qwen3-VL-MoE discriminator on image rows, and
vision training control through the trainer's DDP + optimizer. Models come from the spec, as in training."""
from __future__ import annotations

import torch

from vl_jobs import IMAGE, MERGE, PIXEL_DIM, TEXT_TOKENS, V_END, V_START, grid_tokens


def _config(hf_dir: str, layout: dict, **model):
    from prism_mcore.config.load import build_config
    from prism_mcore.parallel.layout import init_model_parallel

    cfg = build_config({"model": {"hf_path": hf_dir, **model}, "parallel": dict(layout),
                        "optim": {"lr": 1e-3, "weight_decay": 0.0, "clip_grad": 0.0}})
    init_model_parallel(cfg)
    return cfg


def image_sequences(grids=((1, 4, 4), (1, 2, 6), (1, 6, 4), (1, 4, 2)), seed: int = 3):
    """Four token sequences of different lengths, each with one image of the given grid, and the images'
    patches [(grid, pixel rows)]."""
    g = torch.Generator().manual_seed(seed)
    seqs, pixels = [], []
    for i, grid in enumerate(grids):
        ids = torch.cat([torch.randint(0, TEXT_TOKENS, (2 + i,), generator=g), torch.tensor([V_START]),
                         torch.full((grid_tokens(grid),), IMAGE), torch.tensor([V_END]),
                         torch.randint(0, TEXT_TOKENS, (3 + 2 * i,), generator=g)])
        seqs.append(ids)
        pixels.append(torch.randn(grid[0] * grid[1] * grid[2], PIXEL_DIM, generator=g))
    return seqs, pixels, [list(grid) for grid in grids]


def padded(seqs, side: str, multiple: int = 4):
    length = -(-max(len(s) for s in seqs) // multiple) * multiple
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for r, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(length - len(s), length)
        ids[r, cols], mask[r, cols] = s, 1
    return ids, mask


def disc_scores(hf_dir: str, layout: dict) -> dict:
    """The discriminator (eval: no head dropout) on the same four image sequences right-padded, left-padded,
    and packed two per row; per-sequence scores of each, plus the value head's weight."""
    from prism_mcore.checkpoint.hf_weights import DISCRIMINATOR, load_hf
    from prism_mcore.models.discriminator import build_discriminator, sequence_scores
    from prism_mcore.models.spec import resolve

    cfg = _config(hf_dir, layout)
    disc = build_discriminator(cfg.model, cfg.parallel)
    spec, arch = resolve(cfg.model)
    load_hf(disc, spec, arch, hf_dir, DISCRIMINATOR)
    disc.eval()
    seqs, pixels, grids = image_sequences()
    pixel_values, grid_thw = torch.cat(pixels), torch.tensor(grids)
    out = {"head": disc.value_head.weight.detach().clone() if disc.value_head is not None else None}
    with torch.no_grad():
        for side in ("right", "left"):
            ids, mask = padded(seqs, side)
            out[side] = sequence_scores(disc(ids, mask, pixel_values=pixel_values, image_grid_thw=grid_thw), mask)
        lengths = [[len(seqs[0]), len(seqs[1])], [len(seqs[2]), len(seqs[3])]]
        ids, _ = padded([torch.cat(seqs[:2]), torch.cat(seqs[2:])], "right")
        scores = disc(ids, packed_seq_lengths=lengths, pixel_values=pixel_values, image_grid_thw=grid_thw)
        out["packed"] = sequence_scores(scores, packed_seq_lengths=lengths)
    return out


def vision_training(hf_dir: str, batch: dict, weights: torch.Tensor, modes: list[tuple[str, float]]) -> list:
    """For each (model.vision.train, lr_mult): the policy built by the spec, wrapped by the trainer's
    `trainable` (Megatron DDP + build_optimizer), one step of loss = sum(logits * weights) at lr 1e-3 (Adam,
    no weight decay, no clipping). Returns, per mode, ({HF name: vision grad or None}, {HF name: vision
    parameter change}, {text parameter name: change}, {param group lr_mult: lr})."""
    from prism_mcore.models.spec import resolve
    from prism_mcore.trainer.step import forward_backward, trainable

    results = []
    for train, lr_mult in modes:
        cfg = _config(hf_dir, {}, vision={"train": train, "lr_mult": lr_mult})
        spec, arch = resolve(cfg.model)
        net = spec.build(arch, cfg.parallel)
        from prism_mcore.checkpoint.hf_weights import load_hf

        load_hf(net, spec, arch, hf_dir)
        model = trainable(net, cfg.optim)
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        positions, extra = spec.forward_inputs(arch, batch["input_ids"], batch["attention_mask"],
                                               pixel_values=batch["pixel_values"],
                                               image_grid_thw=batch["image_grid_thw"])

        def step(_, m):
            logits = m(batch["input_ids"], positions, None, **extra)[..., :arch.text.vocab_size]
            return logits, lambda out: ((out * weights).sum(), {})

        forward_backward([model.ddp], model.optimizer, step, [None], 1, batch["input_ids"].shape[1],
                         batch["input_ids"].shape[0], lr=1e-3)
        grads = {"model.visual." + n: (p.main_grad.clone() if p.requires_grad else None)
                 for n, p in net.vision.named_parameters()}
        model.optimizer.step()
        change = {n: (p.detach() - before[n]).abs() for n, p in net.named_parameters()}
        vision = {"model.visual." + n[len("vision."):]: c for n, c in change.items() if n.startswith("vision.")}
        text = {n: c for n, c in change.items() if not n.startswith("vision.")}
        groups = {g.get("lr_mult", 1.0): g["lr"] for g in model.optimizer.param_groups if g["params"]}
        results.append((grads, vision, text, groups))
    return results
