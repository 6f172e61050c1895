// The int4 predictor of kernels_pallas.quant_predict on CPU through the XLA FFI, alone (scores) and fused with the
// sparse FFN for one token. The predictor is a 4-bit copy of W_gate and W_up (groups of 32 along D, one f32 scale a
// group, element i of a group in the low nibble of byte i and element i + 16 in the high one, stored +8); x is
// quantised to int8 in the same groups. A neuron's score is its quantised pre-activation over |w_row| |x|, the
// minimum over the projections whose sign decides whether it fires. The fused call then computes exactly, in f32,
// only the predicted neurons: the gate row first, the up row only where the gate passed, the down row only where
// the activation is not zero.
// Legend: B tokens, D d_model, F d_ff, G = D / 32 groups.
#include <string>
#include <vector>

#include "cpu_common.h"

namespace ffi = xla::ffi;

namespace {

using namespace sparse_lm_cpu;

constexpr int64_t kGroup = 32;

// x in int8 groups of 32: q = round(x / s) with s = absmax / 127 (0 for an all-zero group), as the reference
struct QuantizedX {
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> sum;  // sum of q per group: the +8 offset of the stored nibbles is taken out with it
  float norm = 0.f;          // |x| of the dequantised x
};

QuantizedX QuantizeX(const float* x, int64_t d_model) {
  const int64_t groups = d_model / kGroup;
  QuantizedX out{std::vector<int8_t>(d_model), std::vector<float>(groups), std::vector<int32_t>(groups), 0.f};
  double norm2 = 0.0;
  for (int64_t g = 0; g < groups; ++g) {
    float amax = 0.f;
    for (int64_t i = 0; i < kGroup; ++i) amax = std::max(amax, std::fabs(x[g * kGroup + i]));
    const float s = amax / 127.f;
    out.scale[g] = s;
    int32_t sum = 0;
    for (int64_t i = 0; i < kGroup; ++i) {
      const float v = s > 0.f ? std::nearbyint(x[g * kGroup + i] / s) : 0.f;
      const int8_t q = static_cast<int8_t>(std::clamp(v, -127.f, 127.f));
      out.q[g * kGroup + i] = q;
      sum += q;
      const float deq = q * s;
      norm2 += static_cast<double>(deq) * deq;
    }
    out.sum[g] = sum;
  }
  out.norm = static_cast<float>(std::sqrt(norm2));
  return out;
}

// sum over groups of s_w s_x sum_i (w_i - 8) q_i for one packed row (or two rows against the same x, for two streams)
inline void Int4Dots(const uint8_t* const* rows, const float* const* row_scales, int count, const QuantizedX& x,
                     int64_t groups, float* out) {
#if defined(__AVX2__) && defined(__FMA__)
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  float offset[2] = {0.f, 0.f};
  for (int64_t g = 0; g < groups; ++g) {
    const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + g * kGroup));
    for (int r = 0; r < count; ++r) {
      const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[r] + g * (kGroup / 2)));
      const __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), low4), _mm_and_si128(packed, low4));
      // unsigned nibble (0..15) times signed int8: pair sums stay within int16
      const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(w, xq), ones);
      const float scale = row_scales[r][g] * x.scale[g];
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(scale), acc[r]);
      offset[r] += scale * static_cast<float>(x.sum[g]);
    }
  }
  for (int r = 0; r < count; ++r) out[r] = Sum8(acc[r]) - 8.f * offset[r];
#else
  for (int r = 0; r < count; ++r) {
    float total = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      int32_t isum = 0;
      for (int64_t i = 0; i < kGroup / 2; ++i) {
        const uint8_t b = rows[r][g * (kGroup / 2) + i];
        isum += (b & 0x0F) * x.q[g * kGroup + i] + (b >> 4) * x.q[g * kGroup + i + kGroup / 2];
      }
      total += row_scales[r][g] * x.scale[g] * static_cast<float>(isum - 8 * x.sum[g]);
    }
    out[r] = total;
  }
#endif
}

