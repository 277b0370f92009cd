// dequant_matmul_gemv.cu — W4A16 / W8A16 decode GEMV on tensor cores: y = x @ ŵᵀ (+ bias), M <= 16.
//
// Formula (reference.dequant_matmul): ŵ[n, k] = (q[n, k] - z[n, k/G]) · s[n, k/G]
// rounded to x.dtype (exactly as the reference: (q - z) is an exact small
// integer, the product is rounded once), y[m, n] = Σ_k x[m, k] ŵ[n, k] in fp32
// (mma.sync.m16n8k16, fp32 accumulators), + bias[n] in fp32, one cast to x.dtype.
//
// Tensors (N = out_features, K = in_features, G = K / NG):
//   x        (M, K)      fp16/bf16 (this path)   contiguous, 16-byte aligned
//   qweight  (N, K·b/8)  uint8                   qdpo/quant/format.py, rows 16-byte aligned
//   scales   (N, NG)     x.dtype (this path)     contiguous (the Python wrapper rounds other dtypes
//                                                to x.dtype first, as the product would)
//   zeros    (N, NG)     uint8                   contiguous
//   bias     (N,)        any float or none       added in fp32
//   y        (M, N)      x.dtype                 contiguous
// This path needs K % 32 == 0 and G % 32 == 0 (G = K included) and scales in
// x.dtype; everything else — fp32 x, odd sizes, misalignment — goes to
// dequant_matmul_fma.cu (the plan below picks). M > 16 is not served (the Python wrapper raises Unsupported).
//
// Work: a block of 8 warps (or 4: GemvPlan::warps) owns 16·RT rows of ŵ; its
// warps take turns over the 128-code K steps of the block's K range
// (blockIdx.y: split-K when N is too small to fill the GPU). Per step a lane
// issues one 16-byte (W4) or two (W8) loads per weight row straight from the
// canonical format, and 4 of x — the fragment map in gemv_fragments.cuh makes a
// re-layout unnecessary — then dequantizes in registers (SHF + LOP3 + HSUB2 +
// HMUL2 per two W4 codes) and issues 8 · RT · MT mma.sync. The next step's
// loads are issued before this step's math (two register stages in ping-pong);
// only the last step of a K that is not a multiple of 128 checks bounds.
// Four opt-in variants, not yet measured on a GPU (static sm_90 SASS of the M <= 2
// W4 bf16 kernel's main loop: 204.5 instructions per K step, 79 registers, 3
// blocks of 8 warps per SM; README "GPU results" has the table):
// - x_smem (M <= 2): the block first copies x over its K range to shared memory
//   as ready-made mma pairs (about 15 instructions per step and row of x); the
//   main loop keeps only weights in registers and reads a chunk of x with one
//   16-byte load: 190.5 per step, 48 registers, 5 blocks per SM.
// - scale_after (G a multiple of 128, or one group per row): the mma takes the
//   exact integers q - z and each step's fp32 sums are multiplied by the row's
//   scale after it (gemv_fragments.cuh: w4_centered_pair), which drops the HMUL2
//   of every pair: 176 per step; with x_smem, 163. y is then closer to the exact
//   product than the x.dtype-rounded ŵ of the reference.
// - zero_after (W4, bf16 x, with scale_after; any place of x, any M): the mma takes the biased
//   codes as they are, and a second mma per k-tile and tile of x adds -(bias + z) times the same x
//   (gemv_fragments.cuh: zero_frag), before the scale: no HSUB2 per pair, 8 · MT mma more per step.
// - shared_x (any M <= 16; gemv_shared_x_kernel below): each warp owns 16 rows and walks the whole K
//   range, and the block stages x of all M rows in shared memory 512 codes at a time (cp.async into a
//   landing area during the previous chunk, then the x_smem pair layout) for all of them: x comes
//   from L2 once per 16 · warps rows instead of once per 16 · RT, and at M = 16 a warp needs 80
//   registers instead of 156-179 (3 blocks of 8 warps per SM instead of 1; at M <= 8, 64 and 4).
// Grouped (dequant_matmul_experts, a mixture of experts' decode): P rows of x, each with its own expert of
// the weights' `experts` slices of N rows, in one launch, unsplit (gemv_kernels.cuh: GR). Pairs: the
// M = 1 kernel, blockIdx.z the row, each block reading its expert id from device memory. Segments
// (rows sorted by expert; seg_rows > 0, the most rows one expert is expected to take, picks the tile):
// blockIdx.z a chunk of 8 or 16 of one expert's rows, found on the device (gemv_kernels.cuh:
// find_segment), the kernel of the M = seg_rows tile, each expert's weights read once per chunk; the
// grid holds segment_blocks(P, E, rows) blocks, not one column per expert.
// A step keeps the scale bits and zero points it loads as they are and turns them into the grid in the
// step that uses them (gemv_kernels.cuh: WStage), so that no step waits for the loads it has just issued.
// Warps' partial tiles are summed in shared memory in a fixed order; splits
// write fp32 partials that a small kernel sums in split order: results are
// deterministic. That kernel is the GEMV's programmatic dependent on sm_90
// (qdpo_device.cuh: launch_dependent; the GEMV triggers it as it starts): its
// blocks are placed while the GEMV runs and wait for its partials, where an
// ordinary launch began only after the GEMV had finished (not yet timed).
//
// Measured and dropped (H200, benchmarks/results/NVIDIA-H200-sweep_gemv-pipelines.json,
// README "GPU results"): a ring of 3-4 weight stages per warp and a cp.async
// shared-memory pipeline of 2-6 stages with whole-row copies were both slower
// than the ping-pong kernel at M = 1 (Nsight Compute: the kernel is bound by
// instruction issue and the partial second wave, not by loads in flight).
//
// Bytes moved: N·K·b/8 + N·NG·(s_size + 1) of weight, exactly once; x once per
// block from L2 (M·K·2 per 16·RT rows); y M·N·2 (+ 2·splits·M·N·4 of partials).
// At M = 1, W4 moves ~¼ of a bf16 matmul's bytes: the roofline speed-up is ~3.8×.
#include <algorithm>
#include <atomic>
#include <mutex>
#include <unordered_map>

