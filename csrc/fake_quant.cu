// fake_quant.cu — ŵ = dequantize(quantize(w)) on a given grid, and its STE backward.
//
// Forward (reference.fake_quant), fp32, one cast at the end:
//   u = round(w / s) + z, q = clamp(u, 0, qmax), ŵ = cast((q - z) · s).
// Backward (reference.fake_quant_backward), the mask recomputed, never stored:
//   mask = 0 <= u <= qmax;  ∂w = cast_w(mask ? g : 0)  (bit-exact);
//   LSQ (grad_s given): ∂s[n, j] = Σ_{k in group j} g · (mask ? round(w/s) - w/s : q - z),
//   accumulated in fp32 per thread, then a fixed-order team sum (deterministic),
//   cast once to scales.dtype. Zero points get no gradient.
//
// Tensors (N = out_features, K = in_features, G = K / NG):
//   w        (N, K)   fp32/fp16/bf16   K contiguous, row stride stride_wn elements
//   scales   (N, NG)  fp32/fp16/bf16   contiguous
//   zeros    (N, NG)  uint8            contiguous
//   out      (N, K)   any float        contiguous (forward)
//   grad     (N, K)   any float        contiguous (backward)
//   grad_w   (N, K)   w.dtype          contiguous
//   grad_s   (N, NG)  scales.dtype     contiguous, or 0 for no LSQ gradient
// Constraints: bits ∈ {4, 8}; NG divides K; G even for 4 bits; N·NG and K below 2^31.
//
// Work: one team per group row; 8-element (16/32-byte) chunks when aligned, two per lane and pass
// (qdpo_device.cuh: chunk_pairs; both loads before the math). w / s goes through the
// group's reciprocal where that gives the same result bit for bit (qdpo_math.cuh: quotient; every
// scale in [2^-100, 2^100]): a multiply and two FMAs per element instead of a division. The bf16
// passes reached 66-72 % of copy bandwidth on an H200, against 95 % in fp32: they had the division,
// and their 16-byte stores came out as four 4-byte ones (qdpo_device.cuh: st_global_v4). Neither
// change has run on a GPU yet. The LSQ term keeps the division.
// Bytes moved — forward: read N·K·w_size + N·NG·(s_size + 1), write N·K·out_size.
// Backward: read N·K·(g_size + w_size) + N·NG·(s_size + 1), write N·K·w_size
// (+ N·NG·s_size with LSQ).
#include "qdpo_device.cuh"

