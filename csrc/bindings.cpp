// Python face of prism_mcore._C. The Python wrappers in prism_mcore/ops own the argument conventions
// (output buffers allocated there, so a debug mode can poison them); these bindings only forward.
// pybind11 with torch's Tensor casters, without torch/extension.h's whole C++ frontend (half the build time).
#include <torch/csrc/utils/pybind.h>

#include "host_copy.h"
#include "logprob.h"

namespace {

bool built_with_cuda() {
#ifdef PRISM_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "prism_mcore C++/CUDA kernels: fused token log-prob + entropy, bulk host copies";
  m.def(
      "logprob_forward_stats",
      [](const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, double inv_temp,
         int64_t vocab_start, int64_t valid_rows, int64_t chunk_tokens, int64_t chunk_vocab, at::Tensor stats,
         at::Tensor logits_store, int64_t cuda_stream) {
        pybind11::gil_scoped_release no_gil;
        prism::logprob_forward_stats(hidden, weight, targets, inv_temp, vocab_start, valid_rows, chunk_tokens,
                                     chunk_vocab, stats, logits_store, cuda_stream);
      },
      "Fill stats[4, T] = (max z, sum exp(z - max), sum exp(z - max) * (z - max), target z) for this vocab shard; "
      "a non-empty logits_store [T * valid_rows] keeps the raw logits for logprob_backward");
  m.def(
      "logprob_backward",
      [](const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, double inv_temp,
         int64_t vocab_start, int64_t valid_rows, const at::Tensor& lse, const at::Tensor& mean_z,
         const at::Tensor& grad_logp, const at::Tensor& grad_entropy, int64_t chunk_tokens, int64_t chunk_vocab,
         at::Tensor grad_hidden, at::Tensor grad_weight, at::Tensor logits_store, int64_t cuda_stream) {
        pybind11::gil_scoped_release no_gil;
        prism::logprob_backward(hidden, weight, targets, inv_temp, vocab_start, valid_rows, lse, mean_z, grad_logp,
                                grad_entropy, chunk_tokens, chunk_vocab, grad_hidden, grad_weight, logits_store,
                                cuda_stream);
      },
      "Write d(hidden) (this shard's partial sum) and d(weight) of sum(g_logp * logp + g_entropy * entropy); "
      "a logits_store filled by the forward replaces the recomputation of the logits (and is overwritten)");
  m.def(
      "copy_runs",
      [](const at::Tensor& runs, int64_t stream_min_bytes) {
        TORCH_CHECK(runs.dtype() == at::kLong && runs.dim() == 2 && runs.size(1) == 3 && runs.is_contiguous(),
                    "copy_runs: runs must be a contiguous int64 [k, 3] tensor of (dst, src, bytes)");
        pybind11::gil_scoped_release no_gil;
        prism::copy_runs(runs.data_ptr<int64_t>(), runs.size(0), stream_min_bytes);
      },
      "Copy each (dst address, src address, bytes) row; rows of >= stream_min_bytes with streaming stores");
  m.def("built_with_cuda", &built_with_cuda);
  m.def("cpu_epilogue_vectorized", &prism::cpu_epilogue_vectorized, "True when the AVX2/FMA epilogue is in use");
}
