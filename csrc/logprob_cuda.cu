// CUDA tile epilogues of the fused log-prob (the GEMMs are cuBLAS calls made by logprob_driver.cpp).
// Deliberately free of torch/ATen headers: plain kernels + extern "C" launchers over raw pointers, so the file
// compiles in a second with a bare nvcc (tests compile-check it on machines with no GPU and no cuBLAS).
// One block per token row; the row (chunk_vocab fp32 values) is read twice, max then exp-sum, from L2.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int kThreads = 256;

struct Stats {
  float m, s, a;  // max z, sum exp(z - m), sum exp(z - m) * (z - m)
};

__device__ __forceinline__ Stats merge(Stats x, Stats y) {
  const float m = fmaxf(x.m, y.m);
  const float cx = __expf(x.m - m), cy = __expf(y.m - m);
  return {m, x.s * cx + y.s * cy, (x.a + (x.m - m) * x.s) * cx + (y.a + (y.m - m) * y.s) * cy};
}

// Block-wide reduction; every thread gets the result. `shared` holds one value per warp.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T* shared) {
  for (int off = 16; off > 0; off >>= 1) {
    T other;
    if constexpr (sizeof(T) == sizeof(float)) {
      other = __shfl_xor_sync(0xffffffffu, v, off);
    } else {
      other = {__shfl_xor_sync(0xffffffffu, v.m, off), __shfl_xor_sync(0xffffffffu, v.s, off),
               __shfl_xor_sync(0xffffffffu, v.a, off)};
    }
    v = op(v, other);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = shared[0];
  for (int w = 1; w < kThreads / 32; ++w) v = op(v, shared[w]);
  __syncthreads();  // `shared` may be reused by the caller's next reduction
  return v;
}

__global__ void __launch_bounds__(kThreads)
    forward_epilogue_kernel(const float* __restrict__ tile, int64_t cols, const int64_t* __restrict__ targets,
                            int64_t col0, float inv_temp, int first, float* __restrict__ m_out,
                            float* __restrict__ s_out, float* __restrict__ a_out, float* __restrict__ tz_out) {
  __shared__ float shared_max[kThreads / 32];
  __shared__ Stats shared_stats[kThreads / 32];
  const int64_t r = blockIdx.x;
  const float* x = tile + r * cols;
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) mx = fmaxf(mx, x[j]);
  const float m = block_reduce(mx, [](float p, float q) { return fmaxf(p, q); }, shared_max) * inv_temp;
  Stats part{m, 0.f, 0.f};
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    const float z = fmaf(x[j], inv_temp, -m);
    const float e = __expf(z);
    part.s += e;
    part.a = fmaf(e, z, part.a);
  }
  Stats row = block_reduce(
      part, [](Stats p, Stats q) { return Stats{p.m, p.s + q.s, p.a + q.a}; }, shared_stats);
  if (threadIdx.x != 0) return;
  if (!first) row = merge({m_out[r], s_out[r], a_out[r]}, row);
  m_out[r] = row.m;
  s_out[r] = row.s;
  a_out[r] = row.a;
  const int64_t j = targets[r] - col0;
  const bool owned = j >= 0 && j < cols;
  if (owned) {
    tz_out[r] = x[j] * inv_temp;
  } else if (first) {
    tz_out[r] = 0.f;
  }
}

template <typename OutT>
__device__ __forceinline__ OutT to_out(float v);
template <>
__device__ __forceinline__ float to_out<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 to_out<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <>
__device__ __forceinline__ __half to_out<__half>(float v) { return __float2half(v); }

// dz = g_lp * (onehot - p) + g_H * p * (E_p[z] - z), times 1/temperature for d(logit); p = exp(z - lse).
template <typename OutT>
__global__ void __launch_bounds__(kThreads)
    backward_epilogue_kernel(const float* tile, OutT* dz, int64_t cols,  // may alias: fp32 in place
                             const int64_t* __restrict__ targets, int64_t col0, float inv_temp,
                             const float* __restrict__ lse, const float* __restrict__ mean_z,
                             const float* __restrict__ grad_logp, const float* __restrict__ grad_entropy) {
  const int64_t r = blockIdx.x;
  const float l = lse[r], g_lp = grad_logp[r], g_h = grad_entropy[r];
  const float c1 = inv_temp * (g_h * mean_z[r] - g_lp), c2 = -inv_temp * g_h;
  const int64_t target = targets[r] - col0;
  const float* x = tile + r * cols;
  OutT* out = dz + r * cols;
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    const float z = x[j] * inv_temp;
    float v = __expf(z - l) * fmaf(c2, z, c1);
    if (j == target) v += inv_temp * g_lp;
    out[j] = to_out<OutT>(v);
  }
}

}  // namespace

extern "C" {

// Error codes are cudaError_t values; the C++ side turns them into messages with prism_cuda_error_string.
int prism_logprob_forward_epilogue(const float* tile, int64_t rows, int64_t cols, const int64_t* targets,
                                   int64_t col0, float inv_temp, int first, float* m, float* s, float* a, float* tz,
                                   void* stream) {
  if (rows == 0) return 0;
  forward_epilogue_kernel<<<static_cast<unsigned>(rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      tile, cols, targets, col0, inv_temp, first, m, s, a, tz);
  return static_cast<int>(cudaGetLastError());
}

// out_dtype: 0 = fp32, 1 = bf16, 2 = fp16. `tile` and `dz` may alias when out_dtype is fp32.
int prism_logprob_backward_epilogue(const float* tile, void* dz, int out_dtype, int64_t rows, int64_t cols,
                                    const int64_t* targets, int64_t col0, float inv_temp, const float* lse,
                                    const float* mean_z, const float* grad_logp, const float* grad_entropy,
                                    void* stream) {
  if (rows == 0) return 0;
  const dim3 grid(static_cast<unsigned>(rows));
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (out_dtype) {
    case 0:
      backward_epilogue_kernel<float><<<grid, kThreads, 0, st>>>(tile, static_cast<float*>(dz), cols, targets, col0,
                                                                 inv_temp, lse, mean_z, grad_logp, grad_entropy);
      break;
    case 1:
      backward_epilogue_kernel<__nv_bfloat16><<<grid, kThreads, 0, st>>>(
          tile, static_cast<__nv_bfloat16*>(dz), cols, targets, col0, inv_temp, lse, mean_z, grad_logp,
          grad_entropy);
      break;
    case 2:
      backward_epilogue_kernel<__half><<<grid, kThreads, 0, st>>>(tile, static_cast<__half*>(dz), cols, targets,
                                                                  col0, inv_temp, lse, mean_z, grad_logp,
                                                                  grad_entropy);
      break;
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

const char* prism_cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // extern "C"
