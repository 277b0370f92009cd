// gemv_kernels.cuh — the decode GEMV's kernels and the templates that pick one for a plan. The
// contract, the plan and the launch are dequant_matmul_gemv.cu's. Four translation units include this
// header, each for one x dtype and bit width, and export that one's kernel choice (dequant_matmul.cuh:
// gemv_kernel_*): nvcc then builds them in parallel, where the one file took about 50 s per
// architecture. Everything here has internal linkage, so each unit keeps its own instances.
#pragma once

#include "dequant_matmul.cuh"
#include "gemv_fragments.cuh"

namespace qdpo {
namespace {


using gemv::RowGrid;

// One lane's weight operands of one K step: rows g and g + 8 of each 16-row tile. DG (deferred grid):
// the scale's bits and the zero point stay as loaded until the step's math turns them into the grid
// (grid()). Converted in the loader, right behind their loads, they held the warp there for a whole
// memory round trip every step: ptxas keeps that code ahead of the step's first mma (its WARPSYNC),
// and the step's math waited with it (static sm_90: every grid load of the main loop read before the
// next HMMA). Deferred, they are read a step later. The kernels whose register cap then spills a
// loaded value (its STL waits for the load as the conversion did) convert in the loader: defer_grid.
template <int BITS, int RT, bool DG>
struct WStage {
  uint32_t w[RT][2][BITS];  // 16 bytes (W4) or 32 bytes (W8) of codes per row
  uint32_t s_bits[RT][2], z[RT][2];  // DG
  RowGrid grid_[RT][2];              // !DG
  __device__ __forceinline__ void set(int rt, int h, uint32_t s, uint32_t zp, int hd) {
    if constexpr (DG) {
      s_bits[rt][h] = s, z[rt][h] = zp;
    } else {
      grid_[rt][h] = gemv::row_grid_bits(s, zp, hd);
    }
  }
  __device__ __forceinline__ RowGrid grid(int rt, int h, int hd) const {
    if constexpr (DG) return gemv::row_grid_bits(s_bits[rt][h], z[rt][h], hd);
    return grid_[rt][h];
  }
};

// Whether a kernel's stages defer the grid (WStage): all but those that would spill at their register
// caps (static sm_90): x_smem's and the one-tile zero_after kernels (12-44 bytes, stored right behind
// the loads), and bf16 W8's one-tile kernels of 4 warps (96 registers: 4 spill accesses per loop).
constexpr bool defer_grid(int hd, int bits, int w, bool xs, int sc, int mt, int rt) {
  const bool one_tile = mt * rt == 1;
  return !xs && !(one_tile && (sc == gemv::kZeroAfter || (hd == kBF16 && bits == 8 && w == 4)));
}

__device__ __forceinline__ void load16(uint32_t* dst, const void* src) {
  const uint4 u = __ldg(static_cast<const uint4*>(src));
  dst[0] = u.x, dst[1] = u.y, dst[2] = u.z, dst[3] = u.w;
}

// Weights are read once: stream them past L1 (evict-first) and keep L1 for x.
__device__ __forceinline__ void load16_stream(uint32_t* dst, const void* src) {
  const uint4 u = __ldcs(static_cast<const uint4*>(src));
  dst[0] = u.x, dst[1] = u.y, dst[2] = u.z, dst[3] = u.w;
}

// Group of code kl (any G: qdpo's powers of two, K, or an imported checkpoint's), without a branch.
__device__ __forceinline__ int group_of(const GemvArgs& a, int kl) { return div_by(kl, a.g_div); }

// A lane's rows, resolved once per block: weight rows as int32 offsets (every operand is below 2^31
// elements), x rows as pointers (with an offset, ptxas recomputed the row, its check and the 64-bit
// address every step: static sm_90, 6 to 17 instructions more per step). Rows past N repeat row
// N - 1: an mma keeps rows of A apart, so they only fill outputs that store_tile drops, and every
// weight load stays in bounds without a predicate. Rows of x past M (nullptr) load nothing and keep
// the zeros their registers start with: at M = 1, 28 of 32 lanes, whose loads would triple the L1
// traffic of a step (measured: L1 throughput 47 % -> 64 % of peak and 3-5 % slower when they loaded
// a repeated row).
template <int MT, int RT>
struct LaneRows {
  int q[RT][2];           // byte offset of weight row n in qweight
  int p[RT][2];           // n · NG: the row's first scale and zero
  const uint16_t* x[MT];  // x row m (nullptr past M)
};

// Grouped launches (experts): the block's weight rows start at row_base of qweight and its x rows at
// row x_row of x (both 0 otherwise, folded away).
template <int MT, int RT>
__device__ __forceinline__ LaneRows<MT, RT> lane_rows(const GemvArgs& a, int n0, int row_base = 0, int x_row = 0) {
  const int g = (threadIdx.x & 31) >> 2;
  LaneRows<MT, RT> r;
  QDPO_UNROLL
  for (int rt = 0; rt < RT; ++rt) {
    QDPO_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int n = min(n0 + 16 * rt + g + 8 * h, a.n - 1) + row_base;
      r.q[rt][h] = static_cast<int>(n * a.stride_qn);
      r.p[rt][h] = n * a.ng;
    }
  }
  QDPO_UNROLL
  for (int mt = 0; mt < MT; ++mt) {
    r.x[mt] = g + 8 * mt < a.m ? static_cast<const uint16_t*>(a.x) + (x_row + g + 8 * mt) * a.k : nullptr;
  }
  return r;
}

// The loaders below take a step inside the block's range. TAIL: the step may be the last one of a
// K that is not a multiple of 128 (step >= a.full_steps), where lanes past K load nothing and get
// zeros — x and ŵ both, so they add exactly 0; every other step loads without a check.

// The lane's 32 activations of each x row at step `step` (rows past M: untouched).
template <bool TAIL, int MT, int RT>
__device__ __forceinline__ void load_x(const GemvArgs& a, const LaneRows<MT, RT>& rows, int step,
                                       uint32_t (&x)[MT][16]) {
  const int kl = gemv::lane_k(step, threadIdx.x & 3);
  QDPO_UNROLL
  for (int mt = 0; mt < MT; ++mt) {
    if (TAIL && kl >= a.k) {  // K % 32 == 0: a lane's 32 codes are all in or all out
      QDPO_UNROLL
      for (int i = 0; i < 16; ++i) x[mt][i] = 0u;
    } else if (rows.x[mt] != nullptr) {  // (no arithmetic on a null pointer: the compiler may assume none)
      const uint16_t* src = rows.x[mt] + kl;
      QDPO_UNROLL
      for (int i = 0; i < 4; ++i) load16(&x[mt][4 * i], src + 8 * i);
    }
  }
}

template <int MT>
__device__ __forceinline__ void zero_x(uint32_t (&x)[MT][16]) {
  QDPO_UNROLL
  for (int mt = 0; mt < MT; ++mt) {
    QDPO_UNROLL
    for (int i = 0; i < 16; ++i) x[mt][i] = 0u;
  }
}

// The lane's codes and grids of its weight rows at step `step`. SA (scale-after): the whole step is
// one group, and the scale multiplies the lane's accumulators, which hold all four lanes' codes: a
// lane past K in the last step takes the step's scale too, with codes and zero point 0 (q - z = 0);
// with the zero point after (SC == kZeroAfter) the step's real zero point, since its codes meet x = 0.
template <bool TAIL, int HD, int SC, int BITS, int MT, int RT, bool DG>
__device__ __forceinline__ void load_w(const GemvArgs& a, const LaneRows<MT, RT>& rows, int step,
                                       WStage<BITS, RT, DG>& st) {
  const int kl = gemv::lane_k(step, threadIdx.x & 3);
  const int grp = group_of(a, SC != gemv::kScaleInW ? step * gemv::kStepK : kl);
  const uint16_t* scales = static_cast<const uint16_t*>(a.s);  // in x.dtype on this path
  QDPO_UNROLL
  for (int rt = 0; rt < RT; ++rt) {
    QDPO_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int p = rows.p[rt][h] + grp;
      if (TAIL && kl >= a.k) {
        QDPO_UNROLL
        for (int i = 0; i < BITS; ++i) st.w[rt][h][i] = 0u;
        st.set(rt, h, SC != gemv::kScaleInW ? scales[p] : 0u, SC == gemv::kZeroAfter ? a.z[p] : 0u, HD);  // ŵ = 0
        continue;
      }
      const uint8_t* src = a.q + (rows.q[rt][h] + (static_cast<unsigned>(kl) * BITS >> 3));
      load16_stream(st.w[rt][h], src);
      if (BITS == 8) load16_stream(st.w[rt][h] + 4, src + 16);
      st.set(rt, h, scales[p], a.z[p], HD);
    }
  }
}

