// Chunk loop of the fused log-prob: one GEMM per [token chunk x vocab chunk] tile into a reused workspace,
// then a device epilogue folds the tile into per-token stats (forward) or into d(logit) (backward).
// Memory is O(T * d + chunk_tokens * chunk_vocab) beyond the inputs and gradients, independent of V * T,
// unless the caller hands over a `logits_store` of T * valid floats: then the forward keeps every tile
// there and the backward reads them back instead of recomputing them (one GEMM of four saved).
#include "logprob.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>

namespace prism {
namespace {

at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// CPU has no mixed-precision GEMM, so low-precision CPU chunks are upcast (one chunk at a time);
// CUDA keeps bf16/fp16 operands and asks cuBLAS for an fp32 result instead.
at::Tensor operand(const at::Tensor& t, at::ScalarType acc) {
  return (t.is_cuda() || t.scalar_type() == acc) ? t : t.to(acc);
}

// out = a @ b^T, out in the accumulation dtype.
void gemm_nt(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == out.scalar_type()) {
    at::mm_out(out, a, b.t());
  } else {
    at::mm_out(out, a, b.t(), out.scalar_type());
  }
}

// out = a @ b, or out += a @ b. Overwriting on the first contribution means outputs need no zero fill,
// so a poisoned output buffer proves every element was written.
void gemm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const bool mixed = a.scalar_type() != out.scalar_type();
  if (!accumulate) {
    mixed ? at::mm_out(out, a, b, out.scalar_type()) : at::mm_out(out, a, b);
  } else {
    mixed ? at::addmm_out(out, out, a, b, out.scalar_type()) : at::addmm_out(out, out, a, b);
  }
}

// Tile (t0, v0) of a token chunk of `tc` rows starts at t0 * valid + v0 * tc: each token chunk's tiles are
// consecutive, so forward (token-major) and backward (vocab-major) address the same tile.
at::Tensor stored_tile(const at::Tensor& store, int64_t t0, int64_t v0, int64_t tc, int64_t vc, int64_t valid) {
  return store.narrow(0, t0 * valid + v0 * tc, tc * vc).view({tc, vc});
}

void check_store(const at::Tensor& store, const at::Tensor& hidden, at::ScalarType acc, int64_t T, int64_t valid) {
  TORCH_CHECK(store.numel() == 0 || (store.numel() == T * valid && store.scalar_type() == acc &&
                                     store.is_contiguous() && store.device() == hidden.device()),
              "logits_store must be empty or a contiguous [T * valid_rows] tensor of the accumulation dtype");
}

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2, "hidden must be [T, d] and weight [V, d]");
  TORCH_CHECK(hidden.size(1) == weight.size(1), "hidden and weight disagree on d: ", hidden.size(1), " vs ",
              weight.size(1));
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "hidden and weight must share a dtype");
  TORCH_CHECK(hidden.device() == weight.device() && targets.device() == hidden.device(),
              "hidden, weight and targets must be on one device");
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.size(0) == hidden.size(0),
              "targets must be int64 [T]");
  TORCH_CHECK(hidden.is_contiguous() && weight.is_contiguous() && targets.is_contiguous(),
              "hidden, weight and targets must be contiguous");
}

void forward_epilogue(const at::Tensor& tile, const at::Tensor& targets, int64_t t0, int64_t col0, double inv_temp,
                      bool first, at::Tensor& stats, int64_t cuda_stream) {
  if (tile.is_cuda()) {
#ifdef PRISM_WITH_CUDA
    cuda_forward_epilogue(tile, targets, t0, col0, inv_temp, first, stats, cuda_stream);
#else
    TORCH_CHECK(false, "prism_mcore._C was built without CUDA");
#endif
  } else {
    cpu_forward_epilogue(tile, targets, t0, col0, inv_temp, first, stats);
  }
}

}  // namespace

at::Tensor& logprob_forward_stats(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                                  double inv_temp, int64_t vocab_start, int64_t valid_rows, int64_t chunk_tokens,
                                  int64_t chunk_vocab, at::Tensor& stats, at::Tensor& logits_store,
                                  int64_t cuda_stream) {
  check_inputs(hidden, weight, targets);
  const auto acc = acc_type(hidden);
  const int64_t T = hidden.size(0), V = weight.size(0);
  TORCH_CHECK(stats.scalar_type() == acc && stats.is_contiguous() && stats.size(0) == 4 && stats.size(1) == T,
              "stats must be a contiguous [4, T] tensor of the accumulation dtype");
  TORCH_CHECK(chunk_tokens > 0 && chunk_vocab > 0 && inv_temp > 0, "chunks and 1/temperature must be positive");
  const int64_t valid = std::clamp<int64_t>(valid_rows, 0, V);
  check_store(logits_store, hidden, acc, T, valid);
  const bool keep = logits_store.numel() > 0;
  if (T == 0) return stats;
  if (valid == 0) {  // a shard holding only padding rows contributes nothing to any token
    stats.select(0, 0).fill_(kEmptyMax);
    stats.narrow(0, 1, 3).zero_();
    return stats;
  }
  const int64_t tc_max = std::min(chunk_tokens, T), vc_max = std::min(chunk_vocab, valid);
  at::Tensor tile_buf = keep ? at::Tensor() : at::empty({tc_max * vc_max}, hidden.options().dtype(acc));
  for (int64_t t0 = 0; t0 < T; t0 += tc_max) {
    const int64_t tc = std::min(tc_max, T - t0);
    const at::Tensor hc = operand(hidden.narrow(0, t0, tc), acc);
    for (int64_t v0 = 0; v0 < valid; v0 += vc_max) {
      const int64_t vc = std::min(vc_max, valid - v0);
      at::Tensor tile = keep ? stored_tile(logits_store, t0, v0, tc, vc, valid)
                             : tile_buf.narrow(0, 0, tc * vc).view({tc, vc});
      gemm_nt(tile, hc, operand(weight.narrow(0, v0, vc), acc));
      forward_epilogue(tile, targets, t0, vocab_start + v0, inv_temp, v0 == 0, stats, cuda_stream);
    }
  }
  return stats;
}

