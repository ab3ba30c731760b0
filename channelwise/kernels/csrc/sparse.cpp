// Sparse decode kernels (AVX-512, fp32 activations and sums): the two products of a gated MLP
// whose activation is mostly zero (CHESS / CATS), on float32, int8 (W8) or 4-bit (W4) weights.
//
//   rows_mm(x (M,K) f32, idx (A,) int64, w, scale?, zero?, group)       -> (M,A) f32
//       y[m,a] = x[m,:] . W[idx[a],:]      only the indexed output rows (up_proj's active rows)
//   cols_mm(h (M,A) f32, idx (A,) int64, wt, scale_t?, zero_t?, group)  -> (M,N) f32
//       y[m,:] = sum_a h[m,a] * W[:,idx[a]]   only the indexed input columns (down_proj's input
//       is zero elsewhere); W's columns are stored as the rows of wt, so each is contiguous.
//   sparse_input_mm(x (...,K), wt, scale_t?, zero_t?, group)             -> (...,N) f32
//       x @ W.T for an input that is zero outside some channels: idx = the channels nonzero in
//       any row of x, then cols(x[:, idx], idx), one call (TEAL's linears, CHESS's q/o inputs).
//   sparsify(x (...,C) f32, threshold (1,)|(C,))                        -> x with |x| < t zeroed
//       one pass (the activation-sparsity hooks); a NaN or inf entry is refused.
//   sparse_mlp(x (...,K), a (...,N), up w/scale?/zero?, down wt/scale_t?/zero_t?, group) -> (...,K')
//       down(a * up(x)) for an activation a that is zero outside some channels: idx = the
//       channels nonzero in any row of a, then cols(a[:, idx] * rows(x, idx)), one call.
//
// The weight's kind follows its dtype, as the dense kernels take it (weight_only.cpp):
//   float32 w (N,K) / wt (K,N);
//   int8 codes (W8): symmetric per output row, scale (N,) (the same vector for wt);
//   uint8 (W4): codes two per byte, asymmetric groups of `group` along K, W = (code - zero) *
//     scale. Rows: packed (N,K/2) as stored, scale/zero (N,K/group). Columns: packed_t
//     (K, N/32, 16): row k holds input k's codes, block b output columns 32b..32b+31, byte j
//     column 32b + j in its low nibble and 32b + j + 16 in its high one (both nibbles widen to
//     16 contiguous outputs); scale_t/zero_t (K/group, N).
// idx must be strictly increasing and in range (checked: O(A)); the W4 column kernel walks it
// group by group.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <atomic>

#include "tiles.h"

namespace {

enum class Kind { Float, W8, W4 };

// A weight as the kernels read it (rows: w (N,K); columns: wt (K,N)).
struct Weight {
  Kind kind;
  const void* data;
  int64_t rows, cols;    // of the logical matrix as stored: (N,K) for rows, (K,N) for columns
  const float* scale;    // W8: (N,) ; W4: (N,G) rows / (G,N) columns
  const float* zero;     // W4 only
  int64_t group;         // W4 only
};

const float* float_ptr(const std::optional<at::Tensor>& t, int64_t rows, int64_t cols, const char* what) {
  TORCH_CHECK(t.has_value() && t->defined(), what, " is required for this weight");
  check_params(*t, rows, cols, what);
  return t->data_ptr<float>();
}

// columns: whether w is stored transposed (the column kernel's layout).
Weight weight_of(const at::Tensor& w, const std::optional<at::Tensor>& scale,
                 const std::optional<at::Tensor>& zero, int64_t group, bool columns) {
  if (columns && w.scalar_type() == at::kByte) {  // W4 columns: (K, N/32, 16) codes
    TORCH_CHECK(w.dim() == 3 && w.size(2) == 16 && w.is_contiguous(),
                "W4 columns: (K, N/32, 16) codes, contiguous (transpose_weight)");
    TORCH_CHECK(group > 0 && w.size(0) % group == 0,
                "W4 columns: (K, N/32, 16) codes, K a multiple of the group (transpose_weight)");
    const int64_t K = w.size(0), N = w.size(1) * 32, G = K / group;
    return Weight{Kind::W4, w.data_ptr(), K, N, float_ptr(scale, G, N, "scale"),
                  float_ptr(zero, G, N, "zero"), group};
  }
  check_weight(w);
  Weight out{Kind::Float, w.data_ptr(), w.size(0), w.size(1), nullptr, nullptr, group};
  const int64_t out_dim = columns ? w.size(1) : w.size(0);  // N, the output channels
  switch (w.scalar_type()) {
    case at::kFloat: break;
    case at::kChar:
      out.kind = Kind::W8;
      out.scale = float_ptr(scale, out_dim, -1, "scale");
      break;
    case at::kByte: {  // W4 rows
      out.kind = Kind::W4;
      out.cols *= 2;
      TORCH_CHECK(group > 0 && group % 32 == 0 && out.cols % group == 0,
                  "group must divide K, % 32 == 0");
      const int64_t G = out.cols / group;
      out.scale = float_ptr(scale, out.rows, G, "scale");
      out.zero = float_ptr(zero, out.rows, G, "zero");
      break;
    }
    default: TORCH_CHECK(false, "weight: float32, int8 (W8) or uint8 (W4 codes)");
  }
  if (columns) TORCH_CHECK(out.cols % 16 == 0, "the output width must be a multiple of 16");
  return out;
}

void check_index(const at::Tensor& idx, int64_t limit) {
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong && idx.is_contiguous(),
              "idx: (A,) int64 contiguous");
  const int64_t* p = idx.data_ptr<int64_t>();
  for (int64_t a = 0; a < idx.size(0); ++a)
    TORCH_CHECK(p[a] >= 0 && p[a] < limit && (a == 0 || p[a] > p[a - 1]),
                "idx must be strictly increasing and within the weight");
}