// One step's loads: weights, and x too unless it sits in shared memory (X = false).
template <bool TAIL, int HD, int SC, bool X = true, int BITS, int MT, int RT, bool DG>
__device__ __forceinline__ void load_stage(const GemvArgs& a, const LaneRows<MT, RT>& rows, int step,
                                           WStage<BITS, RT, DG>& ws, uint32_t (&x)[MT][16]) {
  if constexpr (X) load_x<TAIL>(a, rows, step, x);
  load_w<TAIL, HD, SC>(a, rows, step, ws);
}

// Where a lane reads its x pairs in shared memory (XS): x tile 0 at p (the lane's row and step), tile 1
// d1 bytes further (the lane's row + 8, or row M - 1 when that is past M).
struct XsLane {
  const uint8_t* p;
  int d1;
};

// One step's math. The x pairs come from the stage's registers, or with XS (x_smem, shared_x) from
// one 16-byte shared-memory load per chunk and x tile at xs (see fill_xs, sx_pair). SA
// (scale-after): the mma sums q - z times x over the step into fresh accumulators, then each is
// multiplied by its row's scale into acc (c0, c1: row g; c2, c3: row g + 8). Zero-after (SC ==
// kZeroAfter): the mma sums (bias + q) · x, and after each one a second mma adds -(bias + z) times
// the same x (the row's zero fragment, one per step), before the scale.
template <int HD, bool XS, int SC, int BITS, int MT, int RT, bool DG>
__device__ __forceinline__ void compute_step(const WStage<BITS, RT, DG>& st, const uint32_t (&x)[MT][16],
                                             XsLane xs, float (&acc)[RT][MT][4]) {
  constexpr bool SA = SC != gemv::kScaleInW, ZA = SC == gemv::kZeroAfter;
  RowGrid grid[RT][2];
  QDPO_UNROLL
  for (int rt = 0; rt < RT; ++rt) grid[rt][0] = st.grid(rt, 0, HD), grid[rt][1] = st.grid(rt, 1, HD);
  [[maybe_unused]] uint32_t zf[RT][4];  // ZA only
  if constexpr (ZA) {
    QDPO_UNROLL
    for (int rt = 0; rt < RT; ++rt) gemv::zero_frag(grid[rt][0], grid[rt][1], zf[rt]);
  }
  float step_acc[RT][MT][4] = {};  // SA only
  float (&sum)[RT][MT][4] = SA ? step_acc : acc;
  QDPO_UNROLL
  for (int c = 0; c < gemv::kChunks; ++c) {
    uint32_t px[MT][4];
    if constexpr (XS) {
      QDPO_UNROLL
      for (int mt = 0; mt < MT; ++mt) {
        const uint4 u = *reinterpret_cast<const uint4*>(xs.p + mt * xs.d1 + 16 * c);
        px[mt][0] = u.x, px[mt][1] = u.y, px[mt][2] = u.z, px[mt][3] = u.w;
      }
    } else {
      QDPO_UNROLL
      for (int mt = 0; mt < MT; ++mt) gemv::x_pairs(&x[mt][4 * c], px[mt]);
    }
    QDPO_UNROLL
    for (int rt = 0; rt < RT; ++rt) {
      uint32_t pg[4], pg8[4];
      gemv::dequant_chunk<BITS, SC>(st.w[rt][0], c, grid[rt][0], HD, pg);
      gemv::dequant_chunk<BITS, SC>(st.w[rt][1], c, grid[rt][1], HD, pg8);
      QDPO_UNROLL
      for (int h = 0; h < 2; ++h) {
        uint32_t af[4];
        gemv::a_frag(pg, pg8, h, af);
        QDPO_UNROLL
        for (int mt = 0; mt < MT; ++mt) {
          uint32_t bf[2];
          gemv::b_frag(px[mt], h, bf);
          mma16816<HD>(sum[rt][mt], af, bf[0], bf[1]);
          if constexpr (ZA) mma16816<HD>(sum[rt][mt], zf[rt], bf[0], bf[1]);
        }
      }
    }
  }
  if constexpr (SA) {
    QDPO_UNROLL
    for (int rt = 0; rt < RT; ++rt) {
      QDPO_UNROLL
      for (int mt = 0; mt < MT; ++mt) {
        QDPO_UNROLL
        for (int i = 0; i < 4; ++i) acc[rt][mt][i] = fmaf(grid[rt][i >> 1].sf, step_acc[rt][mt][i], acc[rt][mt][i]);
      }
    }
  }
}

