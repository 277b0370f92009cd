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
// Work: a block of 8 warps owns 16·RT rows of ŵ; its warps take turns over the
// 128-code K steps of the block's K range (blockIdx.y: split-K when N is too
// small to fill the GPU). Per step a lane issues one 16-byte (W4) or two
// (W8) loads per weight row straight from the canonical format, and 4 of x —
// the fragment map in gemv_fragments.cuh makes a re-layout unnecessary — then
// dequantizes in registers (SHF + LOP3 + HSUB2 + HMUL2 per two W4 codes) and
// issues 8 · RT · MT mma.sync. The next step's loads are issued before this
// step's math (two register stages in ping-pong). For M <= 2 a ring variant
// (plan depth 3 or 4, forced only until measured on a GPU) keeps D steps of
// weight loads in flight per warp and reads x at its step. Warps' partial tiles are summed in shared
// memory in a fixed order; splits write fp32 partials that a small kernel sums
// in split order: results are deterministic.
// Bytes moved: N·K·b/8 + N·NG·(s_size + 1) of weight, exactly once; x once per
// block from L2 (M·K·2 per 16·RT rows); y M·N·2 (+ 2·splits·M·N·4 of partials).
// At M = 1, W4 moves ~¼ of a bf16 matmul's bytes: the roofline speed-up is ~3.8×.
#include <algorithm>
#include <atomic>

#include "dequant_matmul.cuh"
#include "gemv_fragments.cuh"

