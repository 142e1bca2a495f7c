"""One optimizer step of a Megatron model: DDP wrapping, the distributed optimizer, the pipeline
schedule. Every stage (SFT, discriminator warm-up, alignment, RL) trains through these three calls.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from prism_mcore.config import OptimConfig, ParallelConfig


def wrap_ddp(model: torch.nn.Module, grad_reduce_in_fp32: bool = True, use_distributed_optimizer: bool = True):
    """Megatron DDP: grads land in contiguous fp32 `main_grad` buckets, reduced over data parallel ranks."""
    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=False,
        bucket_size=None,
    )
    # The schedule calls this after the last backward: DP grad reduction, plus the TP all-reduce of
    # replicated parameters that see different tokens or heads per rank (SP norms, qk-layernorm).
    model.config.finalize_model_grads_func = finalize_model_grads
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def build_optimizer(ddp_models: list, optim: OptimConfig, params_dtype: torch.dtype = torch.float32):
    """AdamW through Megatron (distributed optimizer shards its state over data-parallel ranks)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        params_dtype=params_dtype,
        use_distributed_optimizer=optim.use_distributed_optimizer,
    )
    return get_megatron_optimizer(config, ddp_models)


def lr_at(step: int, total_steps: int, optim: OptimConfig) -> float:
    """Linear warm-up, then constant or cosine decay to min_lr (step counts from 0)."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    span = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * progress))


@dataclass
class StepResult:
    losses: list[dict[str, float]]  # per micro-batch, as returned by the loss function (last stage only)
    grad_norm: float
    skipped: bool  # the optimizer skipped the update (non-finite gradients)


def train_step(ddp_models: list, optimizer, forward_step: Callable, microbatches: Iterable[Any],
               num_microbatches: int, seq_length: int, micro_batch_size: int, lr: float | None = None) -> StepResult:
    """Forward/backward over all micro-batches with Megatron's schedule (1F1B when PP > 1), then step.

    `forward_step(batch, model) -> (output, loss_fn)` as in Megatron; `loss_fn(output)` returns
    `(loss, {name: value})` where loss is this micro-batch's mean. Megatron divides it by
    `num_microbatches` and DDP averages gradients over data-parallel ranks."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for model in ddp_models:
        model.zero_grad_buffer()
    optimizer.zero_grad()
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    batches = iter(microbatches)
    losses = get_forward_backward_func()(
        forward_step_func=lambda data_iter, model: forward_step(next(data_iter), model),
        data_iterator=batches,
        model=ddp_models,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    update_ok, grad_norm, _ = optimizer.step()
    return StepResult(losses=[{k: float(v) for k, v in d.items()} for d in losses],
                      grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                      skipped=not update_ok)


def parallel_summary(parallel: ParallelConfig) -> str:
    from megatron.core import parallel_state as ps

    return (f"tp={ps.get_tensor_model_parallel_world_size()} pp={ps.get_pipeline_model_parallel_world_size()} "
            f"ep={ps.get_expert_model_parallel_world_size()} dp={ps.get_data_parallel_world_size()} "
            f"sp={parallel.sequence_parallel}")