// x (..., K) f32 contiguous as (M, K).
at::Tensor rows_of(const at::Tensor& x, int64_t K, const char* what) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(-1) == K,
              what, ": (..., ", K, ") f32 contiguous");
  return x.dim() == 2 ? x : x.view({-1, K});
}

// ------------------------------------------------------------------ indexed rows
// A tile is NR gathered rows x MR activation rows. The rows are not adjacent in memory, so the
// dense kernels' prefetch (the next rows as stored) would fetch inactive rows: here each tile
// prefetches, line by line as it goes, the NR active rows the next tile reads.
// These tiles are copies of tiles.h's widen_tile / w4_tile over row pointers. One tile serving
// both was measured (30 SmolLM2 MLP-sized layers, 1 thread): the dense W4 decode went from 1.39
// to 1.47-1.52 ms and W8 at 4 tokens from 2.45 to 2.63-2.68 ms, so the dense ones stay apart.

// y[m * ldy + r] = sum_k x[m, k] * row_r[k]
template <typename Widen, int MR, int NR>
inline void gather_tile(const float* x, int64_t ldx, const typename Widen::T* const* row,
                        const typename Widen::T* const* next, int64_t K, float* y, int64_t ldy) {
  constexpr int64_t LINE = 64 / sizeof(typename Widen::T);  // elements per cache line
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = _mm512_loadu_ps(x + m * ldx + k);
    for (int r = 0; r < NR; ++r) {
      if ((k & (LINE - 1)) == 0) prefetch_ahead(next[r] + k, 0);
      const __m512 wv = Widen::load(row[r] + k);
      for (int m = 0; m < MR; ++m) acc[m][r] = _mm512_fmadd_ps(wv, xv[m], acc[m][r]);
    }
  }
  if (k < K) {
    const __mmask16 mask = lanes(K - k);
    __m512 xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = _mm512_maskz_loadu_ps(mask, x + m * ldx + k);
    for (int r = 0; r < NR; ++r) {
      const __m512 wv = Widen::load(mask, row[r] + k);
      for (int m = 0; m < MR; ++m) acc[m][r] = _mm512_fmadd_ps(wv, xv[m], acc[m][r]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) y[m * ldy + r] = hsum(acc[m][r]);
}

// The W4 tile of weight_only.cpp's w4_tile on gathered rows: xp de-interleaved per 32-block,
// weights read by vpermps from a 16-entry table per row and group.
template <int MR, int NR>
inline void gather_w4_tile(const float* xp, int64_t ldx, const uint8_t* const* row,
                           const uint8_t* const* next, const float* const* scale,
                           const float* const* zero, int64_t K, int64_t group, float* y, int64_t ldy) {
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  const __m512 codes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int64_t G = K / group;
  for (int64_t g = 0; g < G; ++g) {
    __m512 table[NR];
    for (int r = 0; r < NR; ++r) {
      const float sc = scale[r][g];
      table[r] = _mm512_fmadd_ps(codes, _mm512_set1_ps(sc), _mm512_set1_ps(-zero[r][g] * sc));
    }
    for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
      __m512 xe[MR], xo[MR];
      for (int m = 0; m < MR; ++m) {
        xe[m] = _mm512_loadu_ps(xp + m * ldx + k);
        xo[m] = _mm512_loadu_ps(xp + m * ldx + k + 16);
      }
      for (int r = 0; r < NR; ++r) {
        if ((k & 127) == 0) prefetch_ahead(next[r] + k / 2, 0);
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row[r] + k / 2)));
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
    for (int r = 0; r < NR; ++r) y[m * ldy + r] = hsum(acc[m][r]);
}

