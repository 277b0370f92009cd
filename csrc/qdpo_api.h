// qdpo_api.h — the host API of the CUDA kernels, as bindings.cpp sees it.
// Plain C++ (no CUDA headers): pointers are integers, a stream is an integer
// (cudaStream_t), dtypes are the codes of qdpo_math.cuh (0 fp32, 1 fp16,
// 2 bf16). Every launcher checks its arguments first and returns a Status:
// 0 on success, a negative code for a bad argument (nothing launched;
// last_detail() names the failed check), or a positive cudaError_t when the
// launch itself failed (e.g. 35/100: no driver or no GPU).
#pragma once

#include <cstdint>

namespace qdpo {

using ptr_t = std::uintptr_t;

enum Status : int {
  kOk = 0,
  kErrBits = -1,       // bits not in {4, 8}
  kErrDtype = -2,      // a dtype code not in {0, 1, 2}, or not allowed for this operand
  kErrShape = -3,      // sizes < 1, K not split into whole groups, odd K or group for 4 bits, M too large
  kErrTooLarge = -4,   // an operand of 2^31 elements or more (the kernels index with int32)
  kErrNull = -5,       // a required pointer is 0
  kErrAlign = -6,      // a pointer or row stride not aligned as the operand's element needs
  kErrWorkspace = -7,  // the split-K workspace is smaller than dequant_matmul_plan said
  kErrMode = -8,       // an unknown mode (quantize's mode, fake_quant's max_vec)
};

const char* status_name(int code);  // "bad bits", ... for negative codes
const char* last_detail();          // the failed check of this thread's last negative status
int fail(int code, const char* detail);  // records `detail` and returns `code`
const char* cuda_error_string(int code);

// quantize.cu — modes: per-group (scales, zeros) only; plus packed codes; codes on a frozen grid.
enum QuantizeMode : int { kQParams = 0, kQuantize = 1, kQuantizeWith = 2 };
int quantize(int mode, ptr_t w, int w_dtype, int64_t stride_wn, int64_t n, int64_t k, int64_t ng, int bits,
             bool symmetric, ptr_t qweight, ptr_t scales, int s_dtype, ptr_t zeros, ptr_t stream);

// dequantize.cu — max_vec: the widest chunk, 16 codes (the widest the operands allow) or 8 (at most
// 8; the benchmarks' side-by-side).
int dequantize(ptr_t qweight, int64_t stride_qn, int64_t n, int64_t k, int64_t ng, int bits, ptr_t scales,
               int s_dtype, ptr_t zeros, ptr_t out, int out_dtype, int max_vec, ptr_t stream);

// fake_quant.cu — grad_s == 0: no LSQ scale gradient. max_vec: the widest chunk, 16 (the widest the
// operands allow) or 8 (at most 8 elements; the benchmarks' side-by-side).
int fake_quant(ptr_t w, int w_dtype, int64_t stride_wn, int64_t n, int64_t k, int64_t ng, int bits, ptr_t scales,
               int s_dtype, ptr_t zeros, ptr_t out, int out_dtype, int max_vec, ptr_t stream);
int fake_quant_backward(ptr_t grad, int g_dtype, ptr_t w, int w_dtype, int64_t stride_wn, int64_t n, int64_t k,
                        int64_t ng, int bits, ptr_t scales, int s_dtype, ptr_t zeros, ptr_t grad_w, ptr_t grad_s,
                        int max_vec, ptr_t stream);

// dequant_matmul_gemv.cu / dequant_matmul_fma.cu — y = x @ ŵᵀ (+ bias) for M <= 16 rows of x.
constexpr int kGemvMaxM = 16;  // rows of x the GEMV serves (larger M: the ops raise Unsupported)
enum GemvKernel : int { kGemvMma = 0, kGemvFma = 1 };
struct GemvPlan {
  int kernel;               // GemvKernel
  int mt;                   // mma: n8 tiles of x rows (1: M <= 8, 2: M <= 16)
  int rt;                   // mma: 16-row weight tiles per warp
  int splits;               // K ranges over the grid's y axis (partials + reduce when > 1)
  int64_t workspace_bytes;  // fp32 partials [splits, M, N] when splits > 1
  int warps;                // mma: warps per block: the plan's 8 or 4 (gemv_auto_warps for the M <= 2
                            // tile), any 1-8 when forced (4 or 8 with shared_x)
  int blocks_per_sm;        // mma: resident blocks per SM of the chosen kernel (0: no GPU to ask)
  int x_smem;               // mma: 1 = x copied to shared memory first (M <= 2 tile), 0 = x in registers
  int scale_after;          // mma: 1 = the scale multiplies each step's fp32 sums (G % 128 == 0 or G = K)
  int zero_after;           // mma: 1 = the zero point too, in a second mma per k-tile (W4, bf16, scale_after)
  int shared_x;             // mma: 1 = each warp owns 16 rows, x staged in shared memory in K chunks
};
// Rows of ŵ one block of a plan's mma kernel owns (its grid's x axis covers N in these).
inline int gemv_block_rows(const GemvPlan& p) { return 16 * p.rt * (p.shared_x ? p.warps : 1); }
// Warps per block of the M <= 2 tile from the grid's 16-row tiles and how many blocks of 8 and of 4
// warps an SM holds (host only). Blocks of 4 when the 8-warp grid needs more than one wave and either
// they keep more warps resident or their grid fits in one wave: a second wave's tail then idles SMs
// that smaller blocks keep busy. 8 when the occupancy is unknown (0).
int gemv_auto_warps(int64_t tiles, int sm_count, int blocks8, int blocks4);
// What a caller forces on the plan (benchmarks/sweep_gemv.py, the GPU tests). splits / warps: 0 = the
// plan's own choice, else that value (warps 1-8; 4 or 8 with shared_x). The others: 0 = the plan's
// choice (each is off until a GPU has measured it), 1 = off, 2 = on where it applies (else off: the
// plan says which):
// x_smem: x copied to shared memory first (the M <= 2 tile, within 48 KB);
// scale_after: the scale on each step's fp32 sums (G a multiple of 128, or G = K);
// zero_after: the zero point in a second mma too (W4, bf16 x, with scale_after; any place of x);
// shared_x: warps that each own 16 rows and share x staged in shared memory (any M; not with x_smem).
// row_tiles: 0 = the plan's, else the 16-row tiles each warp computes (1 or 2) where x fits one tile
// (M <= 8; the plan's own: 1 at M <= 2, 2 above; not with x_smem or shared_x, which take 1).
struct GemvForce {
  int splits = 0, warps = 0, x_smem = 0, scale_after = 0, zero_after = 0, shared_x = 0, row_tiles = 0;
};
int dequant_matmul_plan(int64_t m, int64_t n, int64_t k, int64_t ng, int bits, int x_dtype, int s_dtype, ptr_t x,
                        ptr_t qweight, int64_t stride_qn, int sm_count, GemvPlan* plan, const GemvForce& force = {});
int dequant_matmul(ptr_t x, int x_dtype, int64_t m, int64_t n, int64_t k, int64_t ng, int bits, ptr_t qweight,
                   int64_t stride_qn, ptr_t scales, int s_dtype, ptr_t zeros, ptr_t bias, int b_dtype, ptr_t y,
                   ptr_t workspace, int64_t workspace_bytes, int sm_count, ptr_t stream, const GemvForce& force = {});
// dequant_matmul_experts: the same GEMV over P pairs of one row of x and one expert, in one launch and
// without the expert ids on the host (a mixture of experts' decode). qweight, scales and zeros hold
// `experts` slices of N rows each (expert e: rows e·N .. (e+1)·N); y[p] = x[p] @ ŵ_{ids[p]}ᵀ, where ids
// (P,) int32 sits in device memory, plus bias[ids[p]] of an (experts, N) bias if given; an id outside
// [0, experts) gives y[p] = 0. Serves what the M = 1 GEMV serves on tensor cores (its plan's kernel is
// kGemvMma); else kErrShape. The plan: the M = 1 plan unsplit, its block size chosen by the blocks of all
// pairs (gemv_auto_warps).
constexpr int64_t kMaxGroupedPairs = 65535;  // the grid's z axis
// seg_rows > 0: segments instead of pairs. x's rows are sorted by expert, `pair_expert` holds experts + 1
// int32 offsets (expert e's rows: offsets[e] .. offsets[e + 1]; rows past offsets[experts] are left
// unwritten; each offset is clamped to 0 .. P on the device, so offsets that are not such ranges give
// wrong rows but no access outside x and y), and each expert's weights are read once per chunk of 8 or
// 16 of its rows. seg_rows, the most rows one expert is expected to take, picks the chunk's tile (the
// plan of M = seg_rows); an expert with more rows than that is still served whole, in more chunks.
// The grid of a segments launch: at most this many chunks of `rows` rows when P rows are sorted among E
// experts (each expert with c > 0 rows makes ceil(c / rows) <= (c + rows - 1) / rows chunks, and at
// most min(E, P) experts have rows), so one block per chunk covers any routing (never more than P).
constexpr int64_t segment_blocks(int64_t pairs, int64_t experts, int64_t rows) {
  return (pairs + (experts < pairs ? experts : pairs) * (rows - 1)) / rows;
}
int dequant_matmul_experts_plan(int64_t pairs, int64_t n, int64_t k, int64_t ng, int bits, int x_dtype,
                                int s_dtype, ptr_t x, ptr_t qweight, int64_t stride_qn, int sm_count,
                                GemvPlan* plan, int64_t seg_rows = 0);
int dequant_matmul_experts(ptr_t x, int x_dtype, int64_t pairs, ptr_t pair_expert, int64_t experts, int64_t n,
                           int64_t k, int64_t ng, int bits, ptr_t qweight, int64_t stride_qn, ptr_t scales,
                           int s_dtype, ptr_t zeros, ptr_t bias, int b_dtype, ptr_t y, int sm_count,
                           ptr_t stream, int64_t seg_rows = 0);

// dequant_matmul_gemm.cu — y = x @ ŵᵀ (+ bias) for any M on tensor cores (prefill). Serves fp16/bf16
// x with scales in x.dtype, K % 64 == 0, G % 32 == 0 and 16-byte aligned x, qweight and its rows
// (dequant_gemm_supported, host only); anything else is kErrShape.
bool dequant_gemm_supported(int64_t k, int64_t ng, int x_dtype, int s_dtype, ptr_t x, ptr_t qweight,
                            int64_t stride_qn);
int dequant_gemm(ptr_t x, int x_dtype, int64_t m, int64_t n, int64_t k, int64_t ng, int bits, ptr_t qweight,
                 int64_t stride_qn, ptr_t scales, int s_dtype, ptr_t zeros, ptr_t bias, int b_dtype, ptr_t y,
                 ptr_t stream);

// team_emulate.cpp — the launches of quantize, dequantize, fake_quant and fake_quant_backward run on the
// host, thread by thread, from CPU buffers (tests only; the launchers' arguments without the stream).
int quantize_emulate(int mode, ptr_t w, int w_dtype, int64_t stride_wn, int64_t n, int64_t k, int64_t ng, int bits,
                     bool symmetric, ptr_t qweight, ptr_t scales, int s_dtype, ptr_t zeros);
int dequantize_emulate(ptr_t qweight, int64_t stride_qn, int64_t n, int64_t k, int64_t ng, int bits, ptr_t scales,
                       int s_dtype, ptr_t zeros, ptr_t out, int out_dtype, int max_vec);
int fake_quant_emulate(ptr_t w, int w_dtype, int64_t stride_wn, int64_t n, int64_t k, int64_t ng, int bits,
                       ptr_t scales, int s_dtype, ptr_t zeros, ptr_t out, int out_dtype, int max_vec);
int fake_quant_backward_emulate(ptr_t grad, int g_dtype, ptr_t w, int w_dtype, int64_t stride_wn, int64_t n,
                                int64_t k, int64_t ng, int bits, ptr_t scales, int s_dtype, ptr_t zeros,
                                ptr_t grad_w, ptr_t grad_s, int max_vec);
// gemv_emulate.cpp — host emulation of one 16-row tile of the mma GEMV (tests only).
int gemv_mma_emulate(const uint8_t* qweight, int64_t stride_qn, int rows, int64_t k, int64_t ng, int bits,
                     const float* scales, const uint8_t* zeros, const uint16_t* x, int m, int x_dtype, float* y,
                     bool x_smem = false, bool scale_after = false, bool zero_after = false, int splits = 1,
                     bool shared_x = false);
// gemm_emulate.cpp — host emulation of one 128 × 128 block of the prefill GEMM (tests only).
int gemm_mma_emulate(const uint8_t* qweight, int64_t stride_qn, int n, int64_t k, int64_t ng, int bits,
                     const float* scales, const uint8_t* zeros, const uint16_t* x, int m, int x_dtype, float* y);

}  // namespace qdpo
