// Helpers shared by the C++ sparse FFN kernels: row dots and axpys with several streams in flight, the FFN
// activation pairs, and a parallel-for over XLA's intra-op thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace sparse_lm_cpu {

namespace ffi = xla::ffi;

// Same order as the Python enum kernels_pallas.cpu.ACTIVATION_CODES.
enum Activation : int64_t { kSwiglu = 0, kReglu = 1, kDrelu = 2, kRelu = 3, kRelu2 = 4 };

#if defined(__AVX2__) && defined(__FMA__)
inline float Sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// The first kHead floats of a row are fetched one row early: a new row is a new stream, which the hardware
// prefetcher only picks up after a few misses.
constexpr int64_t kHead = 256;
inline void PrefetchHead(const float* row, int64_t n) {
  for (int64_t i = 0; i < std::min(n, kHead); i += 16) _mm_prefetch(reinterpret_cast<const char*>(row + i), _MM_HINT_T1);
}

constexpr int64_t kAhead = 256;  // floats (1 KiB) prefetched ahead of each stream: rows cross 4 KiB pages, where
                                // the hardware prefetcher stops

// (a . x, b . x) in one pass over two rows: two streams in flight per core instead of one
inline void DotPair(const float* a, const float* b, const float* x, int64_t n, float* out_a, float* out_b) {
  int64_t i = 0;
  float acc_a = 0.f, acc_b = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
  for (; i + 16 <= n; i += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(a + i + kAhead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(b + i + kAhead), _MM_HINT_T0);
    const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), x0, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), x1, a1);
    b0 = _mm256_fmadd_ps(_mm256_loadu_ps(b + i), x0, b0);
    b1 = _mm256_fmadd_ps(_mm256_loadu_ps(b + i + 8), x1, b1);
  }
  acc_a = Sum8(_mm256_add_ps(a0, a1));
  acc_b = Sum8(_mm256_add_ps(b0, b1));
#endif
  for (; i < n; ++i) {
    acc_a += a[i] * x[i];
    acc_b += b[i] * x[i];
  }
  *out_a = acc_a;
  *out_b = acc_b;
}

// DotPair for two neurons at once: four row streams in flight per core
inline void DotPair2(const float* a0r, const float* b0r, const float* a1r, const float* b1r, const float* x,
                     int64_t n, float* out) {
  int64_t i = 0;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
#if defined(__AVX2__) && defined(__FMA__)
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  for (; i + 8 <= n; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a0r + i), xv, s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(b0r + i), xv, s1);
    s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a1r + i), xv, s2);
    s3 = _mm256_fmadd_ps(_mm256_loadu_ps(b1r + i), xv, s3);
  }
  acc[0] = Sum8(s0);
  acc[1] = Sum8(s1);
  acc[2] = Sum8(s2);
  acc[3] = Sum8(s3);
#endif
  for (; i < n; ++i) {
    acc[0] += a0r[i] * x[i];
    acc[1] += b0r[i] * x[i];
    acc[2] += a1r[i] * x[i];
    acc[3] += b1r[i] * x[i];
  }
  for (int j = 0; j < 4; ++j) out[j] = acc[j];
}

