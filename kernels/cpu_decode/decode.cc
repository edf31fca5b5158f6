// The rollout engine's decode step on x86 CPUs with AVX512-BF16, as two XLA FFI custom calls (api.py).
//
// AlignmentBf16Matmul: y[M, N] float32 = x[M, K] bfloat16 @ W bfloat16, for small M.
// W comes packed (api.pack): [N/64 blocks][K/2 pairs][64 columns][2], so a block's weights are one contiguous
// run streamed once per step, and each load holds the two consecutive-k values that vdpbf16ps multiplies by a
// pair of x values. Products of two bfloat16 are exact in float32; sums are float32 (as XLA with
// preferred_element_type=float32), in a different order. The column blocks are shared between the calling
// thread and XLA's intra-op pool: whoever is free claims the next chunk, so the call never waits on a task the
// pool has not started (the caller takes it over).
#include <immintrin.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <functional>
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

// Runs body(i0, i1) over [0, items) in chunks shared by the calling thread and the pool: whoever is free claims
// the next chunk, so the call never waits on a task the pool has not started (the caller takes its chunks
// over), and a task that starts after the call returned claims nothing (it holds the state, not the buffers).
struct Chunks {
  std::function<void(int64_t, int64_t)> body;
  int64_t items, chunk, count;
  std::atomic<int64_t> next{0}, done{0};

