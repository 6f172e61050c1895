// The int4 predictor of kernels_pallas.quant_predict on CPU through the XLA FFI, alone (scores) and fused with the
// sparse FFN for one token. The predictor is a 4-bit copy of W_gate and W_up (groups of 32 along D, one f32 scale a
// group, element i of a group in the low nibble of byte i and element i + 16 in the high one, stored +8); x is
// quantised to int8 in the same groups. A neuron's score is its quantised pre-activation over |w_row| |x|, the
// minimum over the projections whose sign decides whether it fires. The fused call then computes exactly, in f32,
// only the predicted neurons: the gate row first, the up row only where the activated gate passed (relu(g) > 0 and
// above the layer's gate threshold, if any), the down row only where the activation is not zero.
// Legend: B tokens, D d_model, F d_ff, G = D / 32 groups.
#include <string>
#include <vector>

#include "cpu_common.h"

namespace ffi = xla::ffi;

namespace {

using namespace sparse_lm_cpu;

constexpr int64_t kGroup = 32;
constexpr int64_t kPartsPerThread = 4;
constexpr int64_t kScoreAhead = 6;  // rows

// x in int8 groups of 32: q = round(x / s) with s = absmax / 127 (0 for an all-zero group), as the reference
struct QuantizedX {
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> sum;  // sum of q per group: the +8 offset of the stored nibbles is taken out with it
  float norm = 0.f;          // |x| of the dequantised x
  // Per pair of groups, x in the order of a 32-byte load of their packed rows once split into nibbles: the low
  // nibbles are elements 0-15 of both groups, the high ones elements 16-31.
  std::vector<int8_t> pair_low, pair_high;  // [pairs * 32] each
  std::vector<int32_t> pair_offset;         // [pairs * 8]: -8 * sum of each group in its first lane of four
};

QuantizedX QuantizeX(const float* x, int64_t d_model) {
  const int64_t groups = d_model / kGroup, pairs = groups / 2;
  QuantizedX out;
  out.q.resize(d_model);
  out.scale.resize(groups);
  out.sum.resize(groups);
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
  out.pair_low.resize(pairs * 32);
  out.pair_high.resize(pairs * 32);
  out.pair_offset.assign(pairs * 8, 0);
  for (int64_t p = 0; p < pairs; ++p) {
    for (int64_t h = 0; h < 2; ++h) {  // group 2p, then 2p + 1
      const int8_t* q = out.q.data() + (2 * p + h) * kGroup;
      std::copy(q, q + 16, out.pair_low.data() + p * 32 + h * 16);
      std::copy(q + 16, q + 32, out.pair_high.data() + p * 32 + h * 16);
      out.pair_offset[p * 8 + h * 4] = -8 * out.sum[2 * p + h];
    }
  }
  return out;
}

#if defined(__AVX2__) && defined(__FMA__)
// Integer dot of one packed group pair with x, as int32 lanes: lanes 0-3 sum to group 2p, lanes 4-7 to group 2p + 1
inline __m256i PairDot(const uint8_t* packed, const QuantizedX& x, int64_t p) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed));
  const __m256i low = _mm256_and_si256(bytes, low4), high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
  // unsigned nibble (0..15) times signed int8: each int16 pair sum is within 2 * 15 * 127, two of them still fit
  const __m256i sum16 = _mm256_add_epi16(
      _mm256_maddubs_epi16(low, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.pair_low.data() + p * 32))),
      _mm256_maddubs_epi16(high, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.pair_high.data() + p * 32))));
  const __m256i dot = _mm256_madd_epi16(sum16, _mm256_set1_epi16(1));
  return _mm256_add_epi32(dot, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.pair_offset.data() + p * 8)));
}
#endif

// Adds the groups [g, groups) to total[r]: whole pairs with AVX2, a last odd group (or all of them without AVX2)
// one element at a time. Both Int4Dots paths end with it after their blocks of 8 groups.
template <int kRows>
inline void Int4DotsTail(const uint8_t* const* rows, const float* const* row_scales, const QuantizedX& x, int64_t g,
                         int64_t groups, float* total) {
#if defined(__AVX2__) && defined(__FMA__)
  for (; g + 2 <= groups; g += 2) {
    for (int r = 0; r < kRows; ++r) {
      const __m256 scales = _mm256_set_m128(_mm_set1_ps(row_scales[r][g + 1] * x.scale[g + 1]),
                                            _mm_set1_ps(row_scales[r][g] * x.scale[g]));
      total[r] += Sum8(_mm256_mul_ps(_mm256_cvtepi32_ps(PairDot(rows[r] + g * (kGroup / 2), x, g / 2)), scales));
    }
  }
#endif
  for (; g < groups; ++g) {
    for (int r = 0; r < kRows; ++r) {
      int32_t isum = 0;
      for (int64_t i = 0; i < kGroup / 2; ++i) {
        const uint8_t b = rows[r][g * (kGroup / 2) + i];
        isum += (b & 0x0F) * x.q[g * kGroup + i] + (b >> 4) * x.q[g * kGroup + i + kGroup / 2];
      }
      total[r] += row_scales[r][g] * x.scale[g] * static_cast<float>(isum - 8 * x.sum[g]);
    }
  }
}

