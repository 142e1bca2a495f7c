"""The policy update from scored rollouts, shared by align and rl: PPO mini-batches and epochs, the old
policy's log-probs, truncated importance sampling, through the step runner.

Every rank holds the whole step's rollouts and per-sample advantages as one `Batch`. With the default
settings (one mini-batch, one epoch) the update is on-policy: the ratio is exactly 1 and the old policy is
the current one, detached (no extra forward pass). With `algorithm.ppo_mini_batch_size` below the step's
prompts, or `ppo_epochs` > 1, the old policy's log-probs are computed once, without grad, before the first
update (as verl does), so later mini-batches see ratios != 1 and the clip ranges bind.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from prism_mcore.config import PrismConfig


def loss_config(cfg: PrismConfig):
    """The policy loss as the validated config says (the schema fills unset fields from the algorithm's
    preset, so this is what `prism validate` shows)."""
    from prism_mcore.algorithms.policy_loss import PolicyLossConfig

    a = cfg.algorithm
    return PolicyLossConfig.preset(a.name, clip_low=a.clip_ratio_low, clip_high=a.clip_ratio_high,
                                   clip_ratio_c=a.clip_ratio_c, agg_mode=a.loss_agg_mode, tis_cap=a.tis_cap)


def rollout_batch(prompts: list[list[int]], responses: list[list], pad_id: int, images=None, prompt_images=()):
    """Prompt + response rows (responses[i] are prompt i's rollouts, in order), next-token labels, the
    response mask on targets, the engine's log-probs of the sampled tokens, and each row's prompt
    (extra["prompt"]) for cutting mini-batches by prompt. With images (a StageImages), each row carries its
    prompt's `prompt_images[i]`."""
    from prism_mcore.data.batch import next_token_batch
    from prism_mcore.trainer.images import attach_images

    rows, masks, engine_lp, prompt_of = [], [], [], []
    for p, (prompt, group) in enumerate(zip(prompts, responses)):
        for r in group:
            rows.append(prompt + r.token_ids)
            masks.append([0] * (len(prompt) - 1) + [1] * len(r.token_ids))
            engine_lp.append([0.0] * (len(prompt) - 1) + list(r.logprobs))
            prompt_of.append(p)
    batch = next_token_batch(rows, masks, pad_id, rollout_logprobs=engine_lp)
    batch.extra["prompt"] = torch.tensor(prompt_of)
    return attach_images(batch, images, [prompt_images[p] for p in prompt_of] if images is not None else [])


class PolicyObjective:
    """The clipped policy loss on response tokens, aggregated by `algorithm.loss_agg_mode` over the whole
    (mini-)batch. Log-probs at the sampling temperature, as the engine's."""

    def __init__(self, loss_cfg, vocab_size: int, temperature: float, norm_length: float):
        self.loss_cfg, self.vocab_size = loss_cfg, vocab_size
        self.temperature = max(temperature, 1e-6)
        self.mode, self.norm_length = loss_cfg.agg_mode, norm_length

    def step(self, net, batch, norm):
        from prism_mcore.algorithms.policy_loss import policy_loss
        from prism_mcore.models.qwen3.logprob_head import hidden_to_logprobs, lm_hidden, unwrap

        hidden = lm_hidden(net, batch)

        def loss_fn(h):
            logp, entropy = hidden_to_logprobs(unwrap(net), h, batch.labels, self.vocab_size,
                                               temperature=self.temperature, only=batch.loss_mask)
            return policy_loss(logp, batch.old_logprobs, batch.advantages, batch.loss_mask, self.loss_cfg,
                               rollout_log_prob=batch.rollout_logprobs, entropy=entropy, norm=norm)

        return hidden, loss_fn


def sequence_logprobs(runner, model, batch, vocab_size: int, temperature: float = 1.0) -> torch.Tensor:
    """Collective, no grad: the model's log-probs [B, S] of `batch.labels` where `batch.loss_mask` is set."""
    from prism_mcore.models.qwen3.logprob_head import hidden_to_logprobs, lm_hidden, unwrap

    def score(net, micro):
        hidden = lm_hidden(net, micro)

        def collect(h):
            logp, _ = hidden_to_logprobs(unwrap(net), h, micro.labels, vocab_size, temperature=max(temperature, 1e-6),
                                         with_entropy=False, only=micro.loss_mask)
            return {"logp": logp}

        return hidden, collect

    return runner.forward(model, batch, score)["logp"]


def mini_batches(num_prompts: int, per_update: int | None) -> list[list[int]]:
    """Prompt indices of each update: consecutive runs of `per_update` prompts (the last may be short)."""
    size = per_update or num_prompts
    return [list(range(lo, min(lo + size, num_prompts))) for lo in range(0, num_prompts, size)]


def policy_updates(policy, cfg: PrismConfig, batch, advantages: torch.Tensor, step: int, runner) -> list:
    """Collective: the step's policy updates on `batch` (from `rollout_batch`) with per-sample `advantages`
    [N]: `algorithm.ppo_epochs` passes over mini-batches of `algorithm.ppo_mini_batch_size` prompts, each
    one optimizer step at the step's learning rate. Returns each update's StepResult."""
    from prism_mcore.algorithms.advantages import broadcast_to_tokens
    from prism_mcore.trainer.step import lr_at

    a = cfg.algorithm
    batch = replace(batch, advantages=broadcast_to_tokens(advantages, batch.loss_mask))
    prompt_of = batch.extra["prompt"]
    groups = mini_batches(int(prompt_of.max()) + 1 if len(prompt_of) else 0, a.ppo_mini_batch_size)
    if len(groups) > 1 or a.ppo_epochs > 1:
        old = sequence_logprobs(runner, policy, batch, cfg.model.vocab_size, cfg.rollout.temperature)
        batch = replace(batch, old_logprobs=old)
    objective = PolicyObjective(loss_config(cfg), cfg.model.vocab_size, cfg.rollout.temperature,
                                cfg.rollout.max_tokens)
    lr = lr_at(step, cfg.trainer.steps, cfg.optim)
    results = []
    for _ in range(a.ppo_epochs):
        for prompts in groups:
            rows = torch.nonzero(torch.isin(prompt_of, torch.tensor(prompts))).flatten()
            results.append(runner.train(policy, batch.rows(rows), objective, lr))
    return results


def update_policy(policy, cfg: PrismConfig, batch, advantages: torch.Tensor, step: int, runner) -> dict:
    """Collective: `policy_updates`, summarised (`summarize`)."""
    return summarize(policy_updates(policy, cfg, batch, advantages, step, runner))


def summarize(results: list) -> dict:
    """One step's metrics from its updates: the train/engine mismatch of the first (before any update), the
    mean of every other metric and of the grad norms, min/max for `*_min` / `*_max`."""
    out = {"updates": len(results), "updates_skipped": sum(r.skipped for r in results),
           "nonfinite_updates": sum(r.nonfinite for r in results),
           "grad_norm": sum(r.grad_norm for r in results) / len(results)}
    for name in results[0].metrics:
        values = [r.metrics[name] for r in results]
        if name.startswith("mismatch_"):
            out[name] = values[0]
        elif name.endswith("_min"):
            out[name] = min(values)
        elif name.endswith("_max"):
            out[name] = max(values)
        else:
            out[name] = sum(values) / len(values)
    if len(results) > 1:
        out["clip_frac_last"] = results[-1].metrics.get("clip_frac", 0.0)
    return out
