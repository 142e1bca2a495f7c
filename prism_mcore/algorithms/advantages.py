"""Group-relative advantages: GRPO and PRISM's two-stream multi-reward estimator.

Shapes: per-sample tensors are [N]; `group_index` is an integer tensor [N] naming each sample's
prompt group (any labels; groups may differ in size and need not be contiguous). All group
statistics use scatter ops, so there is no Python loop over groups.
"""
from __future__ import annotations

import torch


def consecutive_groups(num_samples: int, group_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Group labels for a batch laid out as consecutive groups of `group_size` rollouts."""
    if group_size <= 0 or num_samples % group_size:
        raise ValueError(f"num_samples={num_samples} is not a multiple of group_size={group_size}")
    return torch.arange(num_samples, device=device) // group_size


def _dense(group_index: torch.Tensor) -> tuple[torch.Tensor, int]:
    labels, inverse = torch.unique(group_index, return_inverse=True)
    return inverse.view(-1), labels.numel()


def group_scatter(values: torch.Tensor, group_index: torch.Tensor, reduce: str) -> torch.Tensor:
    """Per-group `reduce` ("sum", "amin", "amax", "mean") of `values`, broadcast back to [N]."""
    idx, g = _dense(group_index)
    out = torch.zeros(g, dtype=values.dtype, device=values.device)
    out = out.scatter_reduce(0, idx, values, reduce=reduce, include_self=False)
    return out[idx]


def group_normalize(values: torch.Tensor, group_index: torch.Tensor, eps: float = 1e-6,
                    norm_by_std: bool = True) -> torch.Tensor:
    """(x - mean_G) / (std_G + eps) with the unbiased (N-1) std; without std: x - mean_G.

    Values are shifted by the group minimum before averaging, so a constant group has exactly zero
    deviations (no 1e-17 noise divided by eps). Groups of one sample, and groups with zero std,
    get advantage 0: they carry no relative signal (the original passed a singleton's raw score
    through with mean 0, std 1)."""
    idx, g = _dense(group_index)
    x = values - group_scatter(values, idx, "amin")
    count = torch.zeros(g, dtype=values.dtype, device=values.device).index_add_(0, idx, torch.ones_like(x))[idx]
    mean = torch.zeros(g, dtype=values.dtype, device=values.device).index_add_(0, idx, x)[idx] / count
    centered = x - mean
    if not norm_by_std:
        return torch.where(count > 1, centered, torch.zeros_like(centered))
    sq = torch.zeros(g, dtype=values.dtype, device=values.device).index_add_(0, idx, centered * centered)[idx]
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    keep = (count > 1) & (std > 0)
    return torch.where(keep, centered / (std + eps), torch.zeros_like(centered))


def grpo_advantages(rewards: torch.Tensor, group_index: torch.Tensor, eps: float = 1e-6,
                    norm_by_std: bool = True) -> torch.Tensor:
    """A_i = (R_i - mean_G R) / (std_G R + eps); `norm_by_std=False` is Dr.GRPO's R_i - mean_G R."""
    return group_normalize(rewards.to(torch.float32) if not rewards.is_floating_point() else rewards,
                           group_index, eps, norm_by_std)


def fill_invalid_with_group_floor(scores: torch.Tensor, valid: torch.Tensor, group_index: torch.Tensor,
                                  margin: float = 1.0) -> torch.Tensor:
    """Invalid samples take (min over the group's valid scores) - margin, or -margin when the group has
    no valid sample, so a malformed response always ranks below every well-formed one."""
    valid = valid.to(torch.bool)
    big = torch.finfo(scores.dtype).max
    floor = group_scatter(torch.where(valid, scores, torch.full_like(scores, big)), group_index, "amin")
    has_valid = group_scatter(valid.to(scores.dtype), group_index, "amax") > 0
    floor = torch.where(has_valid, floor, torch.zeros_like(floor)) - margin
    return torch.where(valid, scores, floor)


def prism_advantages(perception_scores: torch.Tensor, reasoning_scores: torch.Tensor, format_valid: torch.Tensor,
                     group_index: torch.Tensor, alpha: float = 0.5, format_penalty: float = 1.5, eps: float = 1e-6,
                     gate_by_format: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A = alpha * A_p + (1 - alpha) * A_r - lambda_fmt * (1 - F), each stream group-normalised after
    invalid samples take their group's floor. `gate_by_format=True` multiplies the alignment term by
    F (the original docstring's form); the default is the released code's form. Returns (A [N], metrics)."""
    valid = format_valid.to(torch.bool)
    fmt = valid.to(perception_scores.dtype)
    a_p = group_normalize(fill_invalid_with_group_floor(perception_scores, valid, group_index), group_index, eps)
    a_r = group_normalize(fill_invalid_with_group_floor(reasoning_scores, valid, group_index), group_index, eps)
    align = alpha * a_p + (1.0 - alpha) * a_r
    if gate_by_format:
        align = align * fmt
    adv = align - format_penalty * (1.0 - fmt)
    metrics = {"perception_adv_abs_mean": a_p.abs().mean().detach(),
               "reasoning_adv_abs_mean": a_r.abs().mean().detach(),
               "format_valid_frac": fmt.mean().detach(), "adv_mean": adv.mean().detach()}
    return adv, metrics


def broadcast_to_tokens(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """[N] -> [N, T]: every response token carries its sample's advantage; padding gets 0."""
    return advantages.unsqueeze(-1) * response_mask.to(advantages.dtype)
