"""`prism upcycle`: sparse upcycling of a dense HF checkpoint into its family's MoE checkpoint (spec section 1).

The family is the dense checkpoint's (its config.json `model_type`, models/spec.py): Qwen3 -> Qwen3-MoE
(models/qwen3/upcycle.py), Qwen3-VL -> Qwen3-VL-MoE (models/qwen3_vl/upcycle.py). Errors are one line
naming the argument or the file, exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prism upcycle",
                                     description="Sparse-upcycle a dense HF checkpoint (Qwen3 or Qwen3-VL) into "
                                                 "its MoE counterpart.")
    parser.add_argument("--hf", required=True, metavar="DENSE_DIR", help="dense HF checkpoint directory")
    parser.add_argument("--out", required=True, metavar="MOE_DIR", help="output HF MoE directory")
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--noise-std", type=float, default=0.01, help="absolute std of the expert noise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--router-std", type=float, default=0.02)
    parser.add_argument("--aux-loss-coef", type=float, default=0.01, help="router_aux_loss_coef in config")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace MOE_DIR if it exists and is not empty (only once the new one is complete)")
    return parser


def _spec(dense_dir: str):
    """The dense checkpoint's family; a directory we cannot read goes to the text family, whose checks say
    what is wrong with it in one line."""
    from prism_mcore.checkpoint.hf_io import CheckpointError, read_json
    from prism_mcore.models.spec import get_spec, spec_for_hf

    path = Path(dense_dir) / "config.json"
    try:
        return spec_for_hf(read_json(path)) if path.is_file() else get_spec("qwen3")
    except (CheckpointError, ValueError):
        return get_spec("qwen3")


def upcycle(dense_dir, out_dir, **kwargs):
    """The dense checkpoint's family's upcycling (keyword arguments as its spec's `upcycle`)."""
    return _spec(str(dense_dir)).upcycle(dense_dir, out_dir, **kwargs)


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse has already printed usage; keep main() returning an int
        return int(e.code or 0)
    try:
        out = _spec(args.hf).upcycle(args.hf, args.out, num_experts=args.num_experts, top_k=args.topk,
                                     noise_std=args.noise_std, seed=args.seed, router_std=args.router_std,
                                     router_aux_loss_coef=args.aux_loss_coef, overwrite=args.overwrite)
    except ValueError as e:  # CheckpointError included: one line naming the argument or the file
        print(f"prism upcycle: {e}".splitlines()[0], file=sys.stderr)
        return 2
    cfg = json.loads((out / "config.json").read_text())
    layers = (cfg.get("text_config") or cfg)["num_hidden_layers"]
    shards = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())
    print(f"upcycled {args.hf} -> {out}: {layers} layers x {args.num_experts} experts "
          f"(top-{args.topk}), noise_std={args.noise_std}, seed={args.seed}, {len(shards)} shard(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
