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
// 16-code chunks (8- or 16-byte code loads, two 16/32-byte stores) when G % 16 == 0 and the
// operands are aligned for them (W8 rows 16-byte aligned), else 8-code chunks (4- or 8-byte loads)
// when G % 8 == 0 and aligned, else code by code; max_vec = 8 keeps the 8-code chunks (the
// benchmarks' cuda-v8).
//
// Work: one team per group row, purely element-wise, two chunks per lane and pass (qdpo_device.cuh:
// chunk_pairs), 8 codes at a time within a chunk. 8 codes become fp32 2^23 + q without shifting
// codes down: W4 codes are masked where they lie in their word (qdpo_math.cuh: dequantize_word; one
// shift and 8 LOP3 per 8 codes, where shifting each code down took about 22 instructions), wherever
// the scale allows it exactly; W8 codes take one byte permute each (gemv_fragments.cuh: w8_biased;
// 8 PRMT where shifts, masks and ORs took 18). A lane loads its first pair of chunks before its
// scale and zero point, and branches on the scale only after (chunk_pairs: FirstPair): one memory
// round trip per thread, where the scale's load used to come first and the codes' after it. 16-code
// chunks give a lane 32 codes: its set-up (group row, scale, zero point, in-place constants,
// addresses) is shared by twice the codes. Static sm_90, not yet run on a GPU. Blocks are pinned to
// 8 per SM (32 registers; the W4 8-code kernel spills one 8-byte value to L1 on sm_90), 6 (38
// registers) for W4's 16-code chunks. No backward (codes are integers). The thread and the launch
// plan live in elementwise.cuh, which the host emulation (team_emulate.cpp) runs too.
// Bytes moved: read N·K·b/8 + N·NG·(s_size + 1), write N·K·out_size.
#include "elementwise.cuh"

namespace qdpo {
namespace {

// Blocks per SM: 8 (32 registers), 6 (40) for W4's 16-code chunks, whose in-place constants and
// second chunk spill at 32 (sm_90).
constexpr int dequantize_min_blocks(int bits, int vec) { return bits == 4 && vec == 16 ? 6 : 8; }

template <int BITS, int VEC>
__global__ void __launch_bounds__(kTeamBlock, dequantize_min_blocks(BITS, VEC)) dequantize_kernel(DequantizeArgs a) {
  const Team tm = my_team(a.tg);
  if (tm.valid) dequantize_thread<BITS, VEC>(a, tm);  // no reduction in this kernel
}

}  // namespace

int dequantize(ptr_t qweight, int64_t stride_qn, int64_t n, int64_t k, int64_t ng, int bits, ptr_t scales,
               int s_dtype, ptr_t zeros, ptr_t out, int out_dtype, int max_vec, ptr_t stream) {
  return dequantize_plan(qweight, stride_qn, n, k, ng, bits, scales, s_dtype, zeros, out, out_dtype, max_vec,
                         [&](auto b, auto v, const TeamShape& sh, const DequantizeArgs& a) {
                           constexpr int BITS = decltype(b)::value, VEC = decltype(v)::value;
                           QDPO_LAUNCH(sh.grid, sh.block, 0, reinterpret_cast<cudaStream_t>(stream),
                                       dequantize_kernel<BITS, VEC>)(a);
                           return launch_status();
                         });
}

}  // namespace qdpo
