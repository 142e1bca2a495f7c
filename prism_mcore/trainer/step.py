"""The step runner every stage trains through: plan -> normalise -> forward/backward -> step -> reduce.

A stage hands `StepRunner.train` the whole step's `Batch` (every rank holds it) and an `Objective` (how
its model runs on a micro-batch and what the loss of the output is). The runner
  1. plans this data-parallel rank's micro-batches (parallel/microbatch.py: same count on every rank);
  2. counts the global loss tokens / sequences / units over all of them (one all-reduce) and builds the
     `LossNormalizer` that makes each micro-batch's loss its exact share of the global mean;
  3. runs Megatron's schedule (1F1B under pipeline parallelism) with each micro-batch moved to the
     model's device as it is used, then the optimizer step at the step's learning rate;
  4. reduces the objective's per-micro-batch metrics from the ranks that hold them (last pipeline stage,
     tensor-parallel rank 0) to every rank.
`StepRunner.forward` is the no-grad pass (log-prob recomputation, discriminator scoring): it returns
per-row outputs for the whole batch on every rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Protocol

import torch
import torch.distributed as dist

from prism_mcore.algorithms.aggregation import LossNormalizer
from prism_mcore.config import OptimConfig
from prism_mcore.data.batch import Batch


# ---- the Megatron model being trained ---------------------------------------------------------

def wrap_ddp(model: torch.nn.Module, grad_reduce_in_fp32: bool = True, use_distributed_optimizer: bool = True):
    """Megatron DDP: grads land in contiguous fp32 `main_grad` buckets, reduced over data parallel ranks."""
    from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                           finalize_model_grads)

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=grad_reduce_in_fp32, overlap_grad_reduce=False,
                                               use_distributed_optimizer=use_distributed_optimizer,
                                               check_for_nan_in_grad=False, bucket_size=None)
    # The schedule calls this after the last backward: DP grad reduction, plus the TP all-reduce of
    # replicated parameters that see different tokens or heads per rank (SP norms, qk-layernorm).
    model.config.finalize_model_grads_func = finalize_model_grads
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def build_optimizer(ddp_models: list, optim: OptimConfig, params_dtype: torch.dtype = torch.float32):
    """AdamW through Megatron (the distributed optimizer shards its state over data-parallel ranks). Parameters
    the model spec tagged with a learning-rate multiplier (`prism_lr_mult`, e.g. the vision tower's
    `model.vision.lr_mult`) get a param group of their own with that `lr_mult`; frozen parameters
    (requires_grad False) get none."""
    from megatron.core.optimizer import OptimizerConfig, ParamKey, get_megatron_optimizer
    from megatron.core.optimizer import get_standard_config_overrides
    from megatron.core.optimizer.optimizer_config import ParamPredicate

    config = OptimizerConfig(optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
                             adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
                             clip_grad=optim.clip_grad, bf16=params_dtype == torch.bfloat16,
                             fp16=params_dtype == torch.float16, params_dtype=params_dtype,
                             use_distributed_optimizer=optim.use_distributed_optimizer)
    mults = sorted({getattr(p, "prism_lr_mult") for m in ddp_models for p in m.parameters()
                    if p.requires_grad and hasattr(p, "prism_lr_mult")})
    overrides = None  # Megatron's default groups (no weight decay on biases and 1-D parameters)
    if mults:
        overrides = get_standard_config_overrides(config)
        for mult in mults:
            key = ParamKey(predicate=ParamPredicate(name=f"lr_mult_{mult}",
                                                    fn=lambda p, mult=mult: getattr(p, "prism_lr_mult", None) == mult))
            overrides[key] = {"lr_mult": mult}
    return get_megatron_optimizer(config, ddp_models, config_overrides=overrides)


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
class Trainable:
    """One Megatron model being trained: the bare module, its DDP wrapper, its optimizer and schedule."""

    net: torch.nn.Module
    ddp: Any
    optimizer: Any
    optim: OptimConfig

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device


def trainable(net: torch.nn.Module, optim: OptimConfig) -> Trainable:
    ddp = wrap_ddp(net, use_distributed_optimizer=optim.use_distributed_optimizer)
    # Data-parallel replicas must start equal. A model loaded from a checkpoint is; a randomly initialised
    # one need not be: with expert parallelism each rank draws its experts from its own RNG stream, and on
    # CPU Megatron's deferred RNG restore never runs, so the dense layers drawn afterwards differed per
    # rank (replicas that then trained apart). Broadcasting from each DP group's first rank settles it.
    ddp.broadcast_params()
    return Trainable(net, ddp, build_optimizer([ddp], optim), optim)


# ---- one step ---------------------------------------------------------------------------------

class Objective(Protocol):
    """What a stage trains, in Megatron's forward-step idiom. `mode` is the loss aggregation
    (algorithms/aggregation.py). `step(net, batch, norm)` runs the model on a micro-batch (already on the
    model's device) and returns (output, loss_fn); `loss_fn(output)` returns the micro-batch's loss, already
    normalised by `norm` (whose counts are global), and metrics as 0-dim tensors that are this micro-batch's
    shares of global values (summed over micro-batches and ranks; names ending in `_min` / `_max` are
    reduced by min / max). An objective may define `units(batch) -> float`, a count of its own (pairs,
    comparisons) that the runner sums into `norm.num_units`."""

    mode: str

    def step(self, net: torch.nn.Module, batch: Batch, norm: "StepNormalizer") -> tuple[torch.Tensor, Callable]: ...


@dataclass(frozen=True)
class StepNormalizer(LossNormalizer):
    """The step's LossNormalizer plus the objective's own global unit count."""

    num_units: float = 1.0

    def loss_per_unit(self, numerator: torch.Tensor) -> torch.Tensor:
        return self.loss_of_sum(numerator, self.num_units)


@dataclass
class StepResult:
    metrics: dict[str, float]  # global values, the same on every rank
    grad_norm: float
    skipped: bool              # no update was applied (a non-finite loss or gradient norm, or fp16 overflow)
    num_micro: int
    nonfinite: bool = False    # the loss or the gradient norm was not finite


def forward_backward(ddp_models: list, optimizer, forward_step: Callable, microbatches: Iterable[Any],
                     num_microbatches: int, seq_length: int, micro_batch_size: int, lr: float | None = None):
    """Forward/backward over all micro-batches with Megatron's schedule (1F1B when PP > 1), gradients reduced,
    no update yet. `forward_step(batch, model) -> (output, loss_fn)` as in Megatron. Returns the per-micro-
    batch metric dicts of the last pipeline stage."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for model in ddp_models:
        model.zero_grad_buffer()
    optimizer.zero_grad()
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)  # build_optimizer's per-group multipliers
    return get_forward_backward_func()(
        forward_step_func=lambda data_iter, model: forward_step(next(data_iter), model), data_iterator=iter(microbatches),
        model=ddp_models, num_microbatches=num_microbatches, seq_length=seq_length,
        micro_batch_size=micro_batch_size, forward_only=False)


