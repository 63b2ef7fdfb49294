// A linear with AVX2 FMA, for CPUs without AVX-512 (built only with KESTREL_AVX2).
//
// oneDNN refuses bf16 weights without AVX-512, and torch's own bf16 matmul takes 195 ms for
// SmolLM2's linears at 16 rows there (AMD EPYC, 2 cores). Here the bf16 weight is widened to
// float32 in registers and every output element sums x[k] * w[k] by FMA in float32 with k in
// order, whatever the row count or the tile shape that computes it: a row's result never
// depends on the rest of the batch.
//
// The weight is pre-packed in panels of 16 outputs, [N / 16][K][16] (see fma_panels in
// engine/kernels/__init__.py): lane 2j holds output j and lane 2j + 1 output 8 + j, so that
// even8 / odd8 of one 32-byte load give outputs 0-7 and 8-15.

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>

#include "cpu_ops.h"

#ifdef KESTREL_AVX2
namespace kestrel {
namespace {

inline void store_bf16x16(uint16_t* out, __m256 lo, __m256 hi) {  // outputs 0-7, 8-15
  // packus interleaves 128-bit lanes: [lo 0-3, hi 0-3, lo 4-7, hi 4-7]; the permute restores order.
  const __m256i packed = _mm256_packus_epi32(bf16_bits8(lo), bf16_bits8(hi));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute4x64_epi64(packed, 0xD8));
}

// MR rows of x (float32) times NP panels: 2 * MR * NP accumulators, all independent FMA chains.
// With `ahead`, each k also prefetches `ahead_step` bytes on from ahead + k * ahead_step (a
// template flag: a branch in the k loop made gcc spill the accumulators).
template <int MR, int NP, bool kPrefetch = false>
void fma_tile(const float* x, int64_t K, const uint16_t* w, int64_t panel_stride, const float* bias,
              uint16_t* out, int64_t out_stride, const char* ahead = nullptr, int64_t ahead_step = 0) {
  __m256 acc[MR][NP][2];
  for (int r = 0; r < MR; ++r)
    for (int p = 0; p < NP; ++p) acc[r][p][0] = acc[r][p][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    if constexpr (kPrefetch) _mm_prefetch(ahead + k * ahead_step, _MM_HINT_T0);
    __m256 lo[NP], hi[NP];
    for (int p = 0; p < NP; ++p) {
      const __m256i v = load_raw16(w + p * panel_stride + k * 16);
      lo[p] = even8(v);
      hi[p] = odd8(v);
    }
    for (int r = 0; r < MR; ++r) {
      const __m256 xr = _mm256_broadcast_ss(x + r * K + k);
      for (int p = 0; p < NP; ++p) {
        acc[r][p][0] = _mm256_fmadd_ps(xr, lo[p], acc[r][p][0]);
        acc[r][p][1] = _mm256_fmadd_ps(xr, hi[p], acc[r][p][1]);
      }
    }
  }
  for (int p = 0; p < NP; ++p) {
    const __m256 b0 = bias ? _mm256_loadu_ps(bias + p * 16) : _mm256_setzero_ps();
    const __m256 b1 = bias ? _mm256_loadu_ps(bias + p * 16 + 8) : _mm256_setzero_ps();
    for (int r = 0; r < MR; ++r)
      store_bf16x16(out + r * out_stride + p * 16, _mm256_add_ps(acc[r][p][0], b0), _mm256_add_ps(acc[r][p][1], b1));
  }
}

// MR rows of x times panels [0, panels): fewer rows take more panels at once, to keep a dozen
// FMA chains in flight.
template <int MR>
void fma_rows(const float* x, int64_t K, const uint16_t* w, int64_t panels, const float* bias, uint16_t* out,
              int64_t out_stride) {
  constexpr int NP = MR >= 4 ? 1 : 6 / MR;  // 1 row: 6 panels, 2: 3, 3: 2
  const int64_t panel_stride = K * 16;
  int64_t p = 0;
  for (; p + NP <= panels; p += NP)
    fma_tile<MR, NP>(x, K, w + p * panel_stride, panel_stride, bias ? bias + p * 16 : nullptr, out + p * 16, out_stride);
  for (; p < panels; ++p)
    fma_tile<MR, 1>(x, K, w + p * panel_stride, panel_stride, bias ? bias + p * 16 : nullptr, out + p * 16, out_stride);
}

}  // namespace

