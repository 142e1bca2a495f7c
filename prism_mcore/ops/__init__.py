"""Kernel ops: one autograd API per op, with the backend picked per device or by name (a config string).

    token_logprobs(hidden, weight, targets, temperature, *, vocab_size, tp_group, backend, ...) -> (logp, entropy)
    topk_softmax_router(logits, k, renormalize=True, *, backend) -> (probs, expert_idx)
    permute_tokens(x, expert_idx, num_experts, *, backend) -> (x_sorted, offsets, sorted_slots)
    unpermute_tokens(y_sorted, sorted_slots, probs, *, backend) -> y
    grouped_gemm(x_sorted, w, offsets, *, backend) -> y_sorted
    gmm(x, w, tokens_per_expert, trans_b=False, *, backend)  (grouped_gemm.ops.gmm's call, for Megatron)
    grouped_linear(x_sorted, [w_e [N, K] ...], offsets, *, backend) -> y_sorted  (per-expert nn.Linear weights)
    moe_experts(x, probs, expert_idx, w_in, w_out, activation, *, backend) -> y
"""
from prism_mcore.ops.backends import (LOGPROB_BACKENDS, MOE_BACKENDS, default_backend, poison_outputs,
                                      resolve_backend, set_default_backend)
from prism_mcore.ops.logprob import naive_token_logprobs, token_logprobs
from prism_mcore.ops.moe import (counts_to_offsets, gmm, grouped_gemm, grouped_linear, moe_experts, permute_tokens,
                                 topk_softmax_router, unpermute_tokens)

__all__ = ["LOGPROB_BACKENDS", "MOE_BACKENDS", "counts_to_offsets", "default_backend", "gmm", "grouped_gemm",
           "grouped_linear", "moe_experts",
           "naive_token_logprobs", "permute_tokens", "poison_outputs", "resolve_backend", "set_default_backend",
           "token_logprobs", "topk_softmax_router", "unpermute_tokens"]