// The quantised copy of the projections that decide firing, as passed from Python (empty buffers: not used).
struct Int4Weights {
  const uint8_t* gate = nullptr;  // [F, D / 2]
  const float* gate_scale = nullptr;  // [F, G]
  const float* gate_inv_norm = nullptr;  // [F]: 1 / |dequantised row|
  const uint8_t* up = nullptr;
  const float* up_scale = nullptr;
  const float* up_inv_norm = nullptr;
};

// Which projections' signs decide firing: dReLU needs both, ReGLU the gate, ungated ReLU / ReLU^2 the up one.
ffi::Error Uses(int64_t activation, bool* gate, bool* up) {
  switch (activation) {
    case kDrelu: *gate = *up = true; return ffi::Error::Success();
    case kReglu: *gate = true; *up = false; return ffi::Error::Success();
    case kRelu:
    case kRelu2: *gate = false; *up = true; return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("the int4 predictor needs an activation with exact zeros "
                                         "(drelu, reglu, relu, relu2); got code " + std::to_string(activation));
  }
}

ffi::Error ReadWeights(int64_t activation, int64_t d_model, int64_t d_ff, ffi::Buffer<ffi::U8>& qg,
                       ffi::Buffer<ffi::F32>& sg, ffi::Buffer<ffi::F32>& ng, ffi::Buffer<ffi::U8>& qu,
                       ffi::Buffer<ffi::F32>& su, ffi::Buffer<ffi::F32>& nu, Int4Weights* w) {
  bool gate = false, up = false;
  if (ffi::Error error = Uses(activation, &gate, &up); error.failure()) return error;
  if (d_model % kGroup != 0) return ffi::Error::InvalidArgument("d_model must be a multiple of 32");
  const int64_t groups = d_model / kGroup;
  auto fits = [&](ffi::Buffer<ffi::U8>& q, ffi::Buffer<ffi::F32>& s, ffi::Buffer<ffi::F32>& n) {
    return static_cast<int64_t>(q.element_count()) == d_ff * d_model / 2 &&
           static_cast<int64_t>(s.element_count()) == d_ff * groups && static_cast<int64_t>(n.element_count()) == d_ff;
  };
  if (gate && !fits(qg, sg, ng)) return ffi::Error::InvalidArgument("int4 gate must be [F, D/2], [F, D/32], [F]");
  if (up && !fits(qu, su, nu)) return ffi::Error::InvalidArgument("int4 up must be [F, D/2], [F, D/32], [F]");
  if (gate) *w = {qg.typed_data(), sg.typed_data(), ng.typed_data(), nullptr, nullptr, nullptr};
  if (up) {
    w->up = qu.typed_data();
    w->up_scale = su.typed_data();
    w->up_inv_norm = nu.typed_data();
  }
  return ffi::Error::Success();
}

// scores[f] for f in [0, d_ff), split over the pool
void Scores(ffi::ThreadPool& pool, int64_t threads, const Int4Weights& w, const QuantizedX& x, int64_t d_model,
            int64_t d_ff, float* scores) {
  const int64_t groups = d_model / kGroup, half = d_model / 2;
  const float inv_norm_x = x.norm > 0.f ? 1.f / x.norm : 0.f;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, d_ff / 64));
  ParallelFor(pool, parts, parts, [&](int64_t part) {
    for (int64_t f = part * d_ff / parts; f < (part + 1) * d_ff / parts; ++f) {
      const uint8_t* rows[2];
      const float* scales[2];
      int count = 0;
      if (w.gate != nullptr) {
        rows[count] = w.gate + f * half;
        scales[count++] = w.gate_scale + f * groups;
      }
      if (w.up != nullptr) {
        rows[count] = w.up + f * half;
        scales[count++] = w.up_scale + f * groups;
      }
      float dots[2];
      Int4Dots(rows, scales, count, x, groups, dots);
      float score = w.gate != nullptr ? dots[0] * w.gate_inv_norm[f] : dots[0] * w.up_inv_norm[f];
      if (count == 2) score = std::min(score, dots[1] * w.up_inv_norm[f]);
      scores[f] = score * inv_norm_x;
    }
  });
}

