// dequantize.cu — packed codes → ŵ = (q - z) · s.
//
// Formula (reference.dequantize): ŵ[n, k] = (q[n, k] - z[n, g]) · s[n, g] with
// g = k / G, in fp32, rounded once to the output dtype (nearest even). Bit-exact.
//
// Tensors (N = out_features, K = in_features, G = K / NG):
//   qweight  (N, K·b/8)  uint8            K contiguous, row stride stride_qn bytes;
//                                         4 bits: code 2j in the low nibble of byte j
//   scales   (N, NG)     fp32/fp16/bf16   contiguous
//   zeros    (N, NG)     uint8            contiguous
//   out      (N, K)      any float        contiguous
// Constraints: bits ∈ {4, 8}; NG divides K; G even for 4 bits; N·NG and K below 2^31.
// 8-code chunks (4- or 8-byte code loads, 16/32-byte stores) when G % 8 == 0 and
// the operands are aligned for them.
//
// Work: one team per group row, purely element-wise, two 8-code chunks per lane and pass (qdpo_device.cuh:
// chunk_pairs). No backward (codes are integers).
// Bytes moved: read N·K·b/8 + N·NG·(s_size + 1), write N·K·out_size.
#include "qdpo_device.cuh"

namespace qdpo {
namespace {

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

template <int BITS, int VEC>
__global__ void __launch_bounds__(kTeamBlock) dequantize_kernel(DequantizeArgs a) {
  const Team tm = my_team(a.tg);
  if (!tm.valid) return;  // no reduction in this kernel
  const int n = tm.n, grp = tm.grp;
  const float s = load1(a.s, a.s_dtype, tm.r), z = a.z[tm.r];
  const uint8_t* qrow = a.q + n * a.stride_qn;
  const int64_t first = static_cast<int64_t>(grp) * a.g;  // the group's first column
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
        store_vec<VEC>(a.out, a.out_dtype, n * a.k + first + static_cast<int64_t>(c) * VEC, v);
      });
}

}  // namespace

int dequantize(ptr_t qweight, int64_t stride_qn, int64_t n, int64_t k, int64_t ng, int bits, ptr_t scales,
               int s_dtype, ptr_t zeros, ptr_t out, int out_dtype, ptr_t stream) {
  if (int e = check_grid(n, k, ng, bits)) return e;
  QDPO_REQUIRE(valid_dtype(s_dtype) && valid_dtype(out_dtype), kErrDtype);
  QDPO_REQUIRE(qweight != 0 && scales != 0 && zeros != 0 && out != 0, kErrNull);
  QDPO_REQUIRE(stride_qn >= k * bits / 8, kErrShape);
  QDPO_REQUIRE(aligned(scales, dtype_size(s_dtype)) && aligned(out, dtype_size(out_dtype)), kErrAlign);
  const int64_t g = k / ng;
  const bool vec8 = g % 8 == 0 && aligned(qweight, 8) && stride_qn % 8 == 0 && aligned(out, 16);
  return dispatch_bits_vec(bits, vec8, [&](auto b, auto v) {
    constexpr int BITS = decltype(b)::value, VEC = decltype(v)::value;
    const TeamShape sh = team_shape(n, ng, pair_lanes(g / VEC));
    const DequantizeArgs a{reinterpret_cast<const uint8_t*>(qweight), stride_qn, sh.tg, static_cast<int>(g),
                           reinterpret_cast<const void*>(scales), s_dtype,
                           reinterpret_cast<const uint8_t*>(zeros), reinterpret_cast<void*>(out), out_dtype, k};
    dequantize_kernel<BITS, VEC><<<sh.grid, sh.block, 0, reinterpret_cast<cudaStream_t>(stream)>>>(a);
    return launch_status();
  });
}

}  // namespace qdpo
