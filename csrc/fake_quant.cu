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
// Work: one team per group row; 8-element (16/32-byte) chunks when aligned, 16-element (32-byte)
// ones where every chunked operand is 16-bit (elementwise.cuh: fq_vec; converted, computed and
// stored 8 at a time: kPart), two per lane and pass (qdpo_device.cuh: chunk_pairs; both loads
// before the math). w / s goes through the group's reciprocal where that gives the same result bit
// for bit (qdpo_math.cuh: quotient; every scale in [2^-100, 2^100]): a multiply and two FMAs per
// element instead of a division, and one FMA by the scale where it is positive (qdpo_math.cuh:
// fake_quant_recip; a negative scale divides); the LSQ term keeps the division. A lane's first pair
// is loaded before its scale and zero point, and the branch on the scale comes after both
// (chunk_pairs: FirstPair): one memory round trip per thread, not the scale's and then the chunks'.
// The chunks stay as loaded (RawChunk) until the math converts them. Blocks are pinned to 6
// (forward, 40 registers, as before) and 4 (backward, 64) per SM, at the cost of a few spilled bytes
// in L1 (ptxas -v, sm_90: at most 16 outside the LSQ backward, 28 in it).
//
// The bf16 passes reached 66-72 % of copy bandwidth on an H200, against 95 % in fp32, and took
// about as long as the fp32 ones for the same elements, which points at a bound on threads in
// flight rather than on bytes. They had the division, 16-byte stores that came out as four 4-byte
// ones (qdpo_device.cuh: st_global_v4), the scale's load before the chunks', and 16 bytes of bf16
// per chunk. None of these changes has run on a GPU yet; the CPU tests run the launches through
// their host emulation (team_emulate.cpp: the plans and threads of elementwise.cuh, one thread
// after another, a 16-byte store as a copy), with 16- and 8-element chunks (max_vec).
// Bytes moved — forward: read N·K·w_size + N·NG·(s_size + 1), write N·K·out_size.
// Backward: read N·K·(g_size + w_size) + N·NG·(s_size + 1), write N·K·w_size
// (+ N·NG·s_size with LSQ).
#include "elementwise.cuh"

namespace qdpo {
namespace {

template <int BITS, int VEC>
__global__ void __launch_bounds__(kTeamBlock, 6) fake_quant_kernel(FakeQuantArgs a) {
  const Team tm = my_team(a.tg);
  if (tm.valid) fake_quant_thread<BITS, VEC>(a, tm);  // no reduction in this kernel
}

template <int BITS, int VEC, bool LSQ>
__global__ void __launch_bounds__(kTeamBlock, 4) fake_quant_backward_kernel(FakeQuantArgs a) {
  const Team tm = my_team(a.tg);
  if (!LSQ && !tm.valid) return;  // with LSQ every thread joins the team sum
  const float acc = fake_quant_backward_thread<BITS, VEC, LSQ>(a, tm);
  if (LSQ) store_grad_s(a, tm, team_allreduce(acc, a.tg.team, SumOp()));
}

}  // namespace

int fake_quant(ptr_t w, int w_dtype, int64_t stride_wn, int64_t n, int64_t k, int64_t ng, int bits, ptr_t scales,
               int s_dtype, ptr_t zeros, ptr_t out, int out_dtype, int max_vec, ptr_t stream) {
  return fake_quant_plan(w, w_dtype, stride_wn, n, k, ng, bits, scales, s_dtype, zeros, out, out_dtype, max_vec,
                         [&](auto b, auto v, const TeamShape& sh, const FakeQuantArgs& a) {
                           constexpr int BITS = decltype(b)::value, VEC = decltype(v)::value;
                           QDPO_LAUNCH(sh.grid, sh.block, 0, reinterpret_cast<cudaStream_t>(stream),
                                       fake_quant_kernel<BITS, VEC>)(a);
                           return launch_status();
                         });
}

int fake_quant_backward(ptr_t grad, int g_dtype, ptr_t w, int w_dtype, int64_t stride_wn, int64_t n, int64_t k,
                        int64_t ng, int bits, ptr_t scales, int s_dtype, ptr_t zeros, ptr_t grad_w, ptr_t grad_s,
                        int max_vec, ptr_t stream) {
  return fake_quant_backward_plan(
      grad, g_dtype, w, w_dtype, stride_wn, n, k, ng, bits, scales, s_dtype, zeros, grad_w, grad_s, max_vec,
      [&](auto b, auto v, const TeamShape& sh, const FakeQuantArgs& a) {
        constexpr int BITS = decltype(b)::value, VEC = decltype(v)::value;
        const auto st = reinterpret_cast<cudaStream_t>(stream);
        if (grad_s != 0) {
          QDPO_LAUNCH(sh.grid, sh.block, 0, st, fake_quant_backward_kernel<BITS, VEC, true>)(a);
        } else {
          QDPO_LAUNCH(sh.grid, sh.block, 0, st, fake_quant_backward_kernel<BITS, VEC, false>)(a);
        }
        return launch_status();
      });
}

}  // namespace qdpo
