"""Sparse upcycling of a dense HF Qwen3 checkpoint into an HF Qwen3-MoE checkpoint (spec section 1).

Every decoder layer becomes an MoE layer with `num_experts` copies of the dense MLP, each perturbed by
i.i.d. N(0, noise_std^2) noise (absolute std), and a fresh N(0, router_std^2) router. Everything else
is copied bit for bit.

On-disk layout. transformers 5.19 keeps Qwen3-MoE experts fused in memory (`experts.gate_up_proj`
[E, 2I, H] with gate rows first, `experts.down_proj` [E, H, I]), but `save_pretrained` converts them
back to the per-expert checkpoint names, and `from_pretrained` fuses those on load:
    model.layers.{i}.mlp.experts.{j}.gate_proj.weight  [I, H]
    model.layers.{i}.mlp.experts.{j}.up_proj.weight    [I, H]
    model.layers.{i}.mlp.experts.{j}.down_proj.weight  [H, I]
    model.layers.{i}.mlp.gate.weight                   [E, H]
We write exactly that layout, so a dense MLP weight maps to an expert weight with no transpose.

Random draws come from one torch.Generator seeded with `seed`, in this order: for each layer i
ascending, the router [E, H], then for each expert j ascending its gate, up and down noise. Noise is
drawn even when noise_std == 0, so the router does not depend on noise_std. Noise is added in float32
and the sum cast to the source dtype.

Peak memory is about one output shard (max_shard_bytes) plus one layer's experts: tensors are read
one at a time with `safe_open` and shards are flushed as they fill.

The output is written as a hidden temporary sibling of out_dir and renamed into place when complete
(checkpoint/hf_io.py `atomic_dir`): a non-empty out_dir is refused unless overwrite, and then replaced only
after the new checkpoint is complete. Unreadable inputs (malformed config.json or index, a truncated or
pickled weights file) are one-line errors naming the file.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from prism_mcore.checkpoint.hf_io import CheckpointError, atomic_dir, check_target, open_safetensors, read_json

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_DENSE_MLP = ("gate_proj", "up_proj", "down_proj")
# Dense-only config fields with no Qwen3-MoE counterpart (identity fields are rewritten anyway).
_DROP_CONFIG_KEYS = {"architectures", "model_type", "transformers_version", "_name_or_path",
                     "layer_types", "max_window_layers"}
_EXTRA_FILES = re.compile(r"^(tokenizer.*|vocab.*|merges.*|special_tokens_map\.json|added_tokens\.json"
                          r"|chat_template.*|generation_config\.json)$")


def _check_args(num_experts, top_k, noise_std, router_std, router_aux_loss_coef, max_shard_bytes) -> None:
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must satisfy 1 <= top_k <= num_experts ({num_experts}), got {top_k}")
    if not (noise_std >= 0 and math.isfinite(noise_std)):
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std}")
    if not (router_std >= 0 and math.isfinite(router_std)):
        raise ValueError(f"router_std must be a finite number >= 0, got {router_std}")
    if not (router_aux_loss_coef >= 0 and math.isfinite(router_aux_loss_coef)):
        raise ValueError(f"router_aux_loss_coef must be a finite number >= 0, got {router_aux_loss_coef}")
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")


def _dense_weight_map(dense: Path) -> dict[str, Path]:
    index = dense / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: no 'weight_map' object of tensor name -> file name")
        for f in sorted(set(weight_map.values())):
            with open_safetensors(dense / f):  # every file readable (not truncated, not a pickle) before any work
                pass
        return {k: dense / f for k, f in weight_map.items()}
    single = dense / "model.safetensors"
    if single.is_file():
        with open_safetensors(single) as f:
            return {k: single for k in f.keys()}
    raise ValueError(f"dense_dir must hold model.safetensors or model.safetensors.index.json: {dense}")


def _moe_config(raw: dict, num_experts: int, top_k: int, aux_coef: float):
    from transformers import Qwen3Config, Qwen3MoeConfig

    # Round-trip through Qwen3Config so legacy fields (rope_theta, torch_dtype) are normalised the way
    # transformers itself would read them.
    kept = {k: v for k, v in Qwen3Config.from_dict(raw).to_dict().items() if k not in _DROP_CONFIG_KEYS}
    return Qwen3MoeConfig(
        **kept, architectures=["Qwen3MoeForCausalLM"], num_experts=num_experts, num_experts_per_tok=top_k,
        moe_intermediate_size=raw["intermediate_size"], decoder_sparse_step=1, mlp_only_layers=[],
        norm_topk_prob=True, router_aux_loss_coef=aux_coef, output_router_logits=False)


class _ShardWriter:
    """Buffers tensors and writes a shard whenever the next tensor would overflow max_bytes."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.buf: dict[str, torch.Tensor] = {}
        self.buf_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = self.total_params = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.buf and self.buf_bytes + nbytes > self.max_bytes:
            self.flush()
        self.buf[name] = t.contiguous()
        self.buf_bytes += nbytes
        self.total_bytes += nbytes
        self.total_params += t.numel()

    def flush(self) -> None:
        if self.buf:
            save_file(self.buf, self.out / f"shard-{len(self.shards):05d}.tmp", metadata={"format": "pt"})
            self.shards.append(list(self.buf))
            self.buf, self.buf_bytes = {}, 0

    def finish(self) -> int:
        # Shard names carry the total count, known only now.
        self.flush()
        n, weight_map = len(self.shards), {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out / f"shard-{i:05d}.tmp", self.out / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_parameters": self.total_params, "total_size": self.total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return n


def upcycle(dense_dir, out_dir, num_experts: int = 4, top_k: int = 2, noise_std: float = 0.01, seed: int = 0,
            router_std: float = 0.02, router_aux_loss_coef: float = 0.01, max_shard_bytes: int = 2 * 1024**3,
            overwrite: bool = False) -> Path:
    """Write the upcycled Qwen3-MoE checkpoint of `dense_dir` to `out_dir` and return out_dir."""
    _check_args(num_experts, top_k, noise_std, router_std, router_aux_loss_coef, max_shard_bytes)
    dense, out = Path(dense_dir).resolve(), Path(out_dir).resolve()
    if not (dense / "config.json").is_file():
        raise ValueError(f"dense_dir must be an HF checkpoint directory with config.json: {dense}")
    if out == dense:
        raise ValueError(f"out_dir must differ from dense_dir: {out}")
    check_target(out, overwrite)  # before any work; atomic_dir checks again
    raw = read_json(dense / "config.json")
    if raw.get("model_type") != "qwen3":
        raise ValueError(f"dense_dir config model_type must be 'qwen3', found {raw.get('model_type')!r}")
    for key in ("num_hidden_layers", "intermediate_size"):
        if not isinstance(raw.get(key), int) or isinstance(raw.get(key), bool) or raw[key] < 1:
            raise CheckpointError(f"{dense / 'config.json'}: {key} must be a positive integer, found {raw.get(key)!r}")
    if raw.get("use_sliding_window"):
        raise ValueError("dense_dir config use_sliding_window must be false: Qwen3-MoE cannot express "
                         "per-layer sliding windows")
    weight_map = _dense_weight_map(dense)
    num_layers = raw["num_hidden_layers"]

    layers: dict[int, list[str]] = {}
    rest = []
    for key in weight_map:
        m = _LAYER_KEY.match(key)
        if m:
            layers.setdefault(int(m.group(1)), []).append(key)
        else:
            rest.append(key)
    if sorted(layers) != list(range(num_layers)):
        raise ValueError(f"dense_dir weights must have layers 0..{num_layers - 1} (num_hidden_layers), "
                         f"found {sorted(layers)}")
    for i, keys in layers.items():
        mlp = sorted(k for k in keys if ".mlp." in k)
        want = sorted(f"model.layers.{i}.mlp.{p}.weight" for p in _DENSE_MLP)
        if mlp != want:
            raise ValueError(f"dense_dir layer {i} MLP weights must be exactly {want}, found {mlp}")

    try:
        config = _moe_config(raw, num_experts, top_k, router_aux_loss_coef)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{dense / 'config.json'}: not a usable Qwen3 config ({str(e).splitlines()[0]})") \
            from None
    gen = torch.Generator().manual_seed(seed)
    handles: dict[Path, object] = {}

    def read(key: str) -> torch.Tensor:
        path = weight_map[key]
        if path not in handles:
            handles[path] = open_safetensors(path)
        return handles[path].get_tensor(key)

    try:
        with atomic_dir(out, overwrite) as tmp:
            writer = _ShardWriter(tmp, max_shard_bytes)
            for key in sorted(rest):
                writer.add(key, read(key))
            for i in range(num_layers):
                for key in sorted(layers[i]):
                    if ".mlp." not in key:
                        writer.add(key, read(key))
                dense_mlp = {p: read(f"model.layers.{i}.mlp.{p}.weight") for p in _DENSE_MLP}
                dtype, hidden = dense_mlp["gate_proj"].dtype, dense_mlp["gate_proj"].shape[1]
                router = torch.randn(num_experts, hidden, generator=gen, dtype=torch.float32) * router_std
                writer.add(f"model.layers.{i}.mlp.gate.weight", router.to(dtype))
                for j in range(num_experts):
                    for p in _DENSE_MLP:
                        w = dense_mlp[p]
                        noise = torch.randn(w.shape, generator=gen, dtype=torch.float32) * noise_std
                        writer.add(f"model.layers.{i}.mlp.experts.{j}.{p}.weight", (w.float() + noise).to(dtype))
            writer.finish()
            handles.clear()
            config.save_pretrained(tmp)  # records transformers_version
            for f in sorted(dense.iterdir()):
                if f.is_file() and _EXTRA_FILES.match(f.name):
                    shutil.copy2(f, tmp / f.name)
    finally:
        handles.clear()
    return out


def main(argv: list[str]) -> int:
    """`prism upcycle`: picks the family from the dense checkpoint's config.json (models/upcycle.py)."""
    from prism_mcore.models.upcycle import main as upcycle_main

    return upcycle_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
