"""Tiny Qwen3-VL / Qwen3-VL-MoE checkpoints, image batches, and the rank functions of the Qwen3-VL tests.

Each rank function runs several layouts in one launch (re-initializing the parallel groups between
them): rank start-up is cheap, model builds are not, and 4 ranks share 2 cores here.
"""
from __future__ import annotations

import torch

VOCAB = 384
TEXT_TOKENS = 290  # ordinary tokens are drawn below this id
IMAGE, VIDEO, V_START, V_END = 300, 301, 302, 303
MERGE, PATCH, TEMPORAL = 2, 8, 2
PIXEL_DIM = 3 * TEMPORAL * PATCH * PATCH


def tiny_vl_config(moe: bool = False, tied: bool = False, layers: int = 4) -> dict:
    """Keyword arguments of Qwen3VL(Moe)Config: 4 text layers so that PP2's first stage holds both
    deepstack layers; head_dim 32 with the interleaved sections [6, 5, 5] (they add up to head_dim/2)."""
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                rms_norm_eps=1e-6,
                rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[6, 5, 5],
                                     mrope_interleaved=True))
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, decoder_sparse_step=1,
                    mlp_only_layers=[], router_aux_loss_coef=0.001)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, out_hidden_size=64,
                  num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
    return dict(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                vision_start_token_id=V_START, vision_end_token_id=V_END, tie_word_embeddings=tied)


