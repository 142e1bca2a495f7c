"""Compile checks of the CUDA side on machines that cannot build or run it (CPU torch, no GPU):
the .cu kernels with nvcc, and the host code under PRISM_WITH_CUDA with the C++ compiler (syntax only)."""
import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NVCC = shutil.which("nvcc")
CXX = shutil.which(os.environ.get("CXX", "g++"))


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("source", sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu"))), ids=os.path.basename)
def test_cuda_kernels_compile(source, tmp_path):
    obj = tmp_path / "kernel.o"
    proc = subprocess.run([NVCC, "-c", "-arch=sm_90", "-O3", "-std=c++17", "-DPRISM_WITH_CUDA", "-Werror",
                           "all-warnings", source, "-o", str(obj)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    if shutil.which("nm"):
        symbols = subprocess.run(["nm", str(obj)], capture_output=True, text=True).stdout
        for name in ("prism_logprob_forward_epilogue", "prism_logprob_backward_epilogue"):
            assert f" T {name}" in symbols, f"launcher {name} missing or not extern \"C\""


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
def test_cuda_host_code_compiles():
    """logprob_cuda_bind.cpp and the driver's CUDA branches only build where torch has CUDA; check their syntax."""
    from torch.utils.cpp_extension import include_paths

    # one translation unit, so the ATen headers are parsed once
    unit = "".join(f'#include "{f}"\n' for f in ("logprob_cuda_bind.cpp", "logprob_driver.cpp"))
    cmd = [CXX, "-std=c++17", "-fsyntax-only", "-DPRISM_WITH_CUDA", "-Wno-c++20-extensions",
           f"-I{os.path.join(ROOT, 'csrc')}"] + [f"-I{p}" for p in include_paths()] + ["-x", "c++", "-"]
    proc = subprocess.run(cmd, input=unit, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
