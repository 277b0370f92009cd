// gemm_fragments.cuh — the index maps of the tensor-core prefill GEMM
// (dequant_matmul_gemm.cu), shared with its host emulation (gemm_emulate.cpp),
// which the CPU test suite runs against reference.dequant_matmul: the copies
// into shared memory, the swizzle, the in-place dequantization, the ldmatrix
// addresses and the output map are all checked without a GPU; only the
// instructions themselves (cp.async, ldmatrix, mma.sync as the PTX ISA states
// them) are taken on trust.
//
// y = x @ ŵᵀ: A = x (m × k, row-major), B = ŵ (k × n, "col": ŵ's rows n are B's
// columns), C = y (m × n, fp32). A block owns BM × BN outputs and walks K in
// tiles of BK codes: per tile, cp.async copies x's BM × BK tile and the packed
// BN × BK codes into shared memory (two buffers: the next tile's copy runs
// during this tile's math), every thread then dequantizes 32 codes of one row
// into a BN × BK tile of ŵ in x.dtype (each code once per block, rounded as
// reference.dequantize), and 8 warps (2 along m × 4 along n, 64 × 32 outputs
// each) run mma.sync.m16n8k16 on ldmatrix fragments of both tiles.
//
// Both 16-bit tiles have 128-byte rows (BK = 64 values) in 16-byte chunks
// stored at chunk ^ (row & 7): the 8 rows an ldmatrix phase reads, and the 8
// rows a quarter warp of copies writes, land in 8 different bank groups.
#pragma once

#include "gemv_fragments.cuh"
#include "qdpo_math.cuh"

namespace qdpo {
namespace gemm {

constexpr int kBM = 128, kBN = 128, kBK = 64;  // block tile; BK codes per K tile
constexpr int kWarpsM = 2, kWarpsN = 4, kThreads = 32 * kWarpsM * kWarpsN;
constexpr int kWM = kBM / kWarpsM, kWN = kBN / kWarpsN;  // 64 × 32 outputs per warp
constexpr int kMT = kWM / 16, kNT = kWN / 8;              // m16 tiles × n8 tiles per warp
constexpr int kRowBytes = kBK * 2;                        // a row of the x or ŵ tile: 128 bytes
constexpr int kTileBytes = kBM * kRowBytes;               // the x tile (= the ŵ tile: kBN == kBM)
static_assert(kBM == kBN, "x and ŵ tiles share one layout");

// Packed codes of one K tile: BN rows of BK·bits/8 bytes, row-major.
QDPO_HD int packed_row_bytes(int bits) { return kBK * bits / 8; }
QDPO_HD int packed_tile_bytes(int bits) { return kBN * packed_row_bytes(bits); }
// Shared memory of a block: two stages of (x tile, packed tile) and one ŵ tile.
QDPO_HD int smem_bytes(int bits) { return 2 * (kTileBytes + packed_tile_bytes(bits)) + kTileBytes; }

// Byte offset of 16-byte chunk `chunk` (0..7) of row `row` in a swizzled 16-bit tile.
QDPO_HD int swz(int row, int chunk) { return row * kRowBytes + ((chunk ^ (row & 7)) << 4); }

// Copy i (0 .. copies - 1) of a K tile by thread `tid`: x chunk (row, chunk) — 4 per thread.
constexpr int kXCopies = kBM * (kRowBytes / 16) / kThreads;
QDPO_HD void x_copy(int tid, int i, int& row, int& chunk) {
  const int c = tid + i * kThreads;
  row = c >> 3, chunk = c & 7;
}
// Packed chunk (row, byte offset in the row) — 1 (W4) or 2 (W8) per thread.
QDPO_HD int w_copies(int bits) { return kBN * packed_row_bytes(bits) / 16 / kThreads; }
QDPO_HD void w_copy(int tid, int i, int bits, int& row, int& byte) {
  const int per_row = packed_row_bytes(bits) / 16, c = tid + i * kThreads;
  row = c / per_row, byte = (c % per_row) * 16;
}

// Dequantization: thread `tid` turns codes [32·half, 32·half + 32) of tile row `row` into
// chunks 4·half .. 4·half + 3 of the ŵ tile.
QDPO_HD void dequant_part(int tid, int& row, int& half) { row = tid >> 1, half = tid & 1; }

// W4: codes 2j and 2j + 1 of a little-endian word (byte j) as a 16-bit pair biased by `bias`:
// (b · 0x1001) puts the byte's high nibble at bit 16, its low nibble stays at bit 0.
QDPO_HD uint32_t w4_pair_adjacent(uint32_t word, int j, uint32_t bias) {
  const uint32_t b = (word >> (8 * j)) & 0xFFu;
  return ((b * 0x1001u) & 0x000F000Fu) | (bias * 0x00010001u);
}

// The 32 ŵ values of one thread's part in x.dtype, as 4 chunks of 4 words (value pairs in k order):
// `codes` is the part's packed bytes (16 for W4, 32 for W8).
template <int BITS>
QDPO_HD void dequant_part_words(const uint32_t* codes, const gemv::RowGrid& r, int hdtype, uint32_t (&out)[4][4]) {
  for (int q = 0; q < 4; ++q) {
    for (int j = 0; j < 4; ++j) {
      if (BITS == 4) {
        out[q][j] = gemv::w4_dequant_pair(w4_pair_adjacent(codes[q], j, gemv::h_bias(hdtype)), r, hdtype);
      } else {
        const uint32_t w = codes[2 * q + (j >> 1)];
        out[q][j] = gemv::w8_dequant_pair(gemv::w8_biased(w, 2 * (j & 1)), gemv::w8_biased(w, 2 * (j & 1) + 1),
                                          r, hdtype);
      }
    }
  }
}

// ldmatrix.x4 row addresses of lane `lane` for k16 slice kk (0..3) of the tile.
// A (x): m16 tile at row m0 — lanes 0-15 rows m0 + lane, chunk 2kk; lanes 16-31 the same rows,
// chunk 2kk + 1: registers a0..a3 as mma.m16n8k16 wants them.
QDPO_HD int a_ldsm(int lane, int m0, int kk) { return swz(m0 + (lane & 15), 2 * kk + (lane >> 4)); }
// B (ŵ): two n8 tiles at rows n0, n0 + 8 — matrices 0, 1: rows n0 .. n0+7, chunks 2kk, 2kk+1;
// matrices 2, 3: rows n0+8 .. n0+15: registers (b0, b1) of tile n0, then of tile n0 + 8.
QDPO_HD int b_ldsm(int lane, int n0, int kk) {
  return swz(n0 + (lane & 7) + 8 * (lane >> 4), 2 * kk + ((lane >> 3) & 1));
}

// Output of accumulator register i of lane (g, t) in an m16 × n8 tile: (row, col) offsets.
QDPO_HD int c_m(int lane, int i) { return (lane >> 2) + 8 * (i >> 1); }
QDPO_HD int c_n(int lane, int i) { return 2 * (lane & 3) + (i & 1); }

}  // namespace gemm
}  // namespace qdpo