constexpr int GATHER_NR = 4;
// Tiles prefetch the active rows this many ahead (and, W4, their scales and zeros): one tile
// ahead (4 rows) left the W4 up_proj of SmolLM2 at 50% active slower than the dense kernel
// (39 against 35 us, 120 distinct weights, 1 thread); 16 ahead: 19-21 us (8: 24, 24-32: 20-22).
constexpr int64_t GATHER_AHEAD = 16;

// Runs tile(a0, nr, m0, mr) over tiles of GATHER_NR active rows (the last one partial, nr < NR
// then handled row by row) and up to 4 activation rows, threads splitting the row tiles.
template <typename Tile>
void for_each_gather(int64_t M, int64_t A, int64_t K, Tile tile) {
  const int64_t tiles = (A + GATHER_NR - 1) / GATHER_NR;
  const int64_t per_tile = std::max<int64_t>(1, GATHER_NR * K * std::min<int64_t>(M, 4));
  at::parallel_for(0, tiles, std::max<int64_t>(1, 65536 / per_tile), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t a0 = t * GATHER_NR;
      const int nr = static_cast<int>(std::min<int64_t>(GATHER_NR, A - a0));
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        auto rows = [&](auto mrc) {
          if (nr == GATHER_NR) {
            tile(mrc, std::integral_constant<int, GATHER_NR>{}, a0, m0);
          } else {
            for (int r = 0; r < nr; ++r) tile(mrc, std::integral_constant<int, 1>{}, a0 + r, m0);
          }
        };
        switch (std::min<int64_t>(4, M - m0)) {
          case 1: rows(std::integral_constant<int, 1>{}); break;
          case 2: rows(std::integral_constant<int, 2>{}); break;
          case 3: rows(std::integral_constant<int, 3>{}); break;
          default: rows(std::integral_constant<int, 4>{}); break;
        }
      }
    }
  });
}

template <typename Widen>
void rows_widened(const float* x, int64_t M, const int64_t* idx, int64_t A, const Weight& w, float* y) {
  using T = typename Widen::T;
  const int64_t K = w.cols;
  const T* wp = static_cast<const T*>(w.data);
  for_each_gather(M, A, K, [&](auto mr, auto nr, int64_t a0, int64_t m0) {
    constexpr int NR = decltype(nr)::value;
    const T* row[NR];
    const T* next[NR];
    for (int r = 0; r < NR; ++r) {
      row[r] = wp + idx[a0 + r] * K;
      next[r] = wp + idx[std::min<int64_t>(a0 + r + GATHER_AHEAD, A - 1)] * K;
    }
    float* out = y + m0 * A + a0;
    gather_tile<Widen, decltype(mr)::value, NR>(x + m0 * K, K, row, next, K, out, A);
    if (w.scale)
      for (int m = 0; m < decltype(mr)::value; ++m)
        for (int r = 0; r < NR; ++r) out[m * A + r] *= w.scale[idx[a0 + r]];
  });
}

