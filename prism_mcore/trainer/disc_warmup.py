"""Stage 2a, discriminator warm-up: pairwise Bradley-Terry on (teacher, student) segments, plus the
MoE load-balancing loss (Megatron adds it inside the MoE layers with `model.router_aux_loss_coef`).

Each comparison is scored as the chat [system, user: prompt, assistant: segment] with a closed
assistant turn, read at each row's own last token (data/disc_inputs.py, shared with the align stage).
"""
from __future__ import annotations

import random

import torch
import torch.distributed as dist

from prism_mcore.config import PrismConfig


def encode_pair(pair, tokenizer, max_length: int) -> tuple[list[int], list[int]]:
    from prism_mcore.data.disc_inputs import discriminator_input, generation_prompt_ids, text_ids

    prompt = generation_prompt_ids(list(pair.prompt_messages), tokenizer)

    def ids(segment: str) -> list[int]:
        # keep the end: the score is read at the last token
        return discriminator_input(prompt, text_ids(segment, tokenizer), tokenizer)[-max_length:]

    return ids(pair.chosen), ids(pair.rejected)


def collate_pairs(encoded: list[tuple[list[int], list[int]]], pad_id: int, length: int | None = None) -> dict:
    """Chosen rows first, then rejected rows, right-padded to one length, with a 0/1 attention mask."""
    rows = [c for c, _ in encoded] + [r for _, r in encoded]
    length = length or max(map(len, rows))
    tokens = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return {"tokens": tokens, "attention_mask": mask, "pairs": len(encoded)}


def _forward_step(num_micro: int, dp: int, pairs_total: float):
    from prism_mcore.algorithms.discriminator_loss import bradley_terry_loss
    from prism_mcore.models.discriminator import sequence_scores

    def forward_step(batch, model):
        token_scores = model(batch["tokens"], batch["attention_mask"])

        def loss_fn(scores):
            seq = sequence_scores(scores, batch["attention_mask"])
            chosen, rejected = seq[: batch["pairs"]], seq[batch["pairs"]:]
            bt = bradley_terry_loss(chosen, rejected).mean()  # over this micro-batch's pairs
            n = float(batch["pairs"])
            loss = bt * n * num_micro * dp / pairs_total  # exact mean over the global batch
            return loss, {"bt_sum": (bt * n).detach().clone(), "correct": (chosen > rejected).float().sum(),
                          "gap_sum": (chosen - rejected).sum().detach(), "pairs": torch.tensor(n)}

        return token_scores, loss_fn

    return forward_step


def run_disc_warmup(cfg: PrismConfig) -> dict:
    from megatron.core import parallel_state as ps

    from prism_mcore.data.tokenizer import qwen3_tokenizer
    from prism_mcore.data.warmup_pairs import load_warmup_pairs
    from prism_mcore.models.discriminator import build_discriminator
    from prism_mcore.parallel.layout import init_model_parallel
    from prism_mcore.trainer.run import StageRun, export_hf, load_hf_weights, trainable

    tok = qwen3_tokenizer()
    pairs, skipped = [], 0
    for path in cfg.data.train_files:
        got, bad = load_warmup_pairs(path)
        pairs += got
        skipped += sum(bad.values())
    max_len = cfg.data.max_prompt_length + cfg.data.max_response_length
    encoded = [encode_pair(p, tok, max_len) for p in pairs]

    init_model_parallel(cfg)
    disc = build_discriminator(cfg.model, cfg.parallel, seed=cfg.trainer.seed)
    if cfg.model.hf_path:
        load_hf_weights(disc, cfg, kind="discriminator")
    model = trainable(disc, cfg.optim)
    run = StageRun(cfg, {"": model})
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    batch = cfg.data.global_batch_size
    last = {}
    for step in run.steps():
        epoch, offset = divmod(step, max(1, len(encoded) // batch))
        order = list(range(len(encoded)))
        random.Random(cfg.data.seed * 1_000_003 + epoch).shuffle(order)
        mine = [encoded[i] for i in order[offset * batch:(offset + 1) * batch]][dp_rank::dp]
        per_micro = max(1, cfg.data.micro_batch_tokens // (2 * max_len))
        micro_rows = [mine[i:i + per_micro] for i in range(0, len(mine), per_micro)]
        length = max(len(r) for pair in mine for r in pair)
        micro = [collate_pairs(m, tok.pad_token_id, length) for m in micro_rows]
        if disc.post_process:
            disc.head_dropout.reseed(step)
        result = model.train(_forward_step(len(micro), dp, float(batch)), micro, seq_length=length,
                             micro_batch_size=2 * per_micro, step=step, total_steps=cfg.trainer.steps)
        stats = torch.tensor([sum(d[k] for d in result.losses) if result.losses else 0.0
                              for k in ("bt_sum", "correct", "gap_sum", "pairs")])
        if not ps.is_pipeline_last_stage() or ps.get_tensor_model_parallel_rank() != 0:
            stats.zero_()
        dist.all_reduce(stats)
        n = max(float(stats[3]), 1.0)
        last = {"loss": float(stats[0]) / n, "accuracy": float(stats[1]) / n, "score_gap": float(stats[2]) / n,
                "grad_norm": result.grad_norm, "lr": model.optimizer.param_groups[0]["lr"], "skipped_rows": skipped}
        run.end_step(step, last, {"kind": "discriminator"}, f"loss {last['loss']:.3f}")
    run.close()
    if cfg.trainer.export_hf:
        export_hf(disc, cfg, f"{cfg.trainer.output_dir}/hf", kind="discriminator")
    return last
