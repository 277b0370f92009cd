// dequant_matmul.cuh — what the GEMV kernel files share: the argument block,
// the tile constants, the launchers dequant_matmul_gemv.cu calls in
// dequant_matmul_fma.cu and the kernel choices of dequant_matmul_gemv_*.cu.
// The contract of the op is in dequant_matmul_gemv.cu.
#pragma once

#include "qdpo_device.cuh"

namespace qdpo {

constexpr int kFmaRows = 4;      // fma: rows of ŵ per block, one warp each
constexpr int kMaxSplits = 16;   // split-K ranges at most (partials: splits · M · N fp32)
constexpr int64_t kXsMaxBytes = 48 * 1024;  // x_smem: shared memory per block (static + dynamic) without opting in

struct GemvArgs {
  const void* x;  // (M, K) contiguous
  int x_dtype;
  int m, n, k;
  int bits;
  int g, ng;      // group size, groups per row
  DivMagic g_div;  // n / G for 0 <= n < 2^31 (div_by)
  const uint8_t* q;
  int64_t stride_qn;  // bytes
  const void* s;      // (N, NG) contiguous
  int s_dtype;
  const uint8_t* z;   // (N, NG) contiguous
  const void* bias;   // (N,) or null
  int b_dtype;
  void* y;            // (M, N) contiguous, x.dtype
  float* partial;     // [splits, M, N] fp32 when splits > 1
  int splits;
  int steps;            // mma: ceil(K / 128)
  int steps_per_split;  // mma: 128-code steps per K range
  int full_steps;       // mma: steps whose 128 codes all lie inside K (floor(K / 128))
  const int32_t* pair_expert = nullptr;  // grouped (dequant_matmul_experts): (P,) expert of each x row, or
                                         // (experts + 1,) offsets of each expert's rows (segments)
  int experts = 0;                       // grouped: experts in qweight (N rows each)
  int pairs = 0;                         // grouped: rows of x (segments: each offset is clamped to 0 .. pairs)
};

int launch_gemv_fma(const GemvArgs& a, bool vec8, cudaStream_t stream);

// The mma kernel of a plan, one function per x dtype and bit width, each in a translation unit of its
// own (dequant_matmul_gemv_{f16,bf16}_w{4,8}.cu, from gemv_kernels.cuh); `grouped`: its grouped
// instance (dequant_matmul_experts: 1 pairs, 2 segments; gemv_kernels.cuh: GroupedMode).
using GemvKernelFn = void (*)(GemvArgs);
GemvKernelFn gemv_kernel_f16_w4(const GemvPlan& p, int grouped = 0);
GemvKernelFn gemv_kernel_f16_w8(const GemvPlan& p, int grouped = 0);
GemvKernelFn gemv_kernel_bf16_w4(const GemvPlan& p, int grouped = 0);
GemvKernelFn gemv_kernel_bf16_w8(const GemvPlan& p, int grouped = 0);
int launch_splitk_reduce(const GemvArgs& a, cudaStream_t stream);

}  // namespace qdpo
