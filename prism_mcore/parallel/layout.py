"""The training layout: Megatron's tensor / pipeline / context / expert / data parallel groups."""
from __future__ import annotations

import torch.distributed as dist

from prism_mcore.config import ParallelConfig, PrismConfig, check_world_size


def init_model_parallel(cfg: PrismConfig, seed: int | None = None) -> None:
    """Create the parallel groups for `cfg.parallel` on the already-joined default process group."""
    from prism_mcore.platform import ensure_platform

    ensure_platform()  # before the first Megatron import
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    check_world_size(cfg, dist.get_world_size())
    p: ParallelConfig = cfg.parallel
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        context_parallel_size=p.cp,
        expert_model_parallel_size=p.ep,
    )
    model_parallel_cuda_manual_seed(cfg.trainer.seed if seed is None else seed)