void rows_w4(const float* x_in, int64_t M, const int64_t* idx, int64_t A, const Weight& w, float* y) {
  const int64_t K = w.cols, G = K / w.group;
  const std::vector<float> xperm = deinterleave32(x_in, M, K);
  const auto* pp = static_cast<const uint8_t*>(w.data);
  for_each_gather(M, A, K, [&](auto mr, auto nr, int64_t a0, int64_t m0) {
    constexpr int NR = decltype(nr)::value;
    const uint8_t* row[NR];
    const uint8_t* next[NR];
    const float* scale[NR];
    const float* zero[NR];
    for (int r = 0; r < NR; ++r) {
      const int64_t n = idx[a0 + r];
      row[r] = pp + n * (K / 2);
      const int64_t ahead = idx[std::min<int64_t>(a0 + r + GATHER_AHEAD, A - 1)];
      next[r] = pp + ahead * (K / 2);
      if (m0 == 0) {
        prefetch_ahead(w.scale + ahead * G, 0);
        prefetch_ahead(w.zero + ahead * G, 0);
      }
      scale[r] = w.scale + n * G;
      zero[r] = w.zero + n * G;
    }
    gather_w4_tile<decltype(mr)::value, NR>(xperm.data() + m0 * K, K, row, next, scale, zero, K,
                                           w.group, y + m0 * A + a0, A);
  });
}

// y (M, A) = x (M, K) . W[idx].T
void rows_into(const float* x, int64_t M, const int64_t* idx, int64_t A, const Weight& w, float* y) {
  switch (w.kind) {
    case Kind::Float: rows_widened<WidenFloat>(x, M, idx, A, w, y); break;
    case Kind::W8: rows_widened<WidenInt8>(x, M, idx, A, w, y); break;
    case Kind::W4: rows_w4(x, M, idx, A, w, y); break;
  }
}

// ------------------------------------------------------------------ indexed input columns
// Output columns are split in chunks of CHUNK (V vectors of 16); a thread owns whole chunks and
// walks every active column for them, so no two threads write the same output.
constexpr int64_t CHUNK = 64;
constexpr int64_t ROWS_AHEAD = 4;  // prefetch the wt row this many active columns ahead

template <typename Body>
void for_each_chunk(int64_t M, int64_t N, int64_t A, Body body) {
  const int64_t chunks = (N + CHUNK - 1) / CHUNK;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, A * CHUNK));
  at::parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n0 = c * CHUNK;
      const int64_t width = std::min<int64_t>(CHUNK, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t mr = std::min<int64_t>(4, M - m0);
        auto run = [&](auto v) {
          switch (mr) {
            case 1: body(n0, m0, std::integral_constant<int, 1>{}, v); break;
            case 2: body(n0, m0, std::integral_constant<int, 2>{}, v); break;
            case 3: body(n0, m0, std::integral_constant<int, 3>{}, v); break;
            default: body(n0, m0, std::integral_constant<int, 4>{}, v); break;
          }
        };
        switch (width / 16) {
          case 1: run(std::integral_constant<int, 1>{}); break;
          case 2: run(std::integral_constant<int, 2>{}); break;
          case 3: run(std::integral_constant<int, 3>{}); break;
          default: run(std::integral_constant<int, 4>{}); break;
        }
      }
    }
  });
}

