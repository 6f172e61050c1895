// Sparse FFN on CPU through the XLA FFI: gather-matvec over the active rows of [F, D] weights, the CPU twin of
// the Pallas kernels (same contract: indices [K] padded to a static capacity, count in a 1-element buffer,
// padding ignored; outputs f32). XLA's gather + dot copies the gathered rows before multiplying; here each
// active row is read once, straight from the weights, split across XLA's own intra-op threads (an OpenMP team
// per calling thread cost 20-70 us per call under XLA's runtime).
// Legend: B tokens, D d_model, F d_ff, K capacity.
#include <string>
#include <vector>

#include "cpu_common.h"

namespace ffi = xla::ffi;

namespace {

using namespace sparse_lm_cpu;

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
// hidden[b, k] for the first n entries of idx (0 for the padding up to capacity), split over the pool
void GateUpRows(ffi::ThreadPool& pool, int64_t threads, const float* xs, int64_t tokens, int64_t d_model,
                const int32_t* idx, int64_t n, int64_t capacity, const float* gate_rows, const float* up_rows,
                int64_t activation, float gate_threshold, float* out) {
  const bool gated = gate_rows != nullptr;
  for (int64_t k = n; k < capacity; ++k)  // padding
    for (int64_t b = 0; b < tokens; ++b) out[b * capacity + k] = 0.f;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, n));
  ParallelFor(pool, parts, n == 0 ? 0 : parts, [&](int64_t part) {
    const int64_t end = (part + 1) * n / parts;
    int64_t k = part * n / parts;
    if (gated && tokens == 1) {  // decode: two neurons per pass
      for (; k + 1 < end; k += 2) {
        const float* g0 = gate_rows + static_cast<int64_t>(idx[k]) * d_model;
        const float* u0 = up_rows + static_cast<int64_t>(idx[k]) * d_model;
        const float* g1 = gate_rows + static_cast<int64_t>(idx[k + 1]) * d_model;
        const float* u1 = up_rows + static_cast<int64_t>(idx[k + 1]) * d_model;
        if (k + 3 < end) {
          for (int64_t j = k + 2; j < k + 4; ++j) {
            PrefetchHead(gate_rows + static_cast<int64_t>(idx[j]) * d_model, d_model);
            PrefetchHead(up_rows + static_cast<int64_t>(idx[j]) * d_model, d_model);
          }
        }
        float sums[4];
        DotPair2(g0, u0, g1, u1, xs, d_model, sums);
        out[k] = Pair(activation, sums[0], sums[1], gate_threshold);
        out[k + 1] = Pair(activation, sums[2], sums[3], gate_threshold);
      }
    }
    for (; k < end; ++k) {
      const float* up_row = up_rows + static_cast<int64_t>(idx[k]) * d_model;
      const float* gate_row = gated ? gate_rows + static_cast<int64_t>(idx[k]) * d_model : nullptr;
      if (k + 1 < end) {  // the next rows' first lines while this one streams
        PrefetchHead(up_rows + static_cast<int64_t>(idx[k + 1]) * d_model, d_model);
        if (gated) PrefetchHead(gate_rows + static_cast<int64_t>(idx[k + 1]) * d_model, d_model);
      }
      for (int64_t b = 0; b < tokens; ++b) {
        const float* xb = xs + b * d_model;
        float gate = 0.f, up = 0.f;
        if (gated) {
          DotPair(gate_row, up_row, xb, d_model, &gate, &up);
        } else {
          up = Dot(up_row, xb, d_model);
        }
        out[b * capacity + k] = Pair(activation, gate, up, gate_threshold);
      }
    }
  });
}

// hidden[b, k] = act(W_gate[idx[k]] . x[b], W_up[idx[k]] . x[b]), 0 where the activated gate does not pass
// gate_threshold (-inf: none); an empty w_gate means an ungated FFN.
ffi::Error SparseGateUpImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> indices,
                            ffi::Buffer<ffi::S32> count, ffi::Buffer<ffi::F32> w_gate, ffi::Buffer<ffi::F32> w_up,
                            int64_t activation, float gate_threshold, int64_t threads,
                            ffi::ResultBuffer<ffi::F32> hidden) {
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
  GateUpRows(pool, threads, xs, tokens, d_model, idx, n, capacity, gate_rows, up_rows, activation, gate_threshold,
             out);
  return ffi::Error::Success();
}

