// gemv_fragments.cuh — how the tensor-core GEMV (dequant_matmul_gemv.cu) turns
// packed weights and activations into mma.sync.m16n8k16 fragments. Shared by
// the kernel and by its host emulation (gemv_emulate.cpp), which the CPU test
// suite runs against reference.dequant_matmul: every bit trick and index map
// below is checked without a GPU; only the instruction itself (its fragment
// layout as the PTX ISA states it) is taken on trust.
//
// The product is yᵀ = ŵ · xᵀ: A = 16 rows of ŵ (n) × 16 k, B = 16 k × 8 rows of x
// (m), C = 16 n × 8 m in fp32. PTX fragment layout (g = lane / 4, t = lane % 4):
//   A regs a0..a3 (two 16-bit values each): a0 = (row g, cols 2t, 2t+1),
//     a1 = (row g+8, same cols), a2 = (row g, cols 2t+8, 2t+9), a3 = (row g+8, same);
//   B regs b0, b1: b0 = (k 2t, 2t+1; col g), b1 = (k 2t+8, 2t+9; col g);
//   C regs c0..c3 (fp32): c0, c1 = (row g, cols 2t, 2t+1), c2, c3 = (row g+8, same).
// A dot product does not care which k sits in which slot, as long as A and B
// agree. So no re-layout of the canonical weights is needed: in one "step" of
// 128 codes, lane (g, t) loads codes [32t, 32t + 32) of rows g and g+8 straight
// from qdpo's row-major format (16 bytes of W4, 32 of W8, per row) and the 32
// matching activations of x row m = g; a chunk c (codes 8c .. 8c+7 of the lane)
// becomes 4 register pairs P_i = (code i, code i + 4), i = 0..3, and k-tile
// j = 2c + h of the step uses pairs 2h and 2h + 1. Lanes with the same t use the
// same map, so A's slot s and B's slot s always hold the same k.
#pragma once

#include "qdpo_math.cuh"

namespace qdpo {
namespace gemv {

constexpr int kStepK = 128;  // codes per row per warp step: 4 lanes (t) × 32
constexpr int kLaneK = 32;   // consecutive codes of one row a lane loads per step
constexpr int kChunks = 4;   // chunks of 8 codes in a lane's 32
constexpr uint32_t kF16Bias = 0x6400u;   // fp16 1024.0: 1024 + q is exact for q < 1024
constexpr uint32_t kBF16Bias = 0x4300u;  // bf16 128.0: 128 + q is exact for q < 128 (W4 only)
constexpr uint32_t kF32Bias = 0x4B000000u;  // fp32 2^23: 2^23 + q is exact for q < 2^23

// First code of lane t's 32 in step `step`.
QDPO_HD int lane_k(int step, int t) { return step * kStepK + kLaneK * t; }

// Output coordinates of accumulator register i of lane (g, t) within a 16 × 8 tile.
QDPO_HD int c_row(int g, int i) { return g + 8 * (i >> 1); }
QDPO_HD int c_col(int t, int i) { return 2 * t + (i & 1); }

// W4: codes i and i + 4 of a little-endian word (nibble j = code j) as a
// 16-bit pair biased by `bias` (fp16 or bf16): one LOP3 on the device.
QDPO_HD uint32_t w4_pair_biased(uint32_t word, int i, uint32_t bias) {
#if defined(__CUDA_ARCH__)
  uint32_t r;  // (word >> 4i) & 0x000F000F | bias2 in one LOP3 (C++ gives AND + OR: two immediates)
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(word >> (4 * i)), "n"(0x000F000F), "r"(bias * 0x00010001u));
  return r;
#else
  return ((word >> (4 * i)) & 0x000F000Fu) | (bias * 0x00010001u);
#endif
}

// PRMT (__byte_perm): byte n of the result is byte s[4n+2 : 4n] of {y, x} (x: bytes 0-3, y: 4-7);
// selectors with bit 3 set (sign replication) are not used here. The host computes the same, so
// the host tests check every selector the kernels use.
QDPO_HD uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t s) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(x, y, s);
#else
  const uint64_t v = (static_cast<uint64_t>(y) << 32) | x;
  uint32_t r = 0;
  for (int n = 0; n < 4; ++n) r |= static_cast<uint32_t>((v >> (8 * ((s >> (4 * n)) & 7u))) & 0xFFu) << (8 * n);
  return r;
#endif
}

// W8: code i of a little-endian word as fp32 2^23 + q: byte i of the word under the bytes 0x4B, 0,
// 0 of 2^23 (one PRMT on the device, where a shift and a mask took two).
QDPO_HD float w8_biased(uint32_t word, int i) {
  return bits_float(byte_perm(word, kF32Bias, 0x7540u | static_cast<uint32_t>(i)));
}

