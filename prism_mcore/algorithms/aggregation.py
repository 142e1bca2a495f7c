"""Masked reductions, the four loss-aggregation modes, and the one loss normaliser every stage uses.
Shapes: values, mask [B, T].

Every mode is a sum over the batch divided by one global count:

    token-mean:               sum_{i,t} l m                  / N_tok
    seq-mean-token-sum:       sum_i sum_t l m                / N_seq
    seq-mean-token-mean:      sum_i (sum_t l m / |y_i|)      / N_seq
    seq-mean-token-sum-norm:  sum_i sum_t l m / L            / N_seq     (Dr.GRPO; L a constant length)

so a batch cut into micro-batches (and data-parallel ranks) gets the exact full-batch loss when every
micro-batch divides its own numerator by the *global* count: `LossNormalizer` does that, and also undoes
the 1/num_micro that Megatron's schedule applies and the 1/dp that DDP's gradient averaging applies.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    masked = values * mask.to(values.dtype)
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    count = mask.to(values.dtype).sum() if dim is None else mask.to(values.dtype).sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def _check_mode(mode: str) -> None:
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {mode!r}; expected one of {AGG_MODES}")


def aggregate_numerator(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
                        norm_length: float | None = None) -> torch.Tensor:
    """The mode's sum over these rows (before the division by the global count)."""
    _check_mode(mode)
    m = mask.to(loss_mat.dtype)
    if mode == "token-mean" or mode == "seq-mean-token-sum":
        return (loss_mat * m).sum()
    if mode == "seq-mean-token-mean":
        return ((loss_mat * m).sum(-1) / m.sum(-1).clamp(min=1)).sum()
    length = norm_length if norm_length is not None else loss_mat.shape[-1]
    return (loss_mat * m).sum() / length


def aggregate_count(mask: torch.Tensor, mode: str = "token-mean") -> torch.Tensor:
    """The mode's count over these rows: loss tokens, or sequences with at least one loss token (an
    all-padding row does not dilute a sequence mean)."""
    _check_mode(mode)
    m = mask.to(torch.float64)
    return m.sum() if mode == "token-mean" else (m.sum(-1) > 0).sum().to(torch.float64)


def aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", *,
              norm_length: float | None = None) -> torch.Tensor:
    """The mode's mean over these rows alone (a batch that is not split). Split batches use
    `LossNormalizer`, whose counts are global."""
    count = float(aggregate_count(mask, mode))
    return aggregate_numerator(loss_mat, mask, mode, norm_length) / max(count, 1.0)


@dataclass(frozen=True)
class LossNormalizer:
    """Turns a micro-batch's numerator into its share of the global mean.

    `num_tokens` / `num_seqs` are global (the whole optimizer step's batch, summed over data-parallel
    ranks); `scale` is num_micro_batches x dp, the factor Megatron's schedule (1/num_micro) and DDP's
    gradient averaging (1/dp) take away. `loss` is what backward sees; `share` is the same value
    without `scale`, so that the shares of all micro-batches on all ranks add up to the global mean
    (what metrics report)."""

    mode: str = "token-mean"
    num_tokens: float = 1.0
    num_seqs: float = 1.0
    scale: float = 1.0
    norm_length: float | None = None

    def __post_init__(self) -> None:
        _check_mode(self.mode)

    @property
    def count(self) -> float:
        """The mode's global denominator (at least 1: an empty batch gives a zero loss, not NaN)."""
        return max(self.num_tokens if self.mode == "token-mean" else self.num_seqs, 1.0)

    def loss(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return aggregate_numerator(values, mask, self.mode, self.norm_length) * (self.scale / self.count)

    def share(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return aggregate_numerator(values, mask, self.mode, self.norm_length) / self.count

    def token_share(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """This micro-batch's share of the global token mean of `values`, whatever the mode (metrics
        such as clip fractions are per token)."""
        return masked_sum(values, mask) / max(self.num_tokens, 1.0)

    def loss_of_sum(self, numerator: torch.Tensor, count: float) -> torch.Tensor:
        """For losses that are not per token (per pair, per comparison): numerator / global count, with
        the schedule's and DDP's factors undone."""
        return numerator * (self.scale / max(count, 1.0))

    @staticmethod
    def local(mask: torch.Tensor, mode: str = "token-mean", norm_length: float | None = None) -> "LossNormalizer":
        """Counts of this batch alone: the plain mean of an unsplit batch."""
        return LossNormalizer(mode, float(aggregate_count(mask, "token-mean")),
                              float(aggregate_count(mask, "seq-mean-token-sum")), 1.0, norm_length)