// Where a block's outputs go: y's first row, and bias's first element (a grouped launch's pair and
// expert; 0 otherwise).
struct OutRow {
  int y_row = 0, bias_at = 0;
};

// One output y[y_row + m, n] (+ bias) from its fp32 sum, or the split's fp32 partial; outside (M, N):
// nothing.
__device__ __forceinline__ void store_out(const GemvArgs& a, int n, int m, float v, OutRow o = {}) {
  if (n >= a.n || m >= a.m) return;
  if (a.splits > 1) {
    a.partial[(static_cast<int64_t>(blockIdx.y) * a.m + m) * a.n + n] = v;
  } else {
    if (a.bias) v += load1(a.bias, a.b_dtype, o.bias_at + n);
    store1(a.y, a.x_dtype, static_cast<int64_t>(o.y_row + m) * a.n + n, v);
  }
}

// The W a block of `warps` warps runs on (its register budget and reduction buffer; FLEX where the two
// differ: gemv_mma_kernel).
constexpr int kernel_warps(int warps) { return warps <= 4 ? 4 : 8; }

// Static shared memory of store_tile: a fp32 partial tile per warp (the x_smem plan counts it).
constexpr int64_t store_tile_smem_bytes(int warps, int mt, int rt) { return int64_t{4} * warps * rt * mt * 4 * 32; }

// The block's nw (<= W) warps hold partial sums of the same tile: add them in warp order, then write y
// (or the split's fp32 partials).
template <int W, int MT, int RT>
__device__ __forceinline__ void store_tile(const GemvArgs& a, const float (&acc)[RT][MT][4], int n0, int nw,
                                           OutRow o = {}) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  constexpr int E = RT * MT * 4;
  QDPO_SHARED(4, float, red, [W][E][32]);
  static_assert(sizeof(red) == store_tile_smem_bytes(W, MT, RT), "the x_smem plan counts this buffer");
  QDPO_UNROLL
  for (int e = 0; e < E; ++e) red[warp][e][lane] = acc[e / (MT * 4)][(e / 4) % MT][e % 4];
  __syncthreads();
  const int g = lane >> 2, t = lane & 3;
  for (int e = warp; e < E; e += nw) {
    float v = 0.f;
    QDPO_UNROLL
    for (int w = 0; w < nw; ++w) v += red[w][e][lane];
    const int rt = e / (MT * 4), mt = (e / 4) % MT, i = e % 4;
    store_out(a, n0 + 16 * rt + gemv::c_row(g, i), 8 * mt + gemv::c_col(t, i), v, o);
  }
}

