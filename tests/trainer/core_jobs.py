"""Rank functions for the training-core tests (module level, so spawned ranks can import them): the policy
update and the discriminator update through the step runner, on fixed synthetic inputs."""
from __future__ import annotations

import torch

TINY = {"vocab_size": 151936, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512}
TINY_MOE = {**TINY, "vocab_size": 256, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48}


class Rollout:
    def __init__(self, token_ids, logprobs):
        self.token_ids, self.logprobs = token_ids, logprobs


def rollouts(num_prompts: int = 4, n: int = 4, seed: int = 0):
    """Prompts of 5..29 tokens, responses of 3..39 tokens with made-up engine log-probs, advantages."""
    g = torch.Generator().manual_seed(seed)
    prompts, groups = [], []
    for _ in range(num_prompts):
        plen = int(torch.randint(5, 30, (1,), generator=g))
        prompts.append(torch.randint(0, 151000, (plen,), generator=g).tolist())
        group = []
        for _ in range(n):
            rlen = int(torch.randint(3, 40, (1,), generator=g))
            group.append(Rollout(torch.randint(0, 151000, (rlen,), generator=g).tolist(),
                                 (-torch.rand(rlen, generator=g) * 5).tolist()))
        groups.append(group)
    return prompts, groups, torch.randn(num_prompts * n, generator=g)


def policy_config(world: int, algorithm: dict, micro_tokens: int, parallel: dict | None = None, steps: int = 2):
    from prism_mcore.config import PrismConfig

    return PrismConfig.model_validate({
        "model": TINY, "parallel": {"world_size": world, **(parallel or {})},
        "optim": {"lr": 1e-3, "weight_decay": 0.0}, "data": {"micro_batch_tokens": micro_tokens},
        "algorithm": algorithm, "trainer": {"stage": "rl", "steps": steps, "seed": 7}})


def policy_steps(world: int, algorithm: dict, micro_tokens: int, parallel: dict | None = None, steps: int = 2,
                 rollout_seeds: tuple = (0, 1), num_prompts: int = 4) -> list[dict]:
    """`steps` policy updates of a seeded tiny policy on fixed rollouts; each step's metrics."""
    from prism_mcore.parallel.layout import init_model_parallel
    from prism_mcore.trainer.policy_update import rollout_batch, update_policy
    from prism_mcore.trainer.run import build_policy
    from prism_mcore.trainer.step import StepRunner, trainable

    cfg = policy_config(world, algorithm, micro_tokens, parallel, steps)
    init_model_parallel(cfg)
    policy = trainable(build_policy(cfg), cfg.optim)
    runner = StepRunner(cfg.data.micro_batch_tokens, 0)
    out = []
    for step in range(steps):
        prompts, groups, adv = rollouts(num_prompts=num_prompts, seed=rollout_seeds[step])
        out.append(update_policy(policy, cfg, rollout_batch(prompts, groups, 0), adv, step, runner))
    return out


def disc_config(world: int, ep: int, micro_tokens: int, steps: int = 3):
    from prism_mcore.config import PrismConfig

    return PrismConfig.model_validate({
        "model": {k: v for k, v in TINY_MOE.items() if not k.startswith(("num_experts", "moe_"))},
        "parallel": {"world_size": world}, "data": {"micro_batch_tokens": micro_tokens},
        "trainer": {"stage": "align", "steps": steps}, "algorithm": {"score_clip": 2.0, "score_reg_coef": 0.05},
        "discriminator": {"model": {**TINY_MOE, "max_position_embeddings": 64}, "parallel": {"ep": ep, "world_size": world},
                          "head_dropout": 0.0, "optim": {"lr": 1e-2, "weight_decay": 0.0, "clip_grad": 0.0}}})


def disc_steps(world: int, ep: int, micro_tokens: int, steps: int = 3, inputs=None) -> list[tuple]:
    """Score, then update, `steps` times (the align stage's discriminator half) on fixed groups."""
    import sys
    import os

    sys.path.insert(0, os.path.dirname(__file__))
    from align_jobs import groups
    from prism_mcore.models.discriminator import build_discriminator
    from prism_mcore.trainer.align import _discriminator_cfg, init_layout
    from prism_mcore.trainer.disc_update import score_groups, update_discriminator
    from prism_mcore.trainer.step import trainable

    cfg = disc_config(world, ep, micro_tokens, steps)
    d_cfg = _discriminator_cfg(cfg)
    init_layout(cfg, d_cfg)
    disc = trainable(build_discriminator(d_cfg.model, d_cfg.parallel, head_dropout=0.0, seed=3), d_cfg.optim)
    group_inputs, valid = inputs if inputs is not None else groups()
    out = []
    for step in range(steps):
        scores = score_groups(disc, group_inputs, pad_id=0, token_budget=micro_tokens)
        stats = update_discriminator(disc, cfg, group_inputs, valid, 0, step)
        out.append((float(scores.double().sum()), stats["d_loss"], stats["d_grad_norm"], stats["d_pair_accuracy"]))
    return out


