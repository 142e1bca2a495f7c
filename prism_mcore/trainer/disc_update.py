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


# Row roles in an alignment batch (0 is padding: Batch.pad_to fills extras with 0).
STUDENT_CAPTION, STUDENT_REASONING, TEACHER_CAPTION, TEACHER_REASONING = 1, 2, 3, 4


def _padded_size(rows: list[list[int]]) -> int:
    return len(rows) * max(map(len, rows))


def pieces_of(inputs: GroupInputs, token_budget: int) -> list[tuple[int, int]]:
    """Rollout ranges lo..hi of one group whose rows (with the teacher's two) fit `token_budget` padded,
    as many rollouts per piece as fit; a single rollout with its teacher is the smallest piece."""
    n, lo, out = len(inputs.captions), 0, []
    while lo < n:
        hi = lo + 1
        while hi < n and _padded_size(inputs.rows(lo, hi + 1)) <= token_budget:
            hi += 1
        out.append((lo, hi))
        lo = hi
    return out


def alignment_batch(inputs: list[GroupInputs], pad_id: int, token_budget: int, valid: torch.Tensor | None = None,
                    images=None, group_images=()):
    """Every group's pieces as units of one Batch. Per-row extras: role (above), group, rollout (-1 for
    the teacher's rows) and, for training, the format validity of each student row's rollout. With images
    (a StageImages), every row of group g carries `group_images[g]` (the prompt's), as the original scores
    each segment with the prompt's image."""
    from prism_mcore.data.batch import Batch, right_padded
    from prism_mcore.trainer.images import attach_images

    rows, unit, role, group, rollout = [], [], [], [], []
    for g, inp in enumerate(inputs):
        for lo, hi in pieces_of(inp, token_budget):
            k = hi - lo
            rows += inp.rows(lo, hi)
            unit += [_next_unit(unit)] * (2 * k + 2)
            role += [STUDENT_CAPTION] * k + [STUDENT_REASONING] * k + [TEACHER_CAPTION, TEACHER_REASONING]
            group += [g] * (2 * k + 2)
            rollout += list(range(lo, hi)) * 2 + [-1, -1]
    tokens, mask = right_padded(rows, pad_id)
    extra = {"role": torch.tensor(role), "group": torch.tensor(group), "rollout": torch.tensor(rollout)}
    if valid is not None:
        extra["valid"] = torch.tensor([bool(valid[g, r]) if r >= 0 else False for g, r in zip(group, rollout)])
    batch = Batch(tokens=tokens, attention_mask=mask, unit=torch.tensor(unit), extra=extra)
    return attach_images(batch, images, [group_images[g] for g in group] if images is not None else [])


def _next_unit(units: list[int]) -> int:
    return units[-1] + 1 if units else 0


def comparisons(scores: torch.Tensor, batch) -> tuple[torch.Tensor, ...]:
    """Per-row scores of a micro-batch -> (student caption, student reasoning, teacher caption, teacher
    reasoning), one entry per rollout, each rollout's teacher read from its own piece."""
    role, unit = batch.extra["role"], batch.unit
    teacher_row = {}
    for i, (r, u) in enumerate(zip(role.tolist(), unit.tolist())):
        if r in (TEACHER_CAPTION, TEACHER_REASONING):
            teacher_row[(u, r)] = i
    students = unit[role == STUDENT_CAPTION].tolist()
    tp = torch.tensor([teacher_row[(u, TEACHER_CAPTION)] for u in students], dtype=torch.long)
    tr = torch.tensor([teacher_row[(u, TEACHER_REASONING)] for u in students], dtype=torch.long)
    dev = scores.device
    return (scores[role.to(dev) == STUDENT_CAPTION], scores[role.to(dev) == STUDENT_REASONING],
            scores[tp.to(dev)], scores[tr.to(dev)])


