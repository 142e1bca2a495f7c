// Fused token log-prob + entropy over a (possibly vocab-sharded) LM head, never holding [T, V] logits.
//
// Shared by the CPU and CUDA paths: the driver (logprob_driver.cpp) walks [token chunk x vocab chunk] tiles,
// computes each tile with one GEMM into a small fp32/fp64 workspace, and hands it to a device epilogue.
// Stats layout, one column per token, in the accumulation dtype (fp64 for fp64 inputs, else fp32):
//   row 0  m : running max of z = logit / temperature over the valid vocab rows of this shard
//   row 1  s : sum exp(z - m)
//   row 2  a : sum exp(z - m) * (z - m)      (entropy = log s - a / s, with no large-number cancellation)
//   row 3  tz: z of the target token if this shard owns it, else 0 (so a SUM over shards recovers it)
#pragma once

// The Tensor class only (not ATen/ATen.h, every operator): the build parses this header four times.
#include <ATen/core/Tensor.h>

namespace prism {

// A max that can never be reached, kept finite so that (m - M) * s stays 0 rather than NaN when s == 0.
constexpr double kEmptyMax = -1e30;

at::Tensor& logprob_forward_stats(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                                  double inv_temp, int64_t vocab_start, int64_t valid_rows, int64_t chunk_tokens,
                                  int64_t chunk_vocab, at::Tensor& stats, at::Tensor& logits_store,
                                  int64_t cuda_stream);

// Writes every element of grad_hidden [T, d] and grad_weight [V, d] (padded vocab rows get 0).
void logprob_backward(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                      double inv_temp, int64_t vocab_start, int64_t valid_rows, const at::Tensor& lse,
                      const at::Tensor& mean_z, const at::Tensor& grad_logp, const at::Tensor& grad_entropy,
                      int64_t chunk_tokens, int64_t chunk_vocab, at::Tensor& grad_hidden, at::Tensor& grad_weight,
                      at::Tensor& logits_store, int64_t cuda_stream);

// Tile epilogues. `tile` is [rows, cols] contiguous raw logits of tokens t0.. and vocab ids col0.. (global ids);
// stats columns t0.. are merged in place (or initialised when `first`).
void cpu_forward_epilogue(const at::Tensor& tile, const at::Tensor& targets, int64_t t0, int64_t col0,
                          double inv_temp, bool first, at::Tensor& stats);
// Turns the raw logits in `tile` into d(loss)/d(logit) in place.
void cpu_backward_epilogue(at::Tensor& tile, const at::Tensor& targets, int64_t t0, int64_t col0, double inv_temp,
                           const at::Tensor& lse, const at::Tensor& mean_z, const at::Tensor& grad_logp,
                           const at::Tensor& grad_entropy);

bool cpu_epilogue_vectorized();

#ifdef PRISM_WITH_CUDA
// `stream` is a cudaStream_t passed as an integer from Python (torch.cuda.current_stream().cuda_stream).
void cuda_forward_epilogue(const at::Tensor& tile, const at::Tensor& targets, int64_t t0, int64_t col0,
                           double inv_temp, bool first, at::Tensor& stats, int64_t stream);
// Reads raw fp32 logits from `tile`, writes d(logit) into `dlogits` (fp32, bf16 or fp16, same shape).
void cuda_backward_epilogue(const at::Tensor& tile, at::Tensor& dlogits, const at::Tensor& targets, int64_t t0,
                            int64_t col0, double inv_temp, const at::Tensor& lse, const at::Tensor& mean_z,
                            const at::Tensor& grad_logp, const at::Tensor& grad_entropy, int64_t stream);
#endif

}  // namespace prism
