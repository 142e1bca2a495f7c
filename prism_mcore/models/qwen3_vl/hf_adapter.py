"""Hugging Face Qwen3-VL / Qwen3-VL-MoE tensors <-> Megatron tensors, exactly, both ways.

Megatron side: the keys of `Qwen3VLModel.sharded_state_dict()` with their global shapes, i.e. a
GPTModel's keys (per-layer tensors with a leading layer axis, expert tensors with a second, expert
axis; see parallel/shards.py) plus `vision.<name>` for each tensor of the vision tower.

HF side:
  * `model.language_model.*`: the Qwen3 text names under another prefix; the text layout (fused QKV
    interleave, [gate; up] fc1, vocabulary padding) is models/qwen3/hf_adapter.py's, reused as it is.
    `lm_head.weight` keeps its name (absent when the embeddings are tied).
  * `model.visual.<name>`: the tower's tensors, unchanged (we run transformers' tower itself).
  * MoE experts fused per layer, in one of two layouts that only a declaration tells apart (the
    shapes coincide when hidden == 2 * moe_intermediate, resp. == moe_intermediate):
      - "released" (Qwen's checkpoints, what vLLM loads, what we write):
            mlp.experts.gate_up_proj [E, H, 2I] (gate columns first), mlp.experts.down_proj [E, I, H]
      - "transformers" (what transformers 5's save_pretrained writes: its in-memory layout):
            mlp.experts.gate_up_proj [E, 2I, H], mlp.experts.down_proj [E, H, I]
    The router is mlp.gate.weight [E, H] in both.
"""
from __future__ import annotations

import re
from typing import Callable, Iterator

import torch

from prism_mcore.models.qwen3 import hf_adapter as text_adapter
from prism_mcore.models.qwen3_vl.config import Qwen3VLArch
from prism_mcore.models.qwen3_vl.vision import HF_VISION_PREFIX, VISION_PREFIX, vision_shapes

RELEASED, TRANSFORMERS = "released", "transformers"
EXPERT_LAYOUTS = (RELEASED, TRANSFORMERS)

# Megatron's expert weights (SequentialMLP and our grouped experts alike), global [layers, E, out, in].
EXPERT_FC1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
EXPERT_FC2 = "decoder.layers.mlp.experts.experts.linear_fc2.weight"

_TEXT_PREFIX = "model.language_model."
_PER_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")


def _check_layout(expert_layout: str) -> None:
    if expert_layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert_layout {expert_layout!r}: expected one of {EXPERT_LAYOUTS}")


def vl_text_name(text_name: str) -> str:
    """A Qwen3 text-model HF name as Qwen3-VL stores it ('model.layers.0...' -> 'model.language_model.layers.0...')."""
    return _TEXT_PREFIX + text_name[len("model."):] if text_name.startswith("model.") else text_name


def fused_expert_names(layer: int) -> tuple[str, str]:
    p = f"{_TEXT_PREFIX}layers.{layer}.mlp.experts."
    return p + "gate_up_proj", p + "down_proj"


