// y[M, N] float32 = x[M, K] bfloat16 @ W bfloat16, for small M (decode steps) on x86 CPUs with AVX512-BF16.
//
// W comes packed (api.pack): [N/64 blocks][K/2 pairs][64 columns][2], so a block's weights are one contiguous
// run streamed once per step, and each load holds the two consecutive-k values that vdpbf16ps multiplies by a
// pair of x values. Products of two bfloat16 are exact in float32; sums are float32 (as XLA with
// preferred_element_type=float32), in a different order. The column blocks are shared between the calling
// thread and XLA's intra-op pool: whoever is free claims the next chunk, so the call never waits on a task the
// pool has not started (the caller takes it over).
#include <immintrin.h>

#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kBlock = 64;  // columns per packed block: 4 zmm of float32 accumulators per row
constexpr int kRows = 4;    // rows per register tile: 16 accumulators + 4 weight registers

// Columns [b0 * 64, b1 * 64) of y for every row.
void Blocks(const uint16_t* x, const uint16_t* w, float* y, int64_t m, int64_t k_pairs, int64_t n,
            int64_t b0, int64_t b1) {
  const int64_t k = 2 * k_pairs;
  for (int64_t b = b0; b < b1; ++b) {
    const uint16_t* wb = w + b * k_pairs * 2 * kBlock;
    for (int64_t m0 = 0; m0 < m; m0 += kRows) {
      const int64_t rows = m - m0 < kRows ? m - m0 : kRows;
      __m512 acc[kRows][4];
      const uint32_t* xr[kRows];
      for (int i = 0; i < kRows; ++i) {
        for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
        xr[i] = reinterpret_cast<const uint32_t*>(x + (m0 + (i < rows ? i : 0)) * k);  // spare rows repeat row 0
      }
      for (int64_t p = 0; p < k_pairs; ++p) {
        const __m512i* wp = reinterpret_cast<const __m512i*>(wb + p * 2 * kBlock);
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wp), w1 = (__m512bh)_mm512_loadu_si512(wp + 1),
                       w2 = (__m512bh)_mm512_loadu_si512(wp + 2), w3 = (__m512bh)_mm512_loadu_si512(wp + 3);
        for (int i = 0; i < kRows; ++i) {
          const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(xr[i][p]));
          acc[i][0] = _mm512_dpbf16_ps(acc[i][0], xv, w0);
          acc[i][1] = _mm512_dpbf16_ps(acc[i][1], xv, w1);
          acc[i][2] = _mm512_dpbf16_ps(acc[i][2], xv, w2);
          acc[i][3] = _mm512_dpbf16_ps(acc[i][3], xv, w3);
        }
      }
      for (int64_t i = 0; i < rows; ++i)
        for (int j = 0; j < 4; ++j) _mm512_storeu_ps(y + (m0 + i) * n + b * kBlock + 16 * j, acc[i][j]);
    }
  }
}

struct Work {
  const uint16_t* x;
  const uint16_t* w;
  float* y;
  int64_t m, k_pairs, n, blocks, chunk, chunks;
  std::atomic<int64_t> next{0}, done{0};

  // Claims and runs chunks until none is left; a task that starts after the call returned claims nothing.
  void Run() {
    for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
      const int64_t b0 = c * chunk, b1 = b0 + chunk < blocks ? b0 + chunk : blocks;
      Blocks(x, w, y, m, k_pairs, n, b0, b1);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error Bf16Matmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (x.element_type() != ffi::DataType::BF16 || w.element_type() != ffi::DataType::BF16 ||
      y->element_type() != ffi::DataType::F32 || xd.size() != 2 || wd.size() != 4 || yd.size() != 2 ||
      wd[2] != kBlock || wd[3] != 2 || xd[1] != 2 * wd[1] || yd[0] != xd[0] || yd[1] != wd[0] * kBlock)
    return ffi::Error::InvalidArgument(
        "bf16_matmul: want x bf16[M, K], w bf16[N/64, K/2, 64, 2] (api.pack), y f32[M, N]");
  auto work = std::make_shared<Work>();
  work->x = reinterpret_cast<const uint16_t*>(x.untyped_data());
  work->w = reinterpret_cast<const uint16_t*>(w.untyped_data());
  work->y = reinterpret_cast<float*>(y->untyped_data());
  work->m = xd[0], work->k_pairs = wd[1], work->n = yd[1], work->blocks = wd[0];
  const int64_t threads = pool.num_threads() > 0 ? pool.num_threads() : 1;
  // A few chunks a thread, so one that starts late still gets a share.
  work->chunks = work->blocks < 4 * threads ? work->blocks : 4 * threads;
  work->chunk = (work->blocks + work->chunks - 1) / work->chunks;
  work->chunks = (work->blocks + work->chunk - 1) / work->chunk;
  for (int64_t t = 1; t < threads && t < work->chunks; ++t) pool.Schedule([work] { work->Run(); });
  work->Run();
  while (work->done.load(std::memory_order_acquire) < work->chunks) _mm_pause();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AlignmentBf16Matmul, Bf16Matmul,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
