"""The discriminator's two jobs in the align stage: score segments (eval mode, no grad, before its
update; these scores are the policy's rewards) and one Bradley-Terry update on the same step's
teacher and student segments (train mode, head dropout on).

Work is cut into pieces: some rollouts of one prompt group (their caption and reasoning rows) plus that
group's two teacher rows, as many rollouts as fit `data.micro_batch_tokens`, then pieces are packed
into micro-batches by the same budget. The teacher rows ride along with every piece of their group, so
each comparison sees its teacher in the same forward pass; a teacher scored in k pieces takes part in
exactly the comparisons of its rollouts, as in the original (which re-scored the teacher per rollout).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from prism_mcore.config import PrismConfig


@dataclass
class GroupInputs:
    """Token rows of one prompt group: captions[i] / reasonings[i] for rollout i, then the teacher's."""

    captions: list[list[int]]
    reasonings: list[list[int]]
    teacher_caption: list[int]
    teacher_reasoning: list[int]

    def rows(self, lo: int = 0, hi: int | None = None) -> list[list[int]]:
        """Rows of rollouts lo..hi: their captions, their reasonings, then the teacher's two."""
        return self.captions[lo:hi] + self.reasonings[lo:hi] + [self.teacher_caption, self.teacher_reasoning]


@dataclass(frozen=True)
class Piece:
    group: int
    lo: int
    hi: int

    @property
    def size(self) -> int:
        return self.hi - self.lo


def _cost(inputs: list[GroupInputs], piece: Piece) -> tuple[int, int]:
    rows = inputs[piece.group].rows(piece.lo, piece.hi)
    return len(rows), max(map(len, rows))


def _padded(cost: tuple[int, int]) -> int:
    return cost[0] * cost[1]


def _pieces(groups: list[int], inputs: list[GroupInputs], token_budget: int) -> list[list[Piece]]:
    """Micro-batches of pieces, each micro-batch's padded rows x length within `token_budget` when
    possible (a single rollout with its teacher is the smallest piece)."""
    pieces = []
    for g in groups:
        n, lo = len(inputs[g].captions), 0
        while lo < n:
            hi = lo + 1
            while hi < n and _padded(_cost(inputs, Piece(g, lo, hi + 1))) <= token_budget:
                hi += 1
            pieces.append(Piece(g, lo, hi))
            lo = hi
    out, current, rows, length = [], [], 0, 0
    for piece in pieces:
        p_rows, p_len = _cost(inputs, piece)
        if current and (rows + p_rows) * max(length, p_len) > token_budget:
            out.append(current)
            current, rows, length = [], 0, 0
        current.append(piece)
        rows, length = rows + p_rows, max(length, p_len)
    return out + ([current] if current else [])


