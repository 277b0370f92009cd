// dequant_matmul_gemv_bf16_w4.cu — the decode GEMV's kernels for bf16 x and W4 codes (gemv_kernels.cuh;
// one of four units, one per x dtype and bit width, which nvcc builds in parallel).
#include "gemv_kernels.cuh"

namespace qdpo {

GemvKernelFn gemv_kernel_bf16_w4(const GemvPlan& p, int grouped) { return pick_kernel<kBF16, 4>(p, grouped); }

}  // namespace qdpo