// y[m, n0 : n0 + 16V] = scale * sum_a h[m, a] * wt[idx[a], n0 : n0 + 16V]
template <typename Widen, int MR, int V>
inline void cols_chunk(const float* h, int64_t A, const int64_t* idx, const typename Widen::T* wt,
                       int64_t N, int64_t n0, const float* scale, float* y) {
  __m512 acc[MR][V];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < V; ++v) acc[m][v] = _mm512_setzero_ps();
  for (int64_t a = 0; a < A; ++a) {
    const typename Widen::T* row = wt + idx[a] * N + n0;
    if (a + ROWS_AHEAD < A)
      for (int line = 0; line < V * 16 * static_cast<int>(sizeof(typename Widen::T)); line += 64)
        prefetch_ahead(wt + idx[a + ROWS_AHEAD] * N + n0, line);
    __m512 wv[V];
    for (int v = 0; v < V; ++v) wv[v] = Widen::load(row + 16 * v);
    for (int m = 0; m < MR; ++m) {
      const __m512 hv = _mm512_set1_ps(h[m * A + a]);
      for (int v = 0; v < V; ++v) acc[m][v] = _mm512_fmadd_ps(wv[v], hv, acc[m][v]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < V; ++v) {
      __m512 out = acc[m][v];
      if (scale) out = _mm512_mul_ps(out, _mm512_loadu_ps(scale + n0 + 16 * v));
      _mm512_storeu_ps(y + m * N + n0 + 16 * v, out);
    }
}

// W4 columns. The codes are stored (K, N/32, 16): row k holds input channel k's codes for every
// output column, contiguous, so an inactive row is skipped whole. Output columns are cut into
// chunks of up to 8 blocks of 32 (16 accumulators per activation row at M = 1). The active rows
// of one K-group share their scales and zeros, so within a group the codes are summed in code
// units, c[m,n] = sum_a h[m,a] q[a,n], and folded into y once per group:
// y[m,n] += s[g,n] (c[m,n] - z[g,n] H[m]), H[m] = sum_a h[m,a] over the group.
// The loop is group by group, each group over a thread's chunks in turn (its active rows stay in
// L1 between chunks); each chunk prefetches its own piece of the row W4_ROWS_AHEAD active rows
// ahead, so the reads from memory spread over the whole walk. Measured on SmolLM2's down_proj,
// 50% active, 120 distinct weights, 1 thread, against the dense W4 kernel in the same run:
// block-major (N/32, K, 16) codes in 64-column chunks 0.80x; these rows, each group's rows
// prefetched whole in its first chunk (16 ahead) 0.80x; each chunk its piece, 16 ahead 0.80x,
// 32 ahead 1.05x (48-96: 0.89-0.95x); the scales and zeros of the next group prefetched too.
// Also tried, no faster: whole rows prefetched to L2 64-128 rows ahead besides (0.90-0.99x);
// M = 1 in one pass per row, the sums in an L1 buffer (0.80x); reading no scales at all (1.11x
// against 1.04x: the scales are not what holds it back).
constexpr int64_t W4_ROWS_AHEAD = 32;

// One group's rows a0..a1 into chunk n0 .. n0 + 32 NB of y.
template <int MR, int NB>  // NB blocks of 32 columns
inline void cols_w4_group(const float* h, int64_t A, const int64_t* idx, int64_t a0, int64_t a1,
                          const uint8_t* codes, int64_t N, int64_t n0, const float* s,
                          const float* z, float* y) {
  constexpr int V = 2 * NB;
  const int64_t row_bytes = N / 2;
  const __m512i nibble = _mm512_set1_epi32(0xF);
  const uint8_t* base = codes + n0 / 2;
  __m512 acc[MR][V];
  float H[MR];
  for (int m = 0; m < MR; ++m) {
    H[m] = 0.0f;
    for (int v = 0; v < V; ++v) acc[m][v] = _mm512_setzero_ps();
  }
  for (int64_t a = a0; a < a1; ++a) {
    if (a + W4_ROWS_AHEAD < A) {
      const uint8_t* ahead = base + idx[a + W4_ROWS_AHEAD] * row_bytes;
      for (int off = 0; off < 16 * NB; off += 64) prefetch_ahead(ahead, off);
      prefetch_ahead(ahead, 16 * NB - 1);
    }
    const uint8_t* row = base + idx[a] * row_bytes;
    __m512 hv[MR];
    for (int m = 0; m < MR; ++m) {
      const float hm = h[m * A + a];
      H[m] += hm;
      hv[m] = _mm512_set1_ps(hm);
    }
    for (int b = 0; b < NB; ++b) {
      const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * b)));
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(c, nibble));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(c, 4));
      for (int m = 0; m < MR; ++m) {
        acc[m][2 * b] = _mm512_fmadd_ps(lo, hv[m], acc[m][2 * b]);
        acc[m][2 * b + 1] = _mm512_fmadd_ps(hi, hv[m], acc[m][2 * b + 1]);
      }
    }
  }
  for (int v = 0; v < V; ++v) {
    const __m512 sv = _mm512_loadu_ps(s + n0 + 16 * v);
    const __m512 zv = _mm512_loadu_ps(z + n0 + 16 * v);
    for (int m = 0; m < MR; ++m) {
      float* out = y + m * N + n0 + 16 * v;
      const __m512 t = _mm512_fnmadd_ps(zv, _mm512_set1_ps(H[m]), acc[m][v]);
      _mm512_storeu_ps(out, _mm512_fmadd_ps(sv, t, _mm512_loadu_ps(out)));
    }
  }
}

