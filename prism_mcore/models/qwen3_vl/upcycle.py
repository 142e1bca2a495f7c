"""Sparse upcycling of a dense HF Qwen3-VL checkpoint into an HF Qwen3-VL-MoE checkpoint (spec section 1:
PRISM's discriminator backbone is Qwen3-VL-2B upcycled to 4 experts, top-2).

Every decoder layer's MLP becomes `num_experts` copies of the dense MLP, each perturbed by i.i.d.
N(0, noise_std^2) noise (absolute std), and a fresh N(0, router_std^2) router; the vision tower, attention,
norms and embeddings are copied bit for bit. Experts are written in Qwen's released fused layout, the one
vLLM loads and transformers reads too (models/qwen3_vl/hf_adapter.py):
    model.language_model.layers.{i}.mlp.experts.gate_up_proj  [E, H, 2I]  (gate columns, then up)
    model.language_model.layers.{i}.mlp.experts.down_proj     [E, I, H]
    model.language_model.layers.{i}.mlp.gate.weight           [E, H]
and config.json is transformers' Qwen3VLMoeConfig with `norm_topk_prob: true` in text_config (vLLM reads it
there; transformers always renormalizes). moe_intermediate_size = the dense intermediate_size.

Random draws come from one torch.Generator seeded with `seed`: for each layer i ascending, the router
[E, H], then for each expert its gate_up noise [H, 2I] and its down noise [I, H]. Noise is drawn even when
noise_std == 0 (the router does not depend on it), added in float32, and the sum cast to the source dtype.
Tensors are read one at a time; the output is written as a temporary sibling and renamed into place
(checkpoint/hf_io.py `atomic_dir`).
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from prism_mcore.checkpoint.hf_io import CheckpointError, atomic_dir, check_target, open_safetensors, read_json
from prism_mcore.models.qwen3.upcycle import _EXTRA_FILES, _check_args, _dense_weight_map, _ShardWriter

_MLP = re.compile(r"^model\.language_model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$")
_SIDE = re.compile(r"^(preprocessor_config\.json|processor_config\.json|video_preprocessor_config\.json)$")


def _moe_config(raw: dict, num_experts: int, top_k: int, aux_coef: float):
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    dense = Qwen3VLConfig.from_dict(raw)  # normalises legacy fields the way transformers reads them
    text = {k: v for k, v in dense.text_config.to_dict().items() if k not in ("model_type", "transformers_version")}
    text.update(num_experts=num_experts, num_experts_per_tok=top_k, moe_intermediate_size=text["intermediate_size"],
                decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, router_aux_loss_coef=aux_coef)
    vision = {k: v for k, v in dense.vision_config.to_dict().items() if k not in ("model_type", "transformers_version")}
    top = {k: getattr(dense, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                          "vision_end_token_id", "tie_word_embeddings")}
    return Qwen3VLMoeConfig(text_config=text, vision_config=vision, architectures=["Qwen3VLMoeForConditionalGeneration"],
                            **top)


def upcycle(dense_dir, out_dir, num_experts: int = 4, top_k: int = 2, noise_std: float = 0.01, seed: int = 0,
            router_std: float = 0.02, router_aux_loss_coef: float = 0.01, max_shard_bytes: int = 2 * 1024**3,
            overwrite: bool = False) -> Path:
    """Write the upcycled Qwen3-VL-MoE checkpoint of `dense_dir` to `out_dir` and return out_dir."""
    _check_args(num_experts, top_k, noise_std, router_std, router_aux_loss_coef, max_shard_bytes)
    dense, out = Path(dense_dir).resolve(), Path(out_dir).resolve()
    if out == dense:
        raise ValueError(f"out_dir must differ from dense_dir: {out}")
    check_target(out, overwrite)
    raw = read_json(dense / "config.json")
    if raw.get("model_type") != "qwen3_vl":
        raise ValueError(f"dense_dir config model_type must be 'qwen3_vl', found {raw.get('model_type')!r}")
    weight_map = _dense_weight_map(dense)
    try:
        config = _moe_config(raw, num_experts, top_k, router_aux_loss_coef)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{dense / 'config.json'}: not a usable Qwen3-VL config ({str(e).splitlines()[0]})") \
            from None
    layers = config.text_config.num_hidden_layers
    mlp = {(int(m[1]), m[2]): k for k in weight_map if (m := _MLP.match(k))}
    missing = [(i, p) for i in range(layers) for p in ("gate", "up", "down") if (i, p) not in mlp]
    if missing:
        i, p = missing[0]
        raise ValueError(f"dense_dir lacks model.language_model.layers.{i}.mlp.{p}_proj.weight "
                         f"({len(missing)} dense MLP weights missing)")
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
            for key in sorted(k for k in weight_map if not _MLP.match(k)):
                writer.add(key, read(key))
            for i in range(layers):
                gate, up, down = (read(mlp[(i, p)]) for p in ("gate", "up", "down"))  # [I, H], [I, H], [H, I]
                dtype, hidden = gate.dtype, gate.shape[1]
                router = torch.randn(num_experts, hidden, generator=gen, dtype=torch.float32) * router_std
                gate_up = torch.cat([gate, up]).t().float()  # [H, 2I]: gate columns, then up
                down_t = down.t().float()  # [I, H]
                fused, downs = [], []
                for _ in range(num_experts):
                    fused.append(gate_up + torch.randn(gate_up.shape, generator=gen) * noise_std)
                    downs.append(down_t + torch.randn(down_t.shape, generator=gen) * noise_std)
                p = f"model.language_model.layers.{i}.mlp."
                writer.add(p + "gate.weight", router.to(dtype))
                writer.add(p + "experts.gate_up_proj", torch.stack(fused).to(dtype))
                writer.add(p + "experts.down_proj", torch.stack(downs).to(dtype))
            writer.finish()
            handles.clear()
            config.save_pretrained(tmp)  # records transformers_version
            for f in sorted(dense.iterdir()):
                if f.is_file() and (_EXTRA_FILES.match(f.name) or _SIDE.match(f.name)):
                    shutil.copy2(f, tmp / f.name)
    finally:
        handles.clear()
    return out
