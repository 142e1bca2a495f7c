"""Stage 3, RL with verifiable rewards (GRPO; DAPO / GSPO through the policy-loss preset).

Per step: rank 0 samples `rollout.n` responses per prompt from the vLLM engines, scores them with the
verifiable reward and broadcasts; every rank computes group-normalized advantages, trains one on-policy
update through the fused log-prob head, and the new weights are synced into the engines (version = step).
"""
from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist

from prism_mcore.config import PrismConfig


def start_engines(cfg: PrismConfig, model_dir: str):
    """Rank 0: a local Ray instance and the vLLM engine pool, started from the HF weights of the policy."""
    import ray

    from prism_mcore.rollout.engine_pool import EnginePool

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray's unix sockets live under its temp dir and must stay under 107 bytes: keep it short.
    ray_dir = tempfile.mkdtemp(prefix="prism_ray_", dir="/tmp")
    ray.init(num_cpus=max(2, cfg.rollout.num_engines + 1), include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 2**20, _temp_dir=ray_dir)
    engine_kwargs = {"dtype": cfg.model.dtype, "max_model_len": cfg.data.max_prompt_length + cfg.rollout.max_tokens}
    return EnginePool(model_dir, cfg.rollout, engine_kwargs=engine_kwargs).start()


def _sequences(rollouts, prompts, pad_id: int):
    """Prompt + response rows, next-token labels, response mask (on targets) and rollout log-probs."""
    rows, masks, engine_lp = [], [], []
    for prompt, completions in zip(prompts, rollouts):
        for c in completions:
            rows.append(prompt + c["token_ids"])
            masks.append([0] * (len(prompt) - 1) + [1] * len(c["token_ids"]))
            engine_lp.append([0.0] * (len(prompt) - 1) + list(c["logprobs"]))
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
                                               temperature=max(cfg.rollout.temperature, 1e-6))
            loss, stats = policy_loss(logp, None, batch["advantages"], batch["response_mask"], loss_cfg,
                                      rollout_log_prob=batch["rollout_logprobs"], entropy=entropy,
                                      num_tokens=total_tokens)
            # token-mean over the global batch: undo Megatron's 1/num_micro and DDP's 1/dp
            return loss * num_micro * dp, {k: v.detach().clone().float() for k, v in stats.items()
                                           if torch.is_tensor(v) and v.dim() == 0}

        return hidden, loss_fn

    return forward_step


# AlgorithmConfig field -> PolicyLossConfig field; fields set in the config override the algorithm's preset.
_LOSS_FIELDS = {"clip_ratio_low": "clip_low", "clip_ratio_high": "clip_high", "clip_ratio_c": "clip_ratio_c",
                "loss_agg_mode": "agg_mode"}


def _explicit_loss_fields(cfg: PrismConfig) -> dict:
    return {ours: getattr(cfg.algorithm, field) for field, ours in _LOSS_FIELDS.items()
            if field in cfg.algorithm.model_fields_set}


def _forever(data, batch_size: int, seed: int):
    """Batches across epochs; the dataset's own position makes this resumable."""
    while True:
        yield from data.batches(batch_size, seed)


