"""Stage 1, SFT: chat data, loss on assistant tokens only, micro-batches packed by token budget.

Reads top to bottom: build -> resume -> for each step: take this DP rank's share of the global batch,
pack it, forward/backward every micro-batch, optimizer step, log, checkpoint -> export HF.
"""
from __future__ import annotations

import random

import torch
import torch.distributed as dist

from prism_mcore.config import PrismConfig


def load_sft_samples(cfg: PrismConfig, tokenizer):
    from prism_mcore.data.errors import DataError
    from prism_mcore.data.sft_dataset import load_chat_jsonl, tokenize_chat

    if not cfg.data.train_files:
        raise DataError("data.train_files: the sft stage needs at least one chat JSONL file")
    samples, skipped = [], 0
    max_length = cfg.data.max_prompt_length + cfg.data.max_response_length
    for path in cfg.data.train_files:
        chats, bad = load_chat_jsonl(path)
        skipped += sum(bad.values())
        samples += [tokenize_chat(chat, tokenizer, max_length) for chat in chats]
    return [s for s in samples if sum(s.loss_mask) > 0], skipped


def step_batches(num_samples: int, batch: int, seed: int, step: int) -> list[int]:
    """Sample indices of global step `step`: epoch-wise deterministic shuffles, so resuming at a step
    reproduces exactly the batches an uninterrupted run would have seen."""
    per_epoch = max(1, num_samples // batch)
    epoch, offset = divmod(step, per_epoch)
    order = list(range(num_samples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[offset * batch:(offset + 1) * batch]


def _sft_forward(tokens_total: float, num_micro: int, dp: int, vocab_size: int):
    from prism_mcore.models.qwen3.logprob_head import hidden_to_logprobs

    def forward_step(batch, model):
        b, s = batch["tokens"].shape
        hidden = model(batch["tokens"], torch.arange(s).unsqueeze(0).expand(b, s), None)
        gpt = model.module if hasattr(model, "module") else model

        def loss_fn(h):
            logp, _ = hidden_to_logprobs(gpt, h, batch["labels"], vocab_size, with_entropy=False,
                                         only=batch["loss_mask"])
            nll = -(logp * batch["loss_mask"]).sum()
            # Megatron divides by the local micro-batch count and DDP averages over DP ranks; scaling
            # back makes the step's gradient the exact token mean over the whole global batch.
            loss = nll * (num_micro * dp / tokens_total)
            return loss, {"nll_sum": nll.detach().clone(), "tokens": batch["loss_mask"].sum()}

        return hidden, loss_fn

    return forward_step


def run_sft(cfg: PrismConfig) -> dict:
    from megatron.core import parallel_state as ps

    from prism_mcore.data.sft_dataset import pack_by_token_budget
    from prism_mcore.data.tokenizer import qwen3_tokenizer
    from prism_mcore.parallel.layout import init_model_parallel
    from prism_mcore.trainer.run import StageRun, build_policy, export_hf, trainable

    tok = qwen3_tokenizer()
    samples, skipped = load_sft_samples(cfg, tok)
    init_model_parallel(cfg)
    policy = trainable(build_policy(cfg), cfg.optim)
    run = StageRun(cfg, {"": policy})
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    pp = ps.get_pipeline_model_parallel_world_size()
    last = {}
    for step in run.steps():
        mine = [samples[i] for i in step_batches(len(samples), cfg.data.global_batch_size, cfg.data.seed, step)][dp_rank::dp]
        groups = pack_by_token_budget(mine, cfg.data.micro_batch_tokens)
        num_micro = torch.tensor([len(groups)])
        dist.all_reduce(num_micro, op=dist.ReduceOp.MAX)  # every DP rank runs the same schedule length
        groups += [[]] * (int(num_micro) - len(groups))
        shape = _shape(groups, pp)
        micro = [collate(g, tok.pad_token_id, *shape) for g in groups]
        tokens = torch.tensor([float(sum(m["loss_mask"].sum() for m in micro))])
        dist.all_reduce(tokens, group=ps.get_data_parallel_group())
        result = policy.train(_sft_forward(float(tokens), len(micro), dp, cfg.model.vocab_size), micro,
                              seq_length=shape[1] or 1, micro_batch_size=shape[0] or 1, step=step,
                              total_steps=cfg.trainer.steps)
        nll = torch.tensor([sum(d["nll_sum"] for d in result.losses)])
        if not ps.is_pipeline_last_stage() or ps.get_tensor_model_parallel_rank() != 0:
            nll.zero_()
        dist.all_reduce(nll)
        last = {"loss": float(nll) / float(tokens), "grad_norm": result.grad_norm,
                "lr": policy.optimizer.param_groups[0]["lr"], "tokens": float(tokens), "skipped_rows": skipped,
                "update_skipped": result.skipped}
        run.end_step(step, last, summary=f"loss {last['loss']:.3f}")
    run.close()
    if cfg.trainer.export_hf:
        export_hf(policy.net, cfg, f"{cfg.trainer.output_dir}/hf")
    return last


def collate(group: list, pad_id: int, rows: int | None = None, length: int | None = None) -> dict:
    """Next-token tokens/labels/loss_mask [rows, length] for packed samples; the mask is the target's.
    An empty group (a DP rank with fewer micro-batches than its peers) becomes one all-masked row."""
    rows = rows or max(1, len(group))
    length = length or max((len(s.input_ids) - 1 for s in group), default=1)
    tokens = torch.full((rows, length + 1), pad_id, dtype=torch.long)
    mask = torch.zeros(rows, length + 1)
    for i, sample in enumerate(group):
        n = min(len(sample.input_ids), length + 1)
        tokens[i, :n] = torch.tensor(sample.input_ids[:n])
        mask[i, :n] = torch.tensor(sample.loss_mask[:n], dtype=torch.float32)
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
            "loss_mask": mask[:, 1:].contiguous()}


def _shape(groups: list, pp: int) -> tuple[int, int] | tuple[None, None]:
    """Pipeline stages exchange fixed-shape activations: pad every micro-batch to one [rows, length]."""
    if pp == 1:
        return None, None
    rows = torch.tensor([max((len(g) for g in groups), default=1),
                         max((len(s.input_ids) for g in groups for s in g), default=2) - 1])
    dist.all_reduce(rows, op=dist.ReduceOp.MAX)
    return int(rows[0]), int(rows[1])
