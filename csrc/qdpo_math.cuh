// qdpo_math.cuh — the quantization math shared by every CUDA kernel and by the
// host-side test module: round half to even, clamp, nibble pack/unpack, float
// ↔ fp16/bf16 rounding, the per-group scale rule and the LSQ term.
// Everything is __host__ __device__ so the CPU test suite can check it
// bit-exactly against qdpo/kernels/reference.py without a GPU.
//
// Spec: qdpo/kernels/reference.py. All arithmetic is fp32, `round` is
// torch.round (half to even, rintf), division is the IEEE `w / s` (nvcc's
// default -prec-div=true; never build with --use_fast_math), and a value is
// rounded to fp16/bf16 once, to nearest even, as Tensor.to does.
#pragma once

#include <cstdint>
#include <cmath>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define QDPO_HD __host__ __device__ __forceinline__
#define QDPO_UNROLL _Pragma("unroll")
#else
#define QDPO_HD inline
#define QDPO_UNROLL
#endif

namespace qdpo {

// Float dtype codes shared with Python (qdpo/kernels/cuda.py DTYPE_CODES).
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

QDPO_HD bool valid_dtype(int dtype) { return dtype == kF32 || dtype == kF16 || dtype == kBF16; }
QDPO_HD int dtype_size(int dtype) { return dtype == kF32 ? 4 : 2; }

// Division by a run-time constant d >= 1 (a group size) without a divide instruction: for
// 0 <= n < 2^31, n / d = (n · m) >> p with p = 31 + ceil(log2 d), m = ceil(2^p / d) < 2^32. With
// m·d = 2^p + e, 0 <= e < d <= 2^(p - 31): n·m / 2^p = n / d + n·e / (d·2^p), and n·e < 2^p keeps the
// second term below 1/d, so the floor is that of n / d. On the device: one IMAD.WIDE.U32 and a shift.
struct DivMagic {
  uint32_t m;
  int p;
};
QDPO_HD DivMagic div_magic(uint32_t d) {
  int l = 0;
  while ((uint64_t{1} << l) < d) ++l;
  const uint64_t two_p = uint64_t{1} << (31 + l);
  return {static_cast<uint32_t>((two_p + d - 1) / d), 31 + l};
}
QDPO_HD int div_by(int n, DivMagic d) {
  return static_cast<int>((static_cast<uint64_t>(static_cast<uint32_t>(n)) * d.m) >> d.p);
}

// ------------------------------------------------------------------ teams (qdpo_device.cuh)
constexpr int kTeamBlock = 256;  // threads per block when teams are sub-warp

// A team kernel's group rows and team size, made on the host (team_shape): a thread finds its group
// row, weight row and group with shifts and one multiply, no division (check_grid: N · NG < 2^31).
struct TeamGrid {
  int rows;         // N · NG group rows
  int ng;           // groups per weight row
  DivMagic ng_div;  // r / ng (div_by)
  int team;         // threads per group row, a power of two
  int team_log2;
};

struct Team {
  int r;       // group row: n * ng + grp (0 where not valid)
  int n, grp;  // weight row and group of r
  int lane;    // thread within the team
  bool valid;  // r < N * ng
};

// Thread `tid` of block `block` (of block_dim threads).
QDPO_HD Team team_of(const TeamGrid& t, unsigned block, unsigned block_dim, unsigned tid) {
  const int64_t r = static_cast<int64_t>(block) * (block_dim >> t.team_log2) + (tid >> t.team_log2);
  const bool valid = r < t.rows;
  const int rv = valid ? static_cast<int>(r) : 0, n = div_by(rv, t.ng_div);
  return {rv, n, rv - n * t.ng, static_cast<int>(tid) & (t.team - 1), valid};
}

// Launch shape of a team kernel over the n · ng group rows of `chunks` chunks each (check_grid first).
struct TeamShape {
  TeamGrid tg;
  int block;
  int64_t grid;
};

inline TeamShape team_shape(int64_t n, int64_t ng, int64_t chunks) {
  int team = 1, log2 = 0;
  while (team < chunks && team < kTeamBlock) team *= 2, ++log2;
  const int block = team > 32 ? team : kTeamBlock;
  const int64_t per_block = block / team, rows = n * ng;
  const TeamGrid tg{static_cast<int>(rows), static_cast<int>(ng), div_magic(static_cast<uint32_t>(ng)), team, log2};
  return {tg, block, (rows + per_block - 1) / per_block};
}

// Lanes a team needs for `chunks` chunks when each lane takes two per pass (chunk_pairs in
// qdpo_device.cuh: dequantize and fake_quant; team_shape rounds up to a power of two).
inline int64_t pair_lanes(int64_t chunks) { return (chunks + 1) / 2; }

// torch.round semantics: ties to even (rintf uses the default FE_TONEAREST mode).
QDPO_HD float round_half_even(float x) { return rintf(x); }

QDPO_HD float clampf(float x, float lo, float hi) { return fminf(fmaxf(x, lo), hi); }

QDPO_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
#endif
}

