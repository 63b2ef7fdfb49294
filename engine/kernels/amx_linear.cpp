// A linear on AMX tiles (built only with KESTREL_AMX).
//
// oneDNN's packed linear pays a fixed cost per call that dominates when a step has a few rows
// (decoding); this one streams the weight through AMX tiles with none of it. It accumulates in
// the same order as oneDNN (checked bit for bit by the tests), so a row's result is the same
// whichever of the two computes it.

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_ops.h"

#ifdef KESTREL_AMX
#include <sys/syscall.h>
#include <unistd.h>

namespace kestrel {
namespace {

bool amx_permitted() {
  // Linux hands out the AMX register state only on request (once per process).
  constexpr int kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  static const bool ok = syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  return ok;
}

struct TileConfig {  // the 64-byte layout ldtilecfg expects (palette 1)
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

}  // namespace

// out[M, N] = x[M, K] @ w^T + bias for any M, bf16, with w pre-packed by the caller into AMX
// B tiles: [N / 16][K / 32][16 k-pairs][16 outputs][2] (see engine/layers/linear.py). x rows are
// the A operand, read in place 16 at a time; each output element sums its k-pairs in order,
// the same whatever M is.
at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& w_tiles, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(amx_permitted(), "amx_linear: the OS does not grant this process AMX state");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w_tiles.scalar_type() == at::kBFloat16, "amx_linear: bf16 only");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && w_tiles.dim() == 5 && w_tiles.is_contiguous(),
              "amx_linear: x [M, K] with unit column stride, w as [N/16, K/32, 16, 16, 2] tiles");
  const int64_t M = x.size(0), K = x.size(1), n_tiles = w_tiles.size(0), k_tiles = w_tiles.size(1);
  const int64_t N = n_tiles * 16, x_stride = x.stride(0);
  TORCH_CHECK(K == k_tiles * 32, "amx_linear: x has ", K, " columns, the weight ", k_tiles * 32);
  if (bias) TORCH_CHECK(bias->is_contiguous() && bias->numel() == N && bias->scalar_type() == at::kBFloat16, "amx_linear: bias");
  auto out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  uint16_t* op = ptr<uint16_t>(out);
  const uint16_t* xp = ptr<uint16_t>(x);
  const uint16_t* wp = ptr<uint16_t>(w_tiles);
  const uint16_t* bp = bias ? ptr<uint16_t>(*bias) : nullptr;
  // The last, partial group of 16 rows is read from a zero-padded copy.
  const int64_t full_rows = M / 16 * 16, tail = M - full_rows;
  std::vector<uint16_t> padded(tail ? 16 * K : 0, 0);
  for (int64_t r = 0; r < tail; ++r) std::memcpy(padded.data() + r * K, xp + (full_rows + r) * x_stride, K * 2);
  const auto rows_at = [&](int64_t m0, int64_t& stride) -> const uint16_t* {
    if (m0 < full_rows) {
      stride = x_stride;
      return xp + m0 * x_stride;
    }
    stride = K;
    return padded.data();
  };
  // A pass multiplies 16 rows by four output tiles: one A tile meets four weight streams, which
  // keeps more of memory's bandwidth busy than one stream with software prefetch (10.5 vs 11.1
  // ms for SmolLM2's linears at 16 rows, and 16.9 vs 23 at 64). Each output element still sums
  // its k-pairs in order.
  const int64_t n_passes = (n_tiles + 3) / 4;
  // Rows in super-blocks that stay in L2 while every weight tile streams past them once.
  const int64_t block_rows = std::max<int64_t>(64, (256 * 1024 / (K * 2)) / 64 * 64);
  #pragma omp parallel num_threads(at::get_num_threads())
  {
    TileConfig config;  // tiles 0-3: C (16 rows x 16 outputs, float), 4: A (x), 5-7: B (weight)
    for (int t = 0; t < 8; ++t) {
      config.rows[t] = 16;
      config.colsb[t] = 64;
    }
    _tile_loadconfig(&config);
    alignas(64) float c[16 * 16];
    for (int64_t block = 0; block < M; block += block_rows) {
      const int64_t block_end = std::min(M, block + block_rows);
      #pragma omp for schedule(static)
      for (int64_t pass = 0; pass < n_passes; ++pass) {
        const int64_t nt0 = pass * 4, nn = std::min<int64_t>(4, n_tiles - nt0);
        const uint16_t* w = wp + nt0 * k_tiles * 512;  // output tile nt0 + j starts at j * k_tiles * 512
        const int64_t w_step = k_tiles * 512;
        for (int64_t m0 = block; m0 < block_end; m0 += 16) {
          int64_t stride;
          const uint16_t* a = rows_at(m0, stride);
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
          for (int64_t k = 0; k < k_tiles; ++k) {  // C tile j: output tile nt0 + j
            const uint16_t* wk = w + k * 512;
            _tile_loadd(4, a + k * 32, stride * 2);
            _tile_loadd(5, wk, 64);
            _tile_dpbf16ps(0, 4, 5);
            if (nn > 1) {
              _tile_loadd(6, wk + w_step, 64);
              _tile_dpbf16ps(1, 4, 6);
            }
            if (nn > 2) {
              _tile_loadd(7, wk + 2 * w_step, 64);
              _tile_dpbf16ps(2, 4, 7);
            }
            if (nn > 3) {
              _tile_loadd(5, wk + 3 * w_step, 64);
              _tile_dpbf16ps(3, 4, 5);
            }
          }
          for (int64_t j = 0; j < nn; ++j) {
            const int64_t nt = nt0 + j;
            switch (j) {  // tile numbers must be constants
              case 0: _tile_stored(0, c, 64); break;
              case 1: _tile_stored(1, c, 64); break;
              case 2: _tile_stored(2, c, 64); break;
              default: _tile_stored(3, c, 64);
            }
            const __m512 bias16 = bp ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                                           _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + nt * 16))), 16))
                                     : _mm512_setzero_ps();
            for (int64_t r = 0; r < 16 && m0 + r < M; ++r) {
              __m512 v = _mm512_load_ps(c + r * 16);
              if (bp) v = _mm512_add_ps(v, bias16);
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(op + (m0 + r) * N + nt * 16),
                                  (__m256i)_mm512_cvtneps_pbh(v));
            }
          }
        }
      }
    }
    _tile_release();
  }
  return out;
}

}  // namespace kestrel
#endif
