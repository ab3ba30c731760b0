// Weight-only linear kernels for CPU decode (AVX-512, fp32 activations and accumulation).
//
//   w8a16_mm(x (...,K) f32, w (N,K) int8, scale (N,) f32, bias (N,)|None)    -> (...,N) f32
//       y[m,n] = scale[n] * sum_k x[m,k] * w[n,k] + bias[n]
//   w4a16_mm(x (...,K) f32, packed (N,K/2) uint8, scale (N,K/g), zero (N,K/g), g, bias|None)
//       y[m,n] = sum_k x[m,k] * (code[n,k] - zero[n,k/g]) * scale[n,k/g] + bias[n]
//       code[n,2j] = packed[n,j] & 0xF, code[n,2j+1] = packed[n,j] >> 4; g % 32 == 0.
//   half_mm(x (...,K) f32, w (N,K) fp16|bf16, bias (N,)|None)                 -> (...,N) f32
//   dequantize_w4 / dequantize_w8: the weight as float32, for prefill (MKL multiplies it).
//   x's leading dims are flattened to M rows (x must be contiguous) and restored on y.
//
// Decode is memory bound: the weight is read once per call in its packed form (1 or 0.5 byte a
// weight instead of 4), widened to fp32 in registers, and used for up to 4 activation rows at
// once. A tile is NR output rows x MR activation rows; threads (ATen's OpenMP pool) split the
// output rows. The TORCH_CHECKs below accept exactly what the Python fast path may pass; when one
// fails, channelwise/kernels/cpu.py re-checks in Python and raises a readable error (or falls
// back), so a decode call pays for no Python-side validation.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "tiles.h"

