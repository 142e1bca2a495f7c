// Host side of the CUDA epilogues: checks, then raw pointers into the extern "C" launchers of logprob_cuda.cu.
// The stream arrives from Python as an integer (torch.cuda.current_stream().cuda_stream), so this file needs
// no CUDA or c10/cuda headers and is compile-checked with PRISM_WITH_CUDA on machines without a CUDA torch.
#ifdef PRISM_WITH_CUDA
#include "logprob.h"

extern "C" {
int prism_logprob_forward_epilogue(const float* tile, int64_t rows, int64_t cols, const int64_t* targets,
                                   int64_t col0, float inv_temp, int first, float* m, float* s, float* a, float* tz,
                                   void* stream);
int prism_logprob_backward_epilogue(const float* tile, void* dz, int out_dtype, int64_t rows, int64_t cols,
                                    const int64_t* targets, int64_t col0, float inv_temp, const float* lse,
                                    const float* mean_z, const float* grad_logp, const float* grad_entropy,
                                    void* stream);
const char* prism_cuda_error_string(int code);
}

namespace prism {
namespace {

void check(int code, const char* what) {
  TORCH_CHECK(code == 0, "prism_mcore._C ", what, ": ", prism_cuda_error_string(code));
}

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: TORCH_CHECK(false, "the CUDA log-prob kernel takes fp32, bf16 or fp16 inputs, got ", t);
  }
  return -1;
}

}  // namespace

void cuda_forward_epilogue(const at::Tensor& tile, const at::Tensor& targets, int64_t t0, int64_t col0,
                           double inv_temp, bool first, at::Tensor& stats, int64_t stream) {
  TORCH_CHECK(tile.scalar_type() == at::kFloat && stats.scalar_type() == at::kFloat,
              "the CUDA log-prob kernel accumulates in fp32 (fp64 inputs: use the torch backend)");
  const int64_t T = stats.size(1);
  float* st = stats.data_ptr<float>() + t0;
  check(prism_logprob_forward_epilogue(tile.data_ptr<float>(), tile.size(0), tile.size(1),
                                       targets.data_ptr<int64_t>() + t0, col0, static_cast<float>(inv_temp), first,
                                       st, st + T, st + 2 * T, st + 3 * T, reinterpret_cast<void*>(stream)),
        "forward epilogue");
}

void cuda_backward_epilogue(const at::Tensor& tile, at::Tensor& dlogits, const at::Tensor& targets, int64_t t0,
                            int64_t col0, double inv_temp, const at::Tensor& lse, const at::Tensor& mean_z,
                            const at::Tensor& grad_logp, const at::Tensor& grad_entropy, int64_t stream) {
  TORCH_CHECK(tile.scalar_type() == at::kFloat && lse.scalar_type() == at::kFloat,
              "the CUDA log-prob kernel accumulates in fp32 (fp64 inputs: use the torch backend)");
  check(prism_logprob_backward_epilogue(tile.data_ptr<float>(), dlogits.data_ptr(), dtype_code(dlogits.scalar_type()),
                                        tile.size(0), tile.size(1), targets.data_ptr<int64_t>() + t0, col0,
                                        static_cast<float>(inv_temp), lse.data_ptr<float>() + t0,
                                        mean_z.data_ptr<float>() + t0, grad_logp.data_ptr<float>() + t0,
                                        grad_entropy.data_ptr<float>() + t0, reinterpret_cast<void*>(stream)),
        "backward epilogue");
}

}  // namespace prism
#endif  // PRISM_WITH_CUDA
