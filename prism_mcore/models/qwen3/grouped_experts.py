"""MoE experts computed with one grouped GEMM per projection (`model.moe_expert_backend: grouped`).

`GroupedGemmExperts` is Megatron's `SequentialMLP` with a different `forward`: instead of splitting the
permuted tokens per local expert (`tokens_per_expert.tolist()`, a host sync) and running each expert's
`linear_fc1 -> SwiGLU * prob -> linear_fc2`, it runs
    h = grouped_linear(x, [fc1 weight of each local expert], offsets)   # [M, 2 * ffn / etp], gate | up
    h = silu(gate) * up * prob                                         # the same activation code path
    y = grouped_linear(h, [fc2 weight of each local expert], offsets)   # [M, hidden], partial over expert TP
with `prism_mcore.ops.grouped_linear`, whose backend is the ops dispatch's ("moe": triton on CUDA, torch's
grouped_mm on CPU). Group offsets are a device-side cumsum of `tokens_per_expert`; a host tensor (what
Megatron's all-to-all dispatcher hands over) is copied asynchronously from pinned memory, so this layer
adds no host sync of its own (the dispatcher's all-to-all needs its split sizes on the host regardless).

Why the weights stay per-expert parameters (and are stacked inside the op) rather than one stacked
[E, ...] parameter like Megatron's legacy `GroupedMLP`: every consumer of the weights sees exactly what it
sees with `SequentialMLP` -- parameter names (`local_experts.{j}.linear_fc1.weight`), shapes, the
expert/tensor-parallel attributes Megatron's DDP and optimizer read, `state_dict()` and
`sharded_state_dict()` (inherited unchanged: `...mlp.experts.experts.linear_fc1.weight` with global
[layers, experts, ...] shape and the SwiGLU gate/up factory under expert TP). So HF conversion
(hf_adapter / checkpoint/convert.py), dist checkpoints (model and optimizer state), sparse upcycling, the
discriminator and rollout weight sync need no backend awareness, and a checkpoint written with either
backend loads into the other. The price is a transient `torch.stack` of the local expert weights in
forward and again in backward (memory traffic of one weight read, no saved copy: autograd keeps the
parameters themselves); a stacked parameter would avoid it but would need its own sharded_state_dict,
state_dict mapping and upcycling/weight-sync code, and Megatron's DDP buffers would not keep it
contiguous with per-expert gradients anyway.

Expert parallelism and expert tensor parallelism work as in SequentialMLP: the weights are the local
shards (fc1 rows [gate_local; up_local], fc2 columns), the token dispatcher does the all-to-all and the
expert-TP all-gather / reduce-scatter, and fc2's output is a partial sum that the dispatcher reduces.
Unsupported (raises at build time): biases on expert linears, fp8/fp4, delayed weight-gradient compute.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

from prism_mcore.ops import counts_to_offsets, grouped_linear


class GroupedGemmExperts(SequentialMLP):
    """All local experts of one MoE layer in two grouped GEMMs; parameters and checkpoints as SequentialMLP."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        cfg = self.config
        unsupported = [name for name, on in (("add_bias_linear", cfg.add_bias_linear), ("fp8", cfg.fp8),
                                             ("fp4", getattr(cfg, "fp4", None)),
                                             ("delay_wgrad_compute", getattr(cfg, "delay_wgrad_compute", False)))
                       if on]
        if unsupported:
            raise NotImplementedError(f"moe_expert_backend 'grouped' does not support {', '.join(unsupported)}; "
                                      f"use 'sequential'")

    def _weights(self, name: str) -> list[torch.Tensor]:
        return [getattr(expert, name).weight for expert in self.local_experts]

    def _activate(self, h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """MLP.forward's activation with per-token scale (the expert's routing probability), same branches."""
        cfg = self.config
        act = self.local_experts[0].activation_func  # config.activation_func, or TE's module
        if cfg.use_te_activation_func:
            h = act(h)
        elif cfg.bias_activation_fusion:
            from megatron.core.fusions.fused_bias_geglu import quick_gelu, weighted_bias_quick_geglu_impl
            from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl

            if act == F.silu and cfg.gated_linear_unit:
                return weighted_bias_swiglu_impl(h, None, probs.unsqueeze(-1), cfg.activation_func_fp8_input_store)
            if act == quick_gelu and cfg.gated_linear_unit:
                return weighted_bias_quick_geglu_impl(h, None, probs.unsqueeze(-1),
                                                      cfg.activation_func_fp8_input_store, cfg.glu_linear_offset,
                                                      cfg.activation_func_clamp_value)
            raise ValueError("Only support fusion of swiglu and quick_gelu with per_token_scale in MLP.")
        elif cfg.gated_linear_unit:
            gate, linear = torch.chunk(h, 2, dim=-1)
            if (val := cfg.activation_func_clamp_value) is not None:
                gate = gate.clamp(min=None, max=val)
                linear = linear.clamp(min=-val, max=val)
            h = cfg.activation_func(gate) * (linear + cfg.glu_linear_offset)
        else:
            h = act(h)
        return (h * probs.unsqueeze(-1)).to(h.dtype)

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        x, probs = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:
            assert self.config.moe_router_topk == 1, "`moe_apply_probs_on_input` only works with `moe_router_topk`=1."
            x = (probs.unsqueeze(-1) * x).to(x.dtype)
            probs = torch.ones_like(probs)
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        offsets = counts_to_offsets(tokens_per_expert, x.device)
        h = grouped_linear(x, self._weights("linear_fc1"), offsets)
        h = self._activate(h, probs.reshape(-1))
        y = grouped_linear(h, self._weights("linear_fc2"), offsets)
        return y.view(*shape[:-1], y.shape[-1]), None


def use_grouped_experts(spec):
    """A copy of a GPT layer spec whose MoE experts are `GroupedGemmExperts` (same submodules)."""
    import copy

    spec = copy.copy(spec)
    spec.submodules = copy.copy(spec.submodules)
    mlp = spec.submodules.mlp = copy.copy(spec.submodules.mlp)
    mlp.submodules = copy.copy(mlp.submodules)
    experts = getattr(mlp.submodules, "experts", None)
    if experts is None or not (isinstance(experts.module, type) and issubclass(experts.module, SequentialMLP)):
        raise ValueError(f"moe_expert_backend 'grouped' replaces SequentialMLP experts; the layer spec has "
                         f"{getattr(experts, 'module', None)}")
    mlp.submodules.experts = copy.copy(experts)
    mlp.submodules.experts.module = GroupedGemmExperts
    return spec