  void Run() {
    for (int64_t c; (c = next.fetch_add(1)) < count;) {
      const int64_t i0 = c * chunk, i1 = i0 + chunk < items ? i0 + chunk : items;
      body(i0, i1);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

void ParallelFor(ffi::ThreadPool& pool, int64_t items, std::function<void(int64_t, int64_t)> body) {
  if (items <= 0) return;
  auto work = std::make_shared<Chunks>();
  work->body = std::move(body);
  work->items = items;
  const int64_t threads = pool.num_threads() > 0 ? pool.num_threads() : 1;
  // A few chunks a thread, so one that starts late still gets a share.
  const int64_t wanted = items < 4 * threads ? items : 4 * threads;
  work->chunk = (items + wanted - 1) / wanted;
  work->count = (items + work->chunk - 1) / work->chunk;
  for (int64_t t = 1; t < threads && t < work->count; ++t) pool.Schedule([work] { work->Run(); });
  work->Run();
  while (work->done.load(std::memory_order_acquire) < work->count) _mm_pause();
}

ffi::Error Bf16Matmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (x.element_type() != ffi::DataType::BF16 || w.element_type() != ffi::DataType::BF16 ||
      y->element_type() != ffi::DataType::F32 || xd.size() != 2 || wd.size() != 4 || yd.size() != 2 ||
      wd[2] != kBlock || wd[3] != 2 || xd[1] != 2 * wd[1] || yd[0] != xd[0] || yd[1] != wd[0] * kBlock)
    return ffi::Error::InvalidArgument(
        "bf16_matmul: want x bf16[M, K], w bf16[N/64, K/2, 64, 2] (api.pack), y f32[M, N]");
  const auto* xp = reinterpret_cast<const uint16_t*>(x.untyped_data());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.untyped_data());
  auto* yp = reinterpret_cast<float*>(y->untyped_data());
  const int64_t m = xd[0], k_pairs = wd[1], n = yd[1];
  ParallelFor(pool, wd[0], [=](int64_t b0, int64_t b1) { Blocks(xp, wp, yp, m, k_pairs, n, b0, b1); });
  return ffi::Error::Success();
}

inline float Widen(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t Narrow(float f) {  // round to nearest even, as XLA's convert
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // NaN stays NaN
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// e^x for x <= 0 (softmax's shifted scores) within 1.2 float32 ulps (checked over [-87, 0]), in a form the
// compiler vectorises (std::exp is a scalar call per score): 2^n e^f with n = round(x / ln 2), f = x - n ln 2
// (in two parts), e^f by its Taylor polynomial to degree 7 on |f| <= ln(2) / 2; below -87 the result is 0.
inline float ExpNonPositive(float x) {
  x = x < -87.f ? -87.f : x;
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float f = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.f / 5040.f;
  p = p * f + 1.f / 720.f;
  p = p * f + 1.f / 120.f;
  p = p * f + 1.f / 24.f;
  p = p * f + 1.f / 6.f;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return x <= -87.f ? 0.f : p * scale;
}

// One (row, kv head): its query heads over the row's first n cached positions, keys kt [head_dim, L] and
// values v [L, head_dim]: both loops run along contiguous memory with no sum across a vector.
void AttendOne(const uint16_t* q, const uint16_t* kt, const uint16_t* v, uint16_t* out, int64_t groups,
               int64_t head_dim, int64_t length, int64_t n, float scale, float* scores, float* acc) {
  for (int64_t g = 0; g < groups; ++g) {
    const uint16_t* qg = q + g * head_dim;
    for (int64_t l = 0; l < n; ++l) scores[l] = 0.f;
    for (int64_t d = 0; d < head_dim; ++d) {
      const float qd = Widen(qg[d]);
      const uint16_t* kd = kt + d * length;
      for (int64_t l = 0; l < n; ++l) scores[l] += qd * Widen(kd[l]);
    }
    float top = -INFINITY;
    for (int64_t l = 0; l < n; ++l) top = scores[l] * scale > top ? scores[l] * scale : top;
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t l = 0; l < n; ++l) total += (scores[l] = ExpNonPositive(scores[l] * scale - top));
    for (int64_t d = 0; d < head_dim; ++d) acc[d] = 0.f;
    for (int64_t l = 0; l < n; ++l) {
      const float p = Widen(Narrow(scores[l] / total));  // probabilities in bf16, as dense_attention
      const uint16_t* vl = v + l * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) acc[d] += p * Widen(vl[d]);
    }
    uint16_t* og = out + g * head_dim;
    for (int64_t d = 0; d < head_dim; ++d) og[d] = Narrow(acc[d]);
  }
}

// out[rows, heads, head_dim] bf16: each row's query q[rows, heads, head_dim] (bf16) over the first kv_lens[row]
// positions of its dense views K [rows, kv_heads, head_dim, L] and V [rows, kv_heads, L, head_dim] (bf16 as raw
// 16-bit words); query head h reads kv head h / (heads / kv_heads). The numbers of
// kernels/paged_attention/xla.py's dense_attention: float32 scores and softmax, bf16 probabilities, float32 sums.
ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                           ffi::Buffer<ffi::DataType::S32> kv_lens, ffi::Result<ffi::AnyBuffer> out) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (q.element_type() != ffi::DataType::BF16 || k.element_type() != ffi::DataType::U16 ||
      v.element_type() != ffi::DataType::U16 || out->element_type() != ffi::DataType::BF16 || qd.size() != 3 ||
      kd.size() != 4 || vd.size() != 4 || kd[0] != qd[0] || qd[1] % kd[1] != 0 || kd[2] != qd[2] ||
      vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[3] || vd[3] != kd[2] || kv_lens.element_count() != qd[0])
    return ffi::Error::InvalidArgument(
        "decode_attention: want q bf16[rows, heads, head_dim], k u16[rows, kv_heads, head_dim, L], "
        "v u16[rows, kv_heads, L, head_dim], kv_lens s32[rows]");
  const int64_t rows = qd[0], heads = qd[1], head_dim = qd[2], kv_heads = kd[1], length = kd[3];
  const int64_t groups = heads / kv_heads;
  const auto* qp = reinterpret_cast<const uint16_t*>(q.untyped_data());
  const auto* kp = reinterpret_cast<const uint16_t*>(k.untyped_data());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.untyped_data());
  const int32_t* lens = kv_lens.typed_data();
  auto* op = reinterpret_cast<uint16_t*>(out->untyped_data());
  const float scale = 1.f / std::sqrt(static_cast<float>(head_dim));
  ParallelFor(pool, rows * kv_heads, [=](int64_t i0, int64_t i1) {
    std::unique_ptr<float[]> scores(new float[length + head_dim]);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / kv_heads, h = i % kv_heads;
      const int64_t n = lens[r] < 0 ? 0 : (lens[r] > length ? length : lens[r]);
      const size_t cache = static_cast<size_t>(i) * length * head_dim;
      const size_t query = static_cast<size_t>(r * heads + h * groups) * head_dim;
      AttendOne(qp + query, kp + cache, vp + cache, op + query, groups, head_dim, length, n, scale, scores.get(),
                scores.get() + length);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AlignmentBf16Matmul, Bf16Matmul,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AlignmentDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>().Arg<ffi::Buffer<ffi::DataType::S32>>()
                                  .Ret<ffi::AnyBuffer>());