def _fused_shapes(arch: Qwen3VLArch, expert_layout: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    m = arch.text
    e, h, i = m.num_experts, m.hidden_size, m.moe_intermediate_size or m.intermediate_size
    if expert_layout == RELEASED:
        return (e, h, 2 * i), (e, i, h)
    return (e, 2 * i, h), (e, h, i)


def hf_shapes(arch: Qwen3VLArch, expert_layout: str = RELEASED) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of this architecture holds, with its shape."""
    _check_layout(expert_layout)
    shapes = {vl_text_name(n): s for n, s in text_adapter.hf_shapes(arch.text).items() if not _PER_EXPERT.fullmatch(n)}
    if arch.is_moe:
        gate_up, down = _fused_shapes(arch, expert_layout)
        for layer in range(arch.text.num_hidden_layers):
            gate_up_name, down_name = fused_expert_names(layer)
            shapes[gate_up_name], shapes[down_name] = gate_up, down
    shapes.update(vision_shapes(arch))
    return shapes


# ---- HF -> Megatron ------------------------------------------------------------------------------

def _expert_matrix(hf_get, arch: Qwen3VLArch, expert_layout: str, layer: int, expert: int, which: str
                   ) -> torch.Tensor:
    """One expert's gate / up [I, H] or down [H, I] weight (nn.Linear layout) from the fused tensors,
    reading only that expert's slice."""
    inter = arch.text.moe_intermediate_size or arch.text.intermediate_size
    gate_up_name, down_name = fused_expert_names(layer)
    one = (slice(expert, expert + 1),)
    if which == "down":
        w = hf_get(down_name, one)[0]
        return w.t() if expert_layout == RELEASED else w
    w = hf_get(gate_up_name, one)[0]
    if expert_layout == RELEASED:  # [H, 2I]: columns are gate then up
        w = w.t()
    return w[:inter] if which == "gate" else w[inter:]


def megatron_reader(arch: Qwen3VLArch, hf_get: Callable[[str, tuple], torch.Tensor], expert_layout: str = RELEASED
                    ) -> Callable[[str, tuple[slice, ...]], torch.Tensor]:
    """A `read(key, region)` for `shards.load_full`: builds only the requested region of a Megatron
    tensor. `hf_get(name, index)` returns `tensor[index]` of one HF tensor (lazily, e.g. a safetensors
    slice), so each rank reads only its layers, experts and the tower where it lives."""
    _check_layout(expert_layout)

    def text_get(name: str, index: tuple) -> torch.Tensor:
        # The Qwen3 reader asks for per-expert tensors; Qwen3-VL-MoE stores them fused.
        match = _PER_EXPERT.fullmatch(name)
        if match:
            layer, expert, which = int(match[1]), int(match[2]), match[3]
            w = _expert_matrix(hf_get, arch, expert_layout, layer, expert, which)
            return w[index] if index else w
        return hf_get(vl_text_name(name), index)

    read_text = text_adapter.megatron_reader(arch.text, text_get)

    def read(key: str, region: tuple[slice, ...]) -> torch.Tensor:
        if key.startswith(VISION_PREFIX):
            return hf_get(HF_VISION_PREFIX + key[len(VISION_PREFIX):], region)
        return read_text(key, region)

    return read


# ---- Megatron -> HF ------------------------------------------------------------------------------

def hf_views(arch: Qwen3VLArch, key: str, layer: int | None, value: torch.Tensor, expert_layout: str = RELEASED
             ) -> Iterator[tuple[str, torch.Tensor, tuple[int, ...]]]:
    """(HF name, source, HF shape) for one Megatron tensor (or one layer of it: `value` without the layer
    axis); `source.reshape(shape)` is the HF tensor, and sources are views of `value`."""
    _check_layout(expert_layout)
    if key.startswith(VISION_PREFIX):
        yield HF_VISION_PREFIX + key[len(VISION_PREFIX):], value, tuple(value.shape)
        return
    if key in (EXPERT_FC1, EXPERT_FC2):
        gate_up_name, down_name = fused_expert_names(layer)
        # Megatron: fc1 [E, 2I, H] ([gate; up] rows), fc2 [E, H, I] -- transformers' layout already.
        fused = value.transpose(1, 2) if expert_layout == RELEASED else value
        yield (gate_up_name if key == EXPERT_FC1 else down_name), fused, tuple(fused.shape)
        return
    for name, source, shape in text_adapter.hf_views(arch.text, key, layer, value):
        yield vl_text_name(name), source, shape


def hf_tensors(arch: Qwen3VLArch, key: str, layer: int | None, value: torch.Tensor,
               expert_layout: str = RELEASED) -> Iterator[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs for one Megatron tensor (or one layer of it: `value` without the layer axis)."""
    for name, source, shape in hf_views(arch, key, layer, value, expert_layout):
        yield name, source.reshape(shape).contiguous()


def is_layered(key: str) -> bool:
    return text_adapter.is_layered(key)