// The most 32-column blocks a chunk holds for MR activation rows: MR * 2 * NB accumulators <= 16.
constexpr int w4_chunk_blocks(int MR) { return MR == 1 ? 8 : MR == 2 ? 4 : 2; }

// cols_w4_group<MR, nb> with nb (1 .. w4_chunk_blocks(MR)) as a compile-time constant.
template <int MR, int NB = w4_chunk_blocks(MR), typename... Args>
inline void cols_w4_dispatch(int nb, Args... args) {
  if constexpr (NB > 1) {
    if (nb < NB) return cols_w4_dispatch<MR, NB - 1>(nb, args...);
  }
  cols_w4_group<MR, NB>(args...);
}

void cols_w4(const float* h, int64_t M, const int64_t* idx, int64_t A, const Weight& w, float* y) {
  std::vector<int64_t> starts;  // the first active row of each group that has one, then A
  for (int64_t a = 0; a < A; ++a)
    if (a == 0 || idx[a] / w.group != idx[a - 1] / w.group) starts.push_back(a);
  starts.push_back(A);
  const int64_t groups = static_cast<int64_t>(starts.size()) - 1, N = w.cols, blocks = N / 32;
  const auto* codes = static_cast<const uint8_t*>(w.data);
  // Chunks as even as the blocks allow, their count a multiple of the threads where there are
  // blocks enough, so no thread idles while another finishes a wide chunk.
  const int most = w4_chunk_blocks(static_cast<int>(std::min<int64_t>(M, 4)));
  int64_t chunks = (blocks + most - 1) / most;
  const int64_t threads = at::get_num_threads();
  if (chunks % threads && blocks >= threads)
    chunks = std::min(blocks, (chunks + threads - 1) / threads * threads);
  auto first_block = [&](int64_t c) { return c * blocks / chunks; };
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, A * 32 * most));
  std::fill(y, y + M * N, 0.0f);
  at::parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
    const int64_t n_first = 32 * first_block(c0), n_end = 32 * first_block(c1);  // this thread's
    for (int64_t gi = 0; gi < groups; ++gi) {
      const int64_t a0 = starts[gi], a1 = starts[gi + 1], g = idx[a0] / w.group;
      const float* s = w.scale + g * N;
      const float* z = w.zero + g * N;
      if (gi + 1 < groups) {  // the next group's scales and zeros
        const int64_t ga = idx[starts[gi + 1]] / w.group;
        for (int64_t off = n_first; off < n_end; off += 16) {
          prefetch_ahead(w.scale + ga * N + off, 0);
          prefetch_ahead(w.zero + ga * N + off, 0);
        }
      }
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t b0 = first_block(c), n0 = 32 * b0;
        const int nb = static_cast<int>(first_block(c + 1) - b0);
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
          const float* hm = h + m0 * A;
          float* ym = y + m0 * N;
          switch (std::min<int64_t>(4, M - m0)) {
            case 1: cols_w4_dispatch<1>(nb, hm, A, idx, a0, a1, codes, N, n0, s, z, ym); break;
            case 2: cols_w4_dispatch<2>(nb, hm, A, idx, a0, a1, codes, N, n0, s, z, ym); break;
            case 3: cols_w4_dispatch<3>(nb, hm, A, idx, a0, a1, codes, N, n0, s, z, ym); break;
            default: cols_w4_dispatch<4>(nb, hm, A, idx, a0, a1, codes, N, n0, s, z, ym); break;
          }
        }
      }
    }
  });
}

// y (M, N) = h (M, A) . W[:, idx].T
void cols_into(const float* h, int64_t M, const int64_t* idx, int64_t A, const Weight& w, float* y) {
  if (w.kind == Kind::W4) return cols_w4(h, M, idx, A, w, y);
  const int64_t N = w.cols;
  for_each_chunk(M, N, A, [&](int64_t n0, int64_t m0, auto mr, auto v) {
    constexpr int MR = decltype(mr)::value, V = decltype(v)::value;
    const float* hm = h + m0 * A;
    float* ym = y + m0 * N;
    switch (w.kind) {
      case Kind::Float:
        cols_chunk<WidenFloat, MR, V>(hm, A, idx, static_cast<const float*>(w.data), N, n0, nullptr, ym);
        break;
      case Kind::W8:
        cols_chunk<WidenInt8, MR, V>(hm, A, idx, static_cast<const int8_t*>(w.data), N, n0, w.scale, ym);
        break;
      case Kind::W4: break;  // cols_w4, above
    }
  });
}

