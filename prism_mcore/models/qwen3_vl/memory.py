"""The Qwen3-VL vision tower's parameters and activations for the memory estimate (pure arithmetic).

Exact for transformers' Qwen3VLVisionModel (tests/test_memory.py counts a meta-device tower): patch embedding
Conv3d (with bias), learned position embedding, `depth` pre-norm blocks (LayerNorm, fused qkv and proj with
biases, a GELU MLP with biases), the patch merger (LayerNorm over hidden, then two Linear layers over
hidden x merge^2) and one merger per deepstack feature (LayerNorm over hidden x merge^2).
"""
from __future__ import annotations


def _tower(v: dict) -> tuple[int, int, int, int, int]:
    h, inter = int(v.get("hidden_size", 1152)), int(v.get("intermediate_size", 4304))
    merged = h * int(v.get("spatial_merge_size", 2)) ** 2
    return h, inter, merged, int(v.get("out_hidden_size", 3584)), len(v.get("deepstack_visual_indexes", ()))


def merger_params(v: dict) -> int:
    """The patch merger and the deepstack mergers."""
    h, _, merged, out, k = _tower(v)
    linears = merged * merged + merged + merged * out + out
    return (2 * h + linears) + k * (2 * merged + linears)


def vision_params(v: dict) -> int:
    h, inter, _, _, _ = _tower(v)
    patch = int(v.get("in_channels", 3)) * int(v.get("temporal_patch_size", 2)) * int(v.get("patch_size", 16)) ** 2
    embed = patch * h + h + int(v.get("num_position_embeddings", 2304)) * h
    block = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * inter + inter) + (inter * h + h)
    return embed + int(v.get("depth", 27)) * block + merger_params(v)


def trainable_vision_params(v: dict, train: str) -> int:
    return {"frozen": 0, "merger": merger_params(v), "full": vision_params(v)}[train]


def image_tokens(v: dict, max_pixels: int) -> int:
    """LLM tokens of one image of at most `max_pixels` pixels (one per (patch x merge)^2 pixels)."""
    side = int(v.get("patch_size", 16)) * int(v.get("spatial_merge_size", 2))
    return max(1, max_pixels // (side * side))


def vision_activation_elements(v: dict, train: str, tokens: int) -> float:
    """Elements autograd keeps for the tower over `tokens` image tokens (merge^2 patches each), assuming
    flash attention over each image's patches: per patch and block the norm and qkv inputs (2h), q, k, v
    (3h), the projection input (h), the MLP's norm and fc1 inputs (2h) and its GELU / fc2 inputs (2I); the
    mergers keep their inputs and hidden layers (about 4 h merge^2 per image token each). A frozen tower
    keeps nothing (no parameter needs a gradient), `merger` keeps only the mergers'."""
    h, inter, merged, _, k = _tower(v)
    patches = tokens * int(v.get("spatial_merge_size", 2)) ** 2
    mergers = (1 + k) * tokens * 4 * merged
    if train == "frozen":
        return 0.0
    if train == "merger":
        return float(mergers)
    return float(int(v.get("depth", 27)) * patches * (8 * h + 2 * inter) + mergers)