namespace qdpo {
namespace {

using gemv::RowGrid;

template <int HD>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if (HD == kF16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// One lane's weight operands of one K step: rows g and g + 8 of each 16-row tile.
template <int BITS, int RT>
struct WStage {
  uint32_t w[RT][2][BITS];  // 16 bytes (W4) or 32 bytes (W8) of codes per row
  RowGrid grid[RT][2];
};

// One lane's operands of one K step: its weights, and x rows g and g + 8.
template <int BITS, int MT, int RT>
struct Stage {
  WStage<BITS, RT> ws;
  uint32_t x[MT][16];  // 32 activations per row of x
};

__device__ __forceinline__ void load16(uint32_t* dst, const void* src) {
  const uint4 u = __ldg(static_cast<const uint4*>(src));
  dst[0] = u.x, dst[1] = u.y, dst[2] = u.z, dst[3] = u.w;
}

// Weights are read once: stream them past L1 (evict-first) and keep L1 for x.
__device__ __forceinline__ void load16_stream(uint32_t* dst, const void* src) {
  const uint4 u = __ldcs(static_cast<const uint4*>(src));
  dst[0] = u.x, dst[1] = u.y, dst[2] = u.z, dst[3] = u.w;
}

// Group of code kl: G is a power of two (qdpo's 32..256) or K (one group per row).
__device__ __forceinline__ int group_of(const GemvArgs& a, int kl) {
  return a.ng == 1 ? 0 : (a.g_shift >= 0 ? kl >> a.g_shift : kl / a.g);
}

// A lane's rows, resolved once per block: int32 offsets (every operand is below
// 2^31 elements), -1 for a row past N (weights) or M (x).
template <int MT, int RT>
struct LaneRows {
  int q[RT][2];  // byte offset of weight row n in qweight
  int p[RT][2];  // n · NG: the row's first scale and zero
  int x[MT];     // element offset of x row m
};

template <int MT, int RT>
__device__ __forceinline__ LaneRows<MT, RT> lane_rows(const GemvArgs& a, int n0) {
  const int g = (threadIdx.x & 31) >> 2;
  LaneRows<MT, RT> r;
  QDPO_UNROLL
  for (int rt = 0; rt < RT; ++rt) {
    QDPO_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int n = n0 + 16 * rt + g + 8 * h;
      r.q[rt][h] = n < a.n ? static_cast<int>(n * a.stride_qn) : -1;
      r.p[rt][h] = n * a.ng;
    }
  }
  QDPO_UNROLL
  for (int mt = 0; mt < MT; ++mt) r.x[mt] = g + 8 * mt < a.m ? (g + 8 * mt) * a.k : -1;
  return r;
}

// The lane's 32 activations of each x row at step `step` (zeros past K, past M or past the range).
template <int MT, int RT>
__device__ __forceinline__ void load_x(const GemvArgs& a, const LaneRows<MT, RT>& rows, int step, int step_hi,
                                       uint32_t (&x)[MT][16]) {
  const int kl = gemv::lane_k(step, threadIdx.x & 3);
  const bool kin = step < step_hi && kl < a.k;  // K % 32 == 0: a lane's 32 codes are all in or all out
  QDPO_UNROLL
  for (int mt = 0; mt < MT; ++mt) {
    const uint16_t* src = static_cast<const uint16_t*>(a.x) + rows.x[mt] + kl;
    QDPO_UNROLL
    for (int i = 0; i < 16; ++i) x[mt][i] = 0u;
    if (kin && rows.x[mt] >= 0) {
      QDPO_UNROLL
      for (int i = 0; i < 4; ++i) load16(&x[mt][4 * i], src + 8 * i);
    }
  }
}

// The lane's codes and grids of its weight rows at step `step` (ŵ = 0 past N, K or the range).
template <int HD, int BITS, int MT, int RT>
__device__ __forceinline__ void load_w(const GemvArgs& a, const LaneRows<MT, RT>& rows, int step, int step_hi,
                                       WStage<BITS, RT>& st) {
  const int kl = gemv::lane_k(step, threadIdx.x & 3);
  const bool kin = step < step_hi && kl < a.k;
  const int grp = group_of(a, kl);
  QDPO_UNROLL
  for (int rt = 0; rt < RT; ++rt) {
    QDPO_UNROLL
    for (int h = 0; h < 2; ++h) {
      uint32_t s_bits = 0u, z = 0u;  // rows past N: ŵ = 0
      QDPO_UNROLL
      for (int i = 0; i < BITS; ++i) st.w[rt][h][i] = 0u;
      if (kin && rows.q[rt][h] >= 0) {
        const uint8_t* src = a.q + rows.q[rt][h] + kl * BITS / 8;
        load16_stream(st.w[rt][h], src);
        if (BITS == 8) load16_stream(st.w[rt][h] + 4, src + 16);
        const int p = rows.p[rt][h] + grp;
        s_bits = static_cast<const uint16_t*>(a.s)[p], z = a.z[p];  // scales in x.dtype on this path
      }
      st.grid[rt][h] = gemv::row_grid_bits(s_bits, z, HD);
    }
  }
}

template <int HD, int BITS, int MT, int RT>
__device__ __forceinline__ void load_stage(const GemvArgs& a, const LaneRows<MT, RT>& rows, int step, int step_hi,
                                           Stage<BITS, MT, RT>& st) {
  load_x(a, rows, step, step_hi, st.x);
  load_w<HD>(a, rows, step, step_hi, st.ws);
}

template <int HD, int BITS, int MT, int RT>
__device__ __forceinline__ void compute_step(const WStage<BITS, RT>& st, const uint32_t (&x)[MT][16],
                                             float (&acc)[RT][MT][4]) {
  QDPO_UNROLL
  for (int c = 0; c < gemv::kChunks; ++c) {
    uint32_t px[MT][4];
    QDPO_UNROLL
    for (int mt = 0; mt < MT; ++mt) gemv::x_pairs(&x[mt][4 * c], px[mt]);
    QDPO_UNROLL
    for (int rt = 0; rt < RT; ++rt) {
      uint32_t pg[4], pg8[4];
      gemv::dequant_chunk<BITS>(st.w[rt][0], c, st.grid[rt][0], HD, pg);
      gemv::dequant_chunk<BITS>(st.w[rt][1], c, st.grid[rt][1], HD, pg8);
      QDPO_UNROLL
      for (int h = 0; h < 2; ++h) {
        uint32_t af[4];
        gemv::a_frag(pg, pg8, h, af);
        QDPO_UNROLL
        for (int mt = 0; mt < MT; ++mt) {
          uint32_t bf[2];
          gemv::b_frag(px[mt], h, bf);
          mma16816<HD>(acc[rt][mt], af, bf);
        }
      }
    }
  }
}

// The block's warps hold partial sums of the same tile: add them in warp order, then write y (or the
// split's fp32 partials).
template <int MT, int RT>
__device__ __forceinline__ void store_tile(const GemvArgs& a, const float (&acc)[RT][MT][4], int n0) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  constexpr int E = RT * MT * 4;
  __shared__ float red[kGemvWarps][E][32];
  QDPO_UNROLL
  for (int e = 0; e < E; ++e) red[warp][e][lane] = acc[e / (MT * 4)][(e / 4) % MT][e % 4];
  __syncthreads();
  const int g = lane >> 2, t = lane & 3;
  for (int e = warp; e < E; e += kGemvWarps) {
    float v = 0.f;
    QDPO_UNROLL
    for (int w = 0; w < kGemvWarps; ++w) v += red[w][e][lane];
    const int rt = e / (MT * 4), mt = (e / 4) % MT, i = e % 4;
    const int n = n0 + 16 * rt + gemv::c_row(g, i), m = 8 * mt + gemv::c_col(t, i);
    if (n >= a.n || m >= a.m) continue;
    if (a.splits > 1) {
      a.partial[(static_cast<int64_t>(blockIdx.y) * a.m + m) * a.n + n] = v;
    } else {
      if (a.bias) v += load1(a.bias, a.b_dtype, n);
      store1(a.y, a.x_dtype, static_cast<int64_t>(m) * a.n + n, v);
    }
  }
}

// A block's work: 16·RT weight rows from n0, K steps [step_lo, step_hi) (blockIdx.y: the split);
// its warps take the steps in turn, warp w from step_lo + w.
struct BlockWork {
  int n0, first, step_hi;
};

template <int RT>
__device__ __forceinline__ BlockWork block_work(const GemvArgs& a) {
  const int step_lo = blockIdx.y * a.steps_per_split;
  return {static_cast<int>(blockIdx.x) * 16 * RT, step_lo + static_cast<int>(threadIdx.x >> 5),
          min(step_lo + a.steps_per_split, a.steps)};
}

template <int HD, int BITS, int MT, int RT>
__global__ void __launch_bounds__(kGemvWarps * 32) gemv_mma_kernel(GemvArgs a) {
  const BlockWork b = block_work<RT>(a);
  float acc[RT][MT][4] = {};
  // two register stages in ping-pong: the next step's loads are in flight during this step's math
  const LaneRows<MT, RT> rows = lane_rows<MT, RT>(a, b.n0);
  Stage<BITS, MT, RT> s0, s1;
  load_stage<HD>(a, rows, b.first, b.step_hi, s0);
  for (int step = b.first; step < b.step_hi; step += 2 * kGemvWarps) {
    load_stage<HD>(a, rows, step + kGemvWarps, b.step_hi, s1);
    compute_step<HD>(s0.ws, s0.x, acc);
    if (step + kGemvWarps >= b.step_hi) break;
    load_stage<HD>(a, rows, step + 2 * kGemvWarps, b.step_hi, s0);
    compute_step<HD>(s1.ws, s1.x, acc);
  }
  store_tile(a, acc, b.n0);
}

// The deep variant (plan depth D >= 3, M <= 2): a ring of D weight stages, so D steps of weight
// loads are in flight per warp; x (a few rows, L1-resident) is read at its step instead of staged,
// which keeps the ring's registers for weights. Same fragments, same sums, same epilogue.
template <int HD, int BITS, int MT, int RT, int D>
__global__ void __launch_bounds__(kGemvWarps * 32) gemv_mma_deep_kernel(GemvArgs a) {
  const BlockWork b = block_work<RT>(a);
  float acc[RT][MT][4] = {};
  const LaneRows<MT, RT> rows = lane_rows<MT, RT>(a, b.n0);
  WStage<BITS, RT> ring[D];
  QDPO_UNROLL
  for (int i = 0; i < D; ++i) load_w<HD>(a, rows, b.first + i * kGemvWarps, b.step_hi, ring[i]);
  for (int step = b.first; step < b.step_hi; step += D * kGemvWarps) {
    QDPO_UNROLL
    for (int i = 0; i < D; ++i) {
      const int s = step + i * kGemvWarps;
      if (s >= b.step_hi) break;  // uniform across the warp
      uint32_t x[MT][16];
      load_x(a, rows, s, b.step_hi, x);
      compute_step<HD>(ring[i], x, acc);
      load_w<HD>(a, rows, s + D * kGemvWarps, b.step_hi, ring[i]);  // refill: D steps ahead
    }
  }
  store_tile(a, acc, b.n0);
}

// The shared-memory variant (plan stage "shared", M <= 2): the block copies each stage — the next
// kGemvWarps K steps of its 16 weight rows and of x — into shared memory with cp.async, 16 bytes
// per thread and one whole row segment per warp (512 or 1024 contiguous bytes: full cache lines,
// where the register kernels' loads touch 8 rows x 64 bytes), D stages deep, with no registers held
// by the loads in flight. Warp w then reads step w of the stage in fragment order (row pitch chosen
// so a quarter warp's 16-byte reads hit distinct banks) and adds it as the register kernels do: the
// same steps in the same order per warp, so the same sums, bit for bit.
template <int BITS>
struct SharedStage {
  static constexpr int kStepBytes = gemv::kStepK * BITS / 8;           // one row's codes of one K step
  static constexpr int kRowBytes = kGemvWarps * kStepBytes;            // one row's codes of one stage
  static constexpr int kPitch = kRowBytes + (BITS == 4 ? 64 : 16);     // rows g, g+1 land 64 / 16 bytes apart
  static constexpr int kXRows = 2;                                     // rows of x staged (M <= 2)
  static constexpr int kXBytes = kGemvWarps * gemv::kStepK * 2;        // one x row of one stage
  static constexpr int kBytes = 16 * kPitch + kXRows * kXBytes;
};

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  // src-size 0: nothing is read, the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
               "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

// Stage j of the block's K range [step_lo, step_hi) into `dst`: weight rows n0 .. n0+15 and x rows
// 0 .. M-1 (zeros past N, K and the range; x rows past M are never read).
template <int BITS>
__device__ __forceinline__ void copy_stage(const GemvArgs& a, int n0, int step_lo, int step_hi, int j,
                                           uint8_t* dst) {
  using S = SharedStage<BITS>;
  const int s0 = step_lo + j * kGemvWarps;
  const int w_lo = s0 * S::kStepBytes, w_hi = min(step_hi * S::kStepBytes, a.k * BITS / 8);
  constexpr int kRowChunks = S::kRowBytes / 16;
  static_assert(16 * kRowChunks % (kGemvWarps * 32) == 0, "every thread copies the same number of chunks");
  QDPO_UNROLL
  for (int i = 0; i < 16 * kRowChunks / (kGemvWarps * 32); ++i) {
    const int c = threadIdx.x + i * kGemvWarps * 32;
    const int r = c / kRowChunks, off = (c % kRowChunks) * 16, n = n0 + r;
    const bool ok = n < a.n && w_lo + off < w_hi;
    cp_async16(dst + r * S::kPitch + off, ok ? a.q + n * a.stride_qn + w_lo + off : a.q, ok);
  }
  const int x_lo = s0 * gemv::kStepK * 2, x_hi = min(step_hi * gemv::kStepK, a.k) * 2;
  constexpr int kXChunks = S::kXBytes / 16;
  const uint8_t* x = static_cast<const uint8_t*>(a.x);
  for (int c = threadIdx.x; c < a.m * kXChunks; c += kGemvWarps * 32) {
    const int r = c / kXChunks, off = (c % kXChunks) * 16;
    const bool ok = x_lo + off < x_hi;
    cp_async16(dst + 16 * S::kPitch + r * S::kXBytes + off,
               ok ? x + (static_cast<int64_t>(r) * a.k * 2 + x_lo + off) : x, ok);
  }
}

// Registers capped so that 4 (W4) or 3 (W8) blocks fit an SM's 64 K registers: 64 and 77-79, no
// spills (-Xptxas -v), where the uncapped W4 kernel takes 66 and fits only 3.
template <int HD, int BITS, int D>
__global__ void __launch_bounds__(kGemvWarps * 32, BITS == 4 ? 4 : 3) gemv_mma_shared_kernel(GemvArgs a) {
  using S = SharedStage<BITS>;
  extern __shared__ __align__(16) uint8_t stage_mem[];  // D stages of S::kBytes
  const BlockWork b = block_work<1>(a);
  const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
  const int step_lo = b.first - warp, stages = (b.step_hi - step_lo + kGemvWarps - 1) / kGemvWarps;
  const LaneRows<1, 1> rows = lane_rows<1, 1>(a, b.n0);
  float acc[1][1][4] = {};
  QDPO_UNROLL
  for (int j = 0; j < D - 1; ++j) {
    if (j < stages) copy_stage<BITS>(a, b.n0, step_lo, b.step_hi, j, stage_mem + j * S::kBytes);
    cp_async_commit();  // one group per stage, empty ones too: the wait below counts groups
  }
  for (int j = 0; j < stages; ++j) {
    cp_async_wait<D - 2>();  // this thread's copies of stage j have landed ...
    __syncthreads();         // ... and everyone's; every warp is done with stage j - 1
    if (j + D - 1 < stages) {
      copy_stage<BITS>(a, b.n0, step_lo, b.step_hi, j + D - 1, stage_mem + ((j + D - 1) % D) * S::kBytes);
    }
    cp_async_commit();
    const int s = b.first + j * kGemvWarps;
    if (s >= b.step_hi) continue;  // uniform across the warp
    const uint8_t* slot = stage_mem + (j % D) * S::kBytes;
    WStage<BITS, 1> st;
    const int kl = gemv::lane_k(s, t);
    const bool kin = kl < a.k;
    QDPO_UNROLL
    for (int h = 0; h < 2; ++h) {
      const uint4* src = reinterpret_cast<const uint4*>(slot + (g + 8 * h) * S::kPitch + warp * S::kStepBytes +
                                                        t * (gemv::kLaneK * BITS / 8));
      QDPO_UNROLL
      for (int i = 0; i < BITS / 4; ++i) {
        const uint4 u = src[i];
        st.w[0][h][4 * i] = u.x, st.w[0][h][4 * i + 1] = u.y, st.w[0][h][4 * i + 2] = u.z, st.w[0][h][4 * i + 3] = u.w;
      }
      uint32_t s_bits = 0u, z = 0u;
      if (kin && rows.q[0][h] >= 0) {
        const int p = rows.p[0][h] + group_of(a, kl);
        s_bits = static_cast<const uint16_t*>(a.s)[p], z = a.z[p];
      }
      st.grid[0][h] = gemv::row_grid_bits(s_bits, z, HD);
    }
    uint32_t x[1][16] = {};
    if (g < a.m) {
      const uint4* src =
          reinterpret_cast<const uint4*>(slot + 16 * S::kPitch + g * S::kXBytes + (warp * gemv::kStepK + t * gemv::kLaneK) * 2);
      QDPO_UNROLL
      for (int i = 0; i < 4; ++i) {
        const uint4 u = src[i];
        x[0][4 * i] = u.x, x[0][4 * i + 1] = u.y, x[0][4 * i + 2] = u.z, x[0][4 * i + 3] = u.w;
      }
    }
    compute_step<HD>(st, x, acc);
  }
  store_tile(a, acc, b.n0);
}

template <int HD, int BITS, int D>
int launch_shared(const GemvArgs& a, dim3 grid, cudaStream_t stream) {
  constexpr int bytes = D * SharedStage<BITS>::kBytes;
  if (bytes > 48 * 1024) {  // above the default dynamic shared memory limit: opt in (per device, once)
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return launch_status();
    static std::atomic<uint64_t> opted{0};  // bit per device
    if (dev >= 64 || !(opted.load() >> dev & 1u)) {
      if (cudaFuncSetAttribute(gemv_mma_shared_kernel<HD, BITS, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               bytes) != cudaSuccess) {
        return launch_status();
      }
      if (dev < 64) opted.fetch_or(uint64_t(1) << dev);
    }
  }
  gemv_mma_shared_kernel<HD, BITS, D><<<grid, kGemvWarps * 32, bytes, stream>>>(a);
  return launch_status();
}

template <int HD, int BITS>
int launch_mma(const GemvArgs& a, const GemvPlan& p, cudaStream_t stream) {
  const dim3 grid((a.n + 16 * p.rt - 1) / (16 * p.rt), p.splits), block(kGemvWarps * 32);
  if (p.stage == kGemvShared) {
    switch (p.depth) {
      case 2: return launch_shared<HD, BITS, 2>(a, grid, stream);
      case 3: return launch_shared<HD, BITS, 3>(a, grid, stream);
      case 4: return launch_shared<HD, BITS, 4>(a, grid, stream);
      default: return launch_shared<HD, BITS, 6>(a, grid, stream);
    }
  }
  if (p.mt == 1 && p.rt == 1 && p.depth == 3) {
    gemv_mma_deep_kernel<HD, BITS, 1, 1, 3><<<grid, block, 0, stream>>>(a);
  } else if (p.mt == 1 && p.rt == 1 && p.depth == 4) {
    gemv_mma_deep_kernel<HD, BITS, 1, 1, 4><<<grid, block, 0, stream>>>(a);
  } else if (p.mt == 1 && p.rt == 1) {
    gemv_mma_kernel<HD, BITS, 1, 1><<<grid, block, 0, stream>>>(a);
  } else if (p.mt == 1) {
    gemv_mma_kernel<HD, BITS, 1, 2><<<grid, block, 0, stream>>>(a);
  } else {
    gemv_mma_kernel<HD, BITS, 2, 2><<<grid, block, 0, stream>>>(a);
  }
  return launch_status();
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int log2_if_pow2(int64_t v) {
  int s = 0;
  while ((int64_t(1) << s) < v) ++s;
  return (int64_t(1) << s) == v ? s : -1;
}

}  // namespace

int dequant_matmul_plan(int64_t m, int64_t n, int64_t k, int64_t ng, int bits, int x_dtype, int s_dtype, ptr_t x,
                        ptr_t qweight, int64_t stride_qn, int sm_count, GemvPlan* plan, int force_splits,
                        int force_depth, int force_stage) {
  if (int e = check_grid(n, k, ng, bits)) return e;
  QDPO_REQUIRE(valid_dtype(x_dtype) && valid_dtype(s_dtype), kErrDtype);
  QDPO_REQUIRE(m >= 1 && m <= kGemvMaxM, kErrShape);
  QDPO_REQUIRE(sm_count >= 1 && stride_qn >= k * bits / 8, kErrShape);
  QDPO_REQUIRE(force_splits >= 0 && force_splits <= kMaxSplits, kErrShape);
  QDPO_REQUIRE(force_stage == 0 || force_stage == kGemvRegisters || force_stage == kGemvShared, kErrShape);
  // registers: 2 (ping-pong), 3, 4 (ring); shared memory: 2, 3, 4 or 6 stages
  QDPO_REQUIRE(force_depth == 0 || (force_depth >= 2 && force_depth <= 4) ||
                   (force_depth == kMaxGemvDepth && force_stage == kGemvShared), kErrShape);
  QDPO_REQUIRE(m * k < kInt32Limit && m * n < kInt32Limit && n * stride_qn < kInt32Limit, kErrTooLarge);
  const int64_t g = k / ng;
  const bool mma = x_dtype != kF32 && s_dtype == x_dtype && k % 32 == 0 && g % 32 == 0 && aligned(x, 16) &&
                   aligned(qweight, 16) && stride_qn % 16 == 0;
  *plan = {mma ? kGemvMma : kGemvFma, m <= 8 ? 1 : 2, m <= 2 ? 1 : 2, 1, 0, 2, kGemvRegisters};
  if (!mma) return kOk;
  // the deeper pipelines exist for the M <= 2 tile; not yet measured, so only when forced
  if (plan->mt == 1 && plan->rt == 1) {
    if (force_stage) plan->stage = force_stage;
    if (force_depth) plan->depth = force_depth;
  }
  // Split K only when the row tiles fill at most a quarter of the SMs, into about one block per SM;
  // keep >= 1 step per warp. Measured on an H200 (132 SMs; benchmarks/sweep_gemv.py, README "GPU
  // results"): each split costs the partials' round trip and a second launch, so 4096-row weights
  // (128 tiles of 32 rows at M > 2) run fastest unsplit, 1024-row ones (32 tiles) with 4 ranges.
  const int64_t tiles = cdiv(n, 16 * plan->rt), steps = cdiv(k, gemv::kStepK);
  int64_t splits = 1;
  if (force_splits) {
    splits = force_splits;
  } else if (4 * tiles <= sm_count) {
    splits = std::min<int64_t>(std::min<int64_t>(sm_count / tiles, kMaxSplits),
                               std::max<int64_t>(1, steps / kGemvWarps));
  }
  splits = cdiv(steps, cdiv(steps, std::min<int64_t>(splits, steps)));  // no empty K range
  plan->splits = static_cast<int>(splits);
  plan->workspace_bytes = plan->splits > 1 ? plan->splits * m * n * 4 : 0;
  return kOk;
}

int dequant_matmul(ptr_t x, int x_dtype, int64_t m, int64_t n, int64_t k, int64_t ng, int bits, ptr_t qweight,
                   int64_t stride_qn, ptr_t scales, int s_dtype, ptr_t zeros, ptr_t bias, int b_dtype, ptr_t y,
                   ptr_t workspace, int64_t workspace_bytes, int sm_count, ptr_t stream, int force_splits,
                   int force_depth, int force_stage) {
  GemvPlan p;
  if (int e = dequant_matmul_plan(m, n, k, ng, bits, x_dtype, s_dtype, x, qweight, stride_qn, sm_count, &p,
                                  force_splits, force_depth, force_stage)) {
    return e;
  }
  QDPO_REQUIRE(bias == 0 || valid_dtype(b_dtype), kErrDtype);
  QDPO_REQUIRE(x != 0 && qweight != 0 && scales != 0 && zeros != 0 && y != 0, kErrNull);
  QDPO_REQUIRE(aligned(x, dtype_size(x_dtype)) && aligned(y, dtype_size(x_dtype)) &&
                   aligned(scales, dtype_size(s_dtype)) && aligned(bias, bias ? dtype_size(b_dtype) : 1), kErrAlign);
  QDPO_REQUIRE(workspace_bytes >= p.workspace_bytes && (p.workspace_bytes == 0 || workspace != 0), kErrWorkspace);
  QDPO_REQUIRE(aligned(workspace, 4), kErrAlign);
  const int64_t steps = cdiv(k, gemv::kStepK);
  GemvArgs a{reinterpret_cast<const void*>(x), x_dtype, static_cast<int>(m), static_cast<int>(n),
             static_cast<int>(k), bits, static_cast<int>(k / ng), static_cast<int>(ng), log2_if_pow2(k / ng),
             reinterpret_cast<const uint8_t*>(qweight), stride_qn, reinterpret_cast<const void*>(scales), s_dtype,
             reinterpret_cast<const uint8_t*>(zeros), reinterpret_cast<const void*>(bias), b_dtype,
             reinterpret_cast<void*>(y), reinterpret_cast<float*>(workspace), p.splits, static_cast<int>(steps),
             static_cast<int>(cdiv(steps, p.splits))};
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  if (p.kernel == kGemvFma) {
    const int xs = dtype_size(x_dtype);
    const bool vec8 = (k / ng) % 8 == 0 && aligned(x, 16) && (k * xs) % 16 == 0 && aligned(qweight, 8) &&
                      stride_qn % 8 == 0;
    return launch_gemv_fma(a, vec8, st);
  }
  int e = x_dtype == kF16 ? (bits == 4 ? launch_mma<kF16, 4>(a, p, st) : launch_mma<kF16, 8>(a, p, st))
                          : (bits == 4 ? launch_mma<kBF16, 4>(a, p, st) : launch_mma<kBF16, 8>(a, p, st));
  if (e == kOk && p.splits > 1) e = launch_splitk_reduce(a, st);
  return e;
}

}  // namespace qdpo