// ------------------------------------------------------------------ ops
// The channels (columns of v (M, C)) nonzero in at least one row, increasing. A NaN or inf
// entry is refused: these kernels read thresholded activations, and inside a compiled graph
// the thresholding is plain torch ops fused into the kernel before it, so this scan is where
// a compiled step finds them (as `sparsify` does eagerly). Branch-free, 16 channels at a
// time: the scalar scan's branch on each channel, taken half the time at random at 50%
// sparsity, cost ~6 us per SmolLM2 MLP call (48.6 against 45.5 us for the same products as
// two calls).
std::vector<int64_t> active_channels(const float* v, int64_t M, int64_t C) {
  std::vector<int64_t> idx(static_cast<size_t>(C + 16));  // + 16: whole-vector stores
  const __m512i iota = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t A = 0;
  __mmask16 non_finite = 0;
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 in = lanes(C - c);
    __mmask16 nonzero = 0;
    for (int64_t m = 0; m < M; ++m) {
      const __m512 x = _mm512_maskz_loadu_ps(in, v + m * C + c);
      nonzero |= _mm512_mask_cmp_ps_mask(in, x, _mm512_setzero_ps(), _CMP_NEQ_UQ);
      non_finite |= _mm512_mask_fpclass_ps_mask(in, x, 0x99);  // QNaN, +inf, -inf, SNaN
    }
    for (int half = 0; half < 2; ++half) {
      const __mmask8 bits = static_cast<__mmask8>(nonzero >> (8 * half));
      const __m512i channels = _mm512_add_epi64(_mm512_set1_epi64(c + 8 * half), iota);
      _mm512_storeu_si512(idx.data() + A, _mm512_maskz_compress_epi64(bits, channels));
      A += __builtin_popcount(bits);
    }
  }
  TORCH_CHECK(non_finite == 0, "NaN or inf activations");
  idx.resize(static_cast<size_t>(A));
  return idx;
}

at::Tensor rows_mm(const at::Tensor& x_in, const at::Tensor& idx, const at::Tensor& w_in,
                   const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& zero,
                   int64_t group) {
  const Weight w = weight_of(w_in, scale, zero, group, false);
  const at::Tensor x = rows_of(x_in, w.cols, "x");
  check_index(idx, w.rows);
  const int64_t M = x.size(0), A = idx.size(0);
  at::Tensor y = at::empty({M, A}, x.options());
  rows_into(x.data_ptr<float>(), M, idx.data_ptr<int64_t>(), A, w, y.data_ptr<float>());
  return y;
}

at::Tensor cols_mm(const at::Tensor& h_in, const at::Tensor& idx, const at::Tensor& wt,
                   const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& zero,
                   int64_t group) {
  const Weight w = weight_of(wt, scale, zero, group, true);
  check_index(idx, w.rows);
  const at::Tensor h = rows_of(h_in, idx.size(0), "h");
  const int64_t M = h.size(0);
  at::Tensor y = at::empty({M, w.cols}, h.options());
  cols_into(h.data_ptr<float>(), M, idx.data_ptr<int64_t>(), idx.size(0), w, y.data_ptr<float>());
  return y;
}

at::Tensor sparse_mlp(const at::Tensor& x_in, const at::Tensor& a_in, const at::Tensor& up_w,
                      const std::optional<at::Tensor>& up_scale, const std::optional<at::Tensor>& up_zero,
                      const at::Tensor& down_wt, const std::optional<at::Tensor>& down_scale,
                      const std::optional<at::Tensor>& down_zero, int64_t group) {
  const Weight up = weight_of(up_w, up_scale, up_zero, group, false);
  const Weight down = weight_of(down_wt, down_scale, down_zero, group, true);
  TORCH_CHECK(down.rows == up.rows, "up has ", up.rows, " outputs, down ", down.rows, " inputs");
  const at::Tensor x = rows_of(x_in, up.cols, "x");
  const at::Tensor a = rows_of(a_in, up.rows, "a");
  const int64_t M = x.size(0), N = up.rows;
  TORCH_CHECK(a.size(0) == M, "x and a disagree on the number of tokens");
  const float* ap = a.data_ptr<float>();
  const std::vector<int64_t> idx = active_channels(ap, M, N);
  const int64_t A = static_cast<int64_t>(idx.size());
  std::vector<float> h(static_cast<size_t>(M * A));
  rows_into(x.data_ptr<float>(), M, idx.data(), A, up, h.data());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < A; ++i) h[m * A + i] *= ap[m * N + idx[i]];
  at::Tensor y = at::empty({M, down.cols}, x.options());
  cols_into(h.data(), M, idx.data(), A, down, y.data_ptr<float>());
  return like_rows(y, x_in);
}