def guarded_update(optimizer, loss_is_finite: bool = True) -> tuple[float, bool]:
    """Collective: the optimizer step, unless the loss or the gradient norm is not finite; then the weights and
    the optimizer state stay as they were. Returns (grad norm, skipped)."""
    # fp16's loss scaler unscales in prepare_grads, once; it also skips overflowing steps by itself
    scaled = getattr(optimizer, "grad_scaler", None) is not None or any(
        getattr(o, "grad_scaler", None) is not None for o in getattr(optimizer, "chained_optimizers", []))
    norm = None
    if not scaled:
        optimizer.prepare_grads()  # copies grads to the optimizer's main grads (repeated by step(): idempotent)
        norm = float(optimizer.get_grad_norm())
        if not (loss_is_finite and math.isfinite(norm)):
            return norm, True
    update_ok, step_norm, _ = optimizer.step()
    norm = float(step_norm) if step_norm is not None else norm
    return (norm if norm is not None else float("nan")), not update_ok


def megatron_step(ddp_models: list, optimizer, forward_step: Callable, microbatches: Iterable[Any],
                  num_microbatches: int, seq_length: int, micro_batch_size: int, lr: float | None = None):
    """`forward_backward`, then `guarded_update`. Returns (per-micro-batch metric dicts, grad norm, skipped)."""
    outputs = forward_backward(ddp_models, optimizer, forward_step, microbatches, num_microbatches, seq_length,
                               micro_batch_size, lr)
    grad_norm, skipped = guarded_update(optimizer)
    return outputs, grad_norm, skipped


