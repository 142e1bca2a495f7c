"""What differs between machines: CPU-only compatibility for Megatron, process-group start-up, rank spawning."""


def ensure_platform() -> None:
    """Make Megatron-core usable on this machine (CPU shims when CUDA is absent); idempotent."""
    from prism_mcore.platform import cpu_compat

    cpu_compat.install()