// sum over groups of s_w s_x sum_i (w_i - 8) q_i for kRows packed rows against the same x (a template, so the
// accumulators stay in registers)
template <int kRows>
inline void Int4Dots(const uint8_t* const* rows, const float* const* row_scales, const QuantizedX& x, int64_t groups,
                     float* out) {
  int64_t g = 0;
  float total[kRows] = {};
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = _mm256_setzero_ps();
  // lane -> group within an 8-group block: pair k of the block takes groups 2k (lanes 0-3) and 2k + 1 (lanes 4-7)
  const __m256i expand0 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), expand1 = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3),
                expand2 = _mm256_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5), expand3 = _mm256_setr_epi32(6, 6, 6, 6, 7, 7, 7, 7);
  for (; g + 8 <= groups; g += 8) {
    const __m256 x_scales = _mm256_loadu_ps(x.scale.data() + g);
    const int64_t p = g / 2;
    for (int r = 0; r < kRows; ++r) {
      const __m256 scales = _mm256_mul_ps(_mm256_loadu_ps(row_scales[r] + g), x_scales);
      const uint8_t* packed = rows[r] + g * (kGroup / 2);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(PairDot(packed, x, p)), _mm256_permutevar8x32_ps(scales, expand0),
                               acc[r]);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(PairDot(packed + 32, x, p + 1)),
                               _mm256_permutevar8x32_ps(scales, expand1), acc[r]);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(PairDot(packed + 64, x, p + 2)),
                               _mm256_permutevar8x32_ps(scales, expand2), acc[r]);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(PairDot(packed + 96, x, p + 3)),
                               _mm256_permutevar8x32_ps(scales, expand3), acc[r]);
    }
  }
  for (int r = 0; r < kRows; ++r) total[r] = Sum8(acc[r]);
#endif
  Int4DotsTail<kRows>(rows, row_scales, x, g, groups, total);
  for (int r = 0; r < kRows; ++r) out[r] = total[r];
}

#if defined(__x86_64__) && defined(__GNUC__)
// GCC's own AVX-512 headers start some vectors undefined on purpose, which its warnings then report
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#define SPARSE_LM_VNNI __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))
// Int4Dots with AVX-512 VNNI: four groups per instruction pair (dpbusd multiplies unsigned nibbles by signed int8
// and sums four products into each int32 lane), the same arithmetic and result as the AVX2 path.
template <int kRows>
SPARSE_LM_VNNI void Int4DotsVnni(const uint8_t* const* rows, const float* const* row_scales, const QuantizedX& x,
                                 int64_t groups, float* out) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  // lane -> group within an 8-group block: quad 0 takes groups 0-3, quad 1 groups 4-7, four lanes each
  const __m512i expand0 = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m512i expand1 = _mm512_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7);
  __m512 acc[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) {
    const __m256 x_scales = _mm256_loadu_ps(x.scale.data() + g);
    for (int q = 0; q < 2; ++q) {  // groups g + 4q .. g + 4q + 3: x of pairs g/2 + 2q and g/2 + 2q + 1, adjacent
      const int64_t p = g / 2 + 2 * q;
      const __m512i x_low = _mm512_loadu_si512(x.pair_low.data() + p * 32);
      const __m512i x_high = _mm512_loadu_si512(x.pair_high.data() + p * 32);
      const __m512i offset = _mm512_loadu_si512(x.pair_offset.data() + p * 8);
      for (int r = 0; r < kRows; ++r) {
        const __m512i bytes = _mm512_loadu_si512(rows[r] + (g + 4 * q) * (kGroup / 2));
        __m512i dot = _mm512_dpbusd_epi32(offset, _mm512_and_si512(bytes, low4), x_low);
        dot = _mm512_dpbusd_epi32(dot, _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low4), x_high);
        const __m256 scales = _mm256_mul_ps(_mm256_loadu_ps(row_scales[r] + g), x_scales);
        const __m512 lane_scales = _mm512_permutexvar_ps(q == 0 ? expand0 : expand1, _mm512_zextps256_ps512(scales));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), lane_scales, acc[r]);
      }
    }
  }
  float total[kRows];
  for (int r = 0; r < kRows; ++r) total[r] = _mm512_reduce_add_ps(acc[r]);
  Int4DotsTail<kRows>(rows, row_scales, x, g, groups, total);
  for (int r = 0; r < kRows; ++r) out[r] = total[r];
}

const bool kHasVnni = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512bw");
#pragma GCC diagnostic pop
#else
template <int kRows>
void Int4DotsVnni(const uint8_t* const*, const float* const*, const QuantizedX&, int64_t, float*) {}
const bool kHasVnni = false;
#endif

