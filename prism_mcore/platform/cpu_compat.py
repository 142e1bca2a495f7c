"""Megatron-core on a CPU-only torch build (gloo), for development machines and CI.

megatron-core 0.16.1 assumes CUDA in a few dozen places. Each patch below fixes one family of
failures, is documented with the error it prevents, and has a test in tests/test_cpu_compat.py
that runs the affected feature with the patch left out and checks that it then fails.

`install()` is a no-op when CUDA is available. `PRISM_CPU_COMPAT_SKIP=name,name` leaves named
patches out (for those tests, and for debugging a raw Megatron error).
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
PATCHES: dict[str, Callable[[], None]] = {}
_installed: list[str] = []


def _patch(fn: Callable[[], None]) -> Callable[[], None]:
    PATCHES[fn.__name__] = fn
    return fn


@_patch
def cuda_device_api() -> None:
    """`torch.cuda.current_device()` & co. raise "Torch not compiled with CUDA enabled".

    Megatron calls them unconditionally (p2p communication, rotary embeddings, memory logging);
    on CPU the "current device" is the CPU and the synchronization/memory calls are no-ops."""
    c = torch.cuda
    c.current_device = lambda: _CPU
    c.synchronize = lambda *a, **k: None
    c.set_device = lambda *a, **k: None
    c.empty_cache = lambda *a, **k: None
    c.device_count = lambda: 0
    c.memory_allocated = lambda *a, **k: 0
    c.max_memory_allocated = lambda *a, **k: 0
    c.memory_reserved = lambda *a, **k: 0
    c.reset_peak_memory_stats = lambda *a, **k: None


class _CpuGenerators:
    def __getitem__(self, index: int) -> torch.Generator:
        return torch.default_generator

    def __len__(self) -> int:
        return 1


@_patch
def cuda_rng() -> None:
    """`model_parallel_cuda_manual_seed` and the activation-checkpoint RNG tracker save/restore
    the CUDA RNG state; route them to the CPU generator. (`manual_seed_all` stays untouched:
    `torch.manual_seed` calls it, and replacing it recurses.)"""
    c = torch.cuda
    c.get_rng_state = lambda *a, **k: torch.get_rng_state()
    c.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    c.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    c.random.get_rng_state = c.get_rng_state
    c.random.set_rng_state = c.set_rng_state
    c.default_generators = _CpuGenerators()


class _NoStream:
    """Stands in for torch.cuda.Stream/Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, *args, **kwargs) -> None:
        pass

    def wait_event(self, *args, **kwargs) -> None:
        pass

    def record_event(self, *args, **kwargs) -> "_NoStream":
        return _NoStream()

    def record(self, *args, **kwargs) -> None:
        pass

    def wait(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _NoStream)

    __hash__ = object.__hash__


@_patch
def cuda_streams() -> None:
    """The MoE token dispatcher creates `torch.cuda.Stream()` in its constructor
    ("torch.cuda.Stream requires CUDA support")."""
    c = torch.cuda
    c.Stream = _NoStream
    c.Event = _NoStream
    c.current_stream = lambda *a, **k: _NoStream()
    c.default_stream = lambda *a, **k: _NoStream()
    c.stream = lambda *a, **k: contextlib.nullcontext()


