"""Policy-gradient losses: PPO clip with dual clip (GRPO, PRISM), DAPO clip-higher, GSPO.

Shapes: log_prob, old_log_prob, advantages, response_mask, and the optional rollout_log_prob,
ref_log_prob, entropy are all [B, T] (advantages already broadcast to tokens). `policy_loss`
returns (scalar loss, metrics of detached 0-dim tensors); nothing here calls `.item()`, so
computing metrics never forces a device sync.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from prism_mcore.algorithms.aggregation import LossNormalizer
from prism_mcore.algorithms.kl import kl_estimate
from prism_mcore.algorithms.presets import ALGORITHM_PRESETS

POLICY_LOSS_MODES = ("vanilla", "gspo")

@dataclass(frozen=True)
class PolicyLossConfig:
    mode: str = "vanilla"                # "vanilla" (PPO / DAPO token-ratio clip) or "gspo"
    clip_low: float = 0.2                # ratio floor 1 - clip_low
    clip_high: float = 0.2               # ratio ceiling 1 + clip_high (DAPO: 0.28)
    clip_ratio_c: float | None = 3.0     # dual clip for A < 0; None disables (GSPO has none)
    agg_mode: str = "token-mean"
    log_ratio_clamp: float = 20.0        # |log ratio| bound before exp (GSPO: 10)
    kl_coef: float = 0.0                 # KL-to-reference loss weight; 0 disables
    kl_type: str = "k3"
    entropy_coef: float = 0.0            # entropy bonus weight; 0 disables
    tis_cap: float | None = None         # truncated importance sampling vs rollout log-probs; None = off

    @classmethod
    def preset(cls, algorithm: str, **overrides) -> "PolicyLossConfig":
        """The original scripts' settings for "grpo", "prism", "dapo" and "gspo" (ALGORITHM_PRESETS)."""
        if algorithm not in ALGORITHM_PRESETS:
            raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {sorted(ALGORITHM_PRESETS)}")
        p = ALGORITHM_PRESETS[algorithm]
        base = cls(mode="gspo" if algorithm == "gspo" else "vanilla", clip_low=p["clip_ratio_low"],
                   clip_high=p["clip_ratio_high"], clip_ratio_c=p["clip_ratio_c"], agg_mode=p["loss_agg_mode"],
                   log_ratio_clamp=10.0 if algorithm == "gspo" else 20.0)
        return replace(base, **overrides)


def _clipped_objective(ratio, advantages, clip_low, clip_high, clip_ratio_c):
    """max(-A r, -A clip(r, 1-eps_low, 1+eps_high)), then min(., -A c) where A < 0 (dual clip)."""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    losses = torch.maximum(unclipped, clipped)
    flags = {"clip_frac_low": (advantages < 0) & (ratio < 1.0 - clip_low),
             "clip_frac_high": (advantages > 0) & (ratio > 1.0 + clip_high)}
    if clip_ratio_c is not None:
        dual = -advantages * clip_ratio_c
        flags["clip_frac_dual"] = (advantages < 0) & (losses > dual)
        losses = torch.where(advantages < 0, torch.minimum(losses, dual), losses)
    return losses, flags


def ppo_token_losses(log_prob, old_log_prob, advantages, cfg: PolicyLossConfig):
    """Per-token ratio r_t = exp(clamp(log pi - log pi_old)). Returns (losses [B,T], r, clip flags)."""
    log_ratio = (log_prob - old_log_prob).clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    losses, flags = _clipped_objective(ratio, advantages, cfg.clip_low, cfg.clip_high, cfg.clip_ratio_c)
    return losses, ratio, flags


def gspo_token_losses(log_prob, old_log_prob, advantages, response_mask, cfg: PolicyLossConfig):
    """s_i = exp(mean_t (log pi - log pi_old)) over the response; per token
    s_it = exp(sg[log s_i] + log pi_t - sg[log pi_t]): its value is s_i, its gradient is
    s_i * grad log pi_t, so with seq-mean-token-mean the tokens share grad s_i = s_i * mean_t grad log pi_t."""
    mask = response_mask.to(log_prob.dtype)
    lengths = mask.sum(-1, keepdim=True).clamp(min=1)
    log_seq_ratio = ((log_prob - old_log_prob) * mask).sum(-1, keepdim=True) / lengths
    log_token_ratio = log_seq_ratio.detach() + log_prob - log_prob.detach()
    ratio = torch.exp(log_token_ratio.clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp))
    losses, flags = _clipped_objective(ratio, advantages, cfg.clip_low, cfg.clip_high, cfg.clip_ratio_c)
    return losses, ratio, flags