void logprob_backward(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                      double inv_temp, int64_t vocab_start, int64_t valid_rows, const at::Tensor& lse,
                      const at::Tensor& mean_z, const at::Tensor& grad_logp, const at::Tensor& grad_entropy,
                      int64_t chunk_tokens, int64_t chunk_vocab, at::Tensor& grad_hidden, at::Tensor& grad_weight,
                      at::Tensor& logits_store, int64_t cuda_stream) {
  check_inputs(hidden, weight, targets);
  const auto acc = acc_type(hidden);
  const int64_t T = hidden.size(0), V = weight.size(0), d = hidden.size(1);
  for (const at::Tensor* t : {&lse, &mean_z, &grad_logp, &grad_entropy}) {
    TORCH_CHECK(t->scalar_type() == acc && t->is_contiguous() && t->numel() == T,
                "per-token inputs must be contiguous [T] tensors of the accumulation dtype");
  }
  TORCH_CHECK(grad_hidden.sizes() == hidden.sizes() && grad_weight.sizes() == weight.sizes() &&
                  grad_hidden.is_contiguous() && grad_weight.is_contiguous(),
              "gradients must be contiguous and shaped like hidden and weight");
  TORCH_CHECK(chunk_tokens > 0 && chunk_vocab > 0 && inv_temp > 0, "chunks and 1/temperature must be positive");
  const int64_t valid = std::clamp<int64_t>(valid_rows, 0, V);
  check_store(logits_store, hidden, acc, T, valid);
  const bool kept = logits_store.numel() > 0;
  if (valid == 0 || T == 0) {
    grad_hidden.zero_();
    grad_weight.zero_();
    return;
  }
  if (valid < V) grad_weight.narrow(0, valid, V - valid).zero_();  // padding rows never take probability mass
  const int64_t tc_max = std::min(chunk_tokens, T), vc_max = std::min(chunk_vocab, valid);
  const auto acc_opts = hidden.options().dtype(acc);
  const bool lowp_cuda = hidden.is_cuda() && hidden.scalar_type() != acc;
  at::Tensor tile_buf = kept ? at::Tensor() : at::empty({tc_max * vc_max}, acc_opts);
  // On CUDA, d(logit) is written in the input dtype so the two backward GEMMs run at the bf16/fp16 rate;
  // elsewhere it overwrites the logits tile in place (a kept store is consumed).
  at::Tensor dz_buf = lowp_cuda ? at::empty({tc_max * vc_max}, hidden.options()) : at::Tensor();
  at::Tensor dh = grad_hidden.scalar_type() == acc ? grad_hidden : at::empty({T, d}, acc_opts);
  // With a single token chunk each d(weight) slice is one GEMM, so it can go straight to a bf16 output.
  const bool dw_direct = grad_weight.scalar_type() == acc || (lowp_cuda && tc_max == T);
  at::Tensor dw_buf = dw_direct ? at::Tensor() : at::empty({vc_max, d}, acc_opts);

  for (int64_t v0 = 0; v0 < valid; v0 += vc_max) {
    const int64_t vc = std::min(vc_max, valid - v0);
    const at::Tensor wv = operand(weight.narrow(0, v0, vc), acc);
    at::Tensor dwv = dw_direct ? grad_weight.narrow(0, v0, vc) : dw_buf.narrow(0, 0, vc);
    for (int64_t t0 = 0; t0 < T; t0 += tc_max) {
      const int64_t tc = std::min(tc_max, T - t0);
      const at::Tensor hc = operand(hidden.narrow(0, t0, tc), acc);
      at::Tensor tile = kept ? stored_tile(logits_store, t0, v0, tc, vc, valid)
                             : tile_buf.narrow(0, 0, tc * vc).view({tc, vc});
      at::Tensor dz = lowp_cuda ? dz_buf.narrow(0, 0, tc * vc).view({tc, vc}) : tile;
      if (!kept) gemm_nt(tile, hc, wv);
      if (tile.is_cuda()) {
#ifdef PRISM_WITH_CUDA
        cuda_backward_epilogue(tile, dz, targets, t0, vocab_start + v0, inv_temp, lse, mean_z, grad_logp,
                               grad_entropy, cuda_stream);
#else
        TORCH_CHECK(false, "prism_mcore._C was built without CUDA");
#endif
      } else {
        cpu_backward_epilogue(tile, targets, t0, vocab_start + v0, inv_temp, lse, mean_z, grad_logp, grad_entropy);
      }
      gemm_into(dh.narrow(0, t0, tc), dz, wv, /*accumulate=*/v0 > 0);
      gemm_into(dwv, dz.t(), hc, /*accumulate=*/t0 > 0);
    }
    if (!dw_direct) grad_weight.narrow(0, v0, vc).copy_(dwv);
  }
  if (!dh.is_same(grad_hidden)) grad_hidden.copy_(dh);
}

}  // namespace prism