// A block's work: 16·RT weight rows from n0, K steps [step_lo, step_hi) (blockIdx.y: the split);
// its nw warps take the steps in turn, warp w from step_lo + w. nw: W itself, a constant the loops
// unroll and fold (the plan's 8 and 4), or with FLEX blockDim.x / 32 (any other count, forced).
struct BlockWork {
  int n0, first, step_lo, step_hi, nw;
};

template <int RT, int W, bool FLEX>
__device__ __forceinline__ BlockWork block_work(const GemvArgs& a) {
  const int step_lo = blockIdx.y * a.steps_per_split;
  return {static_cast<int>(blockIdx.x) * 16 * RT, step_lo + static_cast<int>(threadIdx.x >> 5), step_lo,
          min(step_lo + a.steps_per_split, a.steps), FLEX ? static_cast<int>(blockDim.x >> 5) : W};
}

// The lane's x pairs at step step_rel of the block's range (XS; else unused).
template <bool XS>
__device__ __forceinline__ XsLane xs_at(const uint8_t* xs_lane, int step_rel) {
  if constexpr (XS) return {xs_lane + step_rel * gemv::xs_lane_offset(1, 0), 0};
  return {nullptr, 0};
}

// x_smem (XS): the block first copies its rows of x over its K range into shared memory as pairs
// (gemv_fragments.cuh: xs_offset), 16 bytes per thread and load, zeros past K; the main loop then
// holds only weights in registers and reads a chunk's x pairs with one 16-byte load. Lanes of x rows
// past M read row M - 1: an mma keeps columns of B apart, and store_tile drops those outputs.
__device__ __forceinline__ void fill_xs(const GemvArgs& a, const BlockWork& b, uint8_t* xs, int row_bytes) {
  const int krange = (b.step_hi - b.step_lo) * gemv::kStepK, k0 = b.step_lo * gemv::kStepK;
  for (int row = 0; row < a.m; ++row) {
    for (int kk = 8 * static_cast<int>(threadIdx.x); kk < krange; kk += 8 * 32 * b.nw) {
      uint32_t xw[4] = {0u, 0u, 0u, 0u}, p[4];
      if (k0 + kk < a.k) load16(xw, static_cast<const uint16_t*>(a.x) + row * a.k + k0 + kk);
      gemv::x_pairs(xw, p);
      *reinterpret_cast<uint4*>(xs + row * row_bytes + gemv::xs_offset(kk)) = make_uint4(p[0], p[1], p[2], p[3]);
    }
  }
}

// Blocks per SM the register allocation must allow (__launch_bounds__): ptxas's count moves by 10-15
// registers with small code changes, and one register past a limit costs a whole block per SM. The
// M <= 2 kernels, blocks of 8 / 4 warps: W4 3 / 6 (80 registers), with x_smem 5 / 10 (48); W8 2 / 5
// (96 for 4 warps), with x_smem 4 / 8 (64); W4 with x_smem and the zero point after the mma 4 / 8
// (64: at 48 it spilled 28 bytes). Tighter caps spill; at these, only sm_80's W4 x_smem + scale_after
// kernel spills one register (4 bytes).
constexpr int min_blocks(int bits, int mt, int rt, int w, bool xs, int sc) {
  if (mt * rt != 1) return 1;
  if (bits == 4) return (xs ? (sc == gemv::kZeroAfter ? 4 : 5) : 3) * 8 / w;
  return xs ? 4 * 8 / w : (w == 8 ? 2 : 5);
}

// W warps per block, all on the block's rows, taking its K steps in turn: the plan's 8, or 4 where an
// SM holds more warps in smaller blocks or where the grid then fits in one wave (gemv_auto_warps; the
// 1x1 tile's blocks per SM: min_blocks). FLEX: any other count, forced (blockDim.x / 32 warps; W = 8
// serves 5-7, W = 4 serves 1-3, and sets the register budget and the reduction buffer); a count known
// only at run time costs the main loop up to 31 instructions per two steps (static sm_90), so 8 and 4
// keep kernels of their own. XS: x in shared memory; SC: where the grid applies (ScaleMode).
// GR (grouped, dequant_matmul_experts; no split, x in registers), the weights `a.experts` slices of
// a.n rows and the bias (if any) one row per expert:
// - kPairs: blockIdx.z is a pair of one row of x and one expert; the block multiplies x row z by its
//   rows of that expert's slice (a.pair_expert[z]) into y row z, adding the expert's bias row. An id
//   outside [0, a.experts) (an expert-parallel sentinel) gives that row of y zeros. a.m = 1.
// - kSegments: x's rows come sorted by expert, expert e's at a.pair_expert[e] .. a.pair_expert[e + 1]
//   (a.experts + 1 offsets), in chunks of up to 8 · MT rows; blockIdx.z takes the z-th chunk in expert
//   order (find_segment; a.m: its rows), into the same rows of y. Blocks past the last chunk exit.
enum GroupedMode : int { kNotGrouped = 0, kPairs = 1, kSegments = 2 };