def _ratio_stats(ratio: torch.Tensor, mask: torch.Tensor, norm: LossNormalizer) -> dict[str, torch.Tensor]:
    r = ratio.detach()
    any_token = mask.any()
    one = torch.ones((), dtype=r.dtype, device=r.device)
    return {"ratio_mean": norm.token_share(r, mask),
            "ratio_min": torch.where(any_token, torch.where(mask, r, torch.full_like(r, float("inf"))).min(), one),
            "ratio_max": torch.where(any_token, torch.where(mask, r, torch.full_like(r, float("-inf"))).max(), one)}


def policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor | None, advantages: torch.Tensor,
                response_mask: torch.Tensor, cfg: PolicyLossConfig = PolicyLossConfig(), *,
                rollout_log_prob: torch.Tensor | None = None, ref_log_prob: torch.Tensor | None = None,
                entropy: torch.Tensor | None = None,
                norm: LossNormalizer | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy loss + kl_coef * KL(pi || pi_ref) - entropy_coef * H, each aggregated with
    `cfg.agg_mode`. `old_log_prob=None` means on-policy (old = sg[log pi], ratio exactly 1).

    `norm` carries the global counts of a batch split into micro-batches (see `aggregation.LossNormalizer`);
    without it this batch is the whole batch. Metrics are this batch's shares of the global token means
    (they add up over micro-batches), except `*_min` / `*_max`."""
    mask = response_mask.to(torch.bool)
    if norm is None:
        norm = LossNormalizer.local(mask, cfg.agg_mode)
    if norm.mode != cfg.agg_mode:
        raise ValueError(f"normaliser mode {norm.mode!r} differs from the loss's agg_mode {cfg.agg_mode!r}")
    if old_log_prob is None:
        old_log_prob = log_prob.detach()
    if cfg.mode == "vanilla":
        losses, ratio, flags = ppo_token_losses(log_prob, old_log_prob, advantages, cfg)
    elif cfg.mode == "gspo":
        losses, ratio, flags = gspo_token_losses(log_prob, old_log_prob, advantages, mask, cfg)
    else:
        raise ValueError(f"unknown policy loss mode {cfg.mode!r}; expected one of {POLICY_LOSS_MODES}")

    metrics: dict[str, torch.Tensor] = {}
    if rollout_log_prob is not None:
        # Rollout engine and trainer disagree (kernels, precision); correct with a truncated
        # importance weight pi_old / pi_rollout on the samples the engine actually drew.
        d = (old_log_prob - rollout_log_prob).detach()
        metrics["mismatch_kl"] = norm.token_share(torch.exp(d) - d - 1.0, mask)
        metrics["mismatch_kl_k1"] = norm.token_share(-d, mask)
        if cfg.tis_cap is not None:
            weight = torch.exp(d.clamp(max=cfg.log_ratio_clamp)).clamp(max=cfg.tis_cap)
            losses = losses * weight
            metrics["tis_weight_mean"] = norm.token_share(weight, mask)
            metrics["tis_clip_frac"] = norm.token_share((weight >= cfg.tis_cap).to(weight.dtype), mask)
    elif cfg.tis_cap is not None:
        raise ValueError("tis_cap is set but no rollout_log_prob was given")

    loss = norm.loss(losses, mask)
    metrics["pg_loss"] = norm.share(losses, mask).detach()
    if cfg.kl_coef:
        if ref_log_prob is None:
            raise ValueError("kl_coef > 0 needs ref_log_prob")
        kl = kl_estimate(log_prob, ref_log_prob, cfg.kl_type)
        loss = loss + cfg.kl_coef * norm.loss(kl, mask)
        metrics["kl_loss"] = norm.share(kl, mask).detach()
    if cfg.entropy_coef:
        if entropy is None:
            raise ValueError("entropy_coef != 0 needs entropy")
        loss = loss - cfg.entropy_coef * norm.loss(entropy, mask)
        metrics["entropy"] = norm.share(entropy, mask).detach()

    fdt = losses.dtype
    any_clip = torch.zeros_like(mask)
    for name, flag in flags.items():
        metrics[name] = norm.token_share(flag.to(fdt), mask)
        any_clip = any_clip | flag
    metrics["clip_frac"] = norm.token_share(any_clip.to(fdt), mask)
    metrics["approx_kl"] = norm.token_share((old_log_prob - log_prob).detach(), mask)
    metrics.update(_ratio_stats(ratio, mask, norm))
    return loss, metrics
