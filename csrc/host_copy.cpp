// Bulk host copies with non-temporal (streaming) stores, for weight sync receivers.
//
// A weight sync writes hundreds of MB that nobody reads until the next generation. Ordinary stores first
// read every destination line into the cache (read-for-ownership) and evict useful data; streaming stores
// write around the cache, so a copy moves each byte across the memory bus twice instead of three times.
// glibc's memmove switches to them only for copies above a threshold (about 3/4 of the shared cache per
// thread), which the few-MB tensors of a model never reach: measured on a 2-core EPYC, a sync's per-tensor
// memmoves read 13-15 GB/s, and 17.5-18.6 GB/s with the threshold lowered to 1 MB (GLIBC_TUNABLES).
#include "host_copy.h"

#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>  // SSE2: part of every x86-64 CPU
#define PRISM_STREAM_STORES 1
#endif

namespace prism {

namespace {

void stream_copy(char* dst, const char* src, int64_t n) {
#ifdef PRISM_STREAM_STORES
  // Align the destination to 16 bytes with an ordinary copy; stream the body; copy the tail.
  int64_t head = (16 - (reinterpret_cast<uintptr_t>(dst) & 15)) & 15;
  if (head > n) head = n;
  std::memcpy(dst, src, head);
  dst += head;
  src += head;
  n -= head;
  int64_t blocks = n / 64;
  for (int64_t i = 0; i < blocks; ++i, dst += 64, src += 64) {
    __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16));
    __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 32));
    __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + 48), d);
  }
  std::memcpy(dst, src, n - blocks * 64);
#else
  std::memcpy(dst, src, n);
#endif
}

}  // namespace

void copy_runs(const int64_t* runs, int64_t count, int64_t stream_min_bytes) {
  for (int64_t i = 0; i < count; ++i) {
    char* dst = reinterpret_cast<char*>(runs[3 * i]);
    const char* src = reinterpret_cast<const char*>(runs[3 * i + 1]);
    int64_t n = runs[3 * i + 2];
    if (n >= stream_min_bytes) {
      stream_copy(dst, src, n);
    } else {
      std::memmove(dst, src, n);
    }
  }
#ifdef PRISM_STREAM_STORES
  _mm_sfence();  // streamed lines are visible to other cores (and processes) before this returns
#endif
}

}  // namespace prism
