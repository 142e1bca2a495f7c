"""Masked reductions and the four loss-aggregation modes. Shapes: values, mask [B, T].

Micro-batching: pass the *global* `num_tokens` / `num_seqs` of the whole (mini-)batch, summed over
data-parallel ranks, and the per-micro-batch losses then add up to the loss of the whole batch.
Without them the denominators are local, which over-weights small micro-batches.
"""
from __future__ import annotations

import torch

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    masked = values * mask.to(values.dtype)
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    count = mask.to(values.dtype).sum() if dim is None else mask.to(values.dtype).sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", *,
              num_tokens: float | torch.Tensor | None = None, num_seqs: float | torch.Tensor | None = None,
              norm_length: float | None = None) -> torch.Tensor:
    """
    token-mean:               sum_{i,t} l m / N_tok
    seq-mean-token-sum:       (1/N_seq) sum_i sum_t l m
    seq-mean-token-mean:      (1/N_seq) sum_i (sum_t l m / |y_i|)
    seq-mean-token-sum-norm:  (1/N_seq) sum_i sum_t l m / L   (Dr.GRPO; L = `norm_length`, default T)

    N_seq counts sequences with at least one token, so all-padding rows do not dilute the mean.
    """
    m = mask.to(loss_mat.dtype)
    token_sums = (loss_mat * m).sum(-1)
    lengths = m.sum(-1)
    seqs = num_seqs if num_seqs is not None else (lengths > 0).sum().clamp(min=1)
    if mode == "token-mean":
        tokens = num_tokens if num_tokens is not None else lengths.sum().clamp(min=1)
        return token_sums.sum() / tokens
    if mode == "seq-mean-token-sum":
        return token_sums.sum() / seqs
    if mode == "seq-mean-token-mean":
        return (token_sums / lengths.clamp(min=1)).sum() / seqs
    if mode == "seq-mean-token-sum-norm":
        length = norm_length if norm_length is not None else loss_mat.shape[-1]
        return token_sums.sum() / (seqs * length)
    raise ValueError(f"unknown loss_agg_mode {mode!r}; expected one of {AGG_MODES}")