def hf_class(moe: bool):
    from transformers import (Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLMoeConfig,
                              Qwen3VLMoeForConditionalGeneration)

    return (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if moe else \
        (Qwen3VLConfig, Qwen3VLForConditionalGeneration)


def tiny_vl_hf(out_dir, moe: bool = False, tied: bool = False, layers: int = 4, seed: int = 0):
    """A random tiny HF checkpoint written with transformers, MoE experts rewritten into Qwen's released
    layout (gate_up_proj [E, H, 2I], down_proj [E, I, H]). Returns the model (eval, float32)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    config_cls, model_cls = hf_class(moe)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**tiny_vl_config(moe, tied, layers))).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0; make them informative
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    if moe:
        path = f"{out_dir}/model.safetensors"
        with safe_open(path, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        for k in tensors:
            if k.endswith("mlp.experts.gate_up_proj") or k.endswith("mlp.experts.down_proj"):
                tensors[k] = tensors[k].transpose(1, 2).contiguous()
        save_file(tensors, path, metadata={"format": "pt"})
    return model


def grid_tokens(grid) -> int:
    t, h, w = grid
    return t * h * w // (MERGE * MERGE)


def vl_batch(images_per_row=(0, 1, 2), grids=((1, 4, 4), (1, 6, 4), (1, 2, 6)), pad: str = "right",
             multiple: int = 4, seed: int = 1) -> dict:
    """A batch whose rows carry the given numbers of images (grids taken in order), text around them, and
    padding on `pad`'s side up to a common length, a multiple of `multiple`.
    Keys: input_ids, attention_mask [B, S]; pixel_values [patches, PIXEL_DIM] and image_grid_thw
    [images, 3] (None when no row has an image)."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(0, TEXT_TOKENS, (n,), generator=g)  # noqa: E731
    rows, used = [], []
    next_grid = iter(grids)
    for r, count in enumerate(images_per_row):
        parts = [text(3 + r)]
        for _ in range(count):
            grid = next(next_grid)
            used.append(grid)
            parts += [torch.tensor([V_START]), torch.full((grid_tokens(grid),), IMAGE), torch.tensor([V_END]),
                      text(2)]
        parts.append(text(4))
        rows.append(torch.cat(parts))
    length = -(-max(len(r) for r in rows) // multiple) * multiple
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for r, row in enumerate(rows):
        cols = slice(0, len(row)) if pad == "right" else slice(length - len(row), length)
        ids[r, cols], mask[r, cols] = row, 1
    pixels = None
    if used:
        n = sum(t * h * w for t, h, w in used)
        pixels = torch.randn(n, PIXEL_DIM, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
            "image_grid_thw": torch.tensor(used, dtype=torch.long) if used else None}


def hf_forward(model, batch: dict):
    """transformers' logits [B, S, V] for a batch (with its attention mask and image token types)."""
    ids = batch["input_ids"]
    return model(input_ids=ids, attention_mask=batch["attention_mask"],
                 mm_token_type_ids=(ids == IMAGE).int(), pixel_values=batch["pixel_values"],
                 image_grid_thw=batch["image_grid_thw"]).logits


# ---- rank functions -----------------------------------------------------------------------------

def _init(arch, layout: dict):
    """The parallel groups of `layout` (validated against the text model, e.g. EP needs experts)."""
    from prism_mcore.config.load import build_config
    from prism_mcore.parallel.layout import init_model_parallel

    cfg = build_config({"model": arch.text.model_dump(), "parallel": dict(layout)})
    init_model_parallel(cfg)
    return cfg


def _setup(hf_dir: str, layout: dict, extra: tuple = ()):
    from prism_mcore.models.qwen3_vl.config import arch_from_hf
    from prism_mcore.models.qwen3_vl.model import build_qwen3_vl
    from prism_mcore.models.qwen3_vl.weights import load_hf_weights

    arch = arch_from_hf(hf_dir, **dict(extra))
    cfg = _init(arch, layout)
    model = build_qwen3_vl(arch, cfg.parallel)
    load_hf_weights(model, arch, hf_dir)
    return arch, cfg, model


def _positions(arch, batch):
    from prism_mcore.models.qwen3_vl.rope import rope_index

    return rope_index(batch["input_ids"], batch["image_grid_thw"], batch["attention_mask"], arch.spatial_merge_size,
                      arch.image_token_id, arch.vision_start_token_id)[0]


def _run(model, batch, positions, loss_fn, forward_only: bool):
    """One micro-batch through Megatron's schedule (1F1B with PP); `loss_fn(output) -> (loss, dict)`."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ids = batch["input_ids"]

    def step(_, m):
        out = m(ids, positions, None, pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
        return out, loss_fn

    return get_forward_backward_func()(forward_step_func=step, data_iterator=iter([None]), model=[model],
                                       num_microbatches=1, seq_length=ids.shape[1], micro_batch_size=ids.shape[0],
                                       forward_only=forward_only)


def _full_logits(arch):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return lambda out: gather_from_tensor_model_parallel_region(out)[..., : arch.text.vocab_size]


def vl_logits(hf_dir: str, layouts: list[dict], batches: list[dict]) -> list:
    """For each layout, the full-vocab logits of each batch on the last pipeline stage (None elsewhere)."""
    from megatron.core import parallel_state as ps

    results = []
    for layout in layouts:
        arch, _, model = _setup(hf_dir, layout)
        model.eval()
        full = _full_logits(arch)
        per_batch = []
        for batch in batches:
            positions = _positions(arch, batch)
            with torch.no_grad():
                out = _run(model, batch, positions, lambda o: (torch.zeros(()), {"logits": full(o)}), True)
            per_batch.append(out[0]["logits"].clone() if ps.is_pipeline_last_stage() else None)
        results.append(per_batch)
    return results


def vl_fused_logprobs(hf_dir: str, layout: dict, batch: dict):
    """Next-token log-probs through `use_fused_logprob_head` (no logits) on the last stage."""
    from megatron.core import parallel_state as ps

    from prism_mcore.models.qwen3.logprob_head import hidden_to_logprobs, use_fused_logprob_head

    arch, _, model = _setup(hf_dir, layout)
    use_fused_logprob_head(model)
    model.eval()
    ids = batch["input_ids"]
    targets = torch.cat([ids[:, 1:], torch.full((ids.shape[0], 1), -1)], dim=1)

    def collect(hidden):
        logp, _ = hidden_to_logprobs(model, hidden, targets, arch.text.vocab_size, with_entropy=False)
        return torch.zeros(()), {"logp": logp}

    with torch.no_grad():
        out = _run(model, batch, _positions(arch, batch), collect, True)
    return out[0]["logp"][:, :-1].clone() if ps.is_pipeline_last_stage() else None


def _wrap_ddp(model):
    """Megatron DDP as the trainer uses it (fp32 main_grad buckets; the schedule calls
    finalize_model_grads: DP reduction and the TP sum of `sequence_parallel` parameters), all-reducing
    (not reduce-scattering, as for the distributed optimizer) so that every rank holds whole gradients."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    model.config.finalize_model_grads_func = finalize_model_grads
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=False, bucket_size=None)
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def vl_vision_grads(hf_dir: str, layouts: list[dict], batch: dict, weights: torch.Tensor) -> list:
    """For each layout: loss = sum(logits * weights) through DDP + Megatron's schedule (grad finalization
    included), then one step of Megatron's optimizer. Returns, per layout, (vision grads {HF name: grad}
    on the first stage or None, the optimizer's global grad norm, vision parameters after the step)."""
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    results = []
    for layout in layouts:
        arch, _, model = _setup(hf_dir, layout)
        ddp = _wrap_ddp(model)
        # clip_grad only so that the optimizer computes the global norm (it is far above it)
        optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=1e9,
                                                           use_distributed_optimizer=False), [ddp])
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        full = _full_logits(arch)

        def loss_fn(out):
            loss = (full(out) * weights).sum()
            return loss, {"loss": loss.detach()}

        _run(ddp, batch, _positions(arch, batch), loss_fn, forward_only=False)
        grads = params = None
        if ps.is_pipeline_first_stage():
            grads = {"model.visual." + n: p.main_grad.clone() for n, p in model.vision.named_parameters()}
        _, grad_norm, _ = optimizer.step()
        if ps.is_pipeline_first_stage():
            params = {"model.visual." + n: p.detach().clone() for n, p in model.vision.named_parameters()}
        results.append((grads, float(grad_norm), params))
    return results


def vl_round_trip(hf_dir: str, out_dir: str, ckpt_dir: str, first: dict, second: dict) -> bool:
    """HF -> Megatron at layout `first` -> dist checkpoint -> Megatron at layout `second` -> HF in out_dir."""
    from prism_mcore.checkpoint.dist_ckpt import load_checkpoint, save_checkpoint
    from prism_mcore.checkpoint.hf_io import side_files
    from prism_mcore.models.qwen3_vl.model import build_qwen3_vl
    from prism_mcore.checkpoint.hf_weights import write_hf
    from prism_mcore.models.qwen3_vl.family import SPEC

    arch, _, model = _setup(hf_dir, first)
    path = save_checkpoint(ckpt_dir, 0, [model])
    cfg = _init(arch, second)
    model = build_qwen3_vl(arch, cfg.parallel, vision_seed=99)  # fresh values everywhere, overwritten below
    load_checkpoint(path, [model])
    write_hf(model, SPEC, arch, "policy", out_dir, list(side_files(hf_dir)), max_shard_bytes=300_000)
    return True