class StepRunner:
    """Owned by a stage; holds what every step of it shares (token budget, padding id)."""

    def __init__(self, token_budget: int, pad_id: int):
        self.token_budget, self.pad_id = token_budget, pad_id

    def plan(self, batch: Batch, net: torch.nn.Module):
        """This rank's micro-batches of `batch` for the model `net` (its layout decides the padding)."""
        from megatron.core import parallel_state as ps

        from prism_mcore.parallel.microbatch import plan_micro_batches

        config = net.config
        # sequence parallelism splits every sequence over the TP ranks: lengths must divide evenly
        multiple = config.tensor_model_parallel_size if config.sequence_parallel else 1
        return plan_micro_batches(batch, self.token_budget, ps.get_data_parallel_rank(),
                                  ps.get_data_parallel_world_size(), self.pad_id,
                                  pipeline_parallel=ps.get_pipeline_model_parallel_world_size() > 1,
                                  length_multiple=multiple)

    def normalizer(self, plan, objective: Objective) -> StepNormalizer:
        from megatron.core import parallel_state as ps

        counts = torch.zeros(3, dtype=torch.float64)
        units = getattr(objective, "units", None)
        for m in plan.micro_batches[:plan.num_real]:
            if m.loss_mask is not None:
                mask = m.loss_mask.to(torch.float64)
                counts[0] += mask.sum()
                counts[1] += (mask.sum(-1) > 0).sum()
            if units is not None:
                counts[2] += float(units(m))
        dp = ps.get_data_parallel_world_size(with_context_parallel=True)
        if dp > 1:
            dist.all_reduce(counts, group=ps.get_data_parallel_group(with_context_parallel=True))
        return StepNormalizer(objective.mode, float(counts[0]), float(counts[1]),
                              scale=float(len(plan.micro_batches) * dp),
                              norm_length=getattr(objective, "norm_length", None), num_units=float(counts[2]))

    def train(self, model: Trainable, batch: Batch, objective: Objective, lr: float | None) -> StepResult:
        """Collective: one optimizer step of `model` on `batch`."""
        plan = self.plan(batch, model.net)
        norm = self.normalizer(plan, objective)
        device = model.device

        def forward_step(item: tuple[bool, Batch], net):
            real, micro = item
            output, loss_fn = objective.step(net, micro.to(device, non_blocking=True), norm)
            if not real:
                # A placeholder adds nothing to the loss but must run backward through the whole model like
                # its peers' micro-batches (TP / expert all-to-all collectives in the backward pass).
                return output, _zero_loss
            return output, _recording_loss(loss_fn)

        rows, length = plan.shape or (max(m.num_rows for m in plan.micro_batches),
                                      max(m.length for m in plan.micro_batches))
        items = [(i < plan.num_real, m) for i, m in enumerate(plan.micro_batches)]
        outputs = forward_backward([model.ddp], model.optimizer, forward_step, items, len(items), seq_length=length,
                                   micro_batch_size=rows, lr=lr)
        metrics = reduce_metrics(outputs)
        loss = metrics.pop(_LOSS, 0.0)
        grad_norm, skipped = guarded_update(model.optimizer, loss_is_finite=math.isfinite(loss))
        nonfinite = not (math.isfinite(loss) and math.isfinite(grad_norm))
        return StepResult(metrics, grad_norm, skipped, len(plan.micro_batches), nonfinite)

    def forward(self, model, batch: Batch,
                score: Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, Callable]]) -> dict[str, torch.Tensor]:
        """Collective, no grad, eval mode. `score(net, micro) -> (output, collect)` where `collect(output)` gives
        per-row values {name: [rows, ...]} of the micro-batch; returns them for every row of `batch`
        ([B, ...] float32) on every rank."""
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        ddp = model.ddp if isinstance(model, Trainable) else model
        device = next(ddp.parameters()).device
        plan = self.plan(replace(batch, index=torch.arange(batch.num_rows)), ddp)

        def forward_step(data_iter, net):
            micro = next(data_iter).to(device, non_blocking=True)
            output, collect = score(net, micro)

            def loss_fn(out):
                values = {k: v.detach().float() for k, v in collect(out).items()}
                return torch.zeros((), device=out.device), {"index": micro.index, **values}

            return output, loss_fn

        rows, length = plan.shape or (max(m.num_rows for m in plan.micro_batches),
                                      max(m.length for m in plan.micro_batches))
        was_training = ddp.training
        ddp.eval()
        try:
            with torch.no_grad():
                outputs = get_forward_backward_func()(
                    forward_step_func=forward_step, data_iterator=iter(plan.micro_batches), model=[ddp],
                    num_microbatches=len(plan.micro_batches), seq_length=length, micro_batch_size=rows,
                    forward_only=True)
        finally:
            ddp.train(was_training)
        return gather_rows(outputs or [], batch.num_rows, ps.is_pipeline_last_stage(), batch.length)


