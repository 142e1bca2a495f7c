"""Process-group start-up from whatever launched us: `prism_mcore.platform.multiproc`, torchrun, or srun."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def _env_from_slurm() -> None:
    """srun sets SLURM_* but not the torch variables; fill them in (MASTER_ADDR comes from the launcher)."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def backend_for(cuda: bool) -> str:
    """gloo on CPU machines; on GPU machines one group with both backends: tensors on the GPU go through
    NCCL, CPU tensors (object collectives, the trainer's small counts and metrics) through gloo."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def init_distributed(timeout_s: float | None = None) -> None:
    """Join the default process group (see `backend_for`) on this rank's device (LOCAL_RANK); a no-op when
    already joined."""
    if dist.is_initialized():
        return
    _env_from_slurm()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    timeout = datetime.timedelta(seconds=timeout_s or float(os.environ.get("PRISM_DIST_TIMEOUT_S", 600)))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend_for(cuda), timeout=timeout)


def destroy_distributed() -> None:
    try:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    except ImportError:
        pass
    if dist.is_initialized():
        dist.destroy_process_group()
