import os
import shutil
import sys

# Triton picks interpreter vs compiler when a kernel is decorated, i.e. at the first import of
# prism_triton_kernels, which any test module may trigger: without a GPU the interpreter is the only option.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))  # spawned ranks import helpers from tests/ by name


@pytest.fixture
def ranks():
    """`ranks(fn, n, *args, timeout=..., **kw)`: run fn on n gloo ranks; every rank's error is reported."""
    from prism_mcore.platform.multiproc import run_on_ranks

    def run(fn, world_size, *args, timeout=240, **kwargs):
        return run_on_ranks(fn, world_size, *args, timeout=timeout, **kwargs)

    return run
