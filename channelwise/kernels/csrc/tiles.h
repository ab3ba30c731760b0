// Helpers shared by the CPU kernels (weight_only.cpp, sparse.cpp): AVX-512 tiles that widen
// stored weights in registers, the tile loop over output rows, and the argument checks.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// The first min(left, 16) of 16 lanes: the mask of a row's last, partial chunk.
inline __mmask16 lanes(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}

// Software prefetch of the weight bytes PREFETCH_TILES output tiles ahead, one cache line per
// call site visit. Rows are short (288-768 bytes for SmolLM2), too short for the hardware
// streamer to ramp up: with it the W4 decode pass over a whole model's linears went from 14.8 to
// 9.3 ms on 1 thread (1, 2, 4, 8 tiles ahead: 10.3, 9.3, 9.6, 10.0 ms), W8 likewise.
constexpr int64_t PREFETCH_TILES = 2;
inline void prefetch_ahead(const void* at, int64_t distance) {
  _mm_prefetch(static_cast<const char*>(at) + distance, _MM_HINT_T0);
}

// ---------------------------------------------------------------- W8A16, 16-bit float weights
// One tile serves every weight stored one element per byte or two: Widen turns 16 stored
// elements into 16 floats (int8 codes, fp16 or bf16 values), exactly.
struct WidenInt8 {
  using T = int8_t;
  static __m512 load(const T* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static __m512 load(__mmask16 mask, const T* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
  }
};
struct WidenFloat {  // float32 weights, as stored
  using T = float;
  static __m512 load(const T* p) { return _mm512_loadu_ps(p); }
  static __m512 load(__mmask16 mask, const T* p) { return _mm512_maskz_loadu_ps(mask, p); }
};
struct WidenHalf {
  using T = at::Half;
  static __m512 load(const T* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static __m512 load(__mmask16 mask, const T* p) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));
  }
};
struct WidenBFloat16 {  // bf16 is the top half of an fp32: shift it into place
  using T = at::BFloat16;
  static __m512 widen(__m256i v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
  }
  static __m512 load(const T* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static __m512 load(__mmask16 mask, const T* p) { return widen(_mm256_maskz_loadu_epi16(mask, p)); }
};

// y[m, r] = (sum_k x[m, k] * w[r, k]) * scale[r] + bias[r]; scale == nullptr: no scaling.
template <typename Widen, int MR, int NR>
inline void widen_tile(const float* x, int64_t ldx, const typename Widen::T* w, int64_t K,
                       const float* scale, const float* bias, float* y, int64_t ldy) {
  constexpr int64_t PREFETCH_EVERY = 64 / sizeof(typename Widen::T);  // elements per cache line
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = _mm512_loadu_ps(x + m * ldx + k);
    for (int r = 0; r < NR; ++r) {
      if ((k & (PREFETCH_EVERY - 1)) == 0) prefetch_ahead(w + r * K + k, PREFETCH_TILES * NR * K * sizeof(typename Widen::T));
      const __m512 wv = Widen::load(w + r * K + k);
      for (int m = 0; m < MR; ++m) acc[m][r] = _mm512_fmadd_ps(wv, xv[m], acc[m][r]);
    }
  }
  if (k < K) {  // masked tail: K % 16 != 0
    const __mmask16 mask = lanes(K - k);
    __m512 xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = _mm512_maskz_loadu_ps(mask, x + m * ldx + k);
    for (int r = 0; r < NR; ++r) {
      const __m512 wv = Widen::load(mask, w + r * K + k);
      for (int m = 0; m < MR; ++m) acc[m][r] = _mm512_fmadd_ps(wv, xv[m], acc[m][r]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) {
      const float sum = hsum(acc[m][r]);
      y[m * ldy + r] = (scale ? sum * scale[r] : sum) + (bias ? bias[r] : 0.0f);
    }
}

// ---------------------------------------------------------------- W4A16
// x (M, K) with every 32-block de-interleaved for w4_tile (below); once per call, M*K floats,
// negligible next to the N*K weights.
inline std::vector<float> deinterleave32(const float* x, int64_t M, int64_t K) {
  std::vector<float> xperm(static_cast<size_t>(M * K));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; k += 32)
      for (int j = 0; j < 16; ++j) {
        xperm[m * K + k + j] = x[m * K + k + 2 * j];
        xperm[m * K + k + 16 + j] = x[m * K + k + 2 * j + 1];
      }
  return xperm;
}

// xp is x with every 32-block de-interleaved: [x[k], x[k+2], ..., x[k+30], x[k+1], ..., x[k+31]],
// so the low nibbles (even k) and high nibbles (odd k) of 16 bytes meet contiguous activations.
template <int MR, int NR, int STEPS>  // STEPS: group / 32 if known at compile time, else 0
inline void w4_tile(const float* xp, int64_t ldx, const uint8_t* p, int64_t K, const float* scale,
                    const float* zero, int64_t G, int64_t group, const float* bias, float* y,
                    int64_t ldy) {
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  const int64_t Kb = K / 2;
  const __m512 codes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t g = 0; g < G; ++g) {
    // The group's 16 weights (code - zero) * scale, as code * scale + (-zero * scale): one fma,
    // one rounding. vpermps then reads a weight by its code from the low 4 bits of each index
    // lane, ignoring the rest: a byte's low nibble as it is, its high one after a shift.
    __m512 table[NR];
    for (int r = 0; r < NR; ++r) {
      const float sc = scale[r * G + g];
      table[r] = _mm512_fmadd_ps(codes, _mm512_set1_ps(sc), _mm512_set1_ps(-zero[r * G + g] * sc));
    }
    const int64_t steps = STEPS ? STEPS : group / 32;
    for (int64_t j = 0; j < steps; ++j) {
      const int64_t k = g * group + 32 * j;
      __m512 xe[MR], xo[MR];
      for (int m = 0; m < MR; ++m) {
        xe[m] = _mm512_loadu_ps(xp + m * ldx + k);
        xo[m] = _mm512_loadu_ps(xp + m * ldx + k + 16);
      }
      for (int r = 0; r < NR; ++r) {
        if ((k & 127) == 0) prefetch_ahead(p + r * Kb + k / 2, PREFETCH_TILES * NR * Kb);
        __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + r * Kb + k / 2));
        __m512i v = _mm512_cvtepu8_epi32(b);
        const __m512 lo = _mm512_permutexvar_ps(v, table[r]);
        const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table[r]);
        for (int m = 0; m < MR; ++m) {
          acc[m][r] = _mm512_fmadd_ps(lo, xe[m], acc[m][r]);
          acc[m][r] = _mm512_fmadd_ps(hi, xo[m], acc[m][r]);
        }
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) y[m * ldy + r] = hsum(acc[m][r]) + (bias ? bias[r] : 0.0f);
}