// kSegments: which rows block z takes. Expert e's c rows make ceil(c / R) chunks of R rows; the block
// takes the z-th chunk in expert order ({expert, first row, rows}; rows = 0 past the last chunk). The
// block's threads find it together, one expert each per round of blockDim.x experts: each loads its
// expert's two offsets (one memory round trip, as one thread reading block z's two offsets would take),
// a scan of the chunk counts over the warp (xor butterflies) and over the warps (their sums in shared
// memory) gives each expert its first chunk, and the expert whose chunks hold z writes the answer. So
// the grid needs no block for an expert without rows: segment_blocks(P, E, R) of them at most, where
// one block column per expert took E (most of them empty for a model of 128 experts and a few tokens).
// Not inlined: inlined, the search's code moved ptxas to spill a register inside the main loop of the
// one-tile kernels (static sm_90); a call leaves every main loop as it was without the search.
struct Segment {
  int expert, lo, m;  // m = 0: no chunk for this block
};
template <int R>
__device__ QDPO_NOINLINE Segment find_segment(const int32_t* offsets, int experts, int rows, int z) {
  QDPO_SHARED(4, int, warp_chunks, [32]);
  QDPO_SHARED(4, int, found, [3]);
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int warps = static_cast<int>(blockDim.x) >> 5;
  if (tid == 0) found[2] = 0;  // no chunk, unless an expert's chunks hold z (written after a barrier)
  int before = 0;  // the chunks of the experts of earlier rounds
  for (int base = 0; base < experts; base += static_cast<int>(blockDim.x)) {
    const int e = base + tid;
    // clamped to 0 <= lo <= hi <= rows: offsets that are not the experts' ranges (dequant_matmul_segments
    // takes them from the caller) give wrong rows, never a read or write outside x and y
    const int lo = e < experts ? min(max(offsets[e], 0), rows) : 0;
    const int hi = e < experts ? min(max(offsets[e + 1], lo), rows) : 0;
    const int n = (hi - lo + R - 1) / R;
    int incl = n, group = n;  // incl: the chunks of experts base .. e; group: of the lane's aligned group
    QDPO_UNROLL
    for (int d = 1; d < 32; d <<= 1) {
      const int v = __shfl_xor_sync(0xffffffffu, group, d);
      if (lane & d) incl += v;
      group += v;
    }
    if (lane == 31) warp_chunks[warp] = incl;
    __syncthreads();
    int round = 0;
    for (int w = 0; w < warps; ++w) {
      const int c = warp_chunks[w];
      incl += w < warp ? c : 0;
      round += c;
    }
    const int first = before + incl - n;
    if (z >= first && z < first + n) {
      const int row = lo + R * (z - first);
      found[0] = e, found[1] = row, found[2] = min(hi - row, R);
    }
    before += round;
    __syncthreads();  // found is read below; warp_chunks is written again by the next round
  }
  return {found[0], found[1], found[2]};
}
template <int HD, int BITS, int MT, int RT, int W, bool FLEX, bool XS, int SC, int GR = kNotGrouped>
__global__ void __launch_bounds__(W * 32, min_blocks(BITS, MT, RT, W, XS, SC)) gemv_mma_kernel(GemvArgs a) {
  static_assert(!XS || MT == 1, "x_smem serves the one-x-tile kernel (xs_at gives x tile 1 no row of its own)");
  static_assert(!GR || !XS, "a grouped launch keeps x in registers");
  static_assert(GR != kPairs || MT == 1, "a pair is one row of x");
  pdl_trigger();  // split-K: the reduction's launch need not wait for this grid to finish (it waits itself)
  const BlockWork b = block_work<RT, W, FLEX>(a);
  OutRow out;  // GR: the block's first row of y, its expert's row of bias
  int row_base = 0;  // GR: its expert's first weight row
  if constexpr (GR == kSegments) {
    const Segment seg = find_segment<8 * MT>(a.pair_expert, a.experts, a.pairs, static_cast<int>(blockIdx.z));
    a.m = seg.m;
    if (a.m <= 0) return;  // the same for the whole block
    row_base = seg.expert * a.n;
    out = {seg.lo, row_base};
  }
  if constexpr (GR == kPairs) {
    const int pair = static_cast<int>(blockIdx.z), e = a.pair_expert[pair];
    if (e < 0 || e >= a.experts) {  // the same for the whole block
      for (int i = static_cast<int>(threadIdx.x); i < 16 * RT && b.n0 + i < a.n; i += static_cast<int>(blockDim.x)) {
        store1(a.y, a.x_dtype, static_cast<int64_t>(pair) * a.n + b.n0 + i, 0.f);
      }
      return;
    }
    row_base = e * a.n;
    out = {pair, row_base};
  }
  float acc[RT][MT][4] = {};
  const LaneRows<MT, RT> rows = lane_rows<MT, RT>(a, b.n0, row_base, out.y_row);
  // The full steps: two register stages in ping-pong, the next step's loads in flight during this
  // step's math, no bounds checks.
  const int full_hi = min(b.step_hi, a.full_steps);
  WStage<BITS, RT, defer_grid(HD, BITS, W, XS, SC, MT, RT)> w0, w1;
  uint32_t x0[MT][16], x1[MT][16];  // x in registers (not XS)
  QDPO_DYNAMIC_SMEM(16, uint4, xs_smem);  // XS: [M][row_bytes] of x pairs
  const uint8_t* xs_lane = nullptr;   // XS: the lane's x pairs at step b.step_lo
  if constexpr (XS) {
    const int krange_max = a.steps_per_split * gemv::kStepK, row_bytes = gemv::xs_row_bytes(krange_max);
    const int lane = threadIdx.x & 31;
    uint8_t* smem = reinterpret_cast<uint8_t*>(xs_smem);
    xs_lane = smem + min(lane >> 2, a.m - 1) * row_bytes + gemv::xs_lane_offset(0, lane & 3);
    if (b.first < full_hi) load_w<false, HD, SC>(a, rows, b.first, w0);  // in flight during the copy
    fill_xs(a, b, smem, row_bytes);
    __syncthreads();
  }
  if (b.first < full_hi) {
    if constexpr (!XS) {
      zero_x(x0), zero_x(x1);
      load_stage<false, HD, SC>(a, rows, b.first, w0, x0);
    }
    const int nw = b.nw;
    for (int step = b.first;; step += 2 * nw) {
      if (step + nw < full_hi) load_stage<false, HD, SC, !XS>(a, rows, step + nw, w1, x1);
      const int rel0 = step - b.step_lo, rel1 = rel0 + nw;
      compute_step<HD, XS, SC>(w0, x0, xs_at<XS>(xs_lane, rel0), acc);
      if (step + nw >= full_hi) break;
      if (step + 2 * nw < full_hi) load_stage<false, HD, SC, !XS>(a, rows, step + 2 * nw, w0, x0);
      compute_step<HD, XS, SC>(w1, x1, xs_at<XS>(xs_lane, rel1), acc);
      if (step + 2 * nw >= full_hi) break;
    }
  }
  // The last step of a K that is not a multiple of 128, by the warp whose turn it is.
  if (full_hi < b.step_hi && full_hi >= b.first && (full_hi - b.first) % b.nw == 0) {
    const int rel = full_hi - b.step_lo;
    zero_x(x0);
    load_stage<true, HD, SC, !XS>(a, rows, full_hi, w0, x0);
    compute_step<HD, XS, SC>(w0, x0, xs_at<XS>(xs_lane, rel), acc);
  }
  store_tile<W>(a, acc, b.n0, b.nw, out);
}