at::Tensor sparse_input_mm(const at::Tensor& x_in, const at::Tensor& wt,
                           const std::optional<at::Tensor>& scale,
                           const std::optional<at::Tensor>& zero, int64_t group) {
  const Weight w = weight_of(wt, scale, zero, group, true);
  const at::Tensor x = rows_of(x_in, w.rows, "x");
  const int64_t M = x.size(0), K = w.rows;
  const float* xp = x.data_ptr<float>();
  const std::vector<int64_t> idx = active_channels(xp, M, K);
  const int64_t A = static_cast<int64_t>(idx.size());
  std::vector<float> h(static_cast<size_t>(M * A));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < A; ++i) h[m * A + i] = xp[m * K + idx[i]];
  at::Tensor y = at::empty({M, w.cols}, x.options());
  cols_into(h.data(), M, idx.data(), A, w, y.data_ptr<float>());
  return like_rows(y, x_in);
}

// x with every entry of magnitude below its threshold zeroed, in one pass; t is one threshold
// (numel 1) or one per channel of x's last dimension. A NaN or inf entry is refused.
at::Tensor sparsify(const at::Tensor& x, const at::Tensor& t) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1,
              "x: (..., C) f32 contiguous");
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), "threshold: f32 contiguous");
  const int64_t C = x.size(-1), rows = C ? x.numel() / C : 0;
  const bool per_channel = t.numel() != 1;
  TORCH_CHECK(!per_channel || (t.dim() == 1 && t.size(0) == C), "threshold: one value or (C,)");
  at::Tensor out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* tp = t.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  std::atomic<bool> finite{true};
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C)), [&](int64_t r0, int64_t r1) {
    bool ok = true;
    for (int64_t r = r0; r < r1; ++r) {
      const float* in = xp + r * C;
      float* o = op + r * C;
      for (int64_t c = 0; c < C; c += 16) {
        const __mmask16 m = lanes(C - c);
        const __m512 v = _mm512_maskz_loadu_ps(m, in + c);
        const __m512 th = per_channel ? _mm512_maskz_loadu_ps(m, tp + c) : _mm512_set1_ps(tp[0]);
        ok &= _mm512_mask_fpclass_ps_mask(m, v, 0x99) == 0;  // QNaN, +inf, -inf, SNaN
        const __mmask16 small = _mm512_cmp_ps_mask(_mm512_and_ps(v, sign), th, _CMP_LT_OQ);
        _mm512_mask_storeu_ps(o + c, m, _mm512_maskz_mov_ps(static_cast<__mmask16>(~small), v));
      }
    }
    if (!ok) finite = false;
  });
  TORCH_CHECK(finite.load(), "NaN or inf activations");
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(channelwise_cpu, m) {
  m.def("rows_mm(Tensor x, Tensor idx, Tensor w, Tensor? scale, Tensor? zero, int group) -> Tensor");
  m.def("cols_mm(Tensor h, Tensor idx, Tensor wt, Tensor? scale, Tensor? zero, int group) -> Tensor");
  m.def("sparsify(Tensor x, Tensor threshold) -> Tensor");
  m.def("sparse_input_mm(Tensor x, Tensor wt, Tensor? scale, Tensor? zero, int group) -> Tensor");
  m.def("sparse_mlp(Tensor x, Tensor a, Tensor up, Tensor? up_scale, Tensor? up_zero, Tensor down_t, "
        "Tensor? down_scale, Tensor? down_zero, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(channelwise_cpu, CPU, m) {
  m.impl("rows_mm", &rows_mm);
  m.impl("cols_mm", &cols_mm);
  m.impl("sparse_mlp", &sparse_mlp);
  m.impl("sparse_input_mm", &sparse_input_mm);
  m.impl("sparsify", &sparsify);
}