ffi::Error QuantScoresImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> qg,
                           ffi::Buffer<ffi::F32> sg, ffi::Buffer<ffi::F32> ng, ffi::Buffer<ffi::U8> qu,
                           ffi::Buffer<ffi::F32> su, ffi::Buffer<ffi::F32> nu, int64_t activation, int64_t threads,
                           ffi::ResultBuffer<ffi::F32> scores) {
  const auto x_dims = x.dimensions(), s_dims = scores->dimensions();
  if (x_dims.size() != 2 || s_dims.size() != 2 || s_dims[0] != x_dims[0])
    return ffi::Error::InvalidArgument("x must be [B, D] and scores [B, F]");
  const int64_t tokens = x_dims[0], d_model = x_dims[1], d_ff = s_dims[1];
  Int4Weights w;
  if (ffi::Error error = ReadWeights(activation, d_model, d_ff, qg, sg, ng, qu, su, nu, &w); error.failure())
    return error;
  for (int64_t b = 0; b < tokens; ++b) {
    const QuantizedX xq = QuantizeX(x.typed_data() + b * d_model, d_model);
    Scores(pool, threads, w, xq, d_model, d_ff, scores->typed_data() + b * d_ff);
  }
  return ffi::Error::Success();
}

// One token: scores, the first `capacity` neurons (ascending) scoring above `threshold`, then exactly in f32 their
// gate rows, the up rows of those whose gate passed and the down rows of those whose activation is not zero.
ffi::Error QuantSparseFfnImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> qg,
                              ffi::Buffer<ffi::F32> sg, ffi::Buffer<ffi::F32> ng, ffi::Buffer<ffi::U8> qu,
                              ffi::Buffer<ffi::F32> su, ffi::Buffer<ffi::F32> nu, ffi::Buffer<ffi::F32> w_gate,
                              ffi::Buffer<ffi::F32> w_up, ffi::Buffer<ffi::F32> w_down, int64_t activation,
                              float threshold, int64_t capacity, int64_t threads, ffi::ResultBuffer<ffi::F32> y,
                              ffi::ResultBuffer<ffi::S32> count) {
  const auto up_dims = w_up.dimensions(), x_dims = x.dimensions();
  if (up_dims.size() != 2 || x_dims.size() != 2 || x_dims[0] != 1 || x_dims[1] != up_dims[1] ||
      w_down.element_count() != w_up.element_count())
    return ffi::Error::InvalidArgument("x must be [1, D] and w_up, w_down [F, D]");
  const int64_t d_ff = up_dims[0], d_model = up_dims[1];
  const bool gated = w_gate.element_count() > 0;
  if (gated && w_gate.element_count() != w_up.element_count())
    return ffi::Error::InvalidArgument("w_gate and w_up differ in shape");
  if (gated != (activation == kDrelu || activation == kReglu))
    return ffi::Error::InvalidArgument("w_gate must be given exactly for gated activations");
  Int4Weights w;
  if (ffi::Error error = ReadWeights(activation, d_model, d_ff, qg, sg, ng, qu, su, nu, &w); error.failure())
    return error;
  const float* xs = x.typed_data();
  const QuantizedX xq = QuantizeX(xs, d_model);
  std::vector<float> scores(d_ff);
  Scores(pool, threads, w, xq, d_model, d_ff, scores.data());
  std::vector<int32_t> idx;
  idx.reserve(capacity);
  for (int64_t f = 0; f < d_ff && static_cast<int64_t>(idx.size()) < capacity; ++f)
    if (scores[f] > threshold) idx.push_back(static_cast<int32_t>(f));
  const int64_t n = idx.size();
  count->typed_data()[0] = static_cast<int32_t>(n);

  const float* gate_rows = gated ? w_gate.typed_data() : nullptr;
  const float* up_rows = w_up.typed_data();
  const float* down_rows = w_down.typed_data();
  float* out = y->typed_data();
  std::fill(out, out + d_model, 0.f);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, n));
  std::vector<float> partial(static_cast<size_t>((parts - 1) * d_model), 0.f);  // part 0 accumulates into out
  ParallelFor(pool, parts, n == 0 ? 0 : parts, [&](int64_t part) {
    const int64_t begin = part * n / parts, end = (part + 1) * n / parts;
    std::vector<float> coef;
    std::vector<const float*> rows;
    coef.reserve(end - begin);
    rows.reserve(end - begin);
    auto keep = [&](int32_t neuron, float a) {
      if (a != 0.f) {
        coef.push_back(a);
        rows.push_back(down_rows + static_cast<int64_t>(neuron) * d_model);
      }
    };
    int64_t k = begin;
    if (gated) {  // gate rows two at a time; an up row only behind a gate that passed
      for (; k + 1 < end; k += 2) {
        const int32_t n0 = idx[k], n1 = idx[k + 1];
        if (k + 3 < end) {
          PrefetchHead(gate_rows + static_cast<int64_t>(idx[k + 2]) * d_model, d_model);
          PrefetchHead(gate_rows + static_cast<int64_t>(idx[k + 3]) * d_model, d_model);
        }
        float g0, g1, u0 = 0.f, u1 = 0.f;
        DotPair(gate_rows + n0 * d_model, gate_rows + n1 * d_model, xs, d_model, &g0, &g1);
        if (g0 > 0.f && g1 > 0.f) {
          DotPair(up_rows + n0 * d_model, up_rows + n1 * d_model, xs, d_model, &u0, &u1);
        } else if (g0 > 0.f) {
          u0 = Dot(up_rows + n0 * d_model, xs, d_model);
        } else if (g1 > 0.f) {
          u1 = Dot(up_rows + n1 * d_model, xs, d_model);
        }
        keep(n0, g0 > 0.f ? Pair(activation, g0, u0) : 0.f);
        keep(n1, g1 > 0.f ? Pair(activation, g1, u1) : 0.f);
      }
      for (; k < end; ++k) {
        const float g = Dot(gate_rows + idx[k] * d_model, xs, d_model);
        keep(idx[k], g > 0.f ? Pair(activation, g, Dot(up_rows + idx[k] * d_model, xs, d_model)) : 0.f);
      }
    } else {
      for (; k < end; ++k) keep(idx[k], Pair(activation, 0.f, Dot(up_rows + idx[k] * d_model, xs, d_model)));
    }
    float* acc = part == 0 ? out : partial.data() + (part - 1) * d_model;
    const int64_t kept = coef.size();
    int64_t j = 0;
    for (; j + 3 < kept; j += 4) {
      if (j + 7 < kept)
        for (int64_t i = j + 4; i < j + 8; ++i) PrefetchHead(rows[i], d_model);
      Axpy4(coef.data() + j, rows.data() + j, acc, d_model);
    }
    for (; j < kept; ++j) Axpy(coef[j], rows[j], acc, d_model);
  });
  for (int64_t part = 1; part < parts; ++part)
    for (int64_t i = 0; i < d_model; ++i) out[i] += partial[(part - 1) * d_model + i];
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QuantScores, QuantScoresImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [B, D]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // int4 gate [F, D/2], or empty
                                  .Arg<ffi::Buffer<ffi::F32>>()  // its group scales [F, G]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // its inverse row norms [F]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // int4 up [F, D/2], or empty
                                  .Arg<ffi::Buffer<ffi::F32>>()  // [F, G]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // [F]
                                  .Attr<int64_t>("activation")
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // scores [B, F]

XLA_FFI_DEFINE_HANDLER_SYMBOL(QuantSparseFfn, QuantSparseFfnImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [1, D]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // int4 gate [F, D/2], or empty
                                  .Arg<ffi::Buffer<ffi::F32>>()  // [F, G]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // [F]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // int4 up [F, D/2], or empty
                                  .Arg<ffi::Buffer<ffi::F32>>()  // [F, G]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // [F]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_gate [F, D], or [0, D] when ungated
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_up [F, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w_down [F, D]
                                  .Attr<int64_t>("activation")
                                  .Attr<float>("threshold")
                                  .Attr<int64_t>("capacity")
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [1, D]
                                  .Ret<ffi::Buffer<ffi::S32>>());  // predicted count after the cap [1]
