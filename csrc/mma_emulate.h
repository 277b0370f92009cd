// mma_emulate.h — mma.sync.m16n8k16 (row.col, fp32 accumulate) emulated on the host from the PTX
// ISA's fragment tables, for the GEMV and GEMM emulations (gemv_emulate.cpp, gemm_emulate.cpp).
// Written out independently of the kernels' fragment maps (gemv_fragments.cuh,
// gemm_fragments.cuh): A: row g + 8·(r & 1), col 2t + e + 8·(r >> 1); B: k 2t + e + 8r, col g;
// C: row g + 8·(i >> 1), col 2t + (i & 1) (g = lane / 4, t = lane % 4, e: low or high half).
#pragma once

#include "gemv_fragments.cuh"

namespace qdpo {

// acc[lane][i] += A[16 × 16] · B[16 × 8] from the 32 lanes' registers a[lane][0..3], b[lane][0..1]
// (16-bit values of type `hd`), in double.
inline void mma_emulate(const uint32_t (*a)[4], const uint32_t (*b)[2], int hd, double (*acc)[4]) {
  double am[16][16], bm[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int r = 0; r < 4; ++r) {
      for (int e = 0; e < 2; ++e) {
        am[g + 8 * (r & 1)][2 * t + e + 8 * (r >> 1)] = gemv::from_h_bits((a[lane][r] >> (16 * e)) & 0xFFFFu, hd);
      }
    }
    for (int r = 0; r < 2; ++r) {
      for (int e = 0; e < 2; ++e) bm[2 * t + e + 8 * r][g] = gemv::from_h_bits((b[lane][r] >> (16 * e)) & 0xFFFFu, hd);
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
      for (int kk = 0; kk < 16; ++kk) acc[lane][i] += am[row][kk] * bm[kk][col];
    }
  }
}

}  // namespace qdpo