// W8 with fp16 x: codes i of words lo and hi as the fp16 pair (1024 + q_lo, 1024 + q_hi), exact for
// q < 1024: one PRMT (byte i of each word into the low byte of each half) and one LOP3 (the bias
// 0x64 above each), where the fp32 route takes two PRMT, two FADD and a pack. The pair then goes
// the way of a W4 pair (w4_dequant_pair, w4_centered_pair: zb2 = 1024 + z).
QDPO_HD uint32_t w8_pair_f16(uint32_t lo, uint32_t hi, int i) {
  const uint32_t t = byte_perm(lo, hi, 0x4400u + 0x1111u * static_cast<uint32_t>(i));  // bytes i, i, 4+i, 4+i
  return (t & 0x00FF00FFu) | (kF16Bias * 0x00010001u);
}

// Activation pair P_i = (x_i, x_{i+4}) from 8 consecutive 16-bit values in words
// xw[0..3] (x_0 in the low half of xw[0]): low halves for even i, high for odd.
QDPO_HD uint32_t x_pair(uint32_t lo_word, uint32_t hi_word, int odd) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(lo_word, hi_word, odd ? 0x7632 : 0x5410);  // one PRMT
#else
  return odd ? (lo_word >> 16) | (hi_word & 0xFFFF0000u) : (lo_word & 0xFFFFu) | (hi_word << 16);
#endif
}
QDPO_HD void x_pairs(const uint32_t xw[4], uint32_t p[4]) {
  QDPO_UNROLL
  for (int i = 0; i < 4; ++i) p[i] = x_pair(xw[i >> 1], xw[(i >> 1) + 2], i & 1);
}

// A registers of k-tile half h (0: pairs 0, 1; 1: pairs 2, 3) from the pairs of
// rows g (pg) and g + 8 (pg8) of one chunk; B registers from the x pairs.
QDPO_HD void a_frag(const uint32_t pg[4], const uint32_t pg8[4], int h, uint32_t a[4]) {
  a[0] = pg[2 * h];
  a[1] = pg8[2 * h];
  a[2] = pg[2 * h + 1];
  a[3] = pg8[2 * h + 1];
}
QDPO_HD void b_frag(const uint32_t px[4], int h, uint32_t b[2]) {
  b[0] = px[2 * h];
  b[1] = px[2 * h + 1];
}

// x in shared memory (the kernel's x_smem variant, M <= 2): a block copies its rows of x over its K
// range once, each 8 consecutive activations stored as their pairs P_0..P_3 (x_pairs), so a lane reads
// a chunk's B registers with one 16-byte load and no PRMT. After every 128 bytes (64 activations)
// come 16 bytes of padding, and rows start 32 bytes past a multiple of 128: the 4 (M = 1) or 8
// (M = 2) lanes of one load then read distinct banks.
QDPO_HD constexpr int xs_row_bytes(int krange) { return (krange / 64 * 144 + 127) / 128 * 128 + 32; }
QDPO_HD int xs_bytes(int m, int krange) { return m * xs_row_bytes(krange); }
// Byte offset in a row of the 8 activations from k_rel (a multiple of 8) of the block's range.
QDPO_HD int xs_offset(int k_rel) {
  const unsigned u = static_cast<unsigned>(k_rel);  // >= 0: shifts and masks, no sign fix-ups
  return static_cast<int>(u / 64 * 144 + u % 64 * 2);
}
// The same for lane t's chunk 0 at step step_rel of the range: chunk c is 16·c further, since
// 32·(t % 2) + 8·c < 64.
QDPO_HD int xs_lane_offset(int step_rel, int t) { return (2 * step_rel + (t >> 1)) * 144 + (t & 1) * 64; }

// shared_x (the kernel whose warps each own 16 rows, M <= 16): the block stages x of every row kSxSteps
// steps at a time in the same pair layout, rows kSxRowBytes apart. Each thread copies 16-byte pieces:
// piece p is row p / 64, activations from 8 · (p % 64) of the chunk.
constexpr int kSxSteps = 4;
constexpr int kSxPiecesPerRow = kSxSteps * kStepK / 8;
constexpr int kSxRowBytes = xs_row_bytes(kSxSteps * kStepK);
QDPO_HD int sx_piece_row(int p) { return p / kSxPiecesPerRow; }
QDPO_HD int sx_piece_k(int p) { return p % kSxPiecesPerRow * 8; }