// Runs fn(n0, nr, m0, mr) over NR-row tiles of the output, threads splitting the tiles.
template <int NR, typename Fn>
void for_each_tile(int64_t M, int64_t N, int64_t K, Fn fn) {
  const int64_t tiles = (N + NR - 1) / NR;
  // Below ~64k multiply-adds per chunk the OpenMP fork costs more than it saves.
  const int64_t per_tile = std::max<int64_t>(1, NR * K * std::min<int64_t>(M, 4));
  const int64_t grain = std::max<int64_t>(1, 65536 / per_tile);
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * NR;
      const int nr = static_cast<int>(std::min<int64_t>(NR, N - n0));
      for (int64_t m0 = 0; m0 < M; m0 += 4) fn(n0, nr, m0, static_cast<int>(std::min<int64_t>(4, M - m0)));
    }
  });
}

// Runs tile(MR, R, n, m0) over the output: MR (1-4 activation rows) and R (NR output rows, or 1
// for the last partial tile, row by row) as compile-time constants (std::integral_constant),
// so every kernel instantiates its tile templates from one place.
template <int NR, typename Tile>
void run_tiles(int64_t M, int64_t N, int64_t K, Tile tile) {
  for_each_tile<NR>(M, N, K, [&](int64_t n0, int nr, int64_t m0, int mr) {
    auto rows = [&](auto mrc) {
      if (nr == NR) {
        tile(mrc, std::integral_constant<int, NR>{}, n0, m0);
      } else {
        for (int r = 0; r < nr; ++r) tile(mrc, std::integral_constant<int, 1>{}, n0 + r, m0);
      }
    };
    switch (mr) {
      case 1: rows(std::integral_constant<int, 1>{}); break;
      case 2: rows(std::integral_constant<int, 2>{}); break;
      case 3: rows(std::integral_constant<int, 3>{}); break;
      default: rows(std::integral_constant<int, 4>{}); break;
    }
  });
}

// x may have any leading dims (..., K), contiguous; kernels see it as (M, K).
at::Tensor as_rows(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: (..., K) f32");
  TORCH_CHECK(x.size(-1) == K, "x and weight disagree on K");
  return x.dim() == 2 ? x : x.view({-1, K});
}

// (M, N) result shaped as x's leading dims + (N,).
at::Tensor like_rows(const at::Tensor& y, const at::Tensor& x) {
  if (x.dim() == 2) return y;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = y.size(1);
  return y.view(shape);
}

void check_weight(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "weight must be a contiguous matrix");
}

const float* bias_ptr(const std::optional<at::Tensor>& bias, int64_t N) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == at::kFloat &&
              bias->is_contiguous(), "bias: (N,) f32 contiguous");
  return bias->data_ptr<float>();
}

void check_params(const at::Tensor& t, int64_t rows, int64_t cols, const char* what) {
  const bool shape = cols < 0 ? (t.dim() == 1 && t.size(0) == rows)
                              : (t.dim() == 2 && t.size(0) == rows && t.size(1) == cols);
  TORCH_CHECK(shape && t.scalar_type() == at::kFloat && t.is_contiguous(), what,
              ": wrong shape, dtype or layout");
}

}  // namespace
