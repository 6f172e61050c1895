// Sparse FFN on CPU through the XLA FFI: gather-matvec over the active rows of [F, D] weights, the CPU twin of
// the Pallas kernels (same contract: indices [K] padded to a static capacity, count in a 1-element buffer,
// padding ignored; outputs f32). XLA's gather + dot copies the gathered rows before multiplying; here each
// active row is read once, straight from the weights, by OpenMP threads.
// Legend: B tokens, D d_model, F d_ff, K capacity.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

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

// row . x with four independent accumulators (one chain would wait on FMA latency, not on memory)
inline float Dot(const float* row, const float* x, int64_t n) {
  int64_t i = 0;
  float acc = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (; i + 32 <= n; i += 32) {
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

inline float Pair(int64_t activation, float gate, float up) {
  switch (activation) {
    case kSwiglu: return gate / (1.f + std::exp(-gate)) * up;
    case kReglu: return Relu(gate) * up;
    case kDrelu: return Relu(gate) * Relu(up);
    case kRelu: return Relu(up);
    default: { const float r = Relu(up); return r * r; }
  }
}

// The valid count and a check of the valid indices; an error names the first bad one.
ffi::Error ActiveCount(ffi::Buffer<ffi::S32>& indices, ffi::Buffer<ffi::S32>& count, int64_t d_ff, int64_t* n) {
  const int64_t capacity = indices.element_count();
  *n = count.typed_data()[0];
  if (*n < 0 || *n > capacity)
    return ffi::Error::InvalidArgument("active count " + std::to_string(*n) + " outside [0, " +
                                       std::to_string(capacity) + "]");
  const int32_t* idx = indices.typed_data();
  for (int64_t k = 0; k < *n; ++k)
    if (idx[k] < 0 || idx[k] >= d_ff)
      return ffi::Error::InvalidArgument("active index " + std::to_string(idx[k]) + " out of range [0, " +
                                         std::to_string(d_ff) + ")");
  return ffi::Error::Success();
}

// hidden[b, k] = act(W_gate[idx[k]] . x[b], W_up[idx[k]] . x[b]); an empty w_gate means an ungated FFN.
ffi::Error SparseGateUpImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::S32> count,
                            ffi::Buffer<ffi::F32> w_gate, ffi::Buffer<ffi::F32> w_up, int64_t activation,
                            int64_t threads, ffi::ResultBuffer<ffi::F32> hidden) {
  const auto up_dims = w_up.dimensions();
  const auto x_dims = x.dimensions();
  if (up_dims.size() != 2 || x_dims.size() != 2 || x_dims[1] != up_dims[1])
    return ffi::Error::InvalidArgument("x must be [B, D] and w_up [F, D]");
  const bool gated = w_gate.element_count() > 0;
  if (gated && w_gate.element_count() != w_up.element_count())
    return ffi::Error::InvalidArgument("w_gate and w_up differ in shape");
  const int64_t tokens = x_dims[0], d_model = up_dims[1], capacity = indices.element_count();
  int64_t n = 0;
  if (ffi::Error error = ActiveCount(indices, count, up_dims[0], &n); error.failure()) return error;
  const float* xs = x.typed_data();
  const int32_t* idx = indices.typed_data();
  const float* gate_rows = gated ? w_gate.typed_data() : nullptr;
  const float* up_rows = w_up.typed_data();
  float* out = hidden->typed_data();
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t k = 0; k < capacity; ++k) {
    if (k >= n) {
      for (int64_t b = 0; b < tokens; ++b) out[b * capacity + k] = 0.f;
      continue;
    }
    const float* up_row = up_rows + static_cast<int64_t>(idx[k]) * d_model;
    const float* gate_row = gated ? gate_rows + static_cast<int64_t>(idx[k]) * d_model : nullptr;
    if (k + 1 < n) {  // start the next rows' first lines while this one streams
      __builtin_prefetch(up_rows + static_cast<int64_t>(idx[k + 1]) * d_model);
      if (gated) __builtin_prefetch(gate_rows + static_cast<int64_t>(idx[k + 1]) * d_model);
    }
    for (int64_t b = 0; b < tokens; ++b) {
      const float* xb = xs + b * d_model;
      const float gate = gated ? Dot(gate_row, xb, d_model) : 0.f;
      out[b * capacity + k] = Pair(activation, gate, Dot(up_row, xb, d_model));
    }
  }
  return ffi::Error::Success();
}

// y[b] = sum over k < count of hidden[b, k] * W_down[idx[k]]. Threads own disjoint column ranges (no reduction);
// a row whose coefficients are all zero (a predicted neuron that did not fire) is not read.
ffi::Error SparseDownImpl(ffi::Buffer<ffi::F32> hidden, ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::S32> count,
                          ffi::Buffer<ffi::F32> w_down, int64_t threads, ffi::ResultBuffer<ffi::F32> y) {
  const auto dims = w_down.dimensions();
  const auto h_dims = hidden.dimensions();
  const int64_t capacity = indices.element_count();
  if (dims.size() != 2 || h_dims.size() != 2 || h_dims[1] != capacity)
    return ffi::Error::InvalidArgument("hidden must be [B, K] and w_down [F, D]");
  const int64_t tokens = h_dims[0], d_model = dims[1];
  int64_t n = 0;
  if (ffi::Error error = ActiveCount(indices, count, dims[0], &n); error.failure()) return error;
  const float* h = hidden.typed_data();
  const int32_t* idx = indices.typed_data();
  const float* rows = w_down.typed_data();
  float* out = y->typed_data();
  const int64_t parts = threads < 1 ? 1 : threads;
#pragma omp parallel for num_threads(parts) schedule(static, 1)
  for (int64_t part = 0; part < parts; ++part) {
    // column range of this part, in multiples of 16 floats (64 bytes) so parts never share a cache line
    const int64_t lines = (d_model + 15) / 16;
    const int64_t begin = std::min(d_model, part * lines / parts * 16);
    const int64_t end = std::min(d_model, (part + 1) * lines / parts * 16);
    if (begin >= end) continue;
    for (int64_t b = 0; b < tokens; ++b)
      for (int64_t d = begin; d < end; ++d) out[b * d_model + d] = 0.f;
    for (int64_t k = 0; k < n; ++k) {
      bool any = false;
      for (int64_t b = 0; b < tokens; ++b) any |= h[b * capacity + k] != 0.f;
      if (!any) continue;
      const float* row = rows + static_cast<int64_t>(idx[k]) * d_model;
      for (int64_t b = 0; b < tokens; ++b) {
        const float coefficient = h[b * capacity + k];
        float* yb = out + b * d_model;
#pragma omp simd
        for (int64_t d = begin; d < end; ++d) yb[d] += coefficient * row[d];
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseGateUp, SparseGateUpImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [B, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // indices [K]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // count [1]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_gate [F, D], or [0, D] when ungated
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_up [F, D]
                                  .Attr<int64_t>("activation")
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // hidden [B, K]

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseDown, SparseDownImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // hidden [B, K]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // indices [K]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // count [1]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_down [F, D]
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y [B, D]