// One weight row's grid for one step, in the activation's 16-bit type `hdtype`:
// s2 = (s, s), zb2 = (bias + z, bias + z) and nzb2 = its negation for W4, zf = 2^23 + z for W8, and
// s in fp32 (sf) for the scale-after and zero-after variants.
struct RowGrid {
  uint32_t s2;
  uint32_t zb2;
  uint32_t nzb2;
  float zf;
  float sf;
};

QDPO_HD uint16_t to_h_bits(float v, int hdtype) { return hdtype == kF16 ? f32_to_f16_bits(v) : f32_to_bf16_bits(v); }
QDPO_HD float from_h_bits(uint32_t b, int hdtype) {
  return hdtype == kF16 ? f16_bits_to_f32(static_cast<uint16_t>(b)) : bf16_bits_to_f32(static_cast<uint16_t>(b));
}
QDPO_HD uint32_t h_bias(int hdtype) { return hdtype == kF16 ? kF16Bias : kBF16Bias; }

// From the scale's 16-bit pattern (the kernel reads scales in x.dtype) and the
// zero point: bias + z is an integer add on the bits (unit steps: z < 1024 for
// fp16, z < 128 for bf16, so W4's z < 16 is exact in both). A row that is out
// of range gets s = 0, z = 0: every ŵ of it is then exactly 0.
QDPO_HD RowGrid row_grid_bits(uint32_t s_bits, uint32_t z, int hdtype) {
  return {s_bits * 0x00010001u, (h_bias(hdtype) + z) * 0x00010001u, ((h_bias(hdtype) + z) | 0x8000u) * 0x00010001u,
          8388608.f + static_cast<float>(z), from_h_bits(s_bits & 0xFFFFu, hdtype)};
}
QDPO_HD RowGrid row_grid(float s, float z, int hdtype) {
  return row_grid_bits(to_h_bits(s, hdtype), static_cast<uint32_t>(z), hdtype);
}

#if defined(__CUDA_ARCH__)
template <typename H2>
__device__ __forceinline__ H2 as_h2(uint32_t u) {
  H2 h;
  memcpy(&h, &u, 4);
  return h;
}
template <typename H2>
__device__ __forceinline__ uint32_t h2_bits(H2 h) {
  uint32_t u;
  memcpy(&u, &h, 4);
  return u;
}
#endif

// ŵ of one 16-bit pair: round_H((v - zb) · s) per half; v - zb is an exact small
// integer, so the product is rounded once, as reference.dequantize(..., H) does.
QDPO_HD uint32_t w4_dequant_pair(uint32_t v, const RowGrid& r, int hdtype) {
#if defined(__CUDA_ARCH__)
  if (hdtype == kF16) {
    return h2_bits(__hmul2(__hsub2(as_h2<__half2>(v), as_h2<__half2>(r.zb2)), as_h2<__half2>(r.s2)));
  }
  return h2_bits(__hmul2(__hsub2(as_h2<__nv_bfloat162>(v), as_h2<__nv_bfloat162>(r.zb2)),
                         as_h2<__nv_bfloat162>(r.s2)));
#else
  const float s = from_h_bits(r.s2 & 0xFFFFu, hdtype), zb = from_h_bits(r.zb2 & 0xFFFFu, hdtype);
  const float lo = (from_h_bits(v & 0xFFFFu, hdtype) - zb) * s;
  const float hi = (from_h_bits(v >> 16, hdtype) - zb) * s;
  return to_h_bits(lo, hdtype) | (static_cast<uint32_t>(to_h_bits(hi, hdtype)) << 16);
#endif
}

// W8 pair from fp32 (2^23 + q): (q - z) is exact in fp32 and in both 16-bit
// types (|q - z| <= 255 needs 8 significant bits), then one rounded product.
QDPO_HD uint32_t w8_dequant_pair(float lo_biased, float hi_biased, const RowGrid& r, int hdtype) {
  const float lo = lo_biased - r.zf, hi = hi_biased - r.zf;
#if defined(__CUDA_ARCH__)
  if (hdtype == kF16) return h2_bits(__hmul2(__floats2half2_rn(lo, hi), as_h2<__half2>(r.s2)));
  return h2_bits(__hmul2(__floats2bfloat162_rn(lo, hi), as_h2<__nv_bfloat162>(r.s2)));
#else
  const float s = from_h_bits(r.s2 & 0xFFFFu, hdtype);
  return to_h_bits(lo * s, hdtype) | (static_cast<uint32_t>(to_h_bits(hi * s, hdtype)) << 16);
#endif
}

