"""`prism bench logprob | grouped-gemm | router | ceiling | weight-sync | rl-step [--json FILE] ...`: benchmarks.

Every implementation of an op is measured in the same run as the op's torch reference, and each row reports
median time, TFLOP/s or GB/s, peak extra memory and the time and memory ratios to that reference.
`main(argv)` is what the `prism bench` subcommand calls; `python -m prism_mcore.bench` works too.
"""
from __future__ import annotations

import argparse
import json
import sys

from prism_mcore.bench import ceiling, grouped_gemm, logprob, router

OPS = {"logprob": logprob, "grouped-gemm": grouped_gemm, "router": router, "ceiling": ceiling}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prism bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="op", required=True)
    for name, module in OPS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__)
        p.add_argument("--json", metavar="FILE", help="write the rows as a JSON list")
        p.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test, not a measurement)")
        p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
        p.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on CUDA)")
        p.add_argument("--impls", type=lambda s: s.split(","), help="comma-separated implementations to run")
        p.add_argument("--modes", type=lambda s: s.split(","), help="comma-separated, e.g. fwd,fwdbwd")
        p.add_argument("--reps", type=int, help="timed calls; the median is reported (default 3 CPU, 10 CUDA)")
        p.add_argument("--warmup", type=int, help="untimed calls first; memory comes from the first (default 1/3)")
        p.add_argument("--ceiling", metavar="FILE", help="JSON from `prism bench ceiling`: add fractions of it")
        p.add_argument("--in-process", action="store_true",
                       help="on CPU, skip the fresh process per case and time cases one after another (faster; "
                            "peak memory is then unreliable)")
        module.add_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "weight-sync":  # a model and engines, not a kernel case: its own arguments
        from prism_mcore.bench import weight_sync

        return weight_sync.main(argv[1:])
    if argv and argv[0] == "rl-step":  # two whole trainers, not a kernel case: its own arguments
        from prism_mcore.bench import rl_step

        return rl_step.main(argv[1:])
    import torch

    from prism_mcore.bench.common import print_table, run_case, run_group_interleaved, to_rows

    args = build_parser().parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("prism bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    on_cpu = not device.startswith("cuda")
    base = {"reps": args.reps or (3 if on_cpu else 10), "warmup": args.warmup or (1 if on_cpu else 3)}
    module = OPS[args.op]
    ceiling_summary = None
    if args.ceiling:
        with open(args.ceiling) as f:
            ceiling_summary = ceiling.summary(json.load(f))
    results = []
    groups: dict[str, list] = {}
    for case in module.cases(args, device, base):
        groups.setdefault(json.dumps([case.mode, case.shape, case.dtype]), []).append(case)
    for group in groups.values():
        print(f"  {args.op} {group[0].mode} {group[0].shape} {group[0].dtype}: {', '.join(c.impl for c in group)}",
              file=sys.stderr, flush=True)
        if on_cpu and not args.in_process:
            results += run_group_interleaved(group)
        else:
            results += [run_case(c, isolate=False) for c in group]
    rows = to_rows(results, module.REFERENCE, ceiling_summary)
    print_table(f"prism bench {args.op} ({rows[0]['device'] if rows else device})", rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0