def _names_cuda(device: object) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpu(TorchFunctionMode):
    """Rewrites `device="cuda"`, `.cuda()`, `.to("cuda")` and `record_stream` to their CPU meaning."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _names_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": _CPU}
        name = getattr(func, "__name__", "")
        if name == "cuda":
            return args[0]
        if name == "record_stream":
            return None
        if name == "to" and any(_names_cuda(a) for a in args[1:]):
            args = tuple(_CPU if _names_cuda(a) else a for a in args)
        return func(*args, **kwargs)


@_patch
def cuda_device_literals() -> None:
    """~85 call sites create tensors with `device="cuda"` or call `.cuda()` (pipeline schedules'
    `torch.zeros([], device="cuda")`, the rotary embedding cache, data helpers). A process-wide
    TorchFunctionMode maps them to the CPU instead of patching each site."""
    _CudaToCpu().__enter__()  # stays on the mode stack for the life of the process


@_patch
def optimizer_tensor_type_names() -> None:
    """Megatron's optimizers sort parameters by `param.type()` and accept only the names
    'torch.cuda.{Float,Half,BFloat16}Tensor' ("Wrapped parameters must be one of torch.cuda.FloatTensor
    ..."). Report CPU tensors under their CUDA type names; every other use of `.type(...)` is unchanged."""
    original = torch.Tensor.type

    def type_name(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            # Reached twice when the device-literal mode re-dispatches the call: rename only once.
            if self.device.type == "cpu" and not name.startswith("torch.cuda."):
                return name.replace("torch.", "torch.cuda.", 1)
            return name
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_name


@_patch
def optimizer_torch_adam_step() -> None:
    """Without apex/TE the inner optimizer is torch's Adam, which keeps a per-parameter `step`
    tensor. Megatron's reshardable optimizer checkpoint stores `step` once, and
      * setting per-parameter states then fails with "KeyError: 'step'": leave the step alone while
        the saved tensors are copied in;
      * `load_state_dict` gives every parameter the *same* step tensor, which Adam increments in
        place once per parameter, corrupting bias correction after a resume: give each its own."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        if "step" in tensors or "step" not in state:
            return original(self, model_param, tensors)
        step = state.pop("step")
        try:
            return original(self, model_param, tensors)
        finally:
            state["step"] = step

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states
    original_load = DistributedOptimizer.load_state_dict

    def load_state_dict(self, state_dict):
        original_load(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    DistributedOptimizer.load_state_dict = load_state_dict


@_patch
def moe_te_gemm_symbol() -> None:
    """megatron-core 0.16.1 bug: the router refers to `te_general_gemm`, which is only defined when
    Transformer Engine imports, so the MoE router raises NameError without TE."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


@_patch
def moe_alltoall_split_sizes() -> None:
    """The alltoall dispatcher turns its split sizes into numpy only `if tensor.is_cuda`; on CPU they
    stay tensors and gloo's `all_to_all_single` rejects them ("incompatible function arguments")."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    def to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.cpu().numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = to_host
    token_dispatcher.maybe_move_tensor_to_cpu = to_host


@_patch
def torch_norm_sequence_parallel() -> None:
    """Without TE/apex the local layer spec uses WrappedTorchNorm, which asserts that sequence
    parallelism is off; but MoE with TP>1 requires it. torch's RMSNorm is correct under SP as long
    as its parameters carry `.sequence_parallel = True`, so that their gradients are all-reduced
    across the tensor-parallel group like Megatron's own fused norms."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    original_new = WrappedTorchNorm.__new__

    def new(cls, config, hidden_size, eps=1e-5, *args, **kwargs):
        sequence_parallel = config.sequence_parallel
        config.sequence_parallel = False
        try:
            norm = original_new(cls, config, hidden_size, eps, *args, **kwargs)
        finally:
            config.sequence_parallel = sequence_parallel
        for param in norm.parameters():
            param.sequence_parallel = sequence_parallel
        return norm

    WrappedTorchNorm.__new__ = new


@_patch
def gloo_uneven_collectives() -> None:
    """With expert parallelism *and* expert tensor parallelism, the MoE dispatcher all-gathers (and in
    the backward reduce-scatters) token blocks of different lengths per rank. NCCL accepts that; gloo
    raises "ProcessGroupGloo::allgather: invalid tensor size". Pad to the longest block instead."""
    import torch.distributed as dist

    all_gather, reduce_scatter = dist.all_gather, dist.reduce_scatter

    def uneven(tensors: list, like: torch.Tensor) -> bool:
        return any(t.shape != like.shape for t in tensors)

    def all_gather_uneven(tensor_list, tensor, group=None, async_op=False):
        if not uneven(tensor_list, tensor):
            return all_gather(tensor_list, tensor, group=group, async_op=async_op)
        longest = max(t.shape[0] for t in tensor_list)
        pad = lambda t: torch.cat([t, t.new_zeros(longest - t.shape[0], *t.shape[1:])])  # noqa: E731
        padded = [tensor.new_empty(longest, *tensor.shape[1:]) for _ in tensor_list]
        all_gather(padded, pad(tensor), group=group)
        for out, got in zip(tensor_list, padded):
            out.copy_(got[: out.shape[0]])
        return None

    def reduce_scatter_uneven(output, input_list, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if not uneven(input_list, output):
            return reduce_scatter(output, input_list, op=op, group=group, async_op=async_op)
        flat = torch.cat([t.reshape(-1) for t in input_list])
        dist.all_reduce(flat, op=op, group=group)
        rank = dist.get_rank(group)
        start = sum(t.numel() for t in input_list[:rank])
        output.copy_(flat[start: start + output.numel()].view_as(output))
        return None

    dist.all_gather = all_gather_uneven
    dist.reduce_scatter = reduce_scatter_uneven


def install() -> list[str]:
    """Apply every patch (once per process) unless CUDA is available; return the names applied."""
    if torch.cuda.is_available() or _installed:
        return list(_installed)
    skip = {s.strip() for s in os.environ.get("PRISM_CPU_COMPAT_SKIP", "").split(",") if s.strip()}
    unknown = skip - PATCHES.keys()
    if unknown:
        raise ValueError(f"PRISM_CPU_COMPAT_SKIP names unknown patches {sorted(unknown)}; known: {sorted(PATCHES)}")
    for name, patch in PATCHES.items():
        if name not in skip:
            patch()
            _installed.append(name)
    return list(_installed)
