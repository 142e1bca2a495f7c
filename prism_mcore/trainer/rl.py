"""Stage 3, RL with verifiable rewards: GRPO, DAPO (dynamic sampling, overlong shaping, clip-higher) or
GSPO (sequence-level ratios), chosen by `algorithm.name`.

Per step: rank 0 samples `rollout.n` responses per prompt from the vLLM engines and scores them with
the verifiable reward; every rank gets them, computes group-normalized advantages and trains one
on-policy update through the fused log-prob head; the new weights go into the engines (version = step).
"""
from __future__ import annotations

import time

import torch

from prism_mcore.config import PrismConfig


def dapo_batch(cfg: PrismConfig, rollouts_of, batches, step: int):
    """DAPO dynamic sampling: generation batches of `gen_batch_size` prompts until `global_batch_size`
    prompt groups whose accuracy varies are collected (at most `max_gen_batches` batches; then train
    on what was kept). Without dynamic sampling: one batch of `global_batch_size` prompts."""
    from prism_mcore.algorithms.advantages import consecutive_groups
    from prism_mcore.algorithms.dapo import DynamicSampler

    a, want = cfg.algorithm, cfg.data.global_batch_size
    if not a.dynamic_sampling:
        examples = next(batches)
        return examples, rollouts_of(examples, step), {}
    sampler = DynamicSampler(want, a.max_gen_batches)
    kept_examples, kept_rollouts, generated = [], [], 0
    per_batch = a.gen_batch_size or 3 * want
    while not sampler.done and not sampler.exhausted:
        examples = [e for _ in range(-(-per_batch // want)) for e in next(batches)][:per_batch]
        rollouts = rollouts_of(examples, step * 1000 + sampler.num_gen_batches)
        generated += len(examples)
        acc = torch.tensor([r.acc for group in rollouts for r in group])
        keep = sampler.offer(acc, consecutive_groups(len(acc), cfg.rollout.n))
        groups = sorted({int(i) // cfg.rollout.n for i in keep})
        kept_examples += [examples[g] for g in groups]
        kept_rollouts += [rollouts[g] for g in groups]
    if not kept_examples:  # nothing with signal: train on the last batch (zero advantages, a no-op update)
        kept_examples, kept_rollouts = examples[:want], rollouts[:want]
    return kept_examples, kept_rollouts, {"gen_batches": sampler.num_gen_batches, "prompts_generated": generated,
                                          "prompts_kept": len(kept_examples)}


class TimedRunner:
    """The step runner for one policy update, timing its two kinds of call, so a step's metrics can split it:
    `forward` (the no-grad old-log-prob pass; the update only makes one when a step has several mini-batches
    or epochs, otherwise the log-probs come from the training forward itself) and `train` (forward, backward
    and optimizer step)."""

    def __init__(self, runner):
        self.runner = runner
        self.forward_s = self.train_s = 0.0

    def _timed(self, kind: str, *args, **kwargs):
        t = time.perf_counter()
        try:
            return getattr(self.runner, kind)(*args, **kwargs)
        finally:
            setattr(self, f"{kind}_s", getattr(self, f"{kind}_s") + time.perf_counter() - t)

    def forward(self, *args, **kwargs):
        return self._timed("forward", *args, **kwargs)

    def train(self, *args, **kwargs):
        return self._timed("train", *args, **kwargs)


def run_rl(cfg: PrismConfig) -> dict:
    from prism_mcore.algorithms.advantages import consecutive_groups, grpo_advantages
    from prism_mcore.algorithms.dapo import overlong_penalty
    from prism_mcore.data.rl_dataset import RLDataset
    from prism_mcore.data.tokenizer import qwen3_tokenizer
    from prism_mcore.parallel.layout import init_model_parallel
    from prism_mcore.trainer.engines import Rollouts, evaluate_all, held_out, should_eval
    from prism_mcore.trainer.images import StageImages
    from prism_mcore.trainer.policy_update import rollout_batch, update_policy
    from prism_mcore.trainer.run import StageRun, build_policy, export_hf
    from prism_mcore.trainer.step import StepRunner, trainable

    tok = qwen3_tokenizer()
    images = StageImages.of(cfg, tok)
    data = RLDataset(cfg.data.train_files, tok, cfg.data.max_prompt_length,
                     images=images.processor if images is not None else None)
    val = held_out(cfg, tok, images)
    init_model_parallel(cfg)
    policy = trainable(build_policy(cfg), cfg.optim)
    run = StageRun(cfg, {"": policy})
    if run.resumed and run.resumed.get("data"):
        data.load_state_dict(run.resumed["data"])
    runner = StepRunner(cfg.data.micro_batch_tokens, tok.pad_token_id)
    engines = Rollouts(cfg, tok, cfg.model.hf_path, runner, probe_examples=data.examples[:2], images=images)
    buffer = cfg.algorithm.overlong_buffer
    batches = data.endless(cfg.data.global_batch_size, cfg.data.seed)
    last = {}
    try:
        if run.start:  # engines start from the initial weights: bring them to the resumed ones
            engines.sync(policy, run.start)
        if val and run.start == 0 and cfg.trainer.eval_at_start:
            run.log(0, evaluate_all(engines, val, step=-1))
        for step in run.steps():
            started = time.perf_counter()
            examples, rollouts, sampling = dapo_batch(cfg, engines.sample, batches, step)
            generate_s = time.perf_counter() - started  # sampling, rewards and the broadcast to every rank
            flat = [r for group in rollouts for r in group]
            rewards = torch.tensor([r.score for r in flat])
            lengths = torch.tensor([len(r.token_ids) for r in flat])
            if buffer:
                rewards = rewards + overlong_penalty(lengths, cfg.rollout.max_tokens, buffer,
                                                     cfg.algorithm.overlong_penalty_factor)
            advantages = grpo_advantages(rewards, consecutive_groups(len(flat), cfg.rollout.n))
            batch = rollout_batch([e.prompt_ids for e in examples], rollouts, tok.pad_token_id, images,
                                  [e.images for e in examples])
            engines.release()  # colocated engines sleep until the sync
            timed = TimedRunner(runner)
            update = update_policy(policy, cfg, batch, advantages, step, timed)
            sync = engines.sync(policy, step + 1)
            probe = {} if sync.probe_error is None else {"probe_error": sync.probe_error}
            last = {"reward": float(rewards.mean()), "accuracy": sum(r.acc for r in flat) / len(flat),
                    "format": sum(r.fmt for r in flat) / len(flat), "response_len": float(lengths.float().mean()),
                    "sync_s": sync.seconds, "skipped_rows": sum(data.skipped.values()), **sampling, **update, **probe,
                    **engines.metrics(), "time/generate_s": generate_s, "time/logprob_s": timed.forward_s,
                    "time/update_s": timed.train_s}  # with sync_s: the step's phases (the rest is orchestration)
            if val and should_eval(cfg, step + 1):
                last.update(evaluate_all(engines, val, step=step + 1))
            run.end_step(step, last, {"data": data.state_dict()},
                         f"reward {last['reward']:.3f} acc {last['accuracy']:.2f}", bad=update["nonfinite_updates"] > 0)
    finally:
        run.close()
        engines.close()
    if cfg.trainer.export_hf:
        export_hf(policy.net, cfg, f"{cfg.trainer.output_dir}/hf")
    run.finished(["hf"] if cfg.trainer.export_hf else [])
    return last
