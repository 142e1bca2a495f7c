"""Whether this machine has a CUDA device, and the markers the GPU suite uses."""
import pytest
import torch

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device visible to torch")
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