namespace {

at::Tensor w8a16_mm(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& scale,
                    const std::optional<at::Tensor>& bias) {
  check_weight(w);
  const int64_t K = w.size(1), N = w.size(0);
  const at::Tensor x = as_rows(x_in, K);
  const int64_t M = x.size(0);
  TORCH_CHECK(w.scalar_type() == at::kChar, "w: int8");
  check_params(scale, N, -1, "scale");
  const float* bp = bias_ptr(bias, N);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  constexpr int NR = 8;
  run_tiles<NR>(M, N, K, [&](auto mr, auto nr, int64_t n, int64_t m0) {
    widen_tile<WidenInt8, decltype(mr)::value, decltype(nr)::value>(
        xp + m0 * K, K, wp + n * K, K, sp + n, bp ? bp + n : nullptr, yp + m0 * N + n, N);
  });
  return like_rows(y, x_in);
}

template <typename Widen>
void run_widened(const at::Tensor& x, const at::Tensor& w, const float* bp, at::Tensor& y) {
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  const float* xp = x.data_ptr<float>();
  const auto* wp = reinterpret_cast<const typename Widen::T*>(w.data_ptr());
  float* yp = y.data_ptr<float>();
  constexpr int NR = 8;
  run_tiles<NR>(M, N, K, [&](auto mr, auto nr, int64_t n, int64_t m0) {
    widen_tile<Widen, decltype(mr)::value, decltype(nr)::value>(
        xp + m0 * K, K, wp + n * K, K, nullptr, bp ? bp + n : nullptr, yp + m0 * N + n, N);
  });
}

// y = x @ w.T + bias with w stored in fp16 or bf16, widened exactly in registers, f32 sums: a
// float weight kept at its checkpoint's 16-bit precision reads half the bytes of its fp32 copy.
at::Tensor half_mm(const at::Tensor& x_in, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  check_weight(w);
  const int64_t N = w.size(0), K = w.size(1);
  const at::Tensor x = as_rows(x_in, K);
  TORCH_CHECK(w.scalar_type() == at::kHalf || w.scalar_type() == at::kBFloat16, "w: fp16 or bf16");
  const float* bp = bias_ptr(bias, N);
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  if (w.scalar_type() == at::kHalf) {
    run_widened<WidenHalf>(x, w, bp, y);
  } else {
    run_widened<WidenBFloat16>(x, w, bp, y);
  }
  return like_rows(y, x_in);
}

at::Tensor w4a16_mm(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scale,
                    const at::Tensor& zero, int64_t group, const std::optional<at::Tensor>& bias) {
  check_weight(packed);
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  const at::Tensor x = as_rows(x_in, K);
  const int64_t M = x.size(0);
  TORCH_CHECK(packed.scalar_type() == at::kByte, "packed: uint8");
  TORCH_CHECK(group > 0 && group % 32 == 0 && K % group == 0, "group must divide K, % 32 == 0");
  const int64_t G = K / group;
  check_params(scale, N, G, "scale");
  check_params(zero, N, G, "zero");
  const float* bp = bias_ptr(bias, N);
  const std::vector<float> xperm = deinterleave32(x.data_ptr<float>(), M, K);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = xperm.data();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = zero.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  constexpr int NR = 4;
  run_tiles<NR>(M, N, K, [&](auto mr, auto nr, int64_t n, int64_t m0) {
    auto tile = [&](auto steps) {
      w4_tile<decltype(mr)::value, decltype(nr)::value, decltype(steps)::value>(
          xp + m0 * K, K, pp + n * (K / 2), K, sp + n * G, zp + n * G, G, group,
          bp ? bp + n : nullptr, yp + m0 * N + n, N);
    };
    if (group == 64) {
      tile(std::integral_constant<int, 2>{});
    } else if (group == 128) {
      tile(std::integral_constant<int, 4>{});
    } else {
      tile(std::integral_constant<int, 0>{});
    }
  });
  return like_rows(y, x_in);
}

// ---------------------------------------------------------------- de-quantization (prefill)
// For many tokens the weight is de-quantized once and multiplied by MKL. These write the same
// floats as the Python references (torch's (code - zero) * scale, code * scale), in one pass.
//   dequantize_w4(packed (N,K/2) uint8, scale (N,K/g), zero (N,K/g), g) -> (N,K) f32
//   dequantize_w8(w (N,K) int8, scale (N,))                              -> (N,K) f32
at::Tensor dequantize_w4(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero,
                         int64_t group) {
  check_weight(packed);
  TORCH_CHECK(packed.scalar_type() == at::kByte, "packed: uint8");
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(group > 0 && group % 32 == 0 && K % group == 0, "group must divide K, % 32 == 0");
  const int64_t G = K / group;
  check_params(scale, N, G, "scale");
  check_params(zero, N, G, "zero");
  at::Tensor w = at::empty({N, K}, scale.options());
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = zero.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  const __m512 codes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // lanes of (lo, hi) in weight order: low nibble of byte j is weight 2j, its high one 2j + 1
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  at::parallel_for(0, N, std::max<int64_t>(1, 65536 / K), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t g = 0; g < G; ++g) {
        // the group's 16 weights, rounded as torch rounds them: a subtraction, then a product
        const __m512 table = _mm512_mul_ps(_mm512_sub_ps(codes, _mm512_set1_ps(zp[n * G + g])),
                                           _mm512_set1_ps(sp[n * G + g]));
        for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
          const __m512i v = _mm512_cvtepu8_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(pp + n * (K / 2) + k / 2)));
          const __m512 lo = _mm512_permutexvar_ps(v, table);
          const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
          _mm512_storeu_ps(wp + n * K + k, _mm512_permutex2var_ps(lo, first, hi));
          _mm512_storeu_ps(wp + n * K + k + 16, _mm512_permutex2var_ps(lo, second, hi));
        }
      }
    }
  });
  return w;
}

at::Tensor dequantize_w8(const at::Tensor& q, const at::Tensor& scale) {
  check_weight(q);
  TORCH_CHECK(q.scalar_type() == at::kChar, "w: int8");
  const int64_t N = q.size(0), K = q.size(1);
  check_params(scale, N, -1, "scale");
  at::Tensor w = at::empty({N, K}, scale.options());
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const __m512 s = _mm512_set1_ps(sp[n]);
      for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 mask = lanes(K - k);
        _mm512_mask_storeu_ps(wp + n * K + k, mask, _mm512_mul_ps(WidenInt8::load(mask, qp + n * K + k), s));
      }
    }
  });
  return w;
}

