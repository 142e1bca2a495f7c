"""Discriminator objectives: pairwise Bradley-Terry (warmup and Stage-2 alignment), score
clipping, last-token score readout, and the Switch-style MoE load-balancing loss.

Shapes: per-sample scores [B]; token scores and masks [B, S]; router logits [L, N, E] (or a list
of L tensors [N, E]) with N = B * S tokens in the attention mask's row-major order.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

SCORE_CLIP_MODES = ("hard", "tanh", "none")


def clip_scores(scores: torch.Tensor, limit: float = 10.0, mode: str = "hard") -> torch.Tensor:
    """hard: clamp to [-limit, limit] (the original; the gradient is exactly 0 past the limit, so a
    discriminator that saturates on a sample stops learning from it); tanh: limit * tanh(s / limit),
    the same range with a gradient everywhere; none: unchanged."""
    if mode == "hard":
        return scores.clamp(-limit, limit)
    if mode == "tanh":
        return limit * torch.tanh(scores / limit)
    if mode == "none":
        return scores
    raise ValueError(f"unknown score clip mode {mode!r}; expected one of {SCORE_CLIP_MODES}")


def last_token_scores(token_scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, S] -> [B]: each row's score at its own last valid token, for left, right or mixed padding
    (the original looked only at row 0 to guess the padding side). Empty rows read index 0."""
    mask = attention_mask.to(torch.bool)
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, torch.zeros_like(positions)).amax(-1)
    return token_scores.gather(-1, last.unsqueeze(-1)).squeeze(-1)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per pair -log sigmoid(s_chosen - s_rejected), via logsigmoid for stability. [B] -> [B]."""
    return -F.logsigmoid(chosen - rejected)


def warmup_pair_loss(teacher_scores: torch.Tensor, student_scores: torch.Tensor, aux_loss: torch.Tensor | None = None,
                     aux_coef: float = 0.01) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MoE warmup: mean_i -log sigmoid(s_T,i - s_S,i) + aux_coef * L_aux."""
    bt = bradley_terry_loss(teacher_scores, student_scores).mean()
    loss = bt if aux_loss is None else bt + aux_coef * aux_loss
    metrics = {"bt_loss": bt.detach(), "pair_acc": (teacher_scores > student_scores).float().mean().detach(),
               "margin": (teacher_scores - student_scores).mean().detach()}
    if aux_loss is not None:
        metrics["aux_loss"] = aux_loss.detach()
    return loss, metrics


def alignment_discriminator_loss(student_perception: torch.Tensor, student_reasoning: torch.Tensor,
                                 teacher_perception: torch.Tensor, teacher_reasoning: torch.Tensor,
                                 valid: torch.Tensor, *, score_clip: float = 10.0, clip_mode: str = "hard",
                                 score_reg_coef: float = 1e-3, fallback_coef: float = 0.01,
                                 num_valid: float | torch.Tensor | None = None,
                                 global_num_valid: float | torch.Tensor | None = None,
                                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage-2 discriminator loss on raw scores [B] (clipped here with `clip_mode`):

    L = (1/n_v) sum_i v_i [BT(s*_p,i, s_p,i) + BT(s*_r,i, s_r,i)]
        + reg/4 * (mean s_p^2 + mean s_r^2 + mean s*_p^2 + mean s*_r^2)      (all samples)

    n_v = `num_valid` if given (pass the mini-batch's global count so that micro-batch losses add
    up), else max(1, local sum v). When `global_num_valid` (the count over every rank; default the
    local one) is 0, the pair term is replaced by fallback_coef * (BT(mean s*_p, 0) + BT(mean s*_r, 0)),
    which keeps pushing teacher scores up and keeps every rank's graph identical."""
    sp, sr, tp, tr = (clip_scores(s, score_clip, clip_mode)
                      for s in (student_perception, student_reasoning, teacher_perception, teacher_reasoning))
    v = valid.to(sp.dtype)
    local_valid = v.sum()
    denom = torch.as_tensor(num_valid, dtype=sp.dtype, device=sp.device) if num_valid is not None else local_valid
    denom = denom.clamp(min=1)
    loss_p = (bradley_terry_loss(tp, sp) * v).sum() / denom
    loss_r = (bradley_terry_loss(tr, sr) * v).sum() / denom
    fallback = fallback_coef * (-F.logsigmoid(tp.mean()) - F.logsigmoid(tr.mean()))
    total_valid = local_valid if global_num_valid is None else torch.as_tensor(global_num_valid, device=sp.device)
    pair = torch.where(total_valid > 0, loss_p + loss_r, fallback)
    reg = (sp.square().mean() + sr.square().mean() + tp.square().mean() + tr.square().mean()) / 4.0
    loss = pair + score_reg_coef * reg
    n = local_valid.clamp(min=1)
    metrics = {"d_loss": loss.detach(), "perception_loss": loss_p.detach(), "reasoning_loss": loss_r.detach(),
               "score_reg": reg.detach(), "valid_frac": v.mean().detach(),
               "perception_acc": (((tp > sp).to(v.dtype)) * v).sum().detach() / n,
               "reasoning_acc": (((tr > sr).to(v.dtype)) * v).sum().detach() / n,
               "student_perception_mean": (sp * v).sum().detach() / n,
               "student_reasoning_mean": (sr * v).sum().detach() / n,
               "teacher_perception_mean": tp.mean().detach(), "teacher_reasoning_mean": tr.mean().detach()}
    return loss, metrics


def load_balancing_loss(router_logits: torch.Tensor | Sequence[torch.Tensor], top_k: int,
                        attention_mask: torch.Tensor | None = None, per_layer: bool = False) -> torch.Tensor:
    """Switch-style auxiliary loss E * sum_e f_e * P_e, where f_e is the fraction of (token, choice)
    top-k assignments sent to expert e and P_e the mean router probability of e, over unmasked
    tokens. As in HF Qwen3-MoE (what the original trained with), f counts all k choices, so a
    perfectly balanced router scores top_k, and by default all layers are pooled before the
    product; `per_layer=True` averages per-layer losses instead (balance within every layer)."""
    logits = torch.stack(list(router_logits)) if not torch.is_tensor(router_logits) else router_logits
    num_layers, num_tokens, num_experts = logits.shape
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices
    counts = torch.zeros_like(probs).scatter_add_(-1, chosen, torch.ones_like(chosen, dtype=probs.dtype))
    if attention_mask is None:
        weight = torch.ones(num_tokens, dtype=probs.dtype, device=probs.device)
    else:
        weight = attention_mask.reshape(-1).to(probs.dtype)
    w = weight.view(1, -1, 1)
    if per_layer:
        denom = weight.sum().clamp(min=1)
        f, p = (counts * w).sum(1) / denom, (probs * w).sum(1) / denom
        return (num_experts * (f * p).sum(-1)).mean()
    denom = (weight.sum() * num_layers).clamp(min=1)
    f, p = (counts * w).sum((0, 1)) / denom, (probs * w).sum((0, 1)) / denom
    return num_experts * (f * p).sum()
