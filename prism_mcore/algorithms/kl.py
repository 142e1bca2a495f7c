"""Per-token KL estimators and entropy. Shapes: [B, T] log-probs of the sampled tokens.

With d = log pi_ref - log pi (samples drawn from pi):
  k1 = -d                  unbiased for KL(pi || pi_ref), high variance, can be negative
  k2 = d^2 / 2             biased as a value, low variance; on-policy its gradient is unbiased for grad KL
  k3 = exp(d) - d - 1      unbiased, non-negative, low variance (Schulman's estimator)
"""
from __future__ import annotations

import torch

KL_TYPES = ("k1", "k2", "k3")


def kl_estimate(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, kind: str = "k3",
                clamp: float | None = 10.0) -> torch.Tensor:
    """`clamp` bounds k3 (exp(d) overflows for a far-off token), as verl's low_var_kl does."""
    d = ref_log_prob - log_prob
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        if clamp is not None:
            d = d.clamp(-clamp, clamp)
        kl = torch.exp(d) - d - 1.0
        return kl.clamp(max=clamp) if clamp is not None else kl
    raise ValueError(f"unknown kl type {kind!r}; expected one of {KL_TYPES}")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [...]: H = logsumexp(z) - sum softmax(z) z."""
    log_z = torch.logsumexp(logits, dim=-1)
    return log_z - (torch.softmax(logits, dim=-1) * logits).sum(-1)
