"""DAPO's data-side extras: overlong reward shaping and dynamic sampling (group filtering).

Shapes: per-sample tensors [N] with a `group_index` [N] naming each sample's prompt group.
"""
from __future__ import annotations

import torch

from prism_mcore.algorithms.advantages import group_scatter


def overlong_penalty(response_lengths: torch.Tensor, max_response_length: int, buffer_length: int,
                     penalty_factor: float = 1.0) -> torch.Tensor:
    """min(0, -(L - (L_max - L_buf)) / L_buf * factor): 0 up to L_max - L_buf tokens, then linear
    down to -factor at L_max. L is the valid response length in tokens (EOS included)."""
    if buffer_length <= 0:
        raise ValueError(f"buffer_length must be positive, got {buffer_length}")
    expected = max_response_length - buffer_length
    excess = response_lengths.to(torch.float32) - expected
    return torch.clamp(-excess / buffer_length * penalty_factor, max=0.0)


def groups_with_signal(values: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """[N] bool: the sample's group has at least two distinct values (non-zero std). Singleton
    groups have no signal either; GRPO would give them zero advantage."""
    v = values.to(torch.float64)
    return group_scatter(v, group_index, "amax") > group_scatter(v, group_index, "amin")


def select_groups(values: torch.Tensor, group_index: torch.Tensor, max_groups: int | None = None) -> torch.Tensor:
    """Indices (ascending) of the samples of the groups that have signal, keeping whole groups in
    order of first appearance and at most `max_groups` of them."""
    keep = groups_with_signal(values, group_index)
    if max_groups is not None:
        labels, inverse = torch.unique(group_index, return_inverse=True)
        first = torch.full((labels.numel(),), group_index.numel(), dtype=torch.long, device=group_index.device)
        first = first.scatter_reduce(0, inverse, torch.arange(group_index.numel(), device=group_index.device), "amin")
        kept_groups = torch.zeros(labels.numel(), dtype=torch.bool, device=group_index.device)
        kept_groups[inverse[keep]] = True
        order = torch.argsort(torch.where(kept_groups, first, torch.full_like(first, group_index.numel())))
        allowed = torch.zeros_like(kept_groups)
        allowed[order[:min(max_groups, int(kept_groups.sum()))]] = True
        keep = keep & allowed[inverse]
    return torch.nonzero(keep).view(-1)


class DynamicSampler:
    """Accumulates prompt groups with signal across generation batches until `target_groups` are
    collected. Per batch: `idx = sampler.offer(acc, group_index)`; keep `batch[idx]`; stop when
    `sampler.done`. `exhausted` turns True after `max_gen_batches` batches (0 = unlimited)
    without reaching the target: the trainer then trains on what it has (or skips the step)
    instead of crashing as the original did."""

    def __init__(self, target_groups: int, max_gen_batches: int = 10):
        self.target_groups = target_groups
        self.max_gen_batches = max_gen_batches
        self.num_groups = 0
        self.num_gen_batches = 0

    @property
    def done(self) -> bool:
        return self.num_groups >= self.target_groups

    @property
    def exhausted(self) -> bool:
        return not self.done and 0 < self.max_gen_batches <= self.num_gen_batches

    def offer(self, values: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
        """Indices of this batch's samples to keep (whole groups, truncated to the target)."""
        self.num_gen_batches += 1
        idx = select_groups(values, group_index, max(0, self.target_groups - self.num_groups))
        self.num_groups += int(torch.unique(group_index[idx]).numel())
        return idx