// ---------------------------------------------------------------------------------------------------
// shared_x: warps that each own 16 rows and share x through shared memory (opt-in, any M <= 16).
//
// The kernel above gives a block's rows to all its warps, which take the K steps in turn: every warp
// reads x over its own steps, and at M = 16 its two register stages of x (64 registers) leave room for
// one block of 8 warps per SM, while x from L2 weighs twice the W4 weights (16 rows of x per 32 rows
// of ŵ). Here warp w of a block owns the 16 rows from 16 · (W · blockIdx.x + w) and walks the whole
// K range of the block (split-K: blockIdx.y); the block stages x of all M rows in shared memory,
// kSxSteps steps (512 codes) at a time, as the mma pairs of x_smem. Each thread copies its 16-byte
// pieces of the next chunk with cp.async into a landing area while the warps run this chunk (no
// registers held), then, after a barrier, turns them into pairs in the one pair buffer; a second
// barrier opens the next chunk. x is read from L2 once per 16 · W rows, each warp holds only its
// weights (ping-pong over steps) and 4 or 8 accumulators, and no partial tiles need summing. Rows of x
// past M read row M - 1 (outputs dropped). Dynamic shared memory: [pairs | landing] (sx_smem_bytes).

// A thread's 16-byte pieces of one chunk (gemv::sx_piece_row / sx_piece_k), for x tiles MT.
template <int W, int MT>
constexpr int sx_pieces() {
  static_assert(8 * MT * gemv::kSxPiecesPerRow % (W * 32) == 0, "every thread copies as many pieces");
  return 8 * MT * gemv::kSxPiecesPerRow / (W * 32);
}
constexpr int sx_buffer_bytes(int mt) { return 8 * mt * gemv::kSxRowBytes; }
// The landing area: piece p at 16 · p (every piece of 8 · MT rows, each thread's own).
constexpr int sx_landing_bytes(int mt) { return 8 * mt * gemv::kSxPiecesPerRow * 16; }
constexpr int sx_smem_bytes(int mt) { return sx_buffer_bytes(mt) + sx_landing_bytes(mt); }
static_assert(sx_smem_bytes(2) <= kXsMaxBytes, "shared_x stays within the default 48 KB of shared memory");

// The chunk from step `step0`: cp.async of the thread's pieces into the landing area at `land` (a
// shared-space address); zeros past k_hi (the end of the block's K range: a chunk that runs past it
// loads nothing there) and for rows past M.
template <int W, int MT>
__device__ __forceinline__ void sx_copy(const GemvArgs& a, int step0, int k_hi, uint32_t land) {
  QDPO_UNROLL
  for (int i = 0; i < sx_pieces<W, MT>(); ++i) {
    const int p = static_cast<int>(threadIdx.x) + i * W * 32, row = gemv::sx_piece_row(p);
    const int k = step0 * gemv::kStepK + gemv::sx_piece_k(p);
    const bool ok = row < a.m && k < k_hi;
    const uint16_t* src = ok ? static_cast<const uint16_t*>(a.x) + row * a.k + k : static_cast<const uint16_t*>(a.x);
    cp_async16(land + 16 * p, src, ok);
  }
  cp_async_commit();
}

