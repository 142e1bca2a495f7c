"""Triton kernels for GPUs (also runnable on CPU tensors under TRITON_INTERPRET=1, for tests at tiny shapes).

Modules import triton at import time; callers go through prism_mcore.ops, which only imports them when the
triton backend is selected.

Installed as `prism_triton_kernels` (setup.py package_dir): the folder's own name would shadow the
`triton_kernels` package that vLLM imports for its MoE kernels.
"""
