// elementwise.cuh — the threads and launch plans of the element-wise team kernels: quantize
// (quantize.cu), dequantize (dequantize.cu) and fake_quant forward and backward (fake_quant.cu).
// Shared by those kernels and by their host emulation (team_emulate.cpp), which runs every thread
// of a launch on the CPU: the CPU test suite then checks, against reference.py, what a unit test of
// the math alone cannot — the launchers' checks, chunk widths and team sizes (plan), the thread map
// (team_of), the chunk loops, the addresses, and the loads and stores of every dtype. A kernel's
// team sum (team_allreduce) splits its thread in two phases: the part before it returns the lane's
// value, the part after takes the team's. Only the hardware's own semantics are assumed: the
// kernels' 16-byte vector accesses are plain copies on the host, and the team sums are emulated in
// team_allreduce's shuffle order.
//
// A plan checks its arguments (a Status code on failure: nothing launched), picks the chunk width
// and the team shape, fills the kernel's arguments and calls launch(Int<BITS>, Int<VEC>, shape,
// args), which returns the launch status: `<<<shape.grid, shape.block>>>` in the .cu files, every
// thread in turn on the host.
#pragma once

#include "gemv_fragments.cuh"  // w8_biased
#include "qdpo_device.cuh"

namespace qdpo {

// ------------------------------------------------------------------ quantize
struct QuantizeArgs {
  const void* w;
  int w_dtype;
  int64_t stride_wn;  // elements
  TeamGrid tg;
  int g;              // group size G
  bool symmetric;
  uint8_t* q;         // (N, K·b/8) contiguous
  int64_t stride_qn;  // bytes
  void* s;            // (N, NG) contiguous
  int s_dtype;
  uint8_t* z;         // (N, NG) contiguous
};

// One team's codes of its group. RECIP: w / s through the group's reciprocal (qdpo_math.cuh:
// quotient; the same codes as true division, a multiply and two FMAs per element instead of one).
template <int BITS, int VEC, bool RECIP>
__device__ __forceinline__ void quantize_group(const QuantizeArgs& a, const Team& tm, int n, int grp,
                                               const Recip& d, float z) {
  uint8_t* qrow = a.q + n * a.stride_qn;
  for (int c = tm.lane; c < a.g / VEC; c += a.tg.team) {
    const int64_t k = grp * a.g + static_cast<int64_t>(c) * VEC;
    float v[VEC];
    uint8_t codes[VEC];
    load_vec<VEC>(a.w, a.w_dtype, n * a.stride_wn + k, v);
    QDPO_UNROLL
    for (int j = 0; j < VEC; ++j) codes[j] = RECIP ? quantize_recip(v[j], d, z, BITS) : quantize_one(v[j], d.s, z, BITS);
    store_codes<BITS, VEC>(qrow, k, codes);
  }
}

// The reducing modes' first phase: the min and max of the lane's chunks (0, 0 past the last group
// row; the range always contains 0, as group_qparams clamps it too).
struct Range {
  float lo, hi;
};
template <int VEC>
__device__ __forceinline__ Range quantize_range(const QuantizeArgs& a, const Team& tm) {
  const int64_t w0 = tm.n * a.stride_wn + tm.grp * a.g;  // first element of the group in w
  float lo = 0.f, hi = 0.f;
  for (int c = tm.lane; tm.valid && c < a.g / VEC; c += a.tg.team) {
    float v[VEC];
    load_vec<VEC>(a.w, a.w_dtype, w0 + static_cast<int64_t>(c) * VEC, v);
    QDPO_UNROLL
    for (int j = 0; j < VEC; ++j) lo = fminf(lo, v[j]), hi = fmaxf(hi, v[j]);
  }
  return {lo, hi};
}

// The rest of thread tm: the group's scale and zero point from the team's range (reducing modes: lane
// 0 stores them) or from memory (kQuantizeWith, range unused), then the lane's codes.
template <int BITS, int VEC, int MODE>
__device__ __forceinline__ void quantize_thread(const QuantizeArgs& a, const Team& tm, Range range) {
  float s = 1.f, z = 0.f;
  if (MODE == kQuantizeWith) {
    if (tm.valid) s = load1(a.s, a.s_dtype, tm.r), z = a.z[tm.r];
  } else {
    const GroupParams p = group_qparams(range.lo, range.hi, BITS, a.symmetric, a.w_dtype);
    s = p.s, z = p.z;
    if (tm.valid && tm.lane == 0) {
      store1(a.s, a.s_dtype, tm.r, s);  // exact: s is a w.dtype value
      a.z[tm.r] = static_cast<uint8_t>(z);
    }
  }
  if (MODE == kQParams || !tm.valid) return;
  const Recip d = recip_of(s);
  if (d.fast) {
    quantize_group<BITS, VEC, true>(a, tm, tm.n, tm.grp, d, z);
  } else {
    quantize_group<BITS, VEC, false>(a, tm, tm.n, tm.grp, d, z);
  }
}

template <typename Launch>
int quantize_plan(int mode, ptr_t w, int w_dtype, int64_t stride_wn, int64_t n, int64_t k, int64_t ng, int bits,
                  bool symmetric, ptr_t qweight, ptr_t scales, int s_dtype, ptr_t zeros, Launch&& launch) {
  if (int e = check_grid(n, k, ng, bits)) return e;
  QDPO_REQUIRE(mode == kQParams || mode == kQuantize || mode == kQuantizeWith, kErrMode);
  QDPO_REQUIRE(valid_dtype(w_dtype) && valid_dtype(s_dtype), kErrDtype);
  QDPO_REQUIRE(mode == kQuantizeWith || s_dtype == w_dtype, kErrDtype);  // scales are made in w.dtype
  QDPO_REQUIRE(w != 0 && scales != 0 && zeros != 0, kErrNull);
  QDPO_REQUIRE(mode == kQParams || qweight != 0, kErrNull);
  QDPO_REQUIRE(stride_wn >= k, kErrShape);
  QDPO_REQUIRE(aligned(w, dtype_size(w_dtype)) && aligned(scales, dtype_size(s_dtype)), kErrAlign);
  const int64_t g = k / ng;
  const bool vec8 = g % 8 == 0 && aligned(w, 16) && (stride_wn * dtype_size(w_dtype)) % 16 == 0 &&
                    (mode == kQParams || aligned(qweight, 8));
  return dispatch_bits_vec(bits, vec8, [&](auto b, auto v) {
    constexpr int BITS = decltype(b)::value, VEC = decltype(v)::value;
    const TeamShape sh = team_shape(n, ng, g / VEC);
    const QuantizeArgs a{reinterpret_cast<const void*>(w), w_dtype, stride_wn, sh.tg, static_cast<int>(g),
                         symmetric, reinterpret_cast<uint8_t*>(qweight), k * BITS / 8,
                         reinterpret_cast<void*>(scales), s_dtype, reinterpret_cast<uint8_t*>(zeros)};
    return launch(b, v, sh, a);
  });
}

// ------------------------------------------------------------------ dequantize
struct DequantizeArgs {
  const uint8_t* q;
  int64_t stride_qn;  // bytes
  TeamGrid tg;
  int g;
  const void* s;
  int s_dtype;
  const uint8_t* z;
  void* out;          // (N, K) contiguous
  int out_dtype;
  int64_t k;
};

// One chunk of VEC codes (8 or 16) as the words it was loaded in: BITS · VEC / 32 of them (W4: one
// or two; W8: two or four), one 4-, 8- or 16-byte load.
template <int BITS, int VEC>
struct CodeWords {
  static constexpr int kWords = BITS * VEC / 32;
  uint32_t w[kWords];
  __device__ __forceinline__ uint32_t code(int j) const {
    return (w[j * BITS / 32] >> (j * BITS % 32)) & ((1u << BITS) - 1);
  }
  __device__ __forceinline__ void load(const uint8_t* p) {
    if constexpr (kWords == 1) {
      w[0] = *reinterpret_cast<const uint32_t*>(p);
    } else if constexpr (kWords == 2) {
      const uint2 u = *reinterpret_cast<const uint2*>(p);
      w[0] = u.x, w[1] = u.y;
    } else {
      const uint4 u = *reinterpret_cast<const uint4*>(p);
      w[0] = u.x, w[1] = u.y, w[2] = u.z, w[3] = u.w;
    }
  }
};

// Thread tm (valid) of the dequantize kernel: its lane's chunks of the group row tm.r. Chunks of 8
// or 16 codes (VEC) turn into fp32 2^23 + q without shifting codes down, 8 at a time: W4 codes masked
// where they lie (qdpo_math.cuh: dequantize_word) wherever that is exact, W8 codes by one byte
// permute each (gemv_fragments.cuh: w8_biased); the other chunks code by code. Whole-word chunks
// load as the fake_quant ones do: the lane's first pair, then the zero point and scale, then the
// branch on the scale (chunk_pairs: FirstPair).
template <int BITS, int VEC>
__device__ __forceinline__ void dequantize_thread(const DequantizeArgs& a, const Team& tm) {
  const int n = tm.n, grp = tm.grp;
  const uint8_t* qrow = a.q + n * a.stride_qn;
  const int64_t first = static_cast<int64_t>(grp) * a.g;  // the group's first column
  const int64_t out0 = n * a.k + first;
  if constexpr (VEC >= 8) {
    const uint8_t* qg = qrow + first * BITS / 8;  // the group's codes
    const auto load = [&](int c) {
      CodeWords<BITS, VEC> q;
      q.load(qg + c * (VEC * BITS / 8));
      return q;
    };
    auto p = load_first_pair(tm.lane, a.g / VEC, a.tg.team, load);
    const float z = a.z[tm.r];
    const float s = load1(a.s, a.s_dtype, tm.r);
    constexpr int W = BITS / 4;  // words per 8 codes
    if (BITS == 8 || w4_words_exact(s)) {
      const W4Words g = w4_words(s, z);  // (W4)
      const float zb = 8388608.f + z;    // (W8)
      chunk_pairs(p, a.g / VEC, load, [&](int c, CodeWords<BITS, VEC>& q) {
        QDPO_UNROLL
        for (int h = 0; h < VEC / 8; ++h) {
          float v[8];
          if constexpr (BITS == 4) {
            dequantize_word(q.w[h], g, v);
          } else {
            QDPO_UNROLL
            for (int j = 0; j < 8; ++j) v[j] = (gemv::w8_biased(q.w[W * h + (j >> 2)], j & 3) - zb) * s;
          }
          store_vec<8>(a.out, a.out_dtype, out0 + static_cast<int64_t>(c) * VEC + 8 * h, v);
        }
      });
    } else {
      chunk_pairs(p, a.g / VEC, load, [&](int c, CodeWords<BITS, VEC>& q) {
        QDPO_UNROLL
        for (int h = 0; h < VEC / 8; ++h) {
          float v[8];
          QDPO_UNROLL
          for (int j = 0; j < 8; ++j) v[j] = dequantize_one(static_cast<uint8_t>(q.code(8 * h + j)), s, z);
          store_vec<8>(a.out, a.out_dtype, out0 + static_cast<int64_t>(c) * VEC + 8 * h, v);
        }
      });
    }
    return;
  }
  const float s = load1(a.s, a.s_dtype, tm.r), z = a.z[tm.r];
  struct Codes {
    uint8_t c[VEC];
  };
  chunk_pairs(
      tm.lane, a.g / VEC, a.tg.team,
      [&](int c) {
        Codes q;
        load_codes<BITS, VEC>(qrow, first + static_cast<int64_t>(c) * VEC, q.c);
        return q;
      },
      [&](int c, Codes& q) {
        float v[VEC];
        QDPO_UNROLL
        for (int j = 0; j < VEC; ++j) v[j] = dequantize_one(q.c[j], s, z);
        store_vec<VEC>(a.out, a.out_dtype, out0 + static_cast<int64_t>(c) * VEC, v);
      });
}

template <typename Launch>
int dequantize_plan(ptr_t qweight, int64_t stride_qn, int64_t n, int64_t k, int64_t ng, int bits, ptr_t scales,
                    int s_dtype, ptr_t zeros, ptr_t out, int out_dtype, int max_vec, Launch&& launch) {
  if (int e = check_grid(n, k, ng, bits)) return e;
  QDPO_REQUIRE(valid_dtype(s_dtype) && valid_dtype(out_dtype), kErrDtype);
  QDPO_REQUIRE(qweight != 0 && scales != 0 && zeros != 0 && out != 0, kErrNull);
  QDPO_REQUIRE(stride_qn >= k * bits / 8, kErrShape);
  QDPO_REQUIRE(aligned(scales, dtype_size(s_dtype)) && aligned(out, dtype_size(out_dtype)), kErrAlign);
  QDPO_REQUIRE(max_vec == 8 || max_vec == 16, kErrMode);
  const int64_t g = k / ng;
  // 8-code chunks: 4- or 8-byte code loads; 16-code ones: 8- or 16-byte (W8 rows then 16-byte aligned)
  const bool vec8 = g % 8 == 0 && aligned(qweight, 8) && stride_qn % 8 == 0 && aligned(out, 16);
  const int align16 = bits == 8 ? 16 : 8;
  const bool vec16 = max_vec == 16 && vec8 && g % 16 == 0 && aligned(qweight, align16) && stride_qn % align16 == 0;
  return dispatch_bits_vec16(bits, vec16 ? 16 : vec8 ? 8 : 1, [&](auto b, auto v) {
    constexpr int VEC = decltype(v)::value;
    const TeamShape sh = team_shape(n, ng, pair_lanes(g / VEC));
    const DequantizeArgs a{reinterpret_cast<const uint8_t*>(qweight), stride_qn, sh.tg, static_cast<int>(g),
                           reinterpret_cast<const void*>(scales), s_dtype,
                           reinterpret_cast<const uint8_t*>(zeros), reinterpret_cast<void*>(out), out_dtype, k};
    return launch(b, v, sh, a);
  });
}

// ------------------------------------------------------------------ fake_quant
struct FakeQuantArgs {
  const void* w;
  int w_dtype;
  int64_t stride_wn;  // elements
  TeamGrid tg;
  int g;
  const void* s;
  int s_dtype;
  const uint8_t* z;
  int64_t k;
  const void* grad;   // backward only, (N, K) contiguous
  int g_dtype;
  void* out;          // forward: ŵ in out_dtype; backward: grad_w in w_dtype
  int out_dtype;
  void* grad_s;       // backward with LSQ
};

// The rest of one team's group once the lane's first pair is loaded. RECIP: w / s through the
// group's reciprocal (qdpo_math.cuh: quotient, the same ŵ bit for bit, two FMAs and a multiply per
// element instead of a division).
template <int BITS, int VEC, bool RECIP, typename Load>
__device__ __forceinline__ void fake_quant_group(const FakeQuantArgs& a, int64_t out0,
                                                 FirstPair<RawChunk<VEC>>& p, Load load, const Recip& d, float z) {
  constexpr int P = kPart<VEC>;
  chunk_pairs(p, a.g / VEC, load, [&](int c, RawChunk<VEC>& r) {
    QDPO_UNROLL
    for (int h = 0; h < VEC / P; ++h) {
      float v[P];
      unpack_part<VEC>(a.w_dtype, r, h, v);
      QDPO_UNROLL
      for (int j = 0; j < P; ++j) {
        v[j] = RECIP ? fake_quant_recip(v[j], d, z, BITS) : fake_quant_one(v[j], d.s, z, BITS);
      }
      store_vec<P>(a.out, a.out_dtype, out0 + static_cast<int64_t>(c) * VEC + h * P, v);
    }
  });
}

// Thread tm (valid) of the forward kernel: its first pair of chunks, then its zero point and scale
// (chunk_pairs: FirstPair), then the branch on the reciprocal.
template <int BITS, int VEC>
__device__ __forceinline__ void fake_quant_thread(const FakeQuantArgs& a, const Team& tm) {
  const int64_t first = static_cast<int64_t>(tm.grp) * a.g;  // the group's first column
  const int64_t w0 = tm.n * a.stride_wn + first;
  const auto load = [&](int c) {
    RawChunk<VEC> r;
    load_raw<VEC>(a.w, a.w_dtype, w0 + static_cast<int64_t>(c) * VEC, r);
    return r;
  };
  auto p = load_first_pair(tm.lane, a.g / VEC, a.tg.team, load);
  const float z = a.z[tm.r];
  const Recip d = recip_of(load1(a.s, a.s_dtype, tm.r));
  const int64_t out0 = tm.n * a.k + first;
  if (d.fast && d.s > 0.f) {  // fake_quant_recip: a positive scale
    fake_quant_group<BITS, VEC, true>(a, out0, p, load, d, z);
  } else {
    fake_quant_group<BITS, VEC, false>(a, out0, p, load, d, z);
  }
}

// w and grad of one chunk as loaded (the backward's chunks).
template <int VEC>
struct WGChunk {
  RawChunk<VEC> w, g;
};

// The rest of one team's group of the backward once the lane's first pair is loaded, returning the
// lane's LSQ sum. RECIP (no LSQ): the mask through the group's reciprocal (ste_pass_recip, the same
// mask bit for bit).
template <int BITS, int VEC, bool LSQ, bool RECIP, typename Load>
__device__ __forceinline__ float fake_quant_backward_group(const FakeQuantArgs& a, int64_t out0,
                                                           FirstPair<WGChunk<VEC>>& p, Load load, const Recip& d,
                                                           float z) {
  static_assert(!(LSQ && RECIP), "the LSQ term needs the true quotient");
  float acc = 0.f;
  constexpr int P = kPart<VEC>;
  chunk_pairs(p, a.g / VEC, load, [&](int c, WGChunk<VEC>& x) {
    QDPO_UNROLL
    for (int h = 0; h < VEC / P; ++h) {
      float w[P], g[P];
      unpack_part<VEC>(a.w_dtype, x.w, h, w);
      unpack_part<VEC>(a.g_dtype, x.g, h, g);
      QDPO_UNROLL
      for (int j = 0; j < P; ++j) {
        if constexpr (RECIP) {
          g[j] = ste_pass_recip(w[j], d, z, BITS) ? g[j] : 0.f;
        } else {
          const SteTerms st = ste_terms(w[j], d.s, z, BITS);
          if (LSQ) acc += g[j] * st.lsq;
          g[j] = st.inside ? g[j] : 0.f;
        }
      }
      store_vec<P>(a.out, a.w_dtype, out0 + static_cast<int64_t>(c) * VEC + h * P, g);
    }
  });
  return acc;
}

// Thread tm of the backward kernel up to its team sum: grad_w of its chunks and (LSQ) the lane's
// part of ∂s; 0 for a thread past the last group row, which joins the team sum only. Loads as the
// forward's (fake_quant_thread).
template <int BITS, int VEC, bool LSQ>
__device__ __forceinline__ float fake_quant_backward_thread(const FakeQuantArgs& a, const Team& tm) {
  if (!tm.valid) return 0.f;
  const int64_t first = static_cast<int64_t>(tm.grp) * a.g;
  const int64_t w0 = tm.n * a.stride_wn + first, out0 = tm.n * a.k + first;  // grad and grad_w: (N, K)
  const auto load = [&](int c) {
    WGChunk<VEC> x;
    load_raw<VEC>(a.w, a.w_dtype, w0 + static_cast<int64_t>(c) * VEC, x.w);
    load_raw<VEC>(a.grad, a.g_dtype, out0 + static_cast<int64_t>(c) * VEC, x.g);
    return x;
  };
  auto p = load_first_pair(tm.lane, a.g / VEC, a.tg.team, load);
  const float z = a.z[tm.r];
  const Recip d = recip_of(load1(a.s, a.s_dtype, tm.r));
  if (!LSQ && d.fast) return fake_quant_backward_group<BITS, VEC, false, true>(a, out0, p, load, d, z);
  return fake_quant_backward_group<BITS, VEC, LSQ, false>(a, out0, p, load, d, z);
}

// ∂s of the team's group from the team sum of its lanes' parts (lane 0 stores it).
__device__ __forceinline__ void store_grad_s(const FakeQuantArgs& a, const Team& tm, float sum) {
  if (tm.valid && tm.lane == 0) store1(a.grad_s, a.s_dtype, tm.r, sum);
}

inline int check_fq(ptr_t w, int w_dtype, int64_t stride_wn, int64_t n, int64_t k, int64_t ng, int bits,
                    ptr_t scales, int s_dtype, ptr_t zeros, ptr_t out, int out_dtype) {
  if (int e = check_grid(n, k, ng, bits)) return e;
  QDPO_REQUIRE(valid_dtype(w_dtype) && valid_dtype(s_dtype) && valid_dtype(out_dtype), kErrDtype);
  QDPO_REQUIRE(w != 0 && scales != 0 && zeros != 0 && out != 0, kErrNull);
  QDPO_REQUIRE(stride_wn >= k, kErrShape);
  QDPO_REQUIRE(aligned(w, dtype_size(w_dtype)) && aligned(scales, dtype_size(s_dtype)) &&
                   aligned(out, dtype_size(out_dtype)), kErrAlign);
  return kOk;
}

inline bool vec8_ok(ptr_t w, int w_dtype, int64_t stride_wn, int64_t g, ptr_t out) {
  return g % 8 == 0 && aligned(w, 16) && (stride_wn * dtype_size(w_dtype)) % 16 == 0 && aligned(out, 16);
}

// fake_quant's chunk width: 16 elements where every chunked operand it reads is 16-bit (w, and grad
// in the backward), so that a chunk of bf16 weights is 32 bytes, as one of fp32 weights is: the bf16
// passes took about as long as the fp32 ones for the same elements (H200), as if bound by threads in
// flight rather than bytes. 8 elsewhere when aligned, else the narrowest; never above max_vec (16, or
// 8 for the benchmarks' side-by-side).
inline int fq_vec(bool vec8, bool reads_16bit, int64_t g, int max_vec) {
  if (!vec8) return 1;
  return max_vec == 16 && reads_16bit && g % 16 == 0 ? 16 : 8;
}

template <typename Launch>
int fake_quant_plan(ptr_t w, int w_dtype, int64_t stride_wn, int64_t n, int64_t k, int64_t ng, int bits,
                    ptr_t scales, int s_dtype, ptr_t zeros, ptr_t out, int out_dtype, int max_vec, Launch&& launch) {
  if (int e = check_fq(w, w_dtype, stride_wn, n, k, ng, bits, scales, s_dtype, zeros, out, out_dtype)) return e;
  QDPO_REQUIRE(max_vec == 8 || max_vec == 16, kErrMode);
  const int64_t g = k / ng;
  const int vec = fq_vec(vec8_ok(w, w_dtype, stride_wn, g, out), w_dtype != kF32, g, max_vec);
  return dispatch_bits_vec16(bits, vec, [&](auto b, auto v) {
    constexpr int VEC = decltype(v)::value;
    const TeamShape sh = team_shape(n, ng, pair_lanes(g / VEC));
    const FakeQuantArgs a{reinterpret_cast<const void*>(w), w_dtype, stride_wn, sh.tg, static_cast<int>(g),
                          reinterpret_cast<const void*>(scales), s_dtype,
                          reinterpret_cast<const uint8_t*>(zeros), k, nullptr, 0, reinterpret_cast<void*>(out),
                          out_dtype, nullptr};
    return launch(b, v, sh, a);
  });
}

template <typename Launch>
int fake_quant_backward_plan(ptr_t grad, int g_dtype, ptr_t w, int w_dtype, int64_t stride_wn, int64_t n,
                             int64_t k, int64_t ng, int bits, ptr_t scales, int s_dtype, ptr_t zeros, ptr_t grad_w,
                             ptr_t grad_s, int max_vec, Launch&& launch) {
  if (int e = check_fq(w, w_dtype, stride_wn, n, k, ng, bits, scales, s_dtype, zeros, grad_w, w_dtype)) return e;
  QDPO_REQUIRE(valid_dtype(g_dtype), kErrDtype);
  QDPO_REQUIRE(grad != 0, kErrNull);
  QDPO_REQUIRE(aligned(grad, dtype_size(g_dtype)) && aligned(grad_s, dtype_size(s_dtype)), kErrAlign);
  QDPO_REQUIRE(max_vec == 8 || max_vec == 16, kErrMode);
  const int64_t g = k / ng;
  const bool vec8 = vec8_ok(w, w_dtype, stride_wn, g, grad_w) && aligned(grad, 16);
  const int vec = fq_vec(vec8, w_dtype != kF32 && g_dtype != kF32, g, max_vec);
  return dispatch_bits_vec16(bits, vec, [&](auto b, auto v) {
    constexpr int VEC = decltype(v)::value;
    const TeamShape sh = team_shape(n, ng, pair_lanes(g / VEC));
    const FakeQuantArgs a{reinterpret_cast<const void*>(w), w_dtype, stride_wn, sh.tg, static_cast<int>(g),
                          reinterpret_cast<const void*>(scales), s_dtype,
                          reinterpret_cast<const uint8_t*>(zeros), k, reinterpret_cast<const void*>(grad), g_dtype,
                          reinterpret_cast<void*>(grad_w), w_dtype, reinterpret_cast<void*>(grad_s)};
    return launch(b, v, sh, a);
  });
}

}  // namespace qdpo