// The fastest Int4Dots this CPU runs
template <int kRows>
inline void Int4DotsBest(const uint8_t* const* rows, const float* const* row_scales, const QuantizedX& x,
                         int64_t groups, float* out) {
  if (kHasVnni) {
    Int4DotsVnni<kRows>(rows, row_scales, x, groups, out);
  } else {
    Int4Dots<kRows>(rows, row_scales, x, groups, out);
  }
}

// out[j] = rows[neurons[j]] . x for n neurons, four rows per pass, the heads of the next four prefetched
void RowDots(const float* rows, const int32_t* neurons, int64_t n, const float* x, int64_t d_model, float* out) {
  auto row = [&](int64_t j) { return rows + static_cast<int64_t>(neurons[j]) * d_model; };
  int64_t j = 0;
  for (; j + 3 < n; j += 4) {
    if (j + 7 < n)
      for (int64_t i = j + 4; i < j + 8; ++i) PrefetchHead(row(i), d_model);
    DotPair2(row(j), row(j + 1), row(j + 2), row(j + 3), x, d_model, out + j);
  }
  for (; j < n; ++j) out[j] = Dot(row(j), x, d_model);
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
  // more parts than threads: a helper that wakes late still finds work, instead of the caller doing it all
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(kPartsPerThread * threads, d_ff / 64));
  ParallelFor(pool, threads, parts, [&](int64_t part) {
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
      // rows a few ahead: one core's hardware prefetcher alone streams at ~7 GB/s here
      if (f + kScoreAhead < d_ff)
        for (int r = 0; r < count; ++r) {
          const char* next = reinterpret_cast<const char*>(rows[r] + kScoreAhead * half);
          for (int64_t b = 0; b < half; b += 64) _mm_prefetch(next + b, _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(scales[r] + kScoreAhead * groups), _MM_HINT_T0);
        }
      float dots[2] = {0.f, 0.f};
      if (count == 2) {
        Int4DotsBest<2>(rows, scales, x, groups, dots);
      } else {
        Int4DotsBest<1>(rows, scales, x, groups, dots);
      }
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
// gate rows, the up rows of those whose activated gate passed (relu(g) > max(0, gate_threshold); -inf: no gate
// threshold) and the down rows of those whose activation is not zero.
ffi::Error QuantSparseFfnImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> qg,
                              ffi::Buffer<ffi::F32> sg, ffi::Buffer<ffi::F32> ng, ffi::Buffer<ffi::U8> qu,
                              ffi::Buffer<ffi::F32> su, ffi::Buffer<ffi::F32> nu, ffi::Buffer<ffi::F32> w_gate,
                              ffi::Buffer<ffi::F32> w_up, ffi::Buffer<ffi::F32> w_down, int64_t activation,
                              float threshold, float gate_threshold, int64_t capacity, int64_t threads,
                              ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::S32> count) {
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
  const float gate_floor = ReluGateFloor(gate_threshold);  // gated here means ReGLU or dReLU (ReadWeights)
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(kPartsPerThread * threads, n / 16));
  std::vector<float> partial(static_cast<size_t>((parts - 1) * d_model), 0.f);  // part 0 accumulates into out
  ParallelFor(pool, threads, n == 0 ? 0 : parts, [&](int64_t part) {
    const int64_t begin = part * n / parts, end = (part + 1) * n / parts;
    // Three streaming passes over this part's neurons, each with four rows in flight and the next rows' heads
    // prefetched: gate rows; up rows behind a passing gate; down rows where the activation is not zero.
    std::vector<int32_t> passed;  // neurons whose activated gate passed (all of them when ungated)
    std::vector<float> gates;
    if (gated) {
      std::vector<float> g(end - begin);
      RowDots(gate_rows, idx.data() + begin, end - begin, xs, d_model, g.data());
      for (int64_t k = begin; k < end; ++k)
        if (g[k - begin] > gate_floor) {
          passed.push_back(idx[k]);
          gates.push_back(g[k - begin]);
        }
    } else {
      passed.assign(idx.begin() + begin, idx.begin() + end);
      gates.assign(passed.size(), 0.f);
    }
    std::vector<float> ups(passed.size());
    RowDots(up_rows, passed.data(), passed.size(), xs, d_model, ups.data());
    std::vector<float> coef;
    std::vector<const float*> rows;
    for (size_t j = 0; j < passed.size(); ++j) {
      const float a = Pair(activation, gates[j], ups[j], gate_threshold);
      if (a != 0.f) {
        coef.push_back(a);
        rows.push_back(down_rows + static_cast<int64_t>(passed[j]) * d_model);
      }
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
                                  .Attr<float>("gate_threshold")  // -inf: none
                                  .Attr<int64_t>("capacity")
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [1, D]
                                  .Ret<ffi::Buffer<ffi::S32>>());  // predicted count after the cap [1]
