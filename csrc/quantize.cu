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
// W once. No backward: quantization is not differentiated. The thread (in two phases around the
// team's min and max) and the launch plan live in elementwise.cuh, which the host emulation
// (team_emulate.cpp) runs too.
// Bytes moved: read N·K·w_size, write N·K·b/8 + N·NG·(w_size + 1).
#include "elementwise.cuh"

namespace qdpo {
namespace {

template <int BITS, int VEC, int MODE>
__global__ void __launch_bounds__(kTeamBlock) quantize_kernel(QuantizeArgs a) {
  const Team tm = my_team(a.tg);
  Range range{0.f, 0.f};
  if (MODE != kQuantizeWith) {  // every thread reaches the team sums, valid or not
    range = quantize_range<VEC>(a, tm);
    range.lo = team_allreduce(range.lo, a.tg.team, MinOp());
    range.hi = team_allreduce(range.hi, a.tg.team, MaxOp());
  }
  quantize_thread<BITS, VEC, MODE>(a, tm, range);
}

}  // namespace

int quantize(int mode, ptr_t w, int w_dtype, int64_t stride_wn, int64_t n, int64_t k, int64_t ng, int bits,
             bool symmetric, ptr_t qweight, ptr_t scales, int s_dtype, ptr_t zeros, ptr_t stream) {
  return quantize_plan(mode, w, w_dtype, stride_wn, n, k, ng, bits, symmetric, qweight, scales, s_dtype, zeros,
                       [&](auto b, auto v, const TeamShape& sh, const QuantizeArgs& a) {
                         constexpr int BITS = decltype(b)::value, VEC = decltype(v)::value;
                         const auto st = reinterpret_cast<cudaStream_t>(stream);
                         if (mode == kQParams) {
                           QDPO_LAUNCH(sh.grid, sh.block, 0, st, quantize_kernel<BITS, VEC, kQParams>)(a);
                         } else if (mode == kQuantize) {
                           QDPO_LAUNCH(sh.grid, sh.block, 0, st, quantize_kernel<BITS, VEC, kQuantize>)(a);
                         } else {
                           QDPO_LAUNCH(sh.grid, sh.block, 0, st, quantize_kernel<BITS, VEC, kQuantizeWith>)(a);
                         }
                         return launch_status();
                       });
}

}  // namespace qdpo
