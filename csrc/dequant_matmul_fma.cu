// dequant_matmul_fma.cu — the general GEMV path of dequant_matmul (any x dtype,
// any K the format allows, any alignment) and the split-K reduction.
//
// Formula: y[m, n] = Σ_k x[m, k] · ŵ[n, k] (+ bias[n]), ŵ = (q - z) · s in fp32,
// fp32 FMAs, one cast to x.dtype. Serves what the tensor-core path
// (dequant_matmul_gemv.cu) does not: fp32 x (IEEE fp32 products, as the
// reference), K not a multiple of 32, groups not a multiple of 32, misaligned
// operands. Tensors and constraints: as dequant_matmul_gemv.cu, M <= 16.
//
// Work: one warp per row of ŵ, lanes stride over K in chunks of 8 codes (4- or
// 8-byte code loads; 2 / 1 codes when K or the alignment does not allow 8),
// 16 fp32 accumulators (one per row of x), one xor-tree warp reduction each.
// Bytes moved: N·K·b/8 + N·NG·(s_size + 1) of weight once, x from L1/L2 per
// row of ŵ, write M·N·x_size. CUDA-core bound for M > 1: a fallback, not the
// fast path.
#include "dequant_matmul.cuh"

namespace qdpo {
namespace {

template <int BITS, int VEC>
__global__ void __launch_bounds__(kFmaRows * 32) gemv_fma_kernel(GemvArgs a) {
  const int lane = threadIdx.x & 31;
  const int n = blockIdx.x * kFmaRows + (threadIdx.x >> 5);
  if (n >= a.n) return;  // the whole warp leaves together
  const uint8_t* qrow = a.q + n * a.stride_qn;
  float acc[kGemvMaxM] = {};
  for (int k0 = lane * VEC; k0 < a.k; k0 += 32 * VEC) {
    const int64_t p = static_cast<int64_t>(n) * a.ng + k0 / a.g;  // a chunk never straddles groups
    const float s = load1(a.s, a.s_dtype, p), z = a.z[p];
    uint8_t codes[VEC];
    float w[VEC];
    load_codes<BITS, VEC>(qrow, k0, codes);
    QDPO_UNROLL
    for (int j = 0; j < VEC; ++j) w[j] = dequantize_one(codes[j], s, z);
    QDPO_UNROLL
    for (int m = 0; m < kGemvMaxM; ++m) {
      if (m < a.m) {
        float xv[VEC];
        load_vec<VEC>(a.x, a.x_dtype, static_cast<int64_t>(m) * a.k + k0, xv);
        QDPO_UNROLL
        for (int j = 0; j < VEC; ++j) acc[m] = fmaf(w[j], xv[j], acc[m]);
      }
    }
  }
  QDPO_UNROLL
  for (int m = 0; m < kGemvMaxM; ++m) {
    QDPO_UNROLL
    for (int o = 16; o > 0; o >>= 1) acc[m] += __shfl_xor_sync(0xFFFFFFFFu, acc[m], o);
  }
  if (lane != 0) return;
  const float b = a.bias ? load1(a.bias, a.b_dtype, n) : 0.f;
  QDPO_UNROLL
  for (int m = 0; m < kGemvMaxM; ++m) {
    if (m < a.m) store1(a.y, a.x_dtype, static_cast<int64_t>(m) * a.n + n, acc[m] + b);
  }
}

// y = Σ_s partial[s] (+ bias), summed in split order (deterministic), cast once. Launched as the GEMV's
// dependent (launch_dependent): on sm_90 its blocks are placed while the GEMV runs and wait here for its
// partials, instead of the launch starting after the GEMV has finished.
__global__ void splitk_reduce_kernel(GemvArgs a) {
  pdl_wait();
  const int64_t mn = static_cast<int64_t>(a.m) * a.n;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= mn) return;
  float v = 0.f;
  for (int s = 0; s < a.splits; ++s) v += a.partial[s * mn + i];
  if (a.bias) v += load1(a.bias, a.b_dtype, i % a.n);
  store1(a.y, a.x_dtype, i, v);
}

}  // namespace

int launch_gemv_fma(const GemvArgs& a, bool vec8, cudaStream_t stream) {
  return dispatch_bits_vec(a.bits, vec8, [&](auto b, auto v) {
    constexpr int BITS = decltype(b)::value, VEC = decltype(v)::value;
    QDPO_LAUNCH((a.n + kFmaRows - 1) / kFmaRows, kFmaRows * 32, 0, stream, gemv_fma_kernel<BITS, VEC>)(a);
    return launch_status();
  });
}

int launch_splitk_reduce(const GemvArgs& a, cudaStream_t stream) {
  const int64_t mn = static_cast<int64_t>(a.m) * a.n;
  return launch_dependent(splitk_reduce_kernel, dim3(static_cast<unsigned>((mn + 255) / 256)), dim3(256), 0, stream, a);
}

}  // namespace qdpo