// The thread's landed pieces → the pair buffer, as mma pairs (gemv::xs_offset within a row); the thread
// first waits for its own copies.
template <int W, int MT>
__device__ __forceinline__ void sx_pair(uint8_t* buf, const uint8_t* landing, const GemvArgs& a) {
  cp_async_wait_all();
  QDPO_UNROLL
  for (int i = 0; i < sx_pieces<W, MT>(); ++i) {
    const int p = static_cast<int>(threadIdx.x) + i * W * 32, row = gemv::sx_piece_row(p);
    if (row >= a.m) continue;
    const uint4 u = *reinterpret_cast<const uint4*>(landing + 16 * p);
    const uint32_t xw[4] = {u.x, u.y, u.z, u.w};
    uint32_t q[4];
    gemv::x_pairs(xw, q);
    *reinterpret_cast<uint4*>(buf + row * gemv::kSxRowBytes + gemv::xs_offset(gemv::sx_piece_k(p))) =
        make_uint4(q[0], q[1], q[2], q[3]);
  }
}

// Blocks per SM its register allocation must allow (sm_90, ptxas): blocks of 8 warps 3 (80 registers; the W4
// scale-after and zero-after kernels at M > 8 then spill 4 bytes), W4 at M <= 8 4 (64: 56-62 used), W8 at
// M > 8 2 (128: at 80 it spills 20-44 bytes); blocks of 4 warps (twice the pieces of x per thread) 4 at
// M > 8 and 6 / 5 below (W4 at 8 spills).
constexpr int sx_min_blocks(int bits, int mt, int w) {
  if (w == 8) return mt == 2 ? (bits == 8 ? 2 : 3) : (bits == 4 ? 4 : 3);
  return mt == 2 ? 4 : bits == 4 ? 6 : 5;
}

template <int HD, int BITS, int MT, int W, int SC>
__global__ void __launch_bounds__(W * 32, sx_min_blocks(BITS, MT, W)) gemv_shared_x_kernel(GemvArgs a) {
  static_assert(gemv::kSxSteps % 2 == 0, "the weight stages alternate within a chunk");
  pdl_trigger();  // as gemv_mma_kernel
  QDPO_DYNAMIC_SMEM(16, uint8_t, smem);  // [pairs: sx_buffer_bytes | landing: sx_landing_bytes]
  uint8_t* const sx = smem;
  const uint8_t* const landing = smem + sx_buffer_bytes(MT);
  const uint32_t land = static_cast<uint32_t>(__cvta_generic_to_shared(landing));
  const int lane = threadIdx.x & 31, g = lane >> 2;
  const int n0 = (static_cast<int>(blockIdx.x) * W + static_cast<int>(threadIdx.x >> 5)) * 16;
  const int step_lo = blockIdx.y * a.steps_per_split, step_hi = min(step_lo + a.steps_per_split, a.steps);
  const LaneRows<MT, 1> rows = lane_rows<MT, 1>(a, n0);
  const int r0 = min(g, a.m - 1), r1 = min(g + 8, a.m - 1);
  const int lane_off = r0 * gemv::kSxRowBytes + gemv::xs_lane_offset(0, lane & 3);
  const int d1 = (r1 - r0) * gemv::kSxRowBytes;
  float acc[1][MT][4] = {};
  uint32_t x_unused[MT][16];  // compute_step's registers of x: not read with XS
  WStage<BITS, 1, true> st[2];
  // The full steps run in the chunk loop, the next step's weights in flight during this step's math,
  // without bounds checks; the last step of a K that is not a multiple of 128 runs after it, from the
  // last chunk (still in shared memory).
  const int full_hi = min(step_hi, a.full_steps);
  const int k_hi = min(step_hi * gemv::kStepK, a.k);  // the block's K range ends here
  sx_copy<W, MT>(a, step_lo, k_hi, land);
  if (step_lo < full_hi && n0 < a.n) load_w<false, HD, SC>(a, rows, step_lo, st[0]);
  sx_pair<W, MT>(sx, landing, a);
  if (step_lo + gemv::kSxSteps < step_hi) sx_copy<W, MT>(a, step_lo + gemv::kSxSteps, k_hi, land);  // in flight
  __syncthreads();
  int c0 = step_lo;
  const uint8_t* const xb = sx + lane_off;
  for (;; c0 += gemv::kSxSteps) {
    const bool more = c0 + gemv::kSxSteps < step_hi;
    QDPO_UNROLL
    for (int s = 0; s < gemv::kSxSteps; ++s) {
      const int step = c0 + s;
      if (step >= full_hi || n0 >= a.n) break;  // a warp past N only helps copy x
      if (step + 1 < full_hi) load_w<false, HD, SC>(a, rows, step + 1, st[(s + 1) & 1]);
      compute_step<HD, true, SC>(st[s & 1], x_unused, XsLane{xb + s * gemv::xs_lane_offset(1, 0), d1}, acc);
    }
    if (!more) break;
    __syncthreads();  // every warp is done with this chunk's pairs
    sx_pair<W, MT>(sx, landing, a);  // the next chunk's, from this thread's landed pieces
    if (c0 + 2 * gemv::kSxSteps < step_hi) sx_copy<W, MT>(a, c0 + 2 * gemv::kSxSteps, k_hi, land);
    __syncthreads();  // the pairs are complete
  }
  if (full_hi < step_hi && n0 < a.n) {  // K's partial last step: lanes past K load nothing and add exactly 0
    load_w<true, HD, SC>(a, rows, full_hi, st[0]);
    compute_step<HD, true, SC>(st[0], x_unused, XsLane{xb + (full_hi - c0) * gemv::xs_lane_offset(1, 0), d1}, acc);
  }
  const int t = lane & 3;
  QDPO_UNROLL
  for (int mt = 0; mt < MT; ++mt) {
    QDPO_UNROLL
    for (int i = 0; i < 4; ++i) store_out(a, n0 + gemv::c_row(g, i), 8 * mt + gemv::c_col(t, i), acc[0][mt][i]);
  }
}


