"""Rank functions of the GPU smoke suite: one SFT step and one policy update of the tiny policy through
Megatron and the step runner, on whatever device the rank sees (CUDA_VISIBLE_DEVICES="" forces CPU)."""
from __future__ import annotations

import torch

TINY = {"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256}


def _policy(stage: str):
    from prism_mcore.config import PrismConfig
    from prism_mcore.parallel.layout import init_model_parallel
    from prism_mcore.trainer.run import build_policy
    from prism_mcore.trainer.step import trainable

    cfg = PrismConfig.model_validate({"model": TINY, "parallel": {"world_size": 1},
                                      "optim": {"lr": 1e-3, "weight_decay": 0.0},
                                      "data": {"micro_batch_tokens": 96}, "trainer": {"stage": stage, "seed": 3}})
    init_model_parallel(cfg)
    policy = trainable(build_policy(cfg), cfg.optim)
    # the same starting weights on every device: a fixed draw, not the device's RNG
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.net.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p.device, p.dtype))
    return cfg, policy


def _rows(seed: int, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, 1000, (int(torch.randint(8, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]
    masks = [[0.0] * 4 + [1.0] * (len(r) - 5) for r in rows]
    return rows, masks


def reference_nll(policy, batch) -> float:
    """The batch's token-mean NLL from materialised float64 logits (no fused head): what the SFT loss is."""
    from prism_mcore.models.qwen3.logprob_head import lm_hidden

    net = policy.net
    dev = policy.device
    with torch.no_grad():
        hidden = lm_hidden(net, batch.to(dev)).double()
        weight = net.output_layer.lm_weight.double()
        logits = hidden @ weight.t()
        logits[..., TINY["vocab_size"]:] = float("-inf")
        logp = torch.log_softmax(logits, -1).gather(-1, batch.labels.to(dev)[..., None])[..., 0]
        mask = batch.loss_mask.to(dev).double()
        return float(-(logp * mask).sum() / mask.sum())


def sft_step() -> dict:
    """One SFT step of the runner (several micro-batches): its loss, the float64 reference loss, grad norm."""
    from prism_mcore.data.batch import next_token_batch
    from prism_mcore.trainer.sft import SFTObjective
    from prism_mcore.trainer.step import StepRunner

    cfg, policy = _policy("sft")
    rows, masks = _rows(1)
    batch = next_token_batch(rows, masks, pad_id=0)
    want = reference_nll(policy, batch)
    result = StepRunner(cfg.data.micro_batch_tokens, 0).train(policy, batch, SFTObjective(TINY["vocab_size"]), 1e-3)
    return {"device": str(policy.device), "loss": result.metrics["loss"], "reference": want,
            "grad_norm": result.grad_norm, "micro": result.num_micro, "after": reference_nll(policy, batch)}


def policy_update() -> dict:
    """One on-policy GRPO update: pg_loss (= -token-mean advantage at ratio 1), grad norm."""
    from prism_mcore.trainer.policy_update import rollout_batch, update_policy
    from prism_mcore.trainer.step import StepRunner

    class Rollout:
        def __init__(self, ids):
            self.token_ids, self.logprobs = ids, [-6.9] * len(ids)

    cfg, policy = _policy("rl")
    rows, _ = _rows(2, n=8)
    prompts = [r[:5] for r in rows[::2]]
    groups = [[Rollout(rows[2 * i][5:]), Rollout(rows[2 * i + 1][5:])] for i in range(len(prompts))]
    adv = torch.linspace(-1, 1, 2 * len(prompts))
    batch = rollout_batch(prompts, groups, 0)
    mask = batch.loss_mask
    expected = float(-(adv[:, None] * mask).sum() / mask.sum())
    out = update_policy(policy, cfg, batch, adv, 0, StepRunner(cfg.data.micro_batch_tokens, 0))
    return {"device": str(policy.device), "pg_loss": out["pg_loss"], "expected_pg_loss": expected,
            "grad_norm": out["grad_norm"], "mismatch_kl": out["mismatch_kl"]}