// out[M, N] = x[M, K] @ w^T + bias, bf16, with w in panels [N / 16, K, 16].
at::Tensor fma_linear(const at::Tensor& x, const at::Tensor& w_panels, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w_panels.scalar_type() == at::kBFloat16, "fma_linear: bf16 only");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && w_panels.dim() == 3 && w_panels.size(2) == 16 &&
              w_panels.is_contiguous(), "fma_linear: x [M, K] with unit column stride, w as [N/16, K, 16] panels");
  const int64_t M = x.size(0), K = x.size(1), panels = w_panels.size(0), N = panels * 16;
  TORCH_CHECK(w_panels.size(1) == K, "fma_linear: x has ", K, " columns, the weight ", w_panels.size(1));
  if (bias) TORCH_CHECK(bias->numel() == N && bias->scalar_type() == at::kBFloat16, "fma_linear: bias");
  auto out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  // x and bias widened to float32 once (exact), not at every use; torch's own conversion
  // took 8% of a prefill.
  at::Tensor x32 = at::empty({M, K}, x.options().dtype(at::kFloat));
  float* xp = x32.data_ptr<float>();
  const uint16_t* xin = ptr<uint16_t>(x);
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint16_t* src = xin + r * x.stride(0);
      float* dst = xp + r * K;
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) _mm256_storeu_ps(dst + k, load8(src + k));
      for (; k < K; ++k) dst[k] = f32(src[k]);
    }
  });
  const at::Tensor bias32 = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = bias ? bias32.data_ptr<float>() : nullptr;
  const uint16_t* wp = ptr<uint16_t>(w_panels);
  uint16_t* op = ptr<uint16_t>(out);
  // Rows go in blocks of about 128 KB of x, which stays in L2 while the weights pass it.
  const int64_t block_rows = std::max<int64_t>(6, 128 * 1024 / (K * 4) / 6 * 6);
  if (M < 6) {
    // A thread's share is whole groups of 6 panels (96 outputs), fewer rows taking more panels
    // per tile (fma_rows).
    constexpr int64_t kGroup = 6;
    #pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
    for (int64_t g = 0; g < (panels + kGroup - 1) / kGroup; ++g) {
      const int64_t p0 = g * kGroup, np = std::min(kGroup, panels - p0);
      const uint16_t* w = wp + p0 * K * 16;
      const float* b = bp ? bp + p0 * 16 : nullptr;
      uint16_t* o = op + p0 * 16;
      switch (M) {
        case 5: fma_rows<5>(xp, K, w, np, b, o, N); break;
        case 4: fma_rows<4>(xp, K, w, np, b, o, N); break;
        case 3: fma_rows<3>(xp, K, w, np, b, o, N); break;
        case 2: fma_rows<2>(xp, K, w, np, b, o, N); break;
        default: fma_rows<1>(xp, K, w, np, b, o, N);
      }
    }
    return out;
  }
  // A thread's share is whole panels. Each panel goes through every row tile of the block
  // (up to 6 rows each, evenly split) while in L1, and meanwhile the tiles prefetch the next
  // panel, spread over their k loops: without it the FMAs waited on the weights streaming
  // from memory (SmolLM2's 120 layer linears at 16 rows: median 36 -> 31 ms over 6
  // alternating runs, 64 rows 112 -> 93 ms).
  for (int64_t block = 0; block < M; block += block_rows) {
    const int64_t rows = std::min(M, block + block_rows) - block, tiles = (rows + 5) / 6;
    const int64_t step = 32 / tiles;  // a panel has 32 bytes per k: the tiles stay within the next one
    #pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
    for (int64_t p = 0; p < panels; ++p) {
      const uint16_t* w = wp + p * K * 16;
      const char* next = reinterpret_cast<const char*>(wp + std::min(p + 1, panels - 1) * K * 16);
      const float* b = bp ? bp + p * 16 : nullptr;
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t m = block + t * rows / tiles, mr = block + (t + 1) * rows / tiles - m;
        const float* xm = xp + m * K;
        uint16_t* o = op + m * N + p * 16;
        const char* ahead = next + t * K * step;
        switch (mr) {
          case 6: fma_tile<6, 1, true>(xm, K, w, 0, b, o, N, ahead, step); break;
          case 5: fma_tile<5, 1, true>(xm, K, w, 0, b, o, N, ahead, step); break;
          case 4: fma_tile<4, 1, true>(xm, K, w, 0, b, o, N, ahead, step); break;
          case 3: fma_tile<3, 1, true>(xm, K, w, 0, b, o, N, ahead, step); break;
          case 2: fma_tile<2, 1, true>(xm, K, w, 0, b, o, N, ahead, step); break;
          default: fma_tile<1, 1, true>(xm, K, w, 0, b, o, N, ahead, step);
        }
      }
    }
  }
  return out;
}

}  // namespace kestrel
#endif
