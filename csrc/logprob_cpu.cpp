// CPU tile epilogues of the fused log-prob: rows in parallel (ATen parallel_for), each row one streaming pass
// (two in the forward: max, then exp-sum). fp32 rows use an AVX2/FMA exp chosen at run time, because setup.py
// compiles for x86-64-v2 and the scalar std::exp would otherwise cost as much as a large share of the GEMM.
#include "logprob.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#if defined(__x86_64__)
#include <immintrin.h>
#define PRISM_X86 1
#endif

namespace prism {
namespace {

struct RowStats {
  double m, s, a;
};

// Folds one tile row's (max, sum e, sum e*(z-m)) into the running stats, moving both to the larger max.
inline RowStats merge(RowStats x, RowStats y) {
  const double m = std::max(x.m, y.m);
  const double cx = std::exp(x.m - m), cy = std::exp(y.m - m);
  return {m, x.s * cx + y.s * cy, (x.a + (x.m - m) * x.s) * cx + (y.a + (y.m - m) * y.s) * cy};
}

template <typename T>
RowStats row_stats_scalar(const T* x, int64_t n, T inv_t) {
  T mx = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, x[j]);
  const T m = mx * inv_t;
  T s = 0, a = 0;
  for (int64_t j = 0; j < n; ++j) {
    const T z = x[j] * inv_t - m;
    const T e = std::exp(z);
    s += e;
    a += e * z;
  }
  return {double(m), double(s), double(a)};
}

// d(loss)/dz_j = p_j * (c1 + c2 * z_j) off the target, with p_j = exp(z_j - lse); the 1/temperature of
// d z / d logit is folded into c1 and c2 by the caller.
template <typename T>
void row_dlogits_scalar(T* x, int64_t n, T inv_t, T lse, T c1, T c2) {
  for (int64_t j = 0; j < n; ++j) {
    const T z = x[j] * inv_t;
    x[j] = std::exp(z - lse) * (c1 + c2 * z);
  }
}

#ifdef PRISM_X86
// exp(x) = 2^n * exp(r), n = round(x / ln2), |r| <= ln2 / 2; a degree-6 Taylor polynomial in r is within
// ~1 ulp in fp32. Inputs below the fp32 normal range return exactly 0 rather than a denormal.
__attribute__((target("avx2,fma"))) inline __m256 exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f), hi = _mm256_set1_ps(88.3762626f);
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 split in two for an exact n*ln2
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(pow2n)));
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

__attribute__((target("avx2,fma"))) inline float hmax(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}

__attribute__((target("avx2,fma"))) RowStats row_stats_avx2(const float* x, int64_t n, float inv_t) {
  const int64_t nv = n - n % 8;
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < nv; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(x + j));
  float mx = hmax(vmax);
  for (int64_t j = nv; j < n; ++j) mx = std::max(mx, x[j]);
  const float m = mx * inv_t;
  const __m256 vinv = _mm256_set1_ps(inv_t), vnegm = _mm256_set1_ps(-m);
  // Two independent accumulator pairs hide the FMA latency of the running sums.
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, a0 = s0, a1 = s0;
  int64_t j = 0;
  for (; j + 16 <= nv; j += 16) {
    const __m256 z0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), vinv, vnegm);
    const __m256 z1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j + 8), vinv, vnegm);
    const __m256 e0 = exp256(z0), e1 = exp256(z1);
    s0 = _mm256_add_ps(s0, e0);
    s1 = _mm256_add_ps(s1, e1);
    a0 = _mm256_fmadd_ps(e0, z0, a0);
    a1 = _mm256_fmadd_ps(e1, z1, a1);
  }
  for (; j < nv; j += 8) {
    const __m256 z0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), vinv, vnegm);
    const __m256 e0 = exp256(z0);
    s0 = _mm256_add_ps(s0, e0);
    a0 = _mm256_fmadd_ps(e0, z0, a0);
  }
  double s = hsum(_mm256_add_ps(s0, s1)), a = hsum(_mm256_add_ps(a0, a1));
  for (; j < n; ++j) {
    const float z = x[j] * inv_t - m;
    const float e = std::exp(z);
    s += e;
    a += double(e) * z;
  }
  return {double(m), s, a};
}