// One token, predictor fused: logits = act(x W1 + b1) W2 + b2 (W1 [D, R], W2 [R, F]: the predictor as stored), the
// neurons with logits above the threshold compacted into ascending indices (the first K when more are predicted,
// as sparse_lm.sparse.active_set does), then their activations (gate_threshold as in SparseGateUp). Avoids XLA's small ops between the predictor,
// the compaction and the kernel, which cost more than the predictor's bytes here.
ffi::Error PredictGateUpImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w1,
                             ffi::Buffer<ffi::F32> b1, ffi::Buffer<ffi::F32> w2, ffi::Buffer<ffi::F32> b2,
                             ffi::Buffer<ffi::F32> w_gate, ffi::Buffer<ffi::F32> w_up, int64_t activation,
                             int64_t hidden_relu, float threshold, float gate_threshold, int64_t threads,
                             ffi::ResultBuffer<ffi::F32> hidden, ffi::ResultBuffer<ffi::S32> indices,
                             ffi::ResultBuffer<ffi::S32> count) {
  const auto w1_dims = w1.dimensions(), w2_dims = w2.dimensions(), up_dims = w_up.dimensions();
  if (w1_dims.size() != 2 || w2_dims.size() != 2 || up_dims.size() != 2 || x.element_count() != w1_dims[0] ||
      w2_dims[0] != w1_dims[1] || w2_dims[1] != up_dims[0] || up_dims[1] != w1_dims[0] ||
      b1.element_count() != w1_dims[1] || b2.element_count() != w2_dims[1])
    return ffi::Error::InvalidArgument("predictor [D, R], [R, F] and FFN rows [F, D] do not fit x [1, D]");
  const bool gated = w_gate.element_count() > 0;
  if (gated && w_gate.element_count() != w_up.element_count())
    return ffi::Error::InvalidArgument("w_gate and w_up differ in shape");
  const int64_t d_model = w1_dims[0], rank = w1_dims[1], d_ff = w2_dims[1];
  const int64_t capacity = indices->element_count();
  const float* xs = x.typed_data();
  std::vector<float> h(b1.typed_data(), b1.typed_data() + rank);
  for (int64_t d = 0; d < d_model; ++d) Axpy(xs[d], w1.typed_data() + d * rank, h.data(), rank);
  if (hidden_relu)
    for (float& v : h) v = Relu(v);
  std::vector<float> logits(b2.typed_data(), b2.typed_data() + d_ff);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, d_ff / 64));
  ParallelFor(pool, parts, parts, [&](int64_t part) {  // column slices of W2, whole cache lines each
    const int64_t lines = d_ff / 16;
    const int64_t begin = part * lines / parts * 16;
    const int64_t end = part + 1 == parts ? d_ff : (part + 1) * lines / parts * 16;
    for (int64_t r = 0; r < rank; ++r)
      Axpy(h[r], w2.typed_data() + r * d_ff + begin, logits.data() + begin, end - begin);
  });
  int32_t* idx = indices->typed_data();
  int64_t n = 0;
  for (int64_t f = 0; f < d_ff && n < capacity; ++f)
    if (logits[f] > threshold) idx[n++] = static_cast<int32_t>(f);
  for (int64_t k = n; k < capacity; ++k) idx[k] = 0;
  count->typed_data()[0] = static_cast<int32_t>(n);
  GateUpRows(pool, threads, xs, 1, d_model, idx, n, capacity, gated ? w_gate.typed_data() : nullptr,
             w_up.typed_data(), activation, gate_threshold, hidden->typed_data());
  return ffi::Error::Success();
}

