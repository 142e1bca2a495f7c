"""Per-token KL estimators and entropy. Shapes: [B, T] log-probs of the sampled tokens.

With d = log pi_ref - log pi (samples drawn from pi):
  k1 = -d                  unbiased for KL(pi || pi_ref), high variance, can be negative
  k2 = d^2 / 2             biased as a value, low variance; on-policy its gradient is unbiased for grad KL
  k3 = exp(d) - d - 1      unbiased, non-negative, low variance (Schulman's estimator)
"""
from __future__ import annotations

import torch

KL_TYPES = ("k1", "k2", "k3")
LOG_RATIO_CLAMP = 20.0  # |log pi_ref - log pi| bound before exp (verl low_var_kl)
K3_VALUE_CLAMP = 10.0  # bound of the k3 value itself


def kl_estimate(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate. k3 is verl's `low_var_kl`: the log-ratio is clamped to
    +-LOG_RATIO_CLAMP before `exp` (exp(d) overflows for a far-off token), then the value to
    +-K3_VALUE_CLAMP (one token cannot dominate the loss)."""
    d = ref_log_prob - log_prob
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        d = d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return (torch.exp(d) - d - 1.0).clamp(-K3_VALUE_CLAMP, K3_VALUE_CLAMP)
    raise ValueError(f"unknown kl type {kind!r}; expected one of {KL_TYPES}")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [...]: H = logsumexp(z) - sum softmax(z) z."""
    log_z = torch.logsumexp(logits, dim=-1)
    return log_z - (torch.softmax(logits, dim=-1) * logits).sum(-1)