__attribute__((target("avx2,fma"))) void row_dlogits_avx2(float* x, int64_t n, float inv_t, float lse, float c1,
                                                          float c2) {
  const int64_t nv = n - n % 8;
  const __m256 vinv = _mm256_set1_ps(inv_t), vneglse = _mm256_set1_ps(-lse);
  const __m256 vc1 = _mm256_set1_ps(c1), vc2 = _mm256_set1_ps(c2);
  for (int64_t j = 0; j < nv; j += 8) {
    const __m256 z = _mm256_mul_ps(_mm256_loadu_ps(x + j), vinv);
    const __m256 p = exp256(_mm256_add_ps(z, vneglse));
    _mm256_storeu_ps(x + j, _mm256_mul_ps(p, _mm256_fmadd_ps(vc2, z, vc1)));
  }
  row_dlogits_scalar(x + nv, n - nv, inv_t, lse, c1, c2);
}

const bool kHasAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
const bool kHasAvx2 = false;
#endif

template <typename T>
RowStats row_stats(const T* x, int64_t n, T inv_t) {
#ifdef PRISM_X86
  if constexpr (std::is_same_v<T, float>) {
    if (kHasAvx2) return row_stats_avx2(x, n, inv_t);
  }
#endif
  return row_stats_scalar(x, n, inv_t);
}

template <typename T>
void row_dlogits(T* x, int64_t n, T inv_t, T lse, T c1, T c2) {
#ifdef PRISM_X86
  if constexpr (std::is_same_v<T, float>) {
    if (kHasAvx2) return row_dlogits_avx2(x, n, inv_t, lse, c1, c2);
  }
#endif
  row_dlogits_scalar(x, n, inv_t, lse, c1, c2);
}

int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

}  // namespace

bool cpu_epilogue_vectorized() { return kHasAvx2; }

void cpu_forward_epilogue(const at::Tensor& tile, const at::Tensor& targets, int64_t t0, int64_t col0,
                          double inv_temp, bool first, at::Tensor& stats) {
  const int64_t rows = tile.size(0), cols = tile.size(1), T = stats.size(1);
  const int64_t* tgt = targets.data_ptr<int64_t>() + t0;
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "prism_logprob_cpu_fwd", [&] {
    const scalar_t* x = tile.data_ptr<scalar_t>();
    scalar_t* st = stats.data_ptr<scalar_t>() + t0;
    const auto inv_t = static_cast<scalar_t>(inv_temp);
    at::parallel_for(0, rows, grain_rows(cols), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = x + r * cols;
        RowStats cur = row_stats(xr, cols, inv_t);
        if (!first) cur = merge({double(st[r]), double(st[T + r]), double(st[2 * T + r])}, cur);
        st[r] = scalar_t(cur.m);
        st[T + r] = scalar_t(cur.s);
        st[2 * T + r] = scalar_t(cur.a);
        const int64_t j = tgt[r] - col0;
        const bool owned = j >= 0 && j < cols;
        if (first) st[3 * T + r] = owned ? xr[j] * inv_t : scalar_t(0);
        else if (owned) st[3 * T + r] = xr[j] * inv_t;
      }
    });
  });
}

void cpu_backward_epilogue(at::Tensor& tile, const at::Tensor& targets, int64_t t0, int64_t col0, double inv_temp,
                           const at::Tensor& lse, const at::Tensor& mean_z, const at::Tensor& grad_logp,
                           const at::Tensor& grad_entropy) {
  const int64_t rows = tile.size(0), cols = tile.size(1);
  const int64_t* tgt = targets.data_ptr<int64_t>() + t0;
  AT_DISPATCH_FLOATING_TYPES(tile.scalar_type(), "prism_logprob_cpu_bwd", [&] {
    scalar_t* x = tile.data_ptr<scalar_t>();
    const scalar_t *l = lse.data_ptr<scalar_t>() + t0, *ez = mean_z.data_ptr<scalar_t>() + t0;
    const scalar_t *g_lp = grad_logp.data_ptr<scalar_t>() + t0, *g_h = grad_entropy.data_ptr<scalar_t>() + t0;
    const auto inv_t = static_cast<scalar_t>(inv_temp);
    at::parallel_for(0, rows, grain_rows(cols), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        // dz = g_lp * (onehot - p) + g_H * p * (E_p[z] - z), times 1/temperature for d(logit).
        const scalar_t c1 = inv_t * (g_h[r] * ez[r] - g_lp[r]), c2 = -inv_t * g_h[r];
        row_dlogits(x + r * cols, cols, inv_t, l[r], c1, c2);
        const int64_t j = tgt[r] - col0;
        if (j >= 0 && j < cols) x[r * cols + j] += inv_t * g_lp[r];
      }
    });
  });
}

}  // namespace prism