def run_rl(cfg: PrismConfig) -> dict:
    from megatron.core import parallel_state as ps

    from prism_mcore.algorithms.advantages import broadcast_to_tokens, consecutive_groups, grpo_advantages
    from prism_mcore.algorithms.policy_loss import PolicyLossConfig
    from prism_mcore.algorithms.reward import compute_rewards
    from prism_mcore.data.rl_dataset import RLDataset
    from prism_mcore.data.tokenizer import qwen3_tokenizer
    from prism_mcore.parallel.layout import init_model_parallel
    from prism_mcore.rollout.engine import Prompt, SamplingParams
    from prism_mcore.rollout.weight_sync import sync_weights
    from prism_mcore.trainer.megatron_step import build_optimizer, lr_at, train_step, wrap_ddp
    from prism_mcore.trainer.run import Checkpointer, Metrics, build_policy, export_hf, is_rank0, progress

    tok = qwen3_tokenizer()
    data = RLDataset(cfg.data.train_files, tok, cfg.data.max_prompt_length)
    init_model_parallel(cfg)
    policy = build_policy(cfg)
    model = wrap_ddp(policy, use_distributed_optimizer=cfg.optim.use_distributed_optimizer)
    optimizer = build_optimizer([model], cfg.optim)
    ckpt = Checkpointer(cfg.trainer.output_dir, cfg.trainer.save_interval)
    resumed = ckpt.resume([model], optimizer)
    start = resumed["step"] if resumed else 0
    if resumed and resumed.get("data"):
        data.load_state_dict(resumed["data"])
    loss_cfg = PolicyLossConfig.preset(cfg.algorithm.name, **_explicit_loss_fields(cfg))
    pool = start_engines(cfg, cfg.model.hf_path) if is_rank0() else None
    holder = [pool.endpoints if pool else None]
    dist.broadcast_object_list(holder, src=0)
    endpoints = holder[0]
    if start:  # engines start from the initial weights: bring them to the resumed ones
        sync_weights(policy, cfg.model, endpoints, start, bucket_mb=cfg.rollout.weight_bucket_mb,
                     timeout_s=cfg.rollout.timeout_s, step=start)
    metrics = Metrics(cfg.trainer.output_dir, "rl")
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    params = SamplingParams.from_config(cfg.rollout, stop_token_ids=(tok.eos_token_id,))
    batches = _forever(data, cfg.data.global_batch_size, cfg.data.seed)
    bar = progress(cfg.trainer.steps, "rl", start)
    last = {}
    try:
        for step in range(start, cfg.trainer.steps):
            examples = next(batches)
            shared = [None]
            if pool:
                results = pool.generate([Prompt(e.prompt_ids) for e in examples], params, step=step)
                rollouts = [[{"token_ids": c.token_ids, "logprobs": c.logprobs} for c in r.completions]
                            for r in results]
                texts = [tok.decode(c["token_ids"], skip_special_tokens=True) for r in rollouts for c in r]
                truths = [e.ground_truth for e in examples for _ in range(cfg.rollout.n)]
                equivalents = [e.equivalent_answers for e in examples for _ in range(cfg.rollout.n)]
                scored = compute_rewards(texts, truths, equivalents)
                shared = [(rollouts, [(r.score, r.acc, r.fmt) for r in scored])]
            dist.broadcast_object_list(shared, src=0)
            rollouts, scores = shared[0]
            rewards = torch.tensor([s[0] for s in scores])
            groups = consecutive_groups(len(rewards), cfg.rollout.n)
            advantages = grpo_advantages(rewards, groups)
            batch = _sequences(rollouts, [e.prompt_ids for e in examples], tok.pad_token_id)
            batch["advantages"] = broadcast_to_tokens(advantages, batch["response_mask"])
            rows = list(range(len(rewards)))[dp_rank::dp]
            mine = {k: v[rows] for k, v in batch.items()}
            per_micro = max(1, cfg.data.micro_batch_tokens // mine["tokens"].shape[1])
            micro = [{k: v[i:i + per_micro] for k, v in mine.items()} for i in range(0, len(rows), per_micro)]
            total = float(batch["response_mask"].sum())
            lr = lr_at(step, cfg.trainer.steps, cfg.optim)
            result = train_step([model], optimizer, _forward_step(cfg, loss_cfg, total, len(micro), dp), micro,
                                len(micro), seq_length=mine["tokens"].shape[1], micro_batch_size=per_micro, lr=lr)
            sync = sync_weights(policy, cfg.model, endpoints, step + 1, bucket_mb=cfg.rollout.weight_bucket_mb,
                                timeout_s=cfg.rollout.timeout_s, step=step + 1)
            lengths = batch["response_mask"].sum(1)
            mismatch = [d["mismatch_kl"] for d in result.losses if "mismatch_kl" in d]
            last = {"reward": float(rewards.mean()), "accuracy": sum(s[1] for s in scores) / len(scores),
                    "format": sum(s[2] for s in scores) / len(scores), "response_len": float(lengths.mean()),
                    "grad_norm": result.grad_norm, "lr": lr, "sync_s": sync.seconds,
                    "mismatch_kl": float(sum(mismatch) / max(1, len(mismatch))),
                    "skipped_rows": sum(data.skipped.values())}
            metrics.log(step + 1, last)
            ckpt.maybe_save(step + 1, [model], optimizer, {"stage": "rl", "model": cfg.model.model_dump(),
                                                           "data": data.state_dict()},
                            force=step + 1 == cfg.trainer.steps)
            if bar:
                bar.update(bar.task_ids[0], advance=1,
                           description=f"rl reward {last['reward']:.3f} acc {last['accuracy']:.2f}")
    finally:
        if bar:
            bar.stop()
        metrics.close()
        if pool:
            import ray

            pool.shutdown()
            ray.shutdown()
    if cfg.trainer.export_hf:
        export_hf(policy, cfg, f"{cfg.trainer.output_dir}/hf")
    return last
