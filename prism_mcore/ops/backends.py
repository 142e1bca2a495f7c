"""Backend names, availability and selection for the kernel ops, plus the output-poisoning debug mode.

Backends are plain strings so a config field can carry them (`kernels.logprob_backend: auto`); an unknown name
raises ValueError naming the valid choices, and an explicitly requested backend that cannot run here raises
RuntimeError saying why, instead of silently falling back.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Iterator

import torch

LOGPROB_BACKENDS = ("auto", "torch", "cpp", "cuda", "triton")
MOE_BACKENDS = ("auto", "torch", "triton")

_defaults = {"logprob": "auto", "moe": "auto"}
_VALID = {"logprob": LOGPROB_BACKENDS, "moe": MOE_BACKENDS}


def check_backend_name(op: str, name: str) -> str:
    valid = _VALID[op]
    if name not in valid:
        raise ValueError(f"unknown {op} backend {name!r}; valid choices: {', '.join(valid)}")
    return name


def set_default_backend(op: str, name: str) -> None:
    """What `backend=None` means for `op` ("logprob" or "moe"); the trainer sets this from its config."""
    if op not in _VALID:
        raise ValueError(f"unknown op {op!r}; valid choices: {', '.join(_VALID)}")
    _defaults[op] = check_backend_name(op, name)


def default_backend(op: str) -> str:
    return _defaults[op]


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled `prism_mcore._C`, or None when it was not built (e.g. a metadata-only install)."""
    try:
        from prism_mcore import _C
    except ImportError:
        return None
    return _C


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_usable(device: torch.device) -> bool:
    """Triton compiles for CUDA devices; on CPU tensors it only runs under TRITON_INTERPRET=1 (tests)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())


def _why_unusable(name: str, device: torch.device, dtype: torch.dtype | None) -> str | None:
    if name in ("cuda", "triton") and dtype == torch.float64:
        return "its kernels accumulate in fp32 and do not take fp64 inputs"
    ext = extension()
    if name == "cpp":
        if ext is None:
            return "prism_mcore._C is not built (run `python setup.py build_ext --inplace`)"
        if device.type != "cpu":
            return f"the cpp backend runs on CPU tensors, got {device.type}"
    elif name == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got {device.type}"
        if ext is None or not ext.built_with_cuda():
            return "prism_mcore._C was built without CUDA (torch without CUDA, or no nvcc at build time)"
    elif name == "triton" and not triton_usable(device):
        return f"triton cannot run on {device.type} tensors here (needs CUDA, or TRITON_INTERPRET=1 on CPU)"
    return None


def resolve_backend(op: str, name: str | None, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Turn "auto"/None into a concrete backend for `device`, or check that the requested one can run."""
    name = check_backend_name(op, name if name is not None else _defaults[op])
    if name == "auto":
        if op == "logprob":
            order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpp", "torch")
        else:
            order = ("triton", "torch") if device.type == "cuda" else ("torch",)
        return next(n for n in order if _why_unusable(n, device, dtype) is None)
    why = _why_unusable(name, device, dtype)
    if why is not None:
        raise RuntimeError(f"{op} backend {name!r} is unavailable: {why}")
    return name


# ---- debug: poison freshly allocated outputs so that an element a kernel forgets to write is caught ----
_poison = False


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Within this block, op outputs start as NaN (floats) or a sentinel (ints) instead of uninitialised memory."""
    global _poison
    old, _poison = _poison, enabled
    try:
        yield
    finally:
        _poison = old


POISON_INT = -(2**30)


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if not _poison:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else POISON_INT
    return torch.full(shape, fill, dtype=dtype, device=device)
