"""What differs between machines: CPU-only compatibility for Megatron, process-group start-up, rank spawning."""
import warnings

# Expected on a machine without TE/apex/CUDA; each would otherwise print once per rank and module.
_EXPECTED_WARNINGS = [
    r".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*",
    r".*CUDA_DEVICE_MAX_CONNECTIONS.*",
    r".*full scope is deprecated.*",
    r".*\.grad attribute of a Tensor that is not a leaf Tensor.*",
    r".*torch\.distributed\.\w+. is deprecated.*",
]


def quiet_expected_warnings() -> None:
    """Silence the warnings a machine without TE/apex/CUDA always prints (they carry no information)."""
    for pattern in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def ensure_platform() -> None:
    """Make Megatron-core usable on this machine (CPU shims when CUDA is absent); idempotent."""
    import torch

    from prism_mcore.platform import cpu_compat

    if not torch.cuda.is_available():
        quiet_expected_warnings()
    cpu_compat.install()