def _collate(rows: list[list[int]], pad_id: int, shape: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded [rows, length] with a 0/1 mask; `shape` pads further (pipeline stages exchange
    fixed-shape activations, so with PP > 1 every micro-batch has the step's largest shape)."""
    num, length = shape or (len(rows), max(map(len, rows)))
    tokens = torch.full((num, length), pad_id, dtype=torch.long)
    mask = torch.zeros(num, length, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return {"tokens": tokens, "attention_mask": mask}


def _batches(inputs: list[GroupInputs], groups: list[int], pad_id: int, token_budget: int,
             valid: torch.Tensor | None = None) -> list[dict]:
    """This DP rank's micro-batches: collated rows, their `pieces`, and (training) the pieces' validity."""
    from megatron.core import parallel_state as ps

    micro = _pieces(groups, inputs, token_budget)
    rows = [[r for p in m for r in inputs[p.group].rows(p.lo, p.hi)] for m in micro]
    shape = None
    if ps.get_pipeline_model_parallel_world_size() > 1:
        size = torch.tensor([max(map(len, rows), default=1), max((len(r) for rs in rows for r in rs), default=1)])
        dist.all_reduce(size, op=dist.ReduceOp.MAX)
        shape = (int(size[0]), int(size[1]))
    out = []
    for m, r in zip(micro, rows):
        batch = dict(_collate(r, pad_id, shape), pieces=m)
        if valid is not None:
            batch["valid"] = torch.cat([valid[p.group, p.lo:p.hi] for p in m]).float()
        out.append(batch)
    return out


def _split(scores: torch.Tensor, pieces: list[Piece]):
    """Per-row scores of a micro-batch -> (student caption, student reasoning, teacher caption, teacher
    reasoning), each [sum of piece sizes], the teacher's repeated for each of its piece's rollouts."""
    parts, at = [], 0
    for p in pieces:
        k = p.size
        chunk = scores[at:at + 2 * k + 2]
        parts.append((chunk[:k], chunk[k:2 * k], chunk[2 * k].expand(k), chunk[2 * k + 1].expand(k)))
        at += 2 * k + 2
    return tuple(torch.cat(column) for column in zip(*parts))


def _shares(num_groups: int) -> list[int]:
    from megatron.core import parallel_state as ps

    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    return list(range(num_groups))[rank::dp]


def _gather_to_all(local: dict[int, torch.Tensor], num_groups: int, width: int) -> torch.Tensor:
    """[num_groups, width] on every rank from the rows each DP rank's last pipeline stage computed."""
    from megatron.core import parallel_state as ps

    full = torch.zeros(num_groups, width, dtype=torch.float64)
    if ps.is_pipeline_last_stage():
        for g, values in local.items():
            full[g] = values.double()
    dist.all_reduce(full, group=ps.get_data_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(full, group=ps.get_pipeline_model_parallel_group())
    return full.float()


def score_groups(disc, inputs: list[GroupInputs], pad_id: int, token_budget: int) -> torch.Tensor:
    """Collective: scores [num_groups, 2n + 2] (captions, reasonings, teacher caption, teacher reasoning),
    raw (unclipped), on every rank."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from prism_mcore.models.discriminator import sequence_scores

    batches = _batches(inputs, _shares(len(inputs)), pad_id, token_budget)
    n = len(inputs[0].captions)

    def forward_step(data_iter, model):
        batch = next(data_iter)
        out = model(batch["tokens"], batch["attention_mask"])

        def collect(token_scores):
            rows = sum(2 * p.size + 2 for p in batch["pieces"])
            return torch.zeros(()), {"scores": sequence_scores(token_scores, batch["attention_mask"])[:rows].detach()}

        return out, collect

    disc.ddp.eval()
    try:
        with torch.no_grad():
            outputs = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(batches), model=[disc.ddp],
                num_microbatches=len(batches), seq_length=max(b["tokens"].shape[1] for b in batches) if batches else 1,
                micro_batch_size=max(b["tokens"].shape[0] for b in batches) if batches else 1, forward_only=True)
    finally:
        disc.ddp.train()
    local: dict[int, torch.Tensor] = {}
    for batch, out in zip(batches, outputs or []):
        at = 0
        for p in batch["pieces"]:
            k = p.size
            chunk = out["scores"][at:at + 2 * k + 2]
            row = local.setdefault(p.group, torch.zeros(2 * n + 2))
            row[p.lo:p.hi], row[n + p.lo:n + p.hi], row[2 * n:] = chunk[:k], chunk[k:2 * k], chunk[2 * k:]
            at += 2 * k + 2
    return _gather_to_all(local, len(inputs), 2 * n + 2)


def _loss_step(cfg: PrismConfig, num_samples: int, num_valid: int, num_micro: int, dp: int):
    from prism_mcore.algorithms.discriminator_loss import alignment_discriminator_loss, clip_scores
    from prism_mcore.models.discriminator import sequence_scores

    a = cfg.algorithm

    def forward_step(batch, model):
        out = model(batch["tokens"], batch["attention_mask"])

        def loss_fn(token_scores):
            rows = sum(2 * p.size + 2 for p in batch["pieces"])
            sp, sr, tp, tr = _split(sequence_scores(token_scores, batch["attention_mask"])[:rows], batch["pieces"])
            valid = batch["valid"]
            pair, stats = alignment_discriminator_loss(
                sp, sr, tp, tr, valid, score_clip=a.score_clip, clip_mode=a.score_clip_mode, score_reg_coef=0.0,
                num_valid=float(num_valid), global_num_valid=float(num_valid))
            if num_valid == 0:  # the fallback is a per-micro-batch mean: weight it by this batch's share
                pair = pair * (sp.numel() / num_samples)
            squares = sum(clip_scores(x, a.score_clip, a.score_clip_mode).square().sum() for x in (sp, sr, tp, tr))
            loss = pair + a.score_reg_coef * squares / (4.0 * num_samples)  # mean over the whole step's samples
            # Megatron divides by the local micro-batch count and DDP averages over DP ranks: undo both
            return loss * num_micro * dp, {"d_loss": loss.detach().clone(),
                                           "d_correct": ((tp > sp).float() * valid).sum() + ((tr > sr).float() * valid).sum()}

        return out, loss_fn

    return forward_step


def update_discriminator(disc, cfg: PrismConfig, inputs: list[GroupInputs], valid: torch.Tensor, pad_id: int,
                         step: int) -> dict:
    """Collective: one optimizer step of the alignment Bradley-Terry loss. `valid` [groups, n] is format
    validity; malformed rollouts only enter the score regularizer. Returns metrics (same on every rank)."""
    from megatron.core import parallel_state as ps

    batches = _batches(inputs, _shares(len(inputs)), pad_id, cfg.data.micro_batch_tokens, valid=valid)
    if disc.net.post_process:
        disc.net.head_dropout.reseed(step)
    num_valid = int(valid.sum())
    forward = _loss_step(cfg, valid.numel(), num_valid, len(batches), ps.get_data_parallel_world_size())
    seq = max(b["tokens"].shape[1] for b in batches)
    rows = max(b["tokens"].shape[0] for b in batches)
    result = disc.train(forward, batches, seq_length=seq, micro_batch_size=rows, step=step,
                        total_steps=cfg.trainer.steps)
    stats = torch.tensor([sum(d["d_loss"] for d in result.losses) if result.losses else 0.0,
                          sum(d["d_correct"] for d in result.losses) if result.losses else 0.0], dtype=torch.float64)
    if not ps.is_pipeline_last_stage() or ps.get_tensor_model_parallel_rank() != 0:
        stats.zero_()
    dist.all_reduce(stats)
    return {"d_loss": float(stats[0]), "d_pair_accuracy": float(stats[1]) / max(1, 2 * num_valid),
            "d_grad_norm": result.grad_norm}