// y[b] = sum over k < count of hidden[b, k] * W_down[idx[k]]. Threads take disjoint runs of active rows (whole
// rows: long streams) into private accumulators, summed at the end; a row whose coefficients are all zero (a
// predicted neuron that did not fire) is not read.
ffi::Error SparseDownImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> hidden, ffi::Buffer<ffi::S32> indices,
                          ffi::Buffer<ffi::S32> count, ffi::Buffer<ffi::F32> w_down, int64_t threads,
                          ffi::ResultBuffer<ffi::F32> y) {
  const auto dims = w_down.dimensions();
  const auto h_dims = hidden.dimensions();
  const int64_t capacity = indices.element_count();
  if (dims.size() != 2 || h_dims.size() != 2 || h_dims[1] != capacity)
    return ffi::Error::InvalidArgument("hidden must be [B, K] and w_down [F, D]");
  const int64_t tokens = h_dims[0], d_model = dims[1], size = tokens * d_model;
  int64_t n = 0;
  if (ffi::Error error = ActiveCount(indices, count, dims[0], &n); error.failure()) return error;
  const float* h = hidden.typed_data();
  const int32_t* idx = indices.typed_data();
  const float* rows = w_down.typed_data();
  float* out = y->typed_data();
  const int64_t parts = std::max<int64_t>(1, std::min(threads, std::max<int64_t>(n, 1)));
  std::vector<float> partial(static_cast<size_t>((parts - 1) * size), 0.f);  // part 0 accumulates into out
  std::fill(out, out + size, 0.f);
  ParallelFor(pool, parts, n == 0 ? 0 : parts, [&](int64_t part) {
    float* acc = part == 0 ? out : partial.data() + (part - 1) * size;
    const int64_t begin = part * n / parts, end = (part + 1) * n / parts;
    int64_t k = begin;
    if (tokens == 1) {  // decode: four rows per pass (a zero coefficient costs a read here, not a wrong sum)
      for (; k + 3 < end; k += 4) {
        const float* four[4];
        for (int j = 0; j < 4; ++j) four[j] = rows + static_cast<int64_t>(idx[k + j]) * d_model;
        if (k + 7 < end)
          for (int64_t j = k + 4; j < k + 8; ++j) PrefetchHead(rows + static_cast<int64_t>(idx[j]) * d_model, d_model);
        if (h[k] != 0.f || h[k + 1] != 0.f || h[k + 2] != 0.f || h[k + 3] != 0.f) Axpy4(h + k, four, acc, d_model);
      }
    }
    for (; k + 1 < end; k += 2) {  // rows in pairs
      const float* row0 = rows + static_cast<int64_t>(idx[k]) * d_model;
      const float* row1 = rows + static_cast<int64_t>(idx[k + 1]) * d_model;
      if (k + 3 < end) {
        PrefetchHead(rows + static_cast<int64_t>(idx[k + 2]) * d_model, d_model);
        PrefetchHead(rows + static_cast<int64_t>(idx[k + 3]) * d_model, d_model);
      }
      for (int64_t b = 0; b < tokens; ++b) {
        const float c0 = h[b * capacity + k], c1 = h[b * capacity + k + 1];
        if (c0 != 0.f && c1 != 0.f) {
          Axpy2(c0, row0, c1, row1, acc + b * d_model, d_model);
        } else if (c0 != 0.f) {
          Axpy(c0, row0, acc + b * d_model, d_model);
        } else if (c1 != 0.f) {
          Axpy(c1, row1, acc + b * d_model, d_model);
        }
      }
    }
    for (; k < end; ++k)
      for (int64_t b = 0; b < tokens; ++b)
        if (h[b * capacity + k] != 0.f)
          Axpy(h[b * capacity + k], rows + static_cast<int64_t>(idx[k]) * d_model, acc + b * d_model, d_model);
  });
  for (int64_t part = 1; part < parts; ++part) {
    const float* acc = partial.data() + (part - 1) * size;
    for (int64_t i = 0; i < size; ++i) out[i] += acc[i];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseGateUp, SparseGateUpImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [B, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // indices [K]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // count [1]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_gate [F, D], or [0, D] when ungated
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_up [F, D]
                                  .Attr<int64_t>("activation")
                                  .Attr<float>("gate_threshold")  // -inf: none
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // hidden [B, K]

XLA_FFI_DEFINE_HANDLER_SYMBOL(PredictGateUp, PredictGateUpImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [1, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // predictor W1 [D, R]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b1 [R]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // W2 [R, F]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b2 [F]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_gate [F, D], or [0, D] when ungated
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_up [F, D]
                                  .Attr<int64_t>("activation")
                                  .Attr<int64_t>("hidden_relu")
                                  .Attr<float>("threshold")
                                  .Attr<float>("gate_threshold")  // -inf: none
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::Buffer<ffi::F32>>()  // hidden [1, K]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // indices [K]
                                  .Ret<ffi::Buffer<ffi::S32>>());  // count [1]

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseDown, SparseDownImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // hidden [B, K]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // indices [K]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // count [1]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_down [F, D]
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y [B, D]
