"""Policy-gradient losses: PPO clip with dual clip (GRPO, PRISM), DAPO clip-higher, GSPO.

Shapes: log_prob, old_log_prob, advantages, response_mask, and the optional rollout_log_prob,
ref_log_prob, entropy are all [B, T] (advantages already broadcast to tokens). `policy_loss`
returns (scalar loss, metrics of detached 0-dim tensors); nothing here calls `.item()`, so
computing metrics never forces a device sync.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from prism_mcore.algorithms.aggregation import aggregate, masked_mean
from prism_mcore.algorithms.kl import kl_estimate

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
        """The original scripts' settings for "grpo", "prism", "dapo" and "gspo"."""
        presets = {
            "grpo": cls(),
            "prism": cls(),
            "dapo": cls(clip_low=0.2, clip_high=0.28, clip_ratio_c=10.0),
            "gspo": cls(mode="gspo", clip_low=3e-4, clip_high=4e-4, clip_ratio_c=None,
                        agg_mode="seq-mean-token-mean", log_ratio_clamp=10.0),
        }
        if algorithm not in presets:
            raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {sorted(presets)}")
        return replace(presets[algorithm], **overrides)


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


def _ratio_stats(ratio: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    r = ratio.detach()
    any_token = mask.any()
    one = torch.ones((), dtype=r.dtype, device=r.device)
    return {"ratio_mean": masked_mean(r, mask),
            "ratio_min": torch.where(any_token, torch.where(mask, r, torch.full_like(r, float("inf"))).min(), one),
            "ratio_max": torch.where(any_token, torch.where(mask, r, torch.full_like(r, float("-inf"))).max(), one)}


def policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor | None, advantages: torch.Tensor,
                response_mask: torch.Tensor, cfg: PolicyLossConfig = PolicyLossConfig(), *,
                rollout_log_prob: torch.Tensor | None = None, ref_log_prob: torch.Tensor | None = None,
                entropy: torch.Tensor | None = None, num_tokens=None, num_seqs=None,
                norm_length: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy loss + kl_coef * KL(pi || pi_ref) - entropy_coef * H, each aggregated with
    `cfg.agg_mode`. `old_log_prob=None` means on-policy (old = sg[log pi], ratio exactly 1).
    `num_tokens` / `num_seqs` / `norm_length`: see `aggregation.aggregate`."""
    mask = response_mask.to(torch.bool)
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
        metrics["mismatch_kl"] = masked_mean(torch.exp(d) - d - 1.0, mask)
        metrics["mismatch_kl_k1"] = masked_mean(-d, mask)
        if cfg.tis_cap is not None:
            weight = torch.exp(d.clamp(max=cfg.log_ratio_clamp)).clamp(max=cfg.tis_cap)
            losses = losses * weight
            metrics["tis_weight_mean"] = masked_mean(weight, mask)
            metrics["tis_clip_frac"] = masked_mean((weight >= cfg.tis_cap).to(weight.dtype), mask)
    elif cfg.tis_cap is not None:
        raise ValueError("tis_cap is set but no rollout_log_prob was given")

    agg = dict(num_tokens=num_tokens, num_seqs=num_seqs, norm_length=norm_length)
    pg_loss = aggregate(losses, mask, cfg.agg_mode, **agg)
    loss = pg_loss
    if cfg.kl_coef:
        if ref_log_prob is None:
            raise ValueError("kl_coef > 0 needs ref_log_prob")
        kl_loss = aggregate(kl_estimate(log_prob, ref_log_prob, cfg.kl_type), mask, cfg.agg_mode, **agg)
        loss = loss + cfg.kl_coef * kl_loss
        metrics["kl_loss"] = kl_loss.detach()
    if cfg.entropy_coef:
        if entropy is None:
            raise ValueError("entropy_coef != 0 needs entropy")
        ent = aggregate(entropy, mask, cfg.agg_mode, **agg)
        loss = loss - cfg.entropy_coef * ent
        metrics["entropy"] = ent.detach()

    fdt = losses.dtype
    any_clip = torch.zeros_like(mask)
    for name, flag in flags.items():
        metrics[name] = masked_mean(flag.to(fdt), mask)
        any_clip = any_clip | flag
    metrics["clip_frac"] = masked_mean(any_clip.to(fdt), mask)
    metrics["approx_kl"] = masked_mean((old_log_prob - log_prob).detach(), mask)
    metrics["pg_loss"] = pg_loss.detach()
    metrics.update(_ratio_stats(ratio, mask))
    return loss, metrics