// ---------------------------------------------------------------- W8A8 helpers (around _int_mm)
// Per-token symmetric int8: scale = amax / 127 (1 for an all-zero row, NaN if the row has one),
// q = clamp(round_half_even(x / scale), -127, 127). Same operations, same order, as the Python
// reference, so the codes and scales are bit-identical to it for finite rows.
std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: (M, K) f32");
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({M, 1}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1)), [&](int64_t m0, int64_t m1) {
    const __m512 hi = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-127.0f);
    for (int64_t m = m0; m < m1; ++m) {
      const float* row = xp + m * K;
      __m512 amax = _mm512_setzero_ps();
      __mmask16 nan = 0;
      for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 mask = lanes(K - k);
        __m512 v = _mm512_abs_ps(_mm512_maskz_loadu_ps(mask, row + k));
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        amax = _mm512_max_ps(amax, v);
      }
      float s = _mm512_reduce_max_ps(amax) / 127.0f;
      if (nan) s = std::numeric_limits<float>::quiet_NaN();
      if (s == 0.0f) s = 1.0f;
      sp[m] = s;
      const __m512 sv = _mm512_set1_ps(s);
      for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 mask = lanes(K - k);
        __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(mask, row + k), sv);
        v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
        _mm_mask_storeu_epi8(qp + m * K + k, mask, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
      }
    }
  });
  return {q, scale};
}

// Static symmetric int8 with one calibrated scale: q = clamp(round_half_even(x / scale), -128,
// 127), as the fake quantizer computes it. Returns the codes and a per-token scale column (the
// scale, or NaN for a token with a non-finite value, so that its output row is NaN, as with the
// dynamic quantizer, instead of the clamped codes of an infinity).
std::tuple<at::Tensor, at::Tensor> quantize_static(const at::Tensor& x, double scale_d) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: (M, K) f32");
  const int64_t M = x.size(0), K = x.size(1);
  const float scale = static_cast<float>(scale_d);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor col = at::empty({M, 1}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* cp = col.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1)), [&](int64_t m0, int64_t m1) {
    const __m512 hi = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-128.0f), sv = _mm512_set1_ps(scale);
    const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
    for (int64_t m = m0; m < m1; ++m) {
      __mmask16 bad = 0;
      for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 mask = lanes(K - k);
        const __m512 x16 = _mm512_maskz_loadu_ps(mask, xp + m * K + k);
        bad |= _mm512_cmp_ps_mask(_mm512_abs_ps(x16), inf, _CMP_NLT_UQ);  // inf or NaN
        __m512 v = _mm512_roundscale_ps(_mm512_div_ps(x16, sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
        _mm_mask_storeu_epi8(qp + m * K + k, mask, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
      }
      cp[m] = bad ? std::numeric_limits<float>::quiet_NaN() : scale;
    }
  });
  return {q, col};
}

// y[m, n] = float(acc[m, n] - x_rowsum[m] * w_zero[n]) * w_scale[n] * x_scale[m] (+ bias[n]), in
// the reference's order (oneDNN's int8 linear applies w_scale first, see scale_rows_) (the zero-point term, exact in int32, only for asymmetric int8 weights),
// written over acc (same element size): no second (M, N) buffer to allocate, fault in and stream
// (a 512 x 1536 W8A8 linear: quantize + GEMM + de-quantize 1.60 ms with a fresh output).
at::Tensor dequantize_acc_(at::Tensor& acc, const at::Tensor& x_scale, const at::Tensor& w_scale,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& x_rowsum,
                           const std::optional<at::Tensor>& w_zero) {
  TORCH_CHECK(acc.dim() == 2 && acc.scalar_type() == at::kInt && acc.is_contiguous(),
              "acc: contiguous (M, N) int32");
  const int64_t M = acc.size(0), N = acc.size(1);
  TORCH_CHECK(x_scale.numel() == M && x_scale.scalar_type() == at::kFloat && x_scale.is_contiguous());
  check_params(w_scale, N, -1, "w_scale");
  const float* bp = bias_ptr(bias, N);
  const bool zp = w_zero.has_value() && w_zero->defined();
  TORCH_CHECK(zp == (x_rowsum.has_value() && x_rowsum->defined()), "x_rowsum and w_zero go together");
  if (zp) {
    TORCH_CHECK(w_zero->dim() == 1 && w_zero->size(0) == N && w_zero->scalar_type() == at::kInt &&
                w_zero->is_contiguous(), "w_zero: (N,) int32");
    TORCH_CHECK(x_rowsum->numel() == M && x_rowsum->scalar_type() == at::kInt &&
                x_rowsum->is_contiguous(), "x_rowsum: (M,) int32");
  }
  const int32_t* wz = zp ? w_zero->data_ptr<int32_t>() : nullptr;
  const int32_t* rs = zp ? x_rowsum->data_ptr<int32_t>() : nullptr;
  int32_t* ap = acc.data_ptr<int32_t>();
  float* yp = reinterpret_cast<float*>(ap);
  const float* xs = x_scale.data_ptr<float>();
  const float* ws = w_scale.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const __m512 xv = _mm512_set1_ps(xs[m]);
      const __m512i rv = _mm512_set1_epi32(zp ? rs[m] : 0);
      for (int64_t n = 0; n < N; n += 16) {
        const __mmask16 mask = lanes(N - n);
        __m512i a = _mm512_maskz_loadu_epi32(mask, ap + m * N + n);
        if (zp) a = _mm512_sub_epi32(a, _mm512_mullo_epi32(rv, _mm512_maskz_loadu_epi32(mask, wz + n)));
        __m512 v = _mm512_cvtepi32_ps(a);
        v = _mm512_mul_ps(_mm512_mul_ps(v, _mm512_maskz_loadu_ps(mask, ws + n)), xv);
        if (bp) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bp + n));
        _mm512_mask_storeu_ps(yp + m * N + n, mask, v);
      }
    }
  });
  return acc.view(at::kFloat);
}