namespace qdpo {
namespace {

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

// One team's group. RECIP: w / s through the group's reciprocal (qdpo_math.cuh: quotient, the same
// ŵ bit for bit, two FMAs and a multiply per element instead of a division).
template <int BITS, int VEC, bool RECIP>
__device__ __forceinline__ void fake_quant_group(const FakeQuantArgs& a, const Team& tm, int n, int grp,
                                                 const Recip& d, float z) {
  const int64_t first = static_cast<int64_t>(grp) * a.g;  // the group's first column
  chunk_pairs(
      tm.lane, a.g / VEC, a.tg.team,
      [&](int c) {
        Chunk<VEC> w;
        load_vec<VEC>(a.w, a.w_dtype, n * a.stride_wn + first + static_cast<int64_t>(c) * VEC, w.v);
        return w;
      },
      [&](int c, Chunk<VEC>& w) {
        QDPO_UNROLL
        for (int j = 0; j < VEC; ++j) {
          w.v[j] = RECIP ? fake_quant_recip(w.v[j], d, z, BITS) : fake_quant_one(w.v[j], d.s, z, BITS);
        }
        store_vec<VEC>(a.out, a.out_dtype, n * a.k + first + static_cast<int64_t>(c) * VEC, w.v);
      });
}

template <int BITS, int VEC>
__global__ void __launch_bounds__(kTeamBlock) fake_quant_kernel(FakeQuantArgs a) {
  const Team tm = my_team(a.tg);
  if (!tm.valid) return;  // no reduction in this kernel
  const int n = tm.n, grp = tm.grp;
  const Recip d = recip_of(load1(a.s, a.s_dtype, tm.r));
  const float z = a.z[tm.r];
  if (d.fast) {
    fake_quant_group<BITS, VEC, true>(a, tm, n, grp, d, z);
  } else {
    fake_quant_group<BITS, VEC, false>(a, tm, n, grp, d, z);
  }
}

// One team's group of the backward, returning the lane's LSQ sum. RECIP (no LSQ): the mask through
// the group's reciprocal (ste_pass_recip, the same mask bit for bit).
template <int BITS, int VEC, bool LSQ, bool RECIP>
__device__ __forceinline__ float fake_quant_backward_group(const FakeQuantArgs& a, const Team& tm, int n,
                                                           int grp, const Recip& d, float z) {
  static_assert(!(LSQ && RECIP), "the LSQ term needs the true quotient");
  struct WG {
    Chunk<VEC> w, g;
  };
  const int64_t first = static_cast<int64_t>(grp) * a.g;
  float acc = 0.f;
  chunk_pairs(
      tm.lane, a.g / VEC, a.tg.team,
      [&](int c) {
        const int64_t k = first + static_cast<int64_t>(c) * VEC;
        WG x;
        load_vec<VEC>(a.w, a.w_dtype, n * a.stride_wn + k, x.w.v);
        load_vec<VEC>(a.grad, a.g_dtype, n * a.k + k, x.g.v);
        return x;
      },
      [&](int c, WG& x) {
        QDPO_UNROLL
        for (int j = 0; j < VEC; ++j) {
          if constexpr (RECIP) {
            x.g.v[j] = ste_pass_recip(x.w.v[j], d, z, BITS) ? x.g.v[j] : 0.f;
          } else {
            const SteTerms st = ste_terms(x.w.v[j], d.s, z, BITS);
            if (LSQ) acc += x.g.v[j] * st.lsq;
            x.g.v[j] = st.inside ? x.g.v[j] : 0.f;
          }
        }
        store_vec<VEC>(a.out, a.w_dtype, n * a.k + first + static_cast<int64_t>(c) * VEC, x.g.v);
      });
  return acc;
}

template <int BITS, int VEC, bool LSQ>
__global__ void __launch_bounds__(kTeamBlock) fake_quant_backward_kernel(FakeQuantArgs a) {
  const Team tm = my_team(a.tg);
  if (!LSQ && !tm.valid) return;  // with LSQ every thread joins the team sum
  const int n = tm.n, grp = tm.grp;  // 0 where not valid
  const Recip d = recip_of(tm.valid ? load1(a.s, a.s_dtype, tm.r) : 1.f);
  const float z = tm.valid ? a.z[tm.r] : 0.f;
  float acc = 0.f;
  if (tm.valid) {
    if (!LSQ && d.fast) {
      fake_quant_backward_group<BITS, VEC, false, true>(a, tm, n, grp, d, z);
    } else {
      acc = fake_quant_backward_group<BITS, VEC, LSQ, false>(a, tm, n, grp, d, z);
    }
  }
  if (LSQ) {
    acc = team_allreduce(acc, a.tg.team, SumOp());
    if (tm.valid && tm.lane == 0) store1(a.grad_s, a.s_dtype, tm.r, acc);
  }
}

int check_fq(ptr_t w, int w_dtype, int64_t stride_wn, int64_t n, int64_t k, int64_t ng, int bits, ptr_t scales,
             int s_dtype, ptr_t zeros, ptr_t out, int out_dtype) {
  if (int e = check_grid(n, k, ng, bits)) return e;
  QDPO_REQUIRE(valid_dtype(w_dtype) && valid_dtype(s_dtype) && valid_dtype(out_dtype), kErrDtype);
  QDPO_REQUIRE(w != 0 && scales != 0 && zeros != 0 && out != 0, kErrNull);
  QDPO_REQUIRE(stride_wn >= k, kErrShape);
  QDPO_REQUIRE(aligned(w, dtype_size(w_dtype)) && aligned(scales, dtype_size(s_dtype)) &&
                   aligned(out, dtype_size(out_dtype)), kErrAlign);
  return kOk;
}

bool vec8_ok(ptr_t w, int w_dtype, int64_t stride_wn, int64_t g, ptr_t out) {
  return g % 8 == 0 && aligned(w, 16) && (stride_wn * dtype_size(w_dtype)) % 16 == 0 && aligned(out, 16);
}

}  // namespace

int fake_quant(ptr_t w, int w_dtype, int64_t stride_wn, int64_t n, int64_t k, int64_t ng, int bits, ptr_t scales,
               int s_dtype, ptr_t zeros, ptr_t out, int out_dtype, ptr_t stream) {
  if (int e = check_fq(w, w_dtype, stride_wn, n, k, ng, bits, scales, s_dtype, zeros, out, out_dtype)) return e;
  const int64_t g = k / ng;
  return dispatch_bits_vec(bits, vec8_ok(w, w_dtype, stride_wn, g, out), [&](auto b, auto v) {
    constexpr int BITS = decltype(b)::value, VEC = decltype(v)::value;
    const TeamShape sh = team_shape(n, ng, pair_lanes(g / VEC));
    const FakeQuantArgs a{reinterpret_cast<const void*>(w), w_dtype, stride_wn, sh.tg, static_cast<int>(g),
                          reinterpret_cast<const void*>(scales), s_dtype,
                          reinterpret_cast<const uint8_t*>(zeros), k, nullptr, 0, reinterpret_cast<void*>(out),
                          out_dtype, nullptr};
    fake_quant_kernel<BITS, VEC><<<sh.grid, sh.block, 0, reinterpret_cast<cudaStream_t>(stream)>>>(a);
    return launch_status();
  });
}

int fake_quant_backward(ptr_t grad, int g_dtype, ptr_t w, int w_dtype, int64_t stride_wn, int64_t n, int64_t k,
                        int64_t ng, int bits, ptr_t scales, int s_dtype, ptr_t zeros, ptr_t grad_w, ptr_t grad_s,
                        ptr_t stream) {
  if (int e = check_fq(w, w_dtype, stride_wn, n, k, ng, bits, scales, s_dtype, zeros, grad_w, w_dtype)) return e;
  QDPO_REQUIRE(valid_dtype(g_dtype), kErrDtype);
  QDPO_REQUIRE(grad != 0, kErrNull);
  QDPO_REQUIRE(aligned(grad, dtype_size(g_dtype)) && aligned(grad_s, dtype_size(s_dtype)), kErrAlign);
  const int64_t g = k / ng;
  const bool vec8 = vec8_ok(w, w_dtype, stride_wn, g, grad_w) && aligned(grad, 16);
  return dispatch_bits_vec(bits, vec8, [&](auto b, auto v) {
    constexpr int BITS = decltype(b)::value, VEC = decltype(v)::value;
    const TeamShape sh = team_shape(n, ng, pair_lanes(g / VEC));
    const FakeQuantArgs a{reinterpret_cast<const void*>(w), w_dtype, stride_wn, sh.tg, static_cast<int>(g),
                          reinterpret_cast<const void*>(scales), s_dtype,
                          reinterpret_cast<const uint8_t*>(zeros), k, reinterpret_cast<const void*>(grad), g_dtype,
                          reinterpret_cast<void*>(grad_w), w_dtype, reinterpret_cast<void*>(grad_s)};
    const auto st = reinterpret_cast<cudaStream_t>(stream);
    if (grad_s != 0) {
      fake_quant_backward_kernel<BITS, VEC, true><<<sh.grid, sh.block, 0, st>>>(a);
    } else {
      fake_quant_backward_kernel<BITS, VEC, false><<<sh.grid, sh.block, 0, st>>>(a);
    }
    return launch_status();
  });
}

}  // namespace qdpo