def _zero_loss(output: torch.Tensor):
    return output.sum() * 0.0, {}


_LOSS = "_loss"  # the runner's own record of the loss backward saw (summed, then checked for finiteness)


def _recording_loss(loss_fn: Callable) -> Callable:
    def wrapped(output):
        loss, metrics = loss_fn(output)
        return loss, {**metrics, _LOSS: loss.detach().float()}  # only its finiteness is read

    return wrapped


def gather_rows(outputs: list[dict], num_rows: int, holds: bool, seq_length: int) -> dict[str, torch.Tensor]:
    """Per-row values from the micro-batches of every data-parallel rank's last pipeline stage -> full
    tensors on every rank: [num_rows] for a value per row, [num_rows, seq_length] for a value per token (a
    micro-batch is trimmed to its longest row: shorter rows are zero past their micro-batch's length). Each
    row belongs to one DP rank; the TP ranks of the last stage hold identical values and each reduces within
    its own DP group, so nothing is counted twice."""
    from megatron.core import parallel_state as ps

    names = _agreed_names(sorted({k for out in outputs for k in out if k != "index"}))
    per_token = _agreed_names(sorted({k for out in outputs for k, v in out.items() if k != "index" and v.dim() > 1}))
    full: dict[str, torch.Tensor] = {}
    for name in names:
        value = torch.zeros((num_rows, seq_length) if name in per_token else (num_rows,), dtype=torch.float64)
        if holds:
            for out in outputs:
                keep = out["index"] >= 0
                rows = out["index"][keep].cpu()
                got = out[name][keep.to(out[name].device)].double().cpu()
                if name in per_token:
                    width = min(got.shape[1], seq_length)
                    value[rows, :width] = got[:, :width]
                else:
                    value[rows] = got
        if ps.get_data_parallel_world_size(with_context_parallel=True) > 1:
            dist.all_reduce(value, group=ps.get_data_parallel_group(with_context_parallel=True))
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(value, group=ps.get_pipeline_model_parallel_group())
        full[name] = value.float()
    return full


def _agreed_names(names: list[str]) -> list[str]:
    """The metric names known on any rank (ranks off the last pipeline stage know none)."""
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, names)
    return sorted({n for g in gathered for n in g})


def reduce_metrics(outputs: list[dict]) -> dict[str, float]:
    """Per-micro-batch metric dicts (last pipeline stage) -> global values on every rank: sums over micro-
    batches and data-parallel ranks, min / max for names ending in `_min` / `_max`. Only the last stage's
    tensor-parallel rank 0 contributes (its TP peers hold the same values)."""
    from megatron.core import parallel_state as ps

    names = _agreed_names(sorted({k for out in outputs for k in out}))
    speaks = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    result = {}
    for op, pick in ((dist.ReduceOp.SUM, lambda n: not n.endswith(("_min", "_max"))),
                     (dist.ReduceOp.MIN, lambda n: n.endswith("_min")),
                     (dist.ReduceOp.MAX, lambda n: n.endswith("_max"))):
        group = [n for n in names if pick(n)]
        if not group:
            continue
        neutral = {dist.ReduceOp.SUM: 0.0, dist.ReduceOp.MIN: math.inf, dist.ReduceOp.MAX: -math.inf}[op]
        values = torch.full((len(group),), neutral, dtype=torch.float64)
        if speaks:
            for i, n in enumerate(group):
                per_micro = [float(out[n]) for out in outputs if n in out]
                if per_micro:
                    values[i] = sum(per_micro) if op == dist.ReduceOp.SUM else (
                        min(per_micro) if op == dist.ReduceOp.MIN else max(per_micro))
        dist.all_reduce(values, op=op)
        result.update({n: float(v) for n, v in zip(group, values)})
    return result