// y[m, n] = y[m, n] * x_scale[m] (+ bias[n]) in place: the per-token half of the de-quantization
// after oneDNN's int8 linear, which computed float(acc) * w_scale (its activation scale is one
// number, a per-token one cannot go in).
at::Tensor scale_rows_(at::Tensor& y, const at::Tensor& x_scale, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(y.dim() == 2 && y.scalar_type() == at::kFloat && y.is_contiguous(), "y: contiguous (M, N) f32");
  const int64_t M = y.size(0), N = y.size(1);
  TORCH_CHECK(x_scale.numel() == M && x_scale.scalar_type() == at::kFloat && x_scale.is_contiguous());
  const float* bp = bias_ptr(bias, N);
  float* yp = y.data_ptr<float>();
  const float* xs = x_scale.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const __m512 xv = _mm512_set1_ps(xs[m]);
      for (int64_t n = 0; n < N; n += 16) {
        const __mmask16 mask = lanes(N - n);
        __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, yp + m * N + n), xv);
        if (bp) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bp + n));
        _mm512_mask_storeu_ps(yp + m * N + n, mask, v);
      }
    }
  });
  return y;
}

// ---------------------------------------------------------------- W8A8 for a few tokens (decode)
// y[m, n] = float(sum_k u[n, k] * q[m, k] - zero[n] * sum_k q[m, k]) * w_scale[n] * x_scale[m]
//           (+ bias[n])
// with u the weight codes as stored, unsigned (w + zero: 128 for symmetric int8 rows), q the int8
// activation codes. VNNI's vpdpbusd multiplies unsigned by signed bytes, four per int32 lane, so
// the stored codes go in as they are. The int32 sum equals the reference's sum of (u - zero) * q
// exactly, and the float steps are the reference's, in its order (weight scale first): the result
// is bit-identical to it. oneDNN and _int_mm are slow for one to a few rows (oneDNN ~100x for one
// row into <= 256 outputs; _int_mm pads to 17 rows); this reads each weight byte once per call.
template <int MR, int NR>
inline void w8a8_tile(const int8_t* q, int64_t K, const int32_t* qsum, const float* xs,
                      const uint8_t* u, const int32_t* zero, const float* ws, const float* bias,
                      float* y, int64_t ldy) {
  __m512i acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 mask = K - k >= 64 ? ~0ULL : ((1ULL << (K - k)) - 1ULL);
    __m512i qv[MR];
    for (int m = 0; m < MR; ++m) qv[m] = _mm512_maskz_loadu_epi8(mask, q + m * K + k);
    for (int r = 0; r < NR; ++r) {
      if ((k & 255) == 0) prefetch_ahead(u + r * K + k, PREFETCH_TILES * NR * K);
      const __m512i uv = _mm512_maskz_loadu_epi8(mask, u + r * K + k);
      for (int m = 0; m < MR; ++m) acc[m][r] = _mm512_dpbusd_epi32(acc[m][r], uv, qv[m]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) {
      const int32_t total = _mm512_reduce_add_epi32(acc[m][r]) - zero[r] * qsum[m];
      __m128 v = _mm_set_ss(static_cast<float>(total));
      v = _mm_mul_ss(_mm_mul_ss(v, _mm_set_ss(ws[r])), _mm_set_ss(xs[m]));
      if (bias) v = _mm_add_ss(v, _mm_set_ss(bias[r]));
      y[m * ldy + r] = _mm_cvtss_f32(v);
    }
}

at::Tensor w8a8_small_mm(const at::Tensor& q, const at::Tensor& x_scale, const at::Tensor& u,
                         const at::Tensor& zero, const at::Tensor& w_scale,
                         const std::optional<at::Tensor>& bias) {
  check_weight(u);
  TORCH_CHECK(u.scalar_type() == at::kByte, "u: uint8 codes");
  const int64_t N = u.size(0), K = u.size(1);
  TORCH_CHECK(q.dim() == 2 && q.size(1) == K && q.scalar_type() == at::kChar && q.is_contiguous(),
              "q: contiguous (M, K) int8");
  const int64_t M = q.size(0);
  TORCH_CHECK(x_scale.numel() == M && x_scale.scalar_type() == at::kFloat && x_scale.is_contiguous(),
              "x_scale: (M, 1) f32");
  TORCH_CHECK(zero.dim() == 1 && zero.size(0) == N && zero.scalar_type() == at::kInt &&
              zero.is_contiguous(), "zero: (N,) int32");
  check_params(w_scale, N, -1, "w_scale");
  const float* bp = bias_ptr(bias, N);
  const int8_t* qp = q.data_ptr<int8_t>();
  std::vector<int32_t> qsum(static_cast<size_t>(M), 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) qsum[m] += qp[m * K + k];
  at::Tensor y = at::empty({M, N}, x_scale.options());
  const uint8_t* up = u.data_ptr<uint8_t>();
  const int32_t* zp = zero.data_ptr<int32_t>();
  const float* xs = x_scale.data_ptr<float>();
  const float* wsp = w_scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  constexpr int NR = 4;
  run_tiles<NR>(M, N, K, [&](auto mr, auto nr, int64_t n, int64_t m0) {
    w8a8_tile<decltype(mr)::value, decltype(nr)::value>(qp + m0 * K, K, qsum.data() + m0, xs + m0,
                                                        up + n * K, zp + n, wsp + n,
                                                        bp ? bp + n : nullptr, yp + m0 * N + n, N);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(channelwise_cpu, m) {
  m.def("w8a16_mm(Tensor x, Tensor w, Tensor scale, Tensor? bias) -> Tensor");
  m.def("half_mm(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("w4a16_mm(Tensor x, Tensor packed, Tensor scale, Tensor zero, int group, Tensor? bias) -> Tensor");
  m.def("dequantize_w4(Tensor packed, Tensor scale, Tensor zero, int group) -> Tensor");
  m.def("dequantize_w8(Tensor w, Tensor scale) -> Tensor");
  m.def("quantize_per_token(Tensor x) -> (Tensor, Tensor)");
  m.def("quantize_static(Tensor x, float scale) -> (Tensor, Tensor)");
  m.def("scale_rows_(Tensor(a!) y, Tensor x_scale, Tensor? bias) -> Tensor(a!)");
  m.def("w8a8_small_mm(Tensor q, Tensor x_scale, Tensor u, Tensor zero, Tensor w_scale, Tensor? bias) -> Tensor");
  m.def("dequantize_acc_(Tensor(a!) acc, Tensor x_scale, Tensor w_scale, Tensor? bias, Tensor? x_rowsum, Tensor? w_zero) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(channelwise_cpu, CPU, m) {
  m.impl("w8a16_mm", &w8a16_mm);
  m.impl("half_mm", &half_mm);
  m.impl("w4a16_mm", &w4a16_mm);
  m.impl("dequantize_w4", &dequantize_w4);
  m.impl("dequantize_w8", &dequantize_w8);
  m.impl("quantize_per_token", &quantize_per_token);
  m.impl("quantize_static", &quantize_static);
  m.impl("scale_rows_", &scale_rows_);
  m.impl("dequantize_acc_", &dequantize_acc_);
  m.impl("w8a8_small_mm", &w8a8_small_mm);
}