def score_groups(disc, inputs: list[GroupInputs], pad_id: int, token_budget: int, images=None,
                 group_images=()) -> torch.Tensor:
    """Collective: scores [num_groups, 2n + 2] (captions, reasonings, teacher caption, teacher reasoning),
    raw (unclipped), on every rank."""
    from prism_mcore.models.discriminator import sequence_scores
    from prism_mcore.trainer.disc_warmup import discriminator_forward
    from prism_mcore.trainer.step import StepRunner

    batch = alignment_batch(inputs, pad_id, token_budget, images=images, group_images=group_images)

    def score(net, micro):
        out = discriminator_forward(net, micro)
        return out, lambda token_scores: {"score": sequence_scores(token_scores, micro.attention_mask)}

    per_row = StepRunner(token_budget, pad_id).forward(disc, batch, score)["score"]
    n = len(inputs[0].captions)
    full = torch.zeros(len(inputs), 2 * n + 2)
    column = {STUDENT_CAPTION: 0, STUDENT_REASONING: n, TEACHER_CAPTION: 2 * n, TEACHER_REASONING: 2 * n + 1}
    # the teacher is scored in every piece of its group: keep its first piece's score
    for i in reversed(range(batch.num_rows)):
        r, g, k = (int(batch.extra[name][i]) for name in ("role", "group", "rollout"))
        full[g, column[r] + (k if k >= 0 else 0)] = per_row[i]
    return full


class AlignmentObjective:
    """The Stage-2 Bradley-Terry loss: teacher segments over the rollouts' segments, each rollout compared
    with its own group's teacher; malformed rollouts only enter the score regulariser. Every rank holds
    the step's counts (valid comparisons, rollouts), so the means are global without a collective."""

    mode = "token-mean"  # not per token: the counts below normalise

    def __init__(self, cfg: PrismConfig, num_valid: int, num_samples: int):
        self.a, self.num_valid, self.num_samples = cfg.algorithm, num_valid, num_samples

    def step(self, net, batch, norm):
        from prism_mcore.algorithms.discriminator_loss import alignment_discriminator_loss, clip_scores
        from prism_mcore.models.discriminator import sequence_scores

        from prism_mcore.trainer.disc_warmup import discriminator_forward

        a = self.a
        out = discriminator_forward(net, batch)

        def loss_fn(token_scores):
            sp, sr, tp, tr = comparisons(sequence_scores(token_scores, batch.attention_mask), batch)
            valid = batch.extra["valid"][batch.extra["role"] == STUDENT_CAPTION].to(sp.device)
            pair, _ = alignment_discriminator_loss(
                sp, sr, tp, tr, valid, score_clip=a.score_clip, clip_mode=a.score_clip_mode, score_reg_coef=0.0,
                num_valid=float(self.num_valid), global_num_valid=float(self.num_valid))
            if self.num_valid == 0:  # the fallback is a per-micro-batch mean: weight it by this batch's share
                pair = pair * (sp.numel() / self.num_samples)
            squares = sum(clip_scores(x, a.score_clip, a.score_clip_mode).square().sum() for x in (sp, sr, tp, tr))
            loss = pair + a.score_reg_coef * squares / (4.0 * self.num_samples)  # mean over the step's samples
            v = valid.float()
            correct = ((tp > sp).float() * v).sum() + ((tr > sr).float() * v).sum()
            return loss * norm.scale, {"d_loss": loss.detach(), "d_correct": correct}

        return out, loss_fn


def update_discriminator(disc, cfg: PrismConfig, inputs: list[GroupInputs], valid: torch.Tensor, pad_id: int,
                         step: int, images=None, group_images=()) -> dict:
    """Collective: one optimizer step of the alignment Bradley-Terry loss. `valid` [groups, n] is format
    validity; malformed rollouts only enter the score regularizer. Returns metrics (same on every rank)."""
    from prism_mcore.trainer.step import StepRunner, lr_at

    batch = alignment_batch(inputs, pad_id, cfg.data.micro_batch_tokens, valid=valid, images=images,
                            group_images=group_images)
    if disc.net.post_process:
        disc.net.head_dropout.reseed(step)
    num_valid = int(valid.sum())
    result = StepRunner(cfg.data.micro_batch_tokens, pad_id).train(
        disc, batch, AlignmentObjective(cfg, num_valid, valid.numel()), lr_at(step, cfg.trainer.steps, disc.optim))
    return {"d_loss": result.metrics["d_loss"], "d_pair_accuracy": result.metrics["d_correct"] / max(1, 2 * num_valid),
            "d_grad_norm": result.grad_norm, "d_nonfinite": int(result.nonfinite)}
