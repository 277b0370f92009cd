// quantize.cu — per-group scales/zeros and packed codes in one pass over W;
// codes on a frozen grid (quantize_with).
//
// Formula (qdpo/kernels/reference.py is the spec; same fp32 operations, see
// group_qparams in qdpo_math.cuh):
//   asymmetric: lo = min(min(w), 0), hi = max(max(w), 0),
//               s = cast_up(max((hi - lo) / qmax, tiny)), z = clamp(round(-lo / s), 0, qmax);
//   symmetric:  s = cast_up(max(max|w| / (2^(b-1) - 1), tiny)), z = 2^(b-1);
//   codes:      q = clamp(round(w / s) + z, 0, qmax), packed per qdpo/quant/format.py.
// cast_up rounds to the scale dtype (= w.dtype) to nearest, then one step up if
// that fell below the fp32 value; tiny = finfo(w.dtype).tiny; round is half to
// even (rintf); `/` is IEEE division (the codes take it through the group's reciprocal where
// that gives the same code bit for bit: qdpo_math.cuh, quotient).
//
// Tensors (N = out_features, K = in_features, G = K / NG):
//   w        (N, K)        fp32/fp16/bf16   K contiguous, row stride stride_wn elements
//   qweight  (N, K·b/8)    uint8            contiguous (written; read nothing)
//   scales   (N, NG)       w.dtype          contiguous; written (kQParams, kQuantize) or read
//                                           in any float dtype (kQuantizeWith)
//   zeros    (N, NG)       uint8            contiguous; written or read likewise
// Constraints: bits ∈ {4, 8}; NG divides K; G even for 4 bits; N·NG and K below
// 2^31. 16-byte chunks when G % 8 == 0 and w is 16-byte aligned row by row.
//
// Work: one team (qdpo_device.cuh) per group row. The reducing modes read the
// group twice — min/max, then codes — the second read hits L1/L2, so DRAM sees
// W once. No backward: quantization is not differentiated.
// Bytes moved: read N·K·w_size, write N·K·b/8 + N·NG·(w_size + 1).
#include "qdpo_device.cuh"

namespace qdpo {
namespace {

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

template <int BITS, int VEC, int MODE>
__global__ void __launch_bounds__(kTeamBlock) quantize_kernel(QuantizeArgs a) {
  const Team tm = my_team(a.tg);
  const int n = tm.n, grp = tm.grp;  // 0 where not valid
  const int64_t w0 = n * a.stride_wn + grp * a.g;  // first element of the group in w
  const int chunks = a.g / VEC;
  float s = 1.f, z = 0.f;
  if (MODE == kQuantizeWith) {
    if (tm.valid) s = load1(a.s, a.s_dtype, tm.r), z = a.z[tm.r];
  } else {
    float lo = 0.f, hi = 0.f;  // the range always contains 0 (group_qparams clamps too)
    for (int c = tm.lane; tm.valid && c < chunks; c += a.tg.team) {
      float v[VEC];
      load_vec<VEC>(a.w, a.w_dtype, w0 + static_cast<int64_t>(c) * VEC, v);
      QDPO_UNROLL
      for (int j = 0; j < VEC; ++j) lo = fminf(lo, v[j]), hi = fmaxf(hi, v[j]);
    }
    lo = team_allreduce(lo, a.tg.team, MinOp());
    hi = team_allreduce(hi, a.tg.team, MaxOp());
    const GroupParams p = group_qparams(lo, hi, BITS, a.symmetric, a.w_dtype);
    s = p.s, z = p.z;
    if (tm.valid && tm.lane == 0) {
      store1(a.s, a.s_dtype, tm.r, s);  // exact: s is a w.dtype value
      a.z[tm.r] = static_cast<uint8_t>(z);
    }
  }
  if (MODE == kQParams || !tm.valid) return;
  const Recip d = recip_of(s);
  if (d.fast) {
    quantize_group<BITS, VEC, true>(a, tm, n, grp, d, z);
  } else {
    quantize_group<BITS, VEC, false>(a, tm, n, grp, d, z);
  }
}

}  // namespace

int quantize(int mode, ptr_t w, int w_dtype, int64_t stride_wn, int64_t n, int64_t k, int64_t ng, int bits,
             bool symmetric, ptr_t qweight, ptr_t scales, int s_dtype, ptr_t zeros, ptr_t stream) {
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
    const auto st = reinterpret_cast<cudaStream_t>(stream);
    if (mode == kQParams) {
      quantize_kernel<BITS, VEC, kQParams><<<sh.grid, sh.block, 0, st>>>(a);
    } else if (mode == kQuantize) {
      quantize_kernel<BITS, VEC, kQuantize><<<sh.grid, sh.block, 0, st>>>(a);
    } else {
      quantize_kernel<BITS, VEC, kQuantizeWith><<<sh.grid, sh.block, 0, st>>>(a);
    }
    return launch_status();
  });
}

}  // namespace qdpo