def policy_gradients(world: int, agg_mode: str, micro_tokens: int, num_prompts: int = 3) -> dict:
    """The policy gradient of one update (lr 0, no clipping, every DP rank's full reduced gradient): a dict of
    full parameter gradients, as float64, on rank 0 (TP = PP = 1)."""
    from prism_mcore.parallel.layout import init_model_parallel
    from prism_mcore.trainer.policy_update import rollout_batch, update_policy
    from prism_mcore.trainer.run import build_policy
    from prism_mcore.trainer.step import StepRunner, trainable

    cfg = policy_config(world, {"name": "grpo", "loss_agg_mode": agg_mode}, micro_tokens, steps=1)
    cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={
        "lr": 1e-30, "clip_grad": 0.0, "use_distributed_optimizer": False})})
    init_model_parallel(cfg)
    policy = trainable(build_policy(cfg), cfg.optim)
    prompts, groups, adv = rollouts(num_prompts=num_prompts, seed=0)
    metrics = update_policy(policy, cfg, rollout_batch(prompts, groups, 0), adv, 0, StepRunner(micro_tokens, 0))
    grads = {name: p.main_grad.detach().double().clone() for name, p in policy.net.named_parameters()}
    return {"grads": grads, "micro_per_rank": metrics, "pg_loss": metrics["pg_loss"]}


def ppo_updates(world: int, algorithm: dict, num_prompts: int = 4) -> dict:
    """One step's PPO updates (algorithm.ppo_mini_batch_size etc. from `algorithm`): each update's metrics
    and a checksum of the trained parameters."""
    from prism_mcore.parallel.layout import init_model_parallel
    from prism_mcore.trainer.policy_update import policy_updates, rollout_batch
    from prism_mcore.trainer.run import build_policy
    from prism_mcore.trainer.step import StepRunner, trainable

    cfg = policy_config(world, algorithm, 2048, steps=1)
    cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"lr": 2e-2})})
    init_model_parallel(cfg)
    policy = trainable(build_policy(cfg), cfg.optim)
    prompts, groups, adv = rollouts(num_prompts=num_prompts, seed=0)
    # engine log-probs near the policy's own (an untrained policy is ~uniform over the vocabulary)
    for group in groups:
        for r in group:
            r.logprobs = [-11.93] * len(r.logprobs)
    results = policy_updates(policy, cfg, rollout_batch(prompts, groups, 0), adv * 5, 0, StepRunner(2048, 0))
    checksum = sum(float(p.detach().double().square().sum()) for p in policy.net.parameters())
    return {"updates": [r.metrics for r in results], "checksum": checksum}


def moe_policy_update(world: int, ep: int, micro_tokens: int) -> dict:
    """A Qwen3-MoE policy update at `ep` on 3 prompts x 3 rollouts: 9 rows dealt to 2 data-parallel ranks
    are uneven, so with one row per micro-batch the ranks plan different micro-batch counts."""
    from prism_mcore.config import PrismConfig
    from prism_mcore.parallel.layout import init_model_parallel
    from prism_mcore.trainer.policy_update import rollout_batch, update_policy
    from prism_mcore.trainer.run import build_policy
    from prism_mcore.trainer.step import StepRunner, trainable

    cfg = PrismConfig.model_validate({
        # no load-balancing loss: it is a per-micro-batch statistic, so it would differ between the splits
        "model": {**TINY, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
                  "router_aux_loss_coef": 0.0},
        "parallel": {"world_size": world, "ep": ep}, "optim": {"lr": 1e-3, "weight_decay": 0.0},
        "data": {"micro_batch_tokens": micro_tokens}, "trainer": {"stage": "rl", "steps": 1, "seed": 7}})
    init_model_parallel(cfg)
    policy = trainable(build_policy(cfg), cfg.optim)
    prompts, groups, adv = rollouts(num_prompts=3, n=3, seed=0)
    return update_policy(policy, cfg, rollout_batch(prompts, groups, 0), adv, 0, StepRunner(micro_tokens, 0))


def recomputed_logprobs(world: int, micro_tokens: int) -> torch.Tensor:
    """The policy's log-probs of the rollouts' responses (StepRunner.forward: the old-policy pass), [B, S]."""
    from prism_mcore.parallel.layout import init_model_parallel
    from prism_mcore.trainer.policy_update import rollout_batch, sequence_logprobs
    from prism_mcore.trainer.run import build_policy
    from prism_mcore.trainer.step import StepRunner, trainable

    cfg = policy_config(world, {"name": "grpo"}, micro_tokens, steps=1)
    init_model_parallel(cfg)
    policy = trainable(build_policy(cfg), cfg.optim)
    prompts, groups, _ = rollouts(num_prompts=3, seed=0)
    batch = rollout_batch(prompts, groups, 0)
    return sequence_logprobs(StepRunner(micro_tokens, 0), policy, batch, cfg.model.vocab_size)