// Scale-after variant (G a multiple of the 128-code step, or one group per row): the mma takes
// the exact integers q - z, and the step's fp32 sums are multiplied by s (RowGrid::sf) after it, so
// a pair costs no HMUL2. W4: (v - zb) per half, one HSUB2; W8: (q - z) from fp32, exact in both
// 16-bit types. y is then Σ_groups s · Σ_k (q - z) · x in fp32: ŵ is never rounded to x.dtype,
// which keeps it closer to the exact product than the reference's own x.dtype result.
QDPO_HD uint32_t w4_centered_pair(uint32_t v, const RowGrid& r, int hdtype) {
#if defined(__CUDA_ARCH__)
  if (hdtype == kF16) return h2_bits(__hsub2(as_h2<__half2>(v), as_h2<__half2>(r.zb2)));
  return h2_bits(__hsub2(as_h2<__nv_bfloat162>(v), as_h2<__nv_bfloat162>(r.zb2)));
#else
  const float zb = from_h_bits(r.zb2 & 0xFFFFu, hdtype);
  return to_h_bits(from_h_bits(v & 0xFFFFu, hdtype) - zb, hdtype) |
         (static_cast<uint32_t>(to_h_bits(from_h_bits(v >> 16, hdtype) - zb, hdtype)) << 16);
#endif
}
QDPO_HD uint32_t w8_centered_pair(float lo_biased, float hi_biased, const RowGrid& r, int hdtype) {
  const float lo = lo_biased - r.zf, hi = hi_biased - r.zf;
#if defined(__CUDA_ARCH__)
  if (hdtype == kF16) return h2_bits(__floats2half2_rn(lo, hi));
  return h2_bits(__floats2bfloat162_rn(lo, hi));
#else
  return to_h_bits(lo, hdtype) | (static_cast<uint32_t>(to_h_bits(hi, hdtype)) << 16);
#endif
}

// Where the GEMV applies the grid (s, z): in ŵ (kScaleInW), on each step's fp32 sums (kScaleAfter:
// the mma takes q - z), or both (kZeroAfter, W4: the mma takes the biased codes bias + q as they
// are, and a second mma per k-tile adds -(bias + z) times the same x: zero_frag).
enum ScaleMode : int { kScaleInW = 0, kScaleAfter = 1, kZeroAfter = 2 };

// The 4 ŵ pairs of chunk c (codes 8c .. 8c+7 of a lane's 32): `words` is the
// lane's row data (4 words of W4, 8 words of W8); SC: what they hold (ScaleMode).
template <int BITS, int SC = kScaleInW>
QDPO_HD void dequant_chunk(const uint32_t* words, int c, const RowGrid& r, int hdtype, uint32_t p[4]) {
  static_assert(SC != kZeroAfter || BITS == 4, "zero-after serves W4");
  if (BITS == 4) {
    const uint32_t bias = h_bias(hdtype);
    QDPO_UNROLL
    for (int i = 0; i < 4; ++i) {
      const uint32_t v = w4_pair_biased(words[c], i, bias);
      p[i] = SC == kZeroAfter ? v : SC == kScaleAfter ? w4_centered_pair(v, r, hdtype) : w4_dequant_pair(v, r, hdtype);
    }
  } else if (hdtype == kF16) {
    QDPO_UNROLL
    for (int i = 0; i < 4; ++i) {
      const uint32_t v = w8_pair_f16(words[2 * c], words[2 * c + 1], i);
      p[i] = SC == kScaleAfter ? w4_centered_pair(v, r, hdtype) : w4_dequant_pair(v, r, hdtype);
    }
  } else {
    QDPO_UNROLL
    for (int i = 0; i < 4; ++i) {
      const float lo = w8_biased(words[2 * c], i), hi = w8_biased(words[2 * c + 1], i);
      p[i] = SC == kScaleAfter ? w8_centered_pair(lo, hi, r, hdtype) : w8_dequant_pair(lo, hi, r, hdtype);
    }
  }
}

// Zero-after: the A fragment whose every slot holds -(bias + z) of its row (g: a0, a2; g + 8: a1,
// a3). The step's zero point is one per row (scale-after: the step lies in one group), so one
// fragment serves the step's 8 k-tiles: mma(a_frag) then mma(zero_frag) on the same x add
// Σ (bias + q - bias - z) · x = Σ (q - z) · x, the two fp32 sums cancelling within each k-tile.
QDPO_HD void zero_frag(const RowGrid& g, const RowGrid& g8, uint32_t a[4]) {
  a[0] = g.nzb2;
  a[1] = g8.nzb2;
  a[2] = g.nzb2;
  a[3] = g8.nzb2;
}

}  // namespace gemv
}  // namespace qdpo
