"""Loading a Qwen3-VL(-MoE) Megatron model from an HF directory at any TP/PP/EP layout (each rank reads
only its slices), and writing it back to an HF directory (a collective; rank 0 writes).

Round trip HF -> Megatron -> HF is bitwise: every conversion is a copy, a concatenation or a
transpose, and the vocabulary padding is stripped on the way out.
"""
from __future__ import annotations

from pathlib import Path

import torch

from prism_mcore.checkpoint.hf_io import LazyCheckpoint, ShapeMismatch
from prism_mcore.models.qwen3_vl.config import Qwen3VLArch
from prism_mcore.models.qwen3_vl.hf_adapter import EXPERT_LAYOUTS, RELEASED, hf_shapes, megatron_reader
from prism_mcore.parallel.shards import load_full


def check_checkpoint(source: LazyCheckpoint, arch: Qwen3VLArch, expert_layout: str = RELEASED) -> None:
    """Raise ShapeMismatch unless `source` holds exactly the tensors of `arch` in `expert_layout`; when it
    matches the other expert layout instead, the message says so."""
    try:
        source.check_shapes(hf_shapes(arch, expert_layout))
    except ShapeMismatch as mismatch:
        for other in EXPERT_LAYOUTS:
            if other == expert_layout or not arch.is_moe:
                continue
            try:
                source.check_shapes(hf_shapes(arch, other))
            except ShapeMismatch:
                continue
            raise ShapeMismatch(f"{mismatch}; its experts have the {other!r} layout's shapes: "
                                f"pass expert_layout={other!r}") from None
        raise


def load_hf_weights(model: torch.nn.Module, arch: Qwen3VLArch, hf_dir: str | Path,
                    expert_layout: str = RELEASED) -> list[str]:
    """Fill this rank's pieces of `model` (built by `build_qwen3_vl`) from the HF checkpoint in `hf_dir`.
    Returns the Megatron keys loaded. `expert_layout`: see hf_adapter.py (MoE only)."""
    source = LazyCheckpoint(hf_dir)
    check_checkpoint(source, arch, expert_layout)
    return load_full(model, megatron_reader(arch, source.get, expert_layout))
