"""One on-policy update of the policy from scored rollouts: the step that align and rl share.

Every rank holds the whole step's rollouts and per-sample advantages; each data-parallel rank trains on
its share of the rows, in micro-batches by token budget, with the clipped policy loss on response
tokens only (the fused head never sees prompt or padding positions).
"""
from __future__ import annotations

import torch

from prism_mcore.config import PrismConfig

# AlgorithmConfig field -> PolicyLossConfig field; fields set in the config override the algorithm's preset.
_LOSS_FIELDS = {"clip_ratio_low": "clip_low", "clip_ratio_high": "clip_high", "clip_ratio_c": "clip_ratio_c",
                "loss_agg_mode": "agg_mode"}


def loss_config(cfg: PrismConfig):
    from prism_mcore.algorithms.policy_loss import PolicyLossConfig

    explicit = {ours: getattr(cfg.algorithm, field) for field, ours in _LOSS_FIELDS.items()
                if field in cfg.algorithm.model_fields_set}
    return PolicyLossConfig.preset(cfg.algorithm.name, **explicit)


def sequences(prompts: list[list[int]], responses: list[list], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompt + response rows (responses[i] are prompt i's rollouts), next-token labels, the response
    mask on targets, and the engine's log-probs of the sampled tokens."""
    rows, masks, engine_lp = [], [], []
    for prompt, group in zip(prompts, responses):
        for r in group:
            rows.append(prompt + r.token_ids)
            masks.append([0] * (len(prompt) - 1) + [1] * len(r.token_ids))
            engine_lp.append([0.0] * (len(prompt) - 1) + list(r.logprobs))
    length = max(map(len, rows)) - 1
    tokens = torch.full((len(rows), length + 1), pad_id, dtype=torch.long)
    mask, rollout_lp = torch.zeros(len(rows), length), torch.zeros(len(rows), length)
    for i, (r, m, lp) in enumerate(zip(rows, masks, engine_lp)):
        tokens[i, : len(r)] = torch.tensor(r)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.float32)
        rollout_lp[i, : len(lp)] = torch.tensor(lp)
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(), "response_mask": mask,
            "rollout_logprobs": rollout_lp}


def _forward_step(cfg: PrismConfig, loss_cfg, total_tokens: float, num_micro: int, dp: int):
    from prism_mcore.algorithms.policy_loss import policy_loss
    from prism_mcore.models.qwen3.logprob_head import hidden_to_logprobs

    def forward_step(batch, model):
        b, s = batch["tokens"].shape
        hidden = model(batch["tokens"], torch.arange(s).unsqueeze(0).expand(b, s), None)
        gpt = model.module if hasattr(model, "module") else model

        def loss_fn(h):
            logp, entropy = hidden_to_logprobs(gpt, h, batch["labels"], cfg.model.vocab_size,
                                               temperature=max(cfg.rollout.temperature, 1e-6),
                                               only=batch["response_mask"])
            # one update per batch of rollouts: the old policy is the current one (ratio 1, as in the
            # original's single mini-batch); the engine's log-probs only feed the mismatch metric
            loss, stats = policy_loss(logp, None, batch["advantages"], batch["response_mask"], loss_cfg,
                                      rollout_log_prob=batch["rollout_logprobs"], entropy=entropy,
                                      num_tokens=total_tokens)
            # token-mean over the global batch: undo Megatron's 1/num_micro and DDP's 1/dp
            return loss * num_micro * dp, {k: v.detach().clone().float() for k, v in stats.items()
                                           if torch.is_tensor(v) and v.dim() == 0}

        return hidden, loss_fn

    return forward_step


def update_policy(policy, cfg: PrismConfig, batch: dict[str, torch.Tensor], advantages: torch.Tensor, step: int):
    """Collective: one optimizer step on `batch` (from `sequences`) with per-sample `advantages` [N].
    Returns (StepResult, mean train/rollout mismatch KL over this rank's micro-batches)."""
    from megatron.core import parallel_state as ps

    from prism_mcore.algorithms.advantages import broadcast_to_tokens

    batch = dict(batch, advantages=broadcast_to_tokens(advantages, batch["response_mask"]))
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    rows = list(range(len(advantages)))[dp_rank::dp]
    mine = {k: v[rows] for k, v in batch.items()}
    length = mine["tokens"].shape[1]
    per_micro = max(1, cfg.data.micro_batch_tokens // length)
    micro = [{k: v[i:i + per_micro] for k, v in mine.items()} for i in range(0, len(rows), per_micro)]
    total = float(batch["response_mask"].sum())
    result = policy.train(_forward_step(cfg, loss_config(cfg), total, len(micro), dp), micro, seq_length=length,
                          micro_batch_size=per_micro, step=step, total_steps=cfg.trainer.steps)
    mismatch = [d["mismatch_kl"] for d in result.losses if "mismatch_kl" in d]
    return result, float(sum(mismatch) / max(1, len(mismatch)))
