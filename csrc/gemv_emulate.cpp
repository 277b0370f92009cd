// gemv_emulate.cpp — a host emulation of one 16-row tile of the tensor-core
// GEMV (dequant_matmul_gemv.cu), for the CPU test suite.
//
// Every lane's loads, dequantization and fragment assembly run through the
// same gemv_fragments.cuh functions the kernel calls; the mma.sync.m16n8k16
// instruction is emulated from the PTX ISA's fragment tables (mma_emulate.h,
// written independently of gemv_fragments.cuh), in double.
// The output goes through the kernel's own c_row/c_col. x_smem: the activations go through the
// shared-memory layout of the kernel's x_smem variant (xs_offset to write, xs_lane_offset to read).
// scale_after: the mma takes q - z and each step's sums are multiplied by the row's scale after it,
// with the scale taken from the step's first code (lanes past K too), as the kernel does.
// zero_after: the mma takes bias + q, and after each one a second mma adds the zero fragment
// -(bias + z) (zero_frag) times the same x, before the scale. splits: K in ranges of
// ceil(steps / splits) steps, x_smem refilled per range, as split-K blocks do. shared_x: x of all m rows
// staged kSxSteps steps at a time from each range's start, piece by piece as the kernel's threads copy
// (sx_piece_row, sx_piece_k; zeros past K), rows kSxRowBytes apart; lanes of rows past m read row
// m - 1, as in the kernel (their outputs are dropped). A wrong byte offset,
// nibble order, A/B slot pairing or output map makes y differ from
// reference.dequant_matmul; only the instruction's semantics are assumed.
#include <algorithm>
#include <cstring>
#include <vector>

#include "gemv_fragments.cuh"
#include "mma_emulate.h"
#include "qdpo_api.h"