// row . x with four independent accumulators (one chain would wait on FMA latency, not on memory)
inline float Dot(const float* row, const float* x, int64_t n) {
  int64_t i = 0;
  float acc = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (; i + 32 <= n; i += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(row + i + kAhead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(row + i + kAhead + 16), _MM_HINT_T0);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(row + i), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(row + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(row + i + 16), _mm256_loadu_ps(x + i + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(row + i + 24), _mm256_loadu_ps(x + i + 24), a3);
  }
  acc = Sum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
  for (; i < n; ++i) acc += row[i] * x[i];
  return acc;
}

inline float Relu(float v) { return v > 0.f ? v : 0.f; }

// The hidden activation act(gate, up), kept only where the activated gate passes the gate threshold t:
// |sigma(gate)| > t (sparse_lm.models.ffn.thresholded_hidden with threshold_on=gate: CATS on SwiGLU, FATReLU on
// ReGLU). t = -inf is no threshold and gives the plain pair bit for bit; ungated activations have no gate to test.
// The test is written !(|s| <= t) so that a NaN gate still shows as NaN, as it does without a threshold.
inline float Pair(int64_t activation, float gate, float up, float gate_threshold) {
  switch (activation) {
    case kSwiglu: {
      const float s = gate / (1.f + std::exp(-gate));
      return std::fabs(s) <= gate_threshold ? 0.f : s * up;
    }
    case kReglu: { const float r = Relu(gate); return r <= gate_threshold ? 0.f : r * up; }
    case kDrelu: { const float r = Relu(gate); return r <= gate_threshold ? 0.f : r * Relu(up); }
    case kRelu: return Relu(up);
    default: { const float r = Relu(up); return r * r; }
  }
}

// A ReLU gate (ReGLU, dReLU) is non-zero and passes gate threshold t exactly when its pre-activation g exceeds
// max(0, t): the one compare that decides whether a neuron's up and down rows are read at all.
inline float ReluGateFloor(float gate_threshold) { return std::max(0.f, gate_threshold); }


// Runs body(0..parts-1) on the calling thread and XLA's intra-op pool. Parts are claimed from a shared counter,
// so the caller finishes the work alone if the pool is busy; the state is shared with the scheduled tasks, which
// may start after this returns and then find nothing left to claim.
struct Parts {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t total = 0;
  std::function<void(int64_t)> body;
};

inline void Drain(Parts& parts) {
  for (int64_t part = parts.next.fetch_add(1); part < parts.total; part = parts.next.fetch_add(1)) {
    parts.body(part);
    parts.done.fetch_add(1, std::memory_order_release);
  }
}

inline void ParallelFor(ffi::ThreadPool& pool, int64_t threads, int64_t total, std::function<void(int64_t)> body) {
  auto parts = std::make_shared<Parts>();
  parts->total = total;
  parts->body = std::move(body);
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(threads, 1), total) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([parts] { Drain(*parts); });
  Drain(*parts);
  while (parts->done.load(std::memory_order_acquire) < total) std::this_thread::yield();
}

// y += c * row, streaming the row with prefetch ahead
inline void Axpy(float c, const float* row, float* y, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 cv = _mm256_set1_ps(c);
  for (; i + 16 <= n; i += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(row + i + kAhead), _MM_HINT_T0);
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(cv, _mm256_loadu_ps(row + i), _mm256_loadu_ps(y + i)));
    _mm256_storeu_ps(y + i + 8, _mm256_fmadd_ps(cv, _mm256_loadu_ps(row + i + 8), _mm256_loadu_ps(y + i + 8)));
  }
#endif
  for (; i < n; ++i) y[i] += c * row[i];
}

// y += c0 * row0 + c1 * row1: two streams in flight per core, one pass over y
inline void Axpy2(float c0, const float* row0, float c1, const float* row1, float* y, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 v0 = _mm256_set1_ps(c0), v1 = _mm256_set1_ps(c1);
  for (; i + 16 <= n; i += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(row0 + i + kAhead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(row1 + i + kAhead), _MM_HINT_T0);
    __m256 lo = _mm256_fmadd_ps(v0, _mm256_loadu_ps(row0 + i), _mm256_loadu_ps(y + i));
    __m256 hi = _mm256_fmadd_ps(v0, _mm256_loadu_ps(row0 + i + 8), _mm256_loadu_ps(y + i + 8));
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(v1, _mm256_loadu_ps(row1 + i), lo));
    _mm256_storeu_ps(y + i + 8, _mm256_fmadd_ps(v1, _mm256_loadu_ps(row1 + i + 8), hi));
  }
#endif
  for (; i < n; ++i) y[i] += c0 * row0[i] + c1 * row1[i];
}

// y += sum of c[j] * row[j] over four rows: four streams in flight per core, one pass over y
inline void Axpy4(const float* c, const float* const* row, float* y, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 v0 = _mm256_set1_ps(c[0]), v1 = _mm256_set1_ps(c[1]), v2 = _mm256_set1_ps(c[2]),
               v3 = _mm256_set1_ps(c[3]);
  for (; i + 8 <= n; i += 8) {
    __m256 acc = _mm256_fmadd_ps(v0, _mm256_loadu_ps(row[0] + i), _mm256_loadu_ps(y + i));
    acc = _mm256_fmadd_ps(v1, _mm256_loadu_ps(row[1] + i), acc);
    acc = _mm256_fmadd_ps(v2, _mm256_loadu_ps(row[2] + i), acc);
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(v3, _mm256_loadu_ps(row[3] + i), acc));
  }
#endif
  for (; i < n; ++i) y[i] += c[0] * row[0][i] + c[1] * row[1][i] + c[2] * row[2][i] + c[3] * row[3][i];
}


}  // namespace sparse_lm_cpu