#include "gemv_kernels.cuh"  // the kernels (built in dequant_matmul_gemv_{f16,bf16}_w{4,8}.cu)

namespace qdpo {
namespace {

GemvKernelFn mma_kernel(int x_dtype, int bits, const GemvPlan& p, int grouped = 0) {
  if (x_dtype == kF16) return bits == 4 ? gemv_kernel_f16_w4(p, grouped) : gemv_kernel_f16_w8(p, grouped);
  return bits == 4 ? gemv_kernel_bf16_w4(p, grouped) : gemv_kernel_bf16_w8(p, grouped);
}

// Bytes of dynamic shared memory an x_smem plan's kernel takes: its copy of x over one K range (shared_x:
// sx_smem_bytes).
int64_t xs_smem_bytes(int64_t m, int64_t steps_per_split) {
  return gemv::xs_bytes(static_cast<int>(m), static_cast<int>(steps_per_split * gemv::kStepK));
}

// Blocks of a plan's kernel resident per SM on the current device with `smem` bytes of dynamic shared
// memory (registers decide without: min_blocks); 0 without a GPU. Cached per device, kernel and
// shared-memory size: the plan asks on every call.
int blocks_per_sm(int x_dtype, int bits, const GemvPlan& p, int64_t smem) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  // Key: dtype, bits, tile, warps (1-8), x source (registers, x_smem, shared_x), grid mode (16 · 72
  // launches); then device and shared memory in 128-byte units (< 2^10). Without dynamic shared memory
  // (every launch's auto-warps question) a lock-free table answers; the opt-in x_smem sizes go through a map.
  static_assert(kXsMaxBytes <= 1024 * 128, "the key holds shared memory up to 128 KB");
  constexpr int kKernels = 16 * 72, kDevices = 16;
  const int sc = p.zero_after ? 2 : p.scale_after ? 1 : 0, source = p.shared_x ? 2 : p.x_smem ? 1 : 0;
  const int kernel = ((((x_dtype == kF16) * 2 + (bits == 8)) * 2 + p.mt - 1) * 2 + p.rt - 1) * 72 +
                     (p.warps - 1) * 9 + source * 3 + sc;
  static std::atomic<int> table[kDevices][kKernels] = {};  // 0: not yet asked
  const bool tabled = smem == 0 && dev < kDevices;
  if (tabled) {
    if (const int n = table[dev][kernel].load(std::memory_order_relaxed)) return n;
  }
  const int64_t full_key = (static_cast<int64_t>(dev) * kKernels + kernel) << 10 | (smem + 127) / 128;
  static std::mutex mu;
  static std::unordered_map<int64_t, int> cache;
  if (!tabled) {
    std::lock_guard<std::mutex> lock(mu);
    if (auto it = cache.find(full_key); it != cache.end()) return it->second;
  }
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, mma_kernel(x_dtype, bits, p), p.warps * 32,
                                                    static_cast<size_t>(smem)) != cudaSuccess) {
    cudaGetLastError();  // no GPU here: leave no error behind for the next launch's status
    return 0;            // not cached: a later call on a GPU asks again
  }
  if (tabled) {
    table[dev][kernel].store(n, std::memory_order_relaxed);
  } else {
    std::lock_guard<std::mutex> lock(mu);
    cache[full_key] = n;
  }
  return n;
}