QDPO_HD float bits_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float x;
  std::memcpy(&x, &b, 4);
  return x;
#endif
}

// fp32 → fp16 bits, round to nearest even with subnormals and overflow to inf
// (the device uses the cvt.rn instruction; the host path is the same IEEE rule).
QDPO_HD uint16_t f32_to_f16_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(x));
#else
  const uint32_t f = float_bits(x);
  const uint32_t sign = (f >> 16) & 0x8000u;
  const uint32_t a = f & 0x7FFFFFFFu;
  if (a >= 0x7F800000u) return static_cast<uint16_t>(sign | (a > 0x7F800000u ? 0x7E00u : 0x7C00u));
  if (a >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 rounds to inf
  if (a < 0x38800000u) {  // below 2^-14: a multiple of 2^-24 (exact scaling, RNE by rintf)
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(rintf(fabsf(x) * 16777216.f)));
  }
  uint32_t h = (((a >> 23) - 112u) << 10) | ((a >> 13) & 0x3FFu);  // rebias 127 → 15
  const uint32_t rem = a & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h += 1;  // a carry rolls into the exponent
  return static_cast<uint16_t>(sign | h);
#endif
}

QDPO_HD float f16_bits_to_f32(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0) {  // zero or subnormal: m · 2^-24 is exact in fp32
    const float v = static_cast<float>(m) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  if (e == 31) return bits_float(sign | 0x7F800000u | (m << 13));
  return bits_float(sign | ((e + 112u) << 23) | (m << 13));
#endif
}

