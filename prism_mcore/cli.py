"""`prism` command line. Each subcommand is a thin wrapper; the work lives in the package.

Config errors (and other user errors) print one line on stderr and exit 2.
"""
from __future__ import annotations

import argparse
import os
import sys

from prism_mcore.config import load_config


def _gpu_budget(cfg, given: float | None) -> float | None:
    """The GiB the per-GPU estimate is checked against: --gpu-memory-gib when given, else 80 for a config
    whose models are in a GPU dtype (bfloat16 / float16), else none: a float32 config is taken to be a CPU
    one (the demo's), and "of 80 GiB" would be a number about a device it never uses."""
    from prism_mcore.config.memory import DEFAULT_GPU_MEMORY_GIB

    if given is not None:
        return given
    models = [cfg.model] + ([cfg.discriminator.model] if cfg.discriminator is not None else [])
    return DEFAULT_GPU_MEMORY_GIB if any(m.dtype in ("bfloat16", "float16") for m in models) else None


def _validate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if not args.config_only:
        from prism_mcore.trainer.train import preflight

        preflight(cfg)  # what `prism train` would reject before starting: data files, stage, HF checkpoint
    p = cfg.parallel
    layout = f"tp={p.tp} pp={p.pp} cp={p.cp} ep={p.ep} sp={p.sequence_parallel}"
    m = cfg.model
    kind = f"MoE {m.num_experts}x top-{m.num_experts_per_tok}" if m.is_moe else "dense"
    print(f"{args.config}: ok ({m.num_hidden_layers} layers, hidden {m.hidden_size}, {kind}; {layout})")
    from prism_mcore.config.memory import GiB, estimate_memory

    budget = _gpu_budget(cfg, args.gpu_memory_gib)
    estimate = estimate_memory(cfg, **({} if budget is None else {"gpu_gib": budget}))
    print(estimate.table(budget))
    if budget is not None and not estimate.fits(budget):
        print(f"{args.config}: estimated peak {estimate.peak / GiB:.1f} GiB per GPU exceeds --gpu-memory-gib="
              f"{budget:g}", file=sys.stderr)
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    from prism_mcore.trainer.demo import run_demo

    return run_demo(args.out, args.overrides, quick=args.quick, text=args.text)


# Subcommands that own their argument parsing: `prism NAME ...` -> module.main(argv).
DELEGATED = {
    "convert": ("prism_mcore.checkpoint.convert", "HF <-> Megatron checkpoint conversion"),
    "upcycle": ("prism_mcore.models.qwen3.upcycle", "dense HF Qwen3 / Qwen3-VL -> HF Qwen3-MoE / Qwen3-VL-MoE (sparse upcycling)"),
    "bench": ("prism_mcore.bench", "benchmarks: logprob | grouped-gemm | router | ceiling | weight-sync | rl-step"),
}


def _train(args: argparse.Namespace) -> int:
    from prism_mcore.trainer.train import train

    result = train(load_config(args.config, args.overrides))
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) != 0:
        return 0  # under srun/torchrun every task gets the same result: one line per job, not per task
    print("final: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prism", description="PRISM post-training on Megatron-core")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a config file (and overrides) without running anything")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-6")
    p.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="device memory the per-GPU estimate must fit (exit 1 when it does not); default 80 for a "
                   "bfloat16/float16 config, no budget for a float32 (CPU) one")
    p.add_argument("--config-only", action="store_true",
                   help="check the config alone, not the data files and HF checkpoint `prism train` would read "
                   "(for templates whose data is given at launch)")
    p.set_defaults(func=_validate)

    p = sub.add_parser("train", help="run one training stage (trainer.stage) from a config")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-6")
    p.set_defaults(func=_train)

    p = sub.add_parser("demo", help="the embedded CPU demo (what `make demo` runs): SFT -> warm-up -> PRISM "
                       "align -> GRPO vs SFT -> GRPO, with configs/demo/*.yaml")
    p.add_argument("--out", default="outputs/demo", help="output directory (finished stages are reused)")
    p.add_argument("--quick", action="store_true", help="a few steps per stage (a smoke run)")
    p.add_argument("--text", action="store_true", help="the text demo: a tiny text Qwen3 on the text task "
                   "(configs/demo); the default is the multimodal demo (configs/demo_vl)")
    p.add_argument("overrides", nargs="*", help="STAGE.key=value, STAGE in sft, disc_warmup, align, grpo, "
                   "baseline, all; e.g. sft.trainer.steps=50")
    p.set_defaults(func=_demo)
    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    import prism_mcore.platform.quiet  # noqa: F401 - third-party FutureWarnings, here and in child processes

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        import importlib

        return importlib.import_module(DELEGATED[argv[0]][0]).main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:  # noqa: BLE001
        # errors meant for the user carry an exit code (ConfigError, DataError, CheckpointError, a StageError or
        # RankUserError from the ranks): one line; anything else is a bug and keeps its traceback
        if not isinstance(getattr(e, "exit_code", None), int):
            raise
        print(str(e).splitlines()[0], file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