// The kernel of a plan: tile (mt, rt), block size (warps), x source (x_smem: the 1x1 tile only) and
// where the grid applies (scale_after, zero_after: ScaleMode).
template <int HD, int BITS, int MT, int RT, bool XS, int SC>
GemvKernelFn pick_warps(int warps) {
  const bool flex = warps != kernel_warps(warps);
  if (kernel_warps(warps) == 8) {
    return flex ? gemv_mma_kernel<HD, BITS, MT, RT, 8, true, XS, SC>
                : gemv_mma_kernel<HD, BITS, MT, RT, 8, false, XS, SC>;
  }
  return flex ? gemv_mma_kernel<HD, BITS, MT, RT, 4, true, XS, SC>
              : gemv_mma_kernel<HD, BITS, MT, RT, 4, false, XS, SC>;
}

template <int HD, int BITS, int SC>
GemvKernelFn pick_tile(const GemvPlan& p) {
  if (p.mt == 1 && p.rt == 1) {
    return p.x_smem ? pick_warps<HD, BITS, 1, 1, true, SC>(p.warps) : pick_warps<HD, BITS, 1, 1, false, SC>(p.warps);
  }
  return p.mt == 1 ? pick_warps<HD, BITS, 1, 2, false, SC>(p.warps) : pick_warps<HD, BITS, 2, 2, false, SC>(p.warps);
}

template <int HD, int BITS>
GemvKernelFn pick_scale(const GemvPlan& p) {
  if constexpr (BITS == 4 && HD == kBF16) {
    if (p.zero_after) return pick_tile<HD, 4, gemv::kZeroAfter>(p);
  }
  return p.scale_after ? pick_tile<HD, BITS, gemv::kScaleAfter>(p) : pick_tile<HD, BITS, gemv::kScaleInW>(p);
}

template <int HD, int BITS, int SC>
GemvKernelFn pick_shared_x(const GemvPlan& p) {
  if (p.mt == 1) return p.warps == 4 ? gemv_shared_x_kernel<HD, BITS, 1, 4, SC> : gemv_shared_x_kernel<HD, BITS, 1, 8, SC>;
  return p.warps == 4 ? gemv_shared_x_kernel<HD, BITS, 2, 4, SC> : gemv_shared_x_kernel<HD, BITS, 2, 8, SC>;
}

// A grouped launch's kernel (dequant_matmul_experts): the plan's launch with x in registers and the grid
// in ŵ (the plan's defaults), its tile, blocks of 8 or 4 warps.
template <int HD, int BITS, int MT, int RT, int GR>
GemvKernelFn pick_grouped_warps(const GemvPlan& p) {
  return p.warps == 4 ? gemv_mma_kernel<HD, BITS, MT, RT, 4, false, false, gemv::kScaleInW, GR>
                      : gemv_mma_kernel<HD, BITS, MT, RT, 8, false, false, gemv::kScaleInW, GR>;
}

template <int HD, int BITS>
GemvKernelFn pick_grouped(const GemvPlan& p, int grouped) {
  if (grouped == kPairs) {
    return p.rt == 2 ? pick_grouped_warps<HD, BITS, 1, 2, kPairs>(p) : pick_grouped_warps<HD, BITS, 1, 1, kPairs>(p);
  }
  if (p.mt == 2) return pick_grouped_warps<HD, BITS, 2, 2, kSegments>(p);
  return p.rt == 2 ? pick_grouped_warps<HD, BITS, 1, 2, kSegments>(p) : pick_grouped_warps<HD, BITS, 1, 1, kSegments>(p);
}

template <int HD, int BITS>
GemvKernelFn pick_kernel(const GemvPlan& p, int grouped) {
  if (grouped) return pick_grouped<HD, BITS>(p, grouped);
  if (p.shared_x) {
    if constexpr (BITS == 4 && HD == kBF16) {
      if (p.zero_after) return pick_shared_x<HD, 4, gemv::kZeroAfter>(p);
    }
    return p.scale_after ? pick_shared_x<HD, BITS, gemv::kScaleAfter>(p) : pick_shared_x<HD, BITS, gemv::kScaleInW>(p);
  }
  return pick_scale<HD, BITS>(p);
}

}  // namespace
}  // namespace qdpo
