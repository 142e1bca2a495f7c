"""The GPU smoke suite (`make test-gpu`): needs only torch, triton and our pure-Python dependencies on a
machine with one CUDA GPU; every CUDA test is skipped without one. Tests marked `both` also run with the
device forced to CPU, so that they keep working on machines without a GPU (CI). Markers: gpu_marks.py."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # tests/ (shared helpers)

sys.path.insert(0, os.path.dirname(__file__))  # gpu_marks, gpu_jobs (also for spawned ranks)
from gpu_marks import CUDA  # noqa: E402


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 means fp32: TF32 matmuls would blur every comparison below to ~1e-3."""
    if CUDA:
        before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        yield
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    else:
        yield
