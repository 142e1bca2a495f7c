"""The policy's log-prob path: final hidden states -> fused vocab-parallel log-prob (+ entropy), so that
the [tokens, vocab] logits are never materialized, in training or in log-prob recomputation.

GPTModel's output layer keeps its parameters and checkpoint keys; only its forward is redirected to
hand back the hidden states, and `token_logprobs` consumes them with the layer's (vocab-sharded) weight.
"""
from __future__ import annotations

import types

import torch

from prism_mcore.ops import token_logprobs


def _hidden_forward(self, input_, weight=None, runtime_gather_output=None):
    # GPTModel passes the tied embedding as `weight`; remember which matrix the logits would use.
    # object.__setattr__: a plain reference, not a newly registered parameter of the module.
    object.__setattr__(self, "lm_weight", weight if weight is not None else self.weight)
    if self.sequence_parallel:
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        # The fused op all-reduces d(hidden) over TP itself, so the gather's backward must only split.
        input_ = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=False)
    return input_, None


def use_fused_logprob_head(gpt) -> None:
    """Make `gpt(...)` (labels=None) return final hidden states [b, s, h] on the last pipeline stage."""
    if getattr(gpt, "post_process", False) and hasattr(gpt, "output_layer"):
        gpt.output_layer.forward = types.MethodType(_hidden_forward, gpt.output_layer)


def hidden_to_logprobs(gpt, hidden: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                       temperature: float = 1.0, backend: str | None = "auto", with_entropy: bool = True,
                       only: torch.Tensor | None = None):
    """(logp, entropy) [b, s] of `targets` under the model, from the hidden states `gpt` returned.

    `only` [b, s] (bool or 0/1): compute just these positions (e.g. response tokens) and return 0
    elsewhere. With a 151,936-entry vocabulary the head costs far more than a small body, so skipping
    prompt and padding positions is most of a step's time. Every TP rank holds the same mask."""
    from megatron.core import parallel_state as ps

    tp_group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
    weight = gpt.output_layer.lm_weight
    if only is None:
        return token_logprobs(hidden, weight, targets, temperature, vocab_size=vocab_size,
                              tp_group=tp_group, backend=backend, with_entropy=with_entropy)
    keep = only.to(torch.bool)
    if not bool(keep.any()):  # an all-padding micro-batch still runs the head once (same collectives)
        keep = torch.zeros_like(keep)
        keep.view(-1)[0] = True
        scale = 0.0
    else:
        scale = 1.0
    logp, entropy = token_logprobs(hidden[keep], weight, targets[keep], temperature, vocab_size=vocab_size,
                                   tp_group=tp_group, backend=backend, with_entropy=with_entropy)

    def spread(values):
        if values is None:
            return None
        out = torch.zeros(keep.shape, dtype=values.dtype, device=values.device)
        return out.masked_scatter(keep, values * scale)

    return spread(logp), spread(entropy)


def lm_hidden(net, batch) -> torch.Tensor:
    """The policy's forward on a `data.batch.Batch`: final hidden states [b, s, h] on the last pipeline stage
    (the activations for the next stage elsewhere). What the model takes comes from its family's spec
    (models/spec.py `forward_inputs`): the batch's positions, else each row's own (3-D MRoPE positions from
    the image grids for Qwen3-VL), and the batch's images. A model built without a spec gets 0..s-1."""
    gpt = unwrap(net)
    spec = getattr(gpt, "prism_spec", None)
    if spec is not None:
        positions, extra = spec.forward_inputs(gpt.prism_arch, batch.tokens, batch.attention_mask, batch.position_ids,
                                               batch.packed_seq_lengths, batch.pixel_values, batch.image_grid_thw)
    else:
        b, s = batch.tokens.shape
        positions, extra = batch.position_ids, {}
        if positions is None:
            positions = torch.arange(s, device=batch.tokens.device).unsqueeze(0).expand(b, s)
    if gpt.config.num_moe_experts and gpt.pre_process:
        extra["padding_mask"] = batch.attention_mask == 0  # padding stays out of the load-balancing loss
    return net(batch.tokens, positions, None, **extra)


def unwrap(net):
    """The GPTModel inside Megatron's DDP / Float16Module wrappers (its output layer holds the head weight)."""
    while hasattr(net, "module"):
        net = net.module
    return net