namespace qdpo {

int gemv_mma_emulate(const uint8_t* qweight, int64_t stride_qn, int rows, int64_t k, int64_t ng, int bits,
                     const float* scales, const uint8_t* zeros, const uint16_t* x, int m, int x_dtype, float* y,
                     bool x_smem, bool scale_after, bool zero_after, int splits, bool shared_x) {
  if (bits != 4 && bits != 8) return fail(kErrBits, "bits == 4 || bits == 8");
  if (x_dtype != kF16 && x_dtype != kBF16) return fail(kErrDtype, "x_dtype is fp16 or bf16");
  if (rows < 1 || rows > 16 || m < 1 || m > 16 || ng < 1 || k % ng || k % 32 || (k / ng) % 32) {
    return fail(kErrShape, "1 <= rows, m <= 16 and K, G multiples of 32");
  }
  if (x_smem && m > 2) return fail(kErrShape, "x_smem serves m <= 2");
  if (shared_x && x_smem) return fail(kErrShape, "shared_x: not with x_smem");
  if (splits < 1 || splits > 16) return fail(kErrShape, "1 <= splits <= 16 (kMaxSplits)");
  const int mt_count = m <= 8 ? 1 : 2, g_size = static_cast<int>(k / ng);
  if (scale_after && ng != 1 && g_size % gemv::kStepK) return fail(kErrShape, "scale_after: G % 128 == 0 or G == K");
  if (zero_after && !(bits == 4 && x_dtype == kBF16 && scale_after)) {
    return fail(kErrShape, "zero_after: W4, bf16 x, scale_after");
  }
  std::vector<double> acc(32 * 2 * 4, 0.0), step_acc(32 * 2 * 4, 0.0);
  gemv::RowGrid lane_grid[32][2];  // scale_after: the lane's row grids of the step
  const int steps = static_cast<int>((k + gemv::kStepK - 1) / gemv::kStepK);
  // K ranges of sps steps (split-K; the last may be shorter). x_smem: the kernel's prologue per range:
  // 8 activations at a time (zeros past K) stored as their pairs at xs_offset, in one buffer of the
  // plan's size.
  const int sps = (steps + splits - 1) / splits, kmax = sps * gemv::kStepK;
  const int row_bytes = shared_x ? gemv::kSxRowBytes : gemv::xs_row_bytes(kmax);
  std::vector<uint8_t> xs(x_smem ? gemv::xs_bytes(m, kmax) : shared_x ? 8 * mt_count * row_bytes : 0);
  int lo = 0;  // the first step in shared memory
  for (int step = 0; step < steps; ++step) {
    if (shared_x && step % sps % gemv::kSxSteps == 0) {
      lo = step;
      std::fill(xs.begin(), xs.end(), uint8_t{0xFF});  // a read of a hole shows
      for (int p = 0; p < 8 * mt_count * gemv::kSxPiecesPerRow; ++p) {
        const int row = gemv::sx_piece_row(p), kk = lo * gemv::kStepK + gemv::sx_piece_k(p);
        if (row >= m) continue;
        uint32_t xw[4] = {}, q[4];
        if (kk < k) std::memcpy(xw, x + row * k + kk, 16);
        gemv::x_pairs(xw, q);
        std::memcpy(xs.data() + row * row_bytes + gemv::xs_offset(gemv::sx_piece_k(p)), q, 16);
      }
    }
    if (x_smem && step % sps == 0) {
      lo = step;
      std::fill(xs.begin(), xs.end(), uint8_t{0xFF});  // a read of a hole shows
      const int krange = (std::min(lo + sps, steps) - lo) * gemv::kStepK, k0 = lo * gemv::kStepK;
      for (int row = 0; row < m; ++row) {
        for (int kk = 0; kk < krange; kk += 8) {
          uint32_t xw[4] = {}, p[4];
          if (k0 + kk < k) std::memcpy(xw, x + row * k + k0 + kk, 16);
          gemv::x_pairs(xw, p);
          std::memcpy(xs.data() + row * row_bytes + gemv::xs_offset(kk), p, 16);
        }
      }
    }
    uint32_t a[8][32][4], b[2][8][32][2], zf[32][4];
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane >> 2, t = lane & 3, kl = gemv::lane_k(step, t);
      const int grp = (scale_after ? step * gemv::kStepK : kl) / g_size;
      const bool kin = kl < k;
      uint32_t w[2][8] = {}, xw[2][16] = {};
      gemv::RowGrid grid[2];
      for (int h = 0; h < 2; ++h) {  // the kernel's load_stage, one 16-row tile
        const int n = g + 8 * h;
        float s = 0.f, z = 0.f;
        if (kin && n < rows) {
          std::memcpy(w[h], qweight + n * stride_qn + kl * bits / 8, bits == 4 ? 16 : 32);
          s = scales[n * ng + grp], z = zeros[n * ng + grp];
        } else if (scale_after && n < rows) {
          s = scales[n * ng + grp];  // codes 0, and the zero point too unless it comes after
          if (zero_after) z = zeros[n * ng + grp];
        }
        grid[h] = gemv::row_grid(s, z, x_dtype);
        lane_grid[lane][h] = grid[h];
      }
      gemv::zero_frag(grid[0], grid[1], zf[lane]);
      for (int mt = 0; mt < mt_count; ++mt) {
        const int row = g + 8 * mt;
        if (kin && row < m) std::memcpy(xw[mt], x + row * k + kl, 64);
      }
      for (int c = 0; c < gemv::kChunks; ++c) {  // the kernel's compute_stage
        uint32_t pg[4], pg8[4], px[2][4];
        for (int h = 0; h < 2; ++h) {
          uint32_t* out = h ? pg8 : pg;
          if (bits == 4 && zero_after) {
            gemv::dequant_chunk<4, gemv::kZeroAfter>(w[h], c, grid[h], x_dtype, out);
          } else if (bits == 4) {
            scale_after ? gemv::dequant_chunk<4, gemv::kScaleAfter>(w[h], c, grid[h], x_dtype, out)
                        : gemv::dequant_chunk<4>(w[h], c, grid[h], x_dtype, out);
          } else {
            scale_after ? gemv::dequant_chunk<8, gemv::kScaleAfter>(w[h], c, grid[h], x_dtype, out)
                        : gemv::dequant_chunk<8>(w[h], c, grid[h], x_dtype, out);
          }
        }
        for (int mt = 0; mt < mt_count; ++mt) {
          if (x_smem || shared_x) {  // the kernel's 16-byte shared-memory load
            const int row = std::min(g + 8 * mt, m - 1);
            std::memcpy(px[mt], xs.data() + row * row_bytes + gemv::xs_lane_offset(step - lo, t) + 16 * c, 16);
          } else {
            gemv::x_pairs(&xw[mt][4 * c], px[mt]);
          }
        }
        for (int h = 0; h < 2; ++h) {
          gemv::a_frag(pg, pg8, h, a[2 * c + h][lane]);
          for (int mt = 0; mt < mt_count; ++mt) gemv::b_frag(px[mt], h, b[mt][2 * c + h][lane]);
        }
      }
    }
    std::vector<double>& sum = scale_after ? step_acc : acc;
    if (scale_after) std::fill(step_acc.begin(), step_acc.end(), 0.0);
    for (int j = 0; j < 8; ++j) {
      for (int mt = 0; mt < mt_count; ++mt) {
        double(*sum_mt)[4] = reinterpret_cast<double(*)[4]>(sum.data() + mt * 32 * 4);
        mma_emulate(a[j], b[mt][j], x_dtype, sum_mt);
        if (zero_after) mma_emulate(zf, b[mt][j], x_dtype, sum_mt);
      }
    }
    for (int e = 0; scale_after && e < 2 * 32 * 4; ++e) {  // e = (mt · 32 + lane) · 4 + i
      const gemv::RowGrid& r = lane_grid[(e / 4) % 32][(e % 4) >> 1];
      acc[e] += static_cast<double>(r.sf) * step_acc[e];
    }
  }
  for (int lane = 0; lane < 32; ++lane) {  // the kernel's epilogue map
    const int g = lane >> 2, t = lane & 3;
    for (int mt = 0; mt < mt_count; ++mt) {
      for (int i = 0; i < 4; ++i) {
        const int n = gemv::c_row(g, i), row = 8 * mt + gemv::c_col(t, i);
        if (n < rows && row < m) y[row * rows + n] = static_cast<float>(acc[(mt * 32 + lane) * 4 + i]);
      }
    }
  }
  return kOk;
}

}  // namespace qdpo
