// Block-sparse float32 product (AVX-512): a linear whose weight is zero outside some blocks
// (LPViT's block pruning), computed over the kept blocks only.
//
//   block_sparse_mm(x (...,K) f32, blocks (B,bw,16) f32, starts (S+1,) int64,
//                   columns (B,) int64, bias? (N,) f32, N)                    -> (...,N) f32
//
// The weight W (N,K) is cut into strips of 16 output rows (S = ceil(N/16); the last strip's
// missing rows are zero) and each strip into segments of bw input columns. A strip keeps the
// segments where any of its 16 rows is nonzero: blocks[starts[s] .. starts[s+1]) are strip s's
// kept segments, transposed (blocks[b][k][j] = W[16s + j, bw * columns[b] + k]), so one input
// column of a segment is one 16-lane vector of weights. y[m, 16s + j] = bias + sum over the kept
// segments of x[m, segment] . W[16s + j, segment]: the work is proportional to the kept blocks.
//
// A tile is MR input rows × one strip: MR accumulators of 16 outputs; per input column, one
// weight vector and MR broadcast multiply-adds. Threads split the rows in chunks; within a chunk
// the strips run outermost, so a strip's blocks stay in L1 while the chunk's rows stream from L2.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "tiles.h"

namespace {

constexpr int kMR = 12;        // rows per tile: 12 accumulators + weights + broadcasts in 32 zmm
constexpr int64_t kChunk = 96;  // rows per thread chunk: 96 rows of K <= 1536 floats fit L2

// y[r, 0..15] (masked to `store`) for rows r < MR of x, over one strip's nb kept segments.
template <int MR, int BW>
inline void strip_tile(const float* x, int64_t ldx, const float* blocks, const int64_t* columns,
                       int64_t nb, int64_t bw, __m512 init, float* y, int64_t ldy,
                       __mmask16 store) {
  __m512 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = init;
  const int64_t width = BW ? BW : bw;
  for (int64_t b = 0; b < nb; ++b) {
    const float* w = blocks + b * width * 16;
    const float* xs = x + columns[b] * width;
    for (int64_t k = 0; k < width; ++k) {
      const __m512 wk = _mm512_loadu_ps(w + k * 16);
      for (int r = 0; r < MR; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(xs[r * ldx + k]), wk, acc[r]);
    }
  }
  for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(y + r * ldy, store, acc[r]);
}

template <int BW>
void strip_rows(const float* x, int64_t ldx, int64_t rows, const float* blocks,
                const int64_t* columns, int64_t nb, int64_t bw, __m512 init, float* y,
                int64_t ldy, __mmask16 store) {
  int64_t m = 0;
  for (; m + kMR <= rows; m += kMR)
    strip_tile<kMR, BW>(x + m * ldx, ldx, blocks, columns, nb, bw, init, y + m * ldy, ldy, store);
  const int64_t left = rows - m;
  x += m * ldx;
  y += m * ldy;
  switch (left) {
#define TAIL(R) case R: strip_tile<R, BW>(x, ldx, blocks, columns, nb, bw, init, y, ldy, store); break;
    TAIL(1) TAIL(2) TAIL(3) TAIL(4) TAIL(5) TAIL(6) TAIL(7) TAIL(8) TAIL(9) TAIL(10) TAIL(11)
#undef TAIL
    default: break;
  }
  static_assert(kMR == 12, "the tail switch covers kMR - 1 rows");
}

at::Tensor block_sparse_mm(const at::Tensor& x_in, const at::Tensor& blocks, const at::Tensor& starts,
                           const at::Tensor& columns, const std::optional<at::Tensor>& bias,
                           int64_t N) {
  TORCH_CHECK(blocks.dim() == 3 && blocks.size(2) == 16 && blocks.scalar_type() == at::kFloat &&
              blocks.is_contiguous(), "blocks: (B, bw, 16) f32 contiguous");
  const int64_t bw = blocks.size(1), count = blocks.size(0);
  TORCH_CHECK(bw > 0, "blocks: segment width must be positive");
  TORCH_CHECK(N > 0, "N must be positive");
  const int64_t strips = (N + 15) / 16;
  TORCH_CHECK(starts.dim() == 1 && starts.size(0) == strips + 1 && starts.scalar_type() == at::kLong &&
              starts.is_contiguous(), "starts: (ceil(N/16) + 1,) int64 contiguous");
  TORCH_CHECK(columns.dim() == 1 && columns.size(0) == count && columns.scalar_type() == at::kLong &&
              columns.is_contiguous(), "columns: (B,) int64 contiguous");
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) % bw == 0, "x: K must be a multiple of the segment width");
  const int64_t K = x_in.size(-1);
  const at::Tensor x = as_rows(x_in.contiguous(), K);
  const int64_t M = x.size(0), segments = K / bw;
  const int64_t* start = starts.data_ptr<int64_t>();
  const int64_t* column = columns.data_ptr<int64_t>();
  TORCH_CHECK(start[0] == 0 && start[strips] == count, "starts must run from 0 to B");
  for (int64_t s = 0; s < strips; ++s) TORCH_CHECK(start[s] <= start[s + 1], "starts must not decrease");
  for (int64_t b = 0; b < count; ++b)
    TORCH_CHECK(column[b] >= 0 && column[b] < segments, "columns: segment index out of range");
  const float* bias_p = bias_ptr(bias, N);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* bp = blocks.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t chunks = (M + kChunk - 1) / kChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t m0 = c * kChunk, rows = std::min<int64_t>(kChunk, M - m0);
      for (int64_t s = 0; s < strips; ++s) {
        const int64_t n0 = s * 16;
        const __mmask16 store = lanes(N - n0);
        const __m512 init = bias_p ? _mm512_maskz_loadu_ps(store, bias_p + n0) : _mm512_setzero_ps();
        const int64_t b0 = start[s], nb = start[s + 1] - b0;
        const float* sb = bp + b0 * bw * 16;
        const float* xs = xp + m0 * K;
        float* ys = yp + m0 * N + n0;
        if (bw == 16) strip_rows<16>(xs, K, rows, sb, column + b0, nb, bw, init, ys, N, store);
        else if (bw == 32) strip_rows<32>(xs, K, rows, sb, column + b0, nb, bw, init, ys, N, store);
        else strip_rows<0>(xs, K, rows, sb, column + b0, nb, bw, init, ys, N, store);
      }
    }
  });
  return like_rows(y, x_in);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(channelwise_cpu, m) {
  m.def("block_sparse_mm(Tensor x, Tensor blocks, Tensor starts, Tensor columns, Tensor? bias, "
        "int N) -> Tensor");
}

TORCH_LIBRARY_IMPL(channelwise_cpu, CPU, m) { m.impl("block_sparse_mm", &block_sparse_mm); }