// fp32 → bf16 bits, round to nearest even (NaN stays a quiet NaN).
QDPO_HD uint16_t f32_to_bf16_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
#else
  const uint32_t f = float_bits(x);
  if ((f & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((f >> 16) | 0x40u);
  return static_cast<uint16_t>((f + 0x7FFFu + ((f >> 16) & 1u)) >> 16);
#endif
}

QDPO_HD float bf16_bits_to_f32(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// x rounded to `dtype` (nearest even) and back to fp32: the value a store would keep.
QDPO_HD float round_to_dtype(float x, int dtype) {
  if (dtype == kF16) return f16_bits_to_f32(f32_to_f16_bits(x));
  if (dtype == kBF16) return bf16_bits_to_f32(f32_to_bf16_bits(x));
  return x;
}

// reference.to_scale_dtype for a positive scale: the nearest `dtype` value, or
// the next one above when that fell below s (a scale rounded down would clip
// the group's extreme weight). Overflow gives +inf, as torch.nextafter does.
QDPO_HD float cast_up(float s, int dtype) {
  if (dtype == kF16) {
    uint16_t h = f32_to_f16_bits(s);
    if (f16_bits_to_f32(h) < s) h = static_cast<uint16_t>(h + 1);  // next positive fp16 value
    return f16_bits_to_f32(h);
  }
  if (dtype == kBF16) {
    uint16_t h = f32_to_bf16_bits(s);
    if (bf16_bits_to_f32(h) < s) h = static_cast<uint16_t>(h + 1);
    return bf16_bits_to_f32(h);
  }
  return s;
}

// torch.finfo(dtype).tiny: the scale of a zero-range group (never 0, never NaN).
QDPO_HD float tiny_of(int dtype) { return dtype == kF16 ? 6.103515625e-05f : 1.17549435082228750797e-38f; }

struct GroupParams {
  float s;  // scale, exactly representable in the scale dtype
  float z;  // zero point, an integer in [0, 2^bits - 1]
};

// reference.qparams for one group from its fp32 min and max (any order of
// reduction gives the same min/max). `dtype` is the scale dtype (= w.dtype).
QDPO_HD GroupParams group_qparams(float wmin, float wmax, int bits, bool symmetric, int dtype) {
  const float lo = fminf(wmin, 0.f), hi = fmaxf(wmax, 0.f);  // the range always contains 0
  const float tiny = tiny_of(dtype);
  if (symmetric) {
    const int half = 1 << (bits - 1);
    const float s = cast_up(fmaxf(fmaxf(-lo, hi) / static_cast<float>(half - 1), tiny), dtype);
    return {s, static_cast<float>(half)};
  }
  const float qmax = static_cast<float>((1 << bits) - 1);
  const float s = cast_up(fmaxf((hi - lo) / qmax, tiny), dtype);
  return {s, clampf(round_half_even(-lo / s), 0.f, qmax)};
}

// Code of w on the grid (s, z): clamp(round(w / s) + z, 0, qmax). True division, as the reference.
// The code of the quotient x = w / s: clamp(round(x) + z, 0, qmax).
QDPO_HD uint8_t quantize_x(float x, float z, int bits) {
  const float qmax = static_cast<float>((1 << bits) - 1);
  return static_cast<uint8_t>(clampf(round_half_even(x) + z, 0.f, qmax));
}
QDPO_HD uint8_t quantize_one(float w, float s, float z, int bits) { return quantize_x(w / s, z, bits); }

// w / s for the many w of one group, without a division per element: r = 1 / s once (IEEE), then
// q0 = w·r and one correction, q1 = q0 + r·(w - q0·s) (two FMAs): while w - q0·s is exact, q1 is
// the correctly rounded quotient (Markstein's theorem: r within half an ulp of 1/s). `fast` holds
// the scales for which that covers every quotient that matters: with 2^-100 <= |s| <= 2^100,
// w - q0·s is a multiple of 2^-149 (so exact) unless |w / s| < 1/8, where any quotient within an
// ulp rounds to the same integer, 0; and past 2^24, where q0 may overflow, q0 is used as it is: it
// may differ from w / s there, but any code past 2^24 clamps to the same end of the grid. So the
// codes, ŵ and the straight-through mask equal those of true division (tests/test_cuda_host.py
// checks this against IEEE division on near-ties, tiny and huge quotients; it assumes the IEEE
// division and reciprocal of nvcc's default -prec-div=true, never --use_fast_math). The LSQ term,
// which uses the quotient itself, keeps the true division.
struct Recip {
  float s, r;
  bool fast;
};
QDPO_HD Recip recip_of(float s) {
  const float a = fabsf(s);
  return {s, 1.f / s, a >= 0x1p-100f && a <= 0x1p100f};
}
QDPO_HD float quotient(float w, const Recip& d) {
  const float q0 = w * d.r;
  const float q1 = fmaf(fmaf(-q0, d.s, w), d.r, q0);
  return fabsf(q0) < 0x1p24f ? q1 : q0;
}
// The same for a quotient that is only compared with the grid (the straight-through mask): the
// corrected value even past 2^24, one compare and one select fewer per element. There it is a few
// ulps from q0 (the correction is finite: w - q0·s is small beside w), or NaN where q0 overflowed;
// either way outside [-z, qmax - z], as the true quotient is, and NaN fails both of the mask's
// comparisons.
QDPO_HD float quotient_for_mask(float w, const Recip& d) {
  const float q0 = w * d.r;
  return fmaf(fmaf(-q0, d.s, w), d.r, q0);
}

// ŵ = (q - z) · s in fp32. q becomes fp32 through the bits of 2^23 + q (one OR, where an integer
// conversion is a quarter-rate instruction on the device): (2^23 + q) - (2^23 + z) = q - z exactly.
QDPO_HD float dequantize_one(uint8_t q, float s, float z) {
  return (bits_float(0x4B000000u | q) - (8388608.f + z)) * s;
}

// ŵ of the eight W4 codes of one little-endian word (code j in bits 4j..4j+3), each code masked where
// it lies instead of shifted down: code j of a half-word h (the word, then the word >> 16) is
// 2^23 + q · 16^j under the bits of 2^23 (one LOP3: AND with its mask, OR with the bias), and
// (2^23 + q · 16^j) - (2^23 + z · 16^j) = 16^j (q - z) exactly (integers below 2^24); times
// s_j = s · 16^-j that is (q - z) · s, the same real product, so the same rounded fp32 ŵ as
// dequantize_one, bit for bit, while s_j is exact: |s| >= 2^-114 (s_3 a normal number), or s = 0.
// Per code: a LOP3, an FADD and an FMUL, where the shifted route takes a shift or mask more.
struct W4Words {
  float s[4], zb[4];  // s · 16^-j and 2^23 + z · 16^j
};
QDPO_HD bool w4_words_exact(float s) { return fabsf(s) >= 0x1p-114f || s == 0.f; }
QDPO_HD W4Words w4_words(float s, float z) {
  W4Words g;
  for (int j = 0; j < 4; ++j) {
    const float p = static_cast<float>(1 << (4 * j));
    g.s[j] = s * (1.f / p), g.zb[j] = 8388608.f + z * p;  // exact: powers of two, z · 16^j < 2^20
  }
  return g;
}
template <int J>
QDPO_HD uint32_t w4_in_place(uint32_t half) {
#if defined(__CUDA_ARCH__)
  uint32_t r;  // (half & mask) | 2^23 in one LOP3 (C++ gives an AND and an OR: two immediates)
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(half), "n"(0xF << (4 * J)), "r"(0x4B000000u));
  return r;
#else
  return (half & (0xFu << (4 * J))) | 0x4B000000u;
#endif
}
template <int J>
QDPO_HD float w4_code_in_place(uint32_t half, const W4Words& g) {
  return (bits_float(w4_in_place<J>(half)) - g.zb[J]) * g.s[J];
}
QDPO_HD void dequantize_word(uint32_t w, const W4Words& g, float (&v)[8]) {
  const uint32_t hi = w >> 16;
  v[0] = w4_code_in_place<0>(w, g), v[1] = w4_code_in_place<1>(w, g);
  v[2] = w4_code_in_place<2>(w, g), v[3] = w4_code_in_place<3>(w, g);
  v[4] = w4_code_in_place<0>(hi, g), v[5] = w4_code_in_place<1>(hi, g);
  v[6] = w4_code_in_place<2>(hi, g), v[7] = w4_code_in_place<3>(hi, g);
}

// ŵ of the quotient x = w / s on the grid: (clamp(round(x) + z, 0, qmax) - z) · s, computed as
// (clamp(round(x), -z, qmax - z) + 0) · s, one addition fewer: round(x) + z is exact below 2^24, and
// past it both forms clamp to the same end; "+ 0" turns a zero of either sign into +0, as q - z gives
// it, so even a zero ŵ carries the same sign (that of s) bit for bit.
QDPO_HD float fake_quant_x(float x, float s, float z, int bits) {
  const float qmax = static_cast<float>((1 << bits) - 1);
  return (clampf(round_half_even(x), -z, qmax - z) + 0.f) * s;
}

// ŵ of w on the grid without storing the code: (clamp(round(w / s) + z) - z) · s.
QDPO_HD float fake_quant_one(float w, float s, float z, int bits) { return fake_quant_x(w / s, s, z, bits); }

// The same with the group's reciprocal, for a positive scale (d.fast and s > 0): equal to
// fake_quant_one bit for bit, with one instruction fewer per element. For s > 0, c · s + 0 (one FMA)
// equals (c + 0) · s: both round the same nonzero product once, and a zero c of either sign gives
// +0, as (+0) · s does. (A negative scale would want -0 there: fake_quant_thread takes the division.)
QDPO_HD float fake_quant_recip(float w, const Recip& d, float z, int bits) {
  const float qmax = static_cast<float>((1 << bits) - 1);
  return fmaf(clampf(round_half_even(quotient(w, d)), -z, qmax - z), d.s, 0.f);
}
// The code with the group's reciprocal (d.fast): equal to quantize_one.
QDPO_HD uint8_t quantize_recip(float w, const Recip& d, float z, int bits) { return quantize_x(quotient(w, d), z, bits); }

// One element's straight-through terms on the grid (s, z), from u = round(w / s) + z:
// `inside` (the mask: 0 <= u <= qmax) and the LSQ factor ∂ŵ/∂s, which is
// round(w/s) - w/s inside the grid and clamp(u, 0, qmax) - z where clipped.
struct SteTerms {
  bool inside;
  float lsq;
};

// Whether u = round(w / s) + z lies on the grid [0, qmax]: the straight-through mask.
QDPO_HD bool on_grid(float u, int bits) { return u >= 0.f && u <= static_cast<float>((1 << bits) - 1); }

QDPO_HD SteTerms ste_terms(float w, float s, float z, int bits) {
  const float qmax = static_cast<float>((1 << bits) - 1);
  const float x = w / s;
  const float r = round_half_even(x);
  const float u = r + z;
  const bool inside = on_grid(u, bits);
  return {inside, inside ? r - x : clampf(u, 0.f, qmax) - z};
}

// Straight-through mask: 1 where round(w / s) + z was inside [0, qmax].
QDPO_HD bool ste_pass(float w, float s, float z, int bits) { return ste_terms(w, s, z, bits).inside; }

// The mask from the group's reciprocal (d.fast): equal to ste_pass.
QDPO_HD bool ste_pass_recip(float w, const Recip& d, float z, int bits) {
  const float r = round_half_even(quotient_for_mask(w, d));  // 0 <= r + z <= qmax, one addition fewer
  return r >= -z && r <= static_cast<float>((1 << bits) - 1) - z;
}

// LSQ factor of one element (see ste_terms).
QDPO_HD float lsq_term(float w, float s, float z, int bits) { return ste_terms(w, s, z, bits).lsq; }

// Canonical 4-bit packing: code k = 2j in the low nibble of byte j, k = 2j + 1 in the high one.
QDPO_HD uint8_t pack_nibbles(uint8_t even, uint8_t odd) {
  return static_cast<uint8_t>((even & 0xF) | ((odd & 0xF) << 4));
}
QDPO_HD uint8_t unpack_nibble(uint8_t byte, int k) { return (k & 1) ? (byte >> 4) : (byte & 0xF); }

}  // namespace qdpo