int launch_mma(const GemvArgs& a, const GemvPlan& p, cudaStream_t stream) {
  const dim3 grid((a.n + gemv_block_rows(p) - 1) / gemv_block_rows(p), p.splits);
  const int64_t smem = p.x_smem ? xs_smem_bytes(a.m, a.steps_per_split) : p.shared_x ? sx_smem_bytes(p.mt) : 0;
  QDPO_LAUNCH(grid, p.warps * 32, static_cast<size_t>(smem), stream, mma_kernel(a.x_dtype, a.bits, p))(a);
  return launch_status();
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

// Fitted to and checked against the H200 sweep (benchmarks/results/NVIDIA-H200-sweep_gemv.json, M = 1,
// tests/test_cuda_host.py): it picks the faster block size for all 16 weights there; 4-warp blocks
// won by 5.6-10.8 % on the 7 it gives them to (8192² W4 and W8, Llama-2 gate/up W4 and W8, 16384²
// W8, Llama-3 gate/up W8).
int gemv_auto_warps(int64_t tiles, int sm_count, int blocks8, int blocks4) {
  if (blocks8 < 1 || blocks4 < 1 || tiles <= int64_t(blocks8) * sm_count) return 8;
  if (4 * blocks4 > 8 * blocks8) return 4;
  return tiles <= int64_t(blocks4) * sm_count ? 4 : 8;
}

namespace {

// A plan's block size, split-K and (not shared_x) x_smem and zero_after choices, for its kernel, tile
// and grid mode.
void size_gemv(int64_t m, int64_t n, int64_t k, int bits, int x_dtype, int sm_count, const GemvForce& force,
               GemvPlan* plan) {
  const int64_t steps = cdiv(k, gemv::kStepK);
  if (force.warps) {
    plan->warps = force.warps;
  } else if (plan->mt == 1 && plan->rt == 1 && !plan->shared_x) {  // measured for this tile only (README "GPU results")
    // from the occupancy of the kernels that keep x in registers: an x_smem plan (opt-in, unmeasured)
    // keeps this choice unless its warps are forced too
    GemvPlan p8 = *plan, p4 = *plan;
    p8.warps = 8, p4.warps = 4;
    plan->warps = gemv_auto_warps(cdiv(n, 16), sm_count, blocks_per_sm(x_dtype, bits, p8, 0),
                                  blocks_per_sm(x_dtype, bits, p4, 0));
  } else {
    plan->warps = 8;
  }
  const int64_t tiles = cdiv(n, gemv_block_rows(*plan));  // blocks along N
  // Split K only when the row tiles fill at most a quarter of the SMs, into about one block per SM;
  // keep >= 1 step per warp. Measured on an H200 (132 SMs; benchmarks/sweep_gemv.py, README "GPU
  // results"): each split costs the partials' round trip and a second launch, so 4096-row weights
  // (128 tiles of 32 rows at M > 2) run fastest unsplit, 1024-row ones (32 tiles) with 4 ranges.
  // shared_x (unmeasured): about two blocks per SM, each range at least two chunks of x.
  int64_t splits = 1;
  if (force.splits) {
    splits = force.splits;
  } else if (plan->shared_x) {
    splits = std::clamp<int64_t>(std::min(2 * sm_count / tiles, steps / (2 * gemv::kSxSteps)), 1, kMaxSplits);
  } else if (4 * tiles <= sm_count) {
    splits = std::min<int64_t>(std::min<int64_t>(sm_count / tiles, kMaxSplits),
                               std::max<int64_t>(1, steps / plan->warps));
  }
  splits = cdiv(steps, cdiv(steps, std::min<int64_t>(splits, steps)));  // no empty K range
  plan->splits = static_cast<int>(splits);
  plan->workspace_bytes = plan->splits > 1 ? plan->splits * m * n * 4 : 0;
  // x in shared memory: the 1x1 tile, a copy of x that fits the default 48 KB per block next to
  // store_tile's static buffer. Not yet measured on a GPU, so only when asked (force.x_smem == 2).
  // The zero point after the mma, too (a second mma per k-tile with -(bias + z)): W4 with the scale
  // after, bf16 x (fp16's bias of 1024 would cancel 8 times more in fp32), any place of x and tile.
  // Not yet measured either (force.zero_after == 2).
  const int64_t sps = cdiv(steps, splits), fixed = store_tile_smem_bytes(kernel_warps(plan->warps), 1, 1);
  plan->x_smem = force.x_smem == 2 && !plan->shared_x && plan->mt == 1 && plan->rt == 1 &&
                 fixed + xs_smem_bytes(m, sps) <= kXsMaxBytes;
  plan->zero_after = force.zero_after == 2 && bits == 4 && x_dtype == kBF16 && plan->scale_after;
}

// The plan; `occupancy`: also ask the runtime for the chosen kernel's blocks per SM (a report for
// dequant_matmul_plan; the launch does not need it).
int plan_gemv(int64_t m, int64_t n, int64_t k, int64_t ng, int bits, int x_dtype, int s_dtype, ptr_t x,
              ptr_t qweight, int64_t stride_qn, int sm_count, GemvPlan* plan, const GemvForce& force,
              bool occupancy) {
  if (int e = check_grid(n, k, ng, bits)) return e;
  QDPO_REQUIRE(valid_dtype(x_dtype) && valid_dtype(s_dtype), kErrDtype);
  QDPO_REQUIRE(m >= 1 && m <= kGemvMaxM, kErrShape);
  QDPO_REQUIRE(sm_count >= 1 && stride_qn >= k * bits / 8, kErrShape);
  QDPO_REQUIRE(force.splits >= 0 && force.splits <= kMaxSplits, kErrShape);
  // any 1-8 warps per block (0: the plan's); shared_x blocks 4 or 8 (a warp owns 16 rows of its own)
  QDPO_REQUIRE(force.warps >= 0 && force.warps <= 8, kErrShape);
  QDPO_REQUIRE(force.shared_x != 2 || force.warps % 4 == 0, kErrShape);
  for (const int choice : {force.x_smem, force.scale_after, force.zero_after, force.shared_x, force.row_tiles}) {
    QDPO_REQUIRE(choice >= 0 && choice <= 2, kErrShape);
  }
  QDPO_REQUIRE(m * k < kInt32Limit && m * n < kInt32Limit && n * stride_qn < kInt32Limit, kErrTooLarge);
  const int64_t g = k / ng;
  const bool mma = x_dtype != kF32 && s_dtype == x_dtype && k % 32 == 0 && g % 32 == 0 && aligned(x, 16) &&
                   aligned(qweight, 16) && stride_qn % 16 == 0;
  *plan = {mma ? kGemvMma : kGemvFma, m <= 8 ? 1 : 2, m <= 2 ? 1 : 2, 1, 0, 8, 0, 0, 0, 0, 0};
  if (!mma) return kOk;
  // Each warp on one or two 16-row tiles where x fits one tile (M <= 8): the plan's 1 at M <= 2 and 2
  // above, or as forced. Two tiles share x's registers and the step's address and group arithmetic
  // (static sm_90, W4 bf16, per 1 KB of weight: 173 instructions against 197.5 with the grid in ŵ, 132
  // against 153.5 with zero_after), at 128 registers (2 blocks of 8 warps per SM, not 3) and half the
  // blocks. Not yet measured at M <= 2, so only when asked. x_smem and shared_x take one tile.
  if (force.row_tiles && plan->mt == 1) plan->rt = force.row_tiles;
  // Scale after the mma: every 128-code step in one group. Not yet measured on a GPU, so only when
  // asked (force.scale_after == 2).
  plan->scale_after = force.scale_after == 2 && (ng == 1 || g % gemv::kStepK == 0);
  // Warps that each own 16 rows and share x in shared memory (any M): not yet measured on a GPU, so
  // only when asked (force.shared_x == 2), and not where x_smem is asked for and granted (sized once
  // without shared_x to see; otherwise each plan is sized once).
  const auto share_x = [plan] { plan->shared_x = 1, plan->rt = 1; };
  if (force.shared_x == 2 && force.x_smem != 2) share_x();
  size_gemv(m, n, k, bits, x_dtype, sm_count, force, plan);
  if (force.shared_x == 2 && !plan->shared_x && !plan->x_smem) {
    share_x();
    size_gemv(m, n, k, bits, x_dtype, sm_count, force, plan);
  }
  const int64_t sps = cdiv(cdiv(k, gemv::kStepK), plan->splits);
  if (occupancy) {
    const int64_t smem = plan->x_smem ? xs_smem_bytes(m, sps) : plan->shared_x ? sx_smem_bytes(plan->mt) : 0;
    plan->blocks_per_sm = blocks_per_sm(x_dtype, bits, *plan, smem);
  }
  return kOk;
}

}  // namespace

int dequant_matmul_plan(int64_t m, int64_t n, int64_t k, int64_t ng, int bits, int x_dtype, int s_dtype, ptr_t x,
                        ptr_t qweight, int64_t stride_qn, int sm_count, GemvPlan* plan, const GemvForce& force) {
  return plan_gemv(m, n, k, ng, bits, x_dtype, s_dtype, x, qweight, stride_qn, sm_count, plan, force, true);
}

namespace {

GemvArgs gemv_args(ptr_t x, int x_dtype, int64_t m, int64_t n, int64_t k, int64_t ng, int bits, ptr_t qweight,
                   int64_t stride_qn, ptr_t scales, int s_dtype, ptr_t zeros, ptr_t bias, int b_dtype, ptr_t y,
                   ptr_t workspace, int splits) {
  const int64_t steps = cdiv(k, gemv::kStepK);
  return GemvArgs{reinterpret_cast<const void*>(x), x_dtype, static_cast<int>(m), static_cast<int>(n),
                  static_cast<int>(k), bits, static_cast<int>(k / ng), static_cast<int>(ng),
                  div_magic(static_cast<uint32_t>(k / ng)),
                  reinterpret_cast<const uint8_t*>(qweight), stride_qn, reinterpret_cast<const void*>(scales),
                  s_dtype, reinterpret_cast<const uint8_t*>(zeros), reinterpret_cast<const void*>(bias), b_dtype,
                  reinterpret_cast<void*>(y), reinterpret_cast<float*>(workspace), splits, static_cast<int>(steps),
                  static_cast<int>(cdiv(steps, splits)), static_cast<int>(k / gemv::kStepK)};
}

}  // namespace

int dequant_matmul(ptr_t x, int x_dtype, int64_t m, int64_t n, int64_t k, int64_t ng, int bits, ptr_t qweight,
                   int64_t stride_qn, ptr_t scales, int s_dtype, ptr_t zeros, ptr_t bias, int b_dtype, ptr_t y,
                   ptr_t workspace, int64_t workspace_bytes, int sm_count, ptr_t stream, const GemvForce& force) {
  GemvPlan p;
  if (int e = plan_gemv(m, n, k, ng, bits, x_dtype, s_dtype, x, qweight, stride_qn, sm_count, &p, force, false)) {
    return e;
  }
  QDPO_REQUIRE(bias == 0 || valid_dtype(b_dtype), kErrDtype);
  QDPO_REQUIRE(x != 0 && qweight != 0 && scales != 0 && zeros != 0 && y != 0, kErrNull);
  QDPO_REQUIRE(aligned(x, dtype_size(x_dtype)) && aligned(y, dtype_size(x_dtype)) &&
                   aligned(scales, dtype_size(s_dtype)) && aligned(bias, bias ? dtype_size(b_dtype) : 1), kErrAlign);
  QDPO_REQUIRE(workspace_bytes >= p.workspace_bytes && (p.workspace_bytes == 0 || workspace != 0), kErrWorkspace);
  QDPO_REQUIRE(aligned(workspace, 4), kErrAlign);
  const GemvArgs a = gemv_args(x, x_dtype, m, n, k, ng, bits, qweight, stride_qn, scales, s_dtype, zeros, bias,
                               b_dtype, y, workspace, p.splits);
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  if (p.kernel == kGemvFma) {
    const int xs = dtype_size(x_dtype);
    const bool vec8 = (k / ng) % 8 == 0 && aligned(x, 16) && (k * xs) % 16 == 0 && aligned(qweight, 8) &&
                      stride_qn % 8 == 0;
    return launch_gemv_fma(a, vec8, st);
  }
  int e = launch_mma(a, p, st);
  if (e == kOk && p.splits > 1) e = launch_splitk_reduce(a, st);
  return e;
}

int dequant_matmul_experts_plan(int64_t pairs, int64_t n, int64_t k, int64_t ng, int bits, int x_dtype,
                                int s_dtype, ptr_t x, ptr_t qweight, int64_t stride_qn, int sm_count,
                                GemvPlan* plan, int64_t seg_rows) {
  QDPO_REQUIRE(pairs >= 0 && pairs <= kMaxGroupedPairs && seg_rows >= 0, kErrShape);
  GemvForce force{};
  force.splits = 1;
  const int64_t m = std::clamp<int64_t>(seg_rows, 1, kGemvMaxM);  // segments: the tile of the most rows
  if (int e = plan_gemv(m, n, k, ng, bits, x_dtype, s_dtype, x, qweight, stride_qn, sm_count, plan, force, false)) {
    return e;
  }
  if (plan->kernel == kGemvMma && plan->rt == 1) {  // the M = 1 block-size rule, on the blocks of all pairs
    GemvPlan p8 = *plan, p4 = *plan;
    p8.warps = 8, p4.warps = 4;
    plan->warps = gemv_auto_warps(std::max<int64_t>(pairs, 1) * cdiv(n, 16), sm_count,
                                  blocks_per_sm(x_dtype, bits, p8, 0), blocks_per_sm(x_dtype, bits, p4, 0));
  }
  return kOk;
}

int dequant_matmul_experts(ptr_t x, int x_dtype, int64_t pairs, ptr_t pair_expert, int64_t experts, int64_t n,
                           int64_t k, int64_t ng, int bits, ptr_t qweight, int64_t stride_qn, ptr_t scales,
                           int s_dtype, ptr_t zeros, ptr_t bias, int b_dtype, ptr_t y, int sm_count, ptr_t stream,
                           int64_t seg_rows) {
  QDPO_REQUIRE(experts >= 1, kErrShape);
  GemvPlan p;
  if (int e = dequant_matmul_experts_plan(pairs, n, k, ng, bits, x_dtype, s_dtype, x, qweight, stride_qn, sm_count,
                                          &p, seg_rows)) {
    return e;
  }
  QDPO_REQUIRE(p.kernel == kGemvMma, kErrShape);  // the wrapper asks dequant_matmul_experts_plan first
  QDPO_REQUIRE(experts * n * stride_qn < kInt32Limit && experts * n * ng < kInt32Limit && pairs * k < kInt32Limit &&
                   pairs * n < kInt32Limit, kErrTooLarge);
  if (pairs == 0) return kOk;
  QDPO_REQUIRE(x != 0 && pair_expert != 0 && qweight != 0 && scales != 0 && zeros != 0 && y != 0, kErrNull);
  QDPO_REQUIRE(bias == 0 || valid_dtype(b_dtype), kErrDtype);
  QDPO_REQUIRE(aligned(y, dtype_size(x_dtype)) && aligned(scales, dtype_size(s_dtype)) && aligned(pair_expert, 4) &&
                   aligned(bias, bias ? dtype_size(b_dtype) : 1), kErrAlign);
  GemvArgs a = gemv_args(x, x_dtype, 1, n, k, ng, bits, qweight, stride_qn, scales, s_dtype, zeros, bias, b_dtype, y,
                         0, 1);
  a.pair_expert = reinterpret_cast<const int32_t*>(pair_expert);
  a.experts = static_cast<int>(experts);
  a.pairs = static_cast<int>(pairs);
  const dim3 grid(static_cast<unsigned>(cdiv(n, gemv_block_rows(p))), 1,
                  static_cast<unsigned>(seg_rows ? segment_blocks(pairs, experts, 8 * p.mt) : pairs));
  QDPO_LAUNCH(grid, p.warps * 32, 0, reinterpret_cast<cudaStream_t>(stream),
              mma_kernel(x_dtype, bits, p, seg_rows ? kSegments : kPairs))(a);
  return launch_status();
}

}  // namespace qdpo
