"""Qwen3-VL (policy) and Qwen3-VL-MoE (discriminator backbone) on Megatron-core.

  config.py      `arch_from_hf(dir_or_dict) -> Qwen3VLArch`, `is_qwen3_vl(hf_config_dict)`
  rope.py        `rope_index(...)` (3-D positions, transformers' get_rope_index rule), `InterleavedMRoPE`
  vision.py      the vision tower (transformers' module, replicated over TP) and feature placement
  model.py       `Qwen3VLModel` (a GPTModel stage), `build_qwen3_vl(arch, parallel)`
  hf_adapter.py  HF <-> Megatron names and layouts (`hf_shapes`, `megatron_reader`, `hf_tensors`)
  weights.py     `load_hf_weights(model, arch, hf_dir)` (writing HF: checkpoint/hf_weights.write_hf with SPEC)

Modules are imported by path (nothing here imports Megatron or transformers on package import).
"""
