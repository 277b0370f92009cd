// dequant_matmul_gemm.cu — W4A16 / W8A16 prefill GEMM on tensor cores: y = x @ ŵᵀ (+ bias), any M.
//
// Formula and operands as dequant_matmul_gemv.cu (ŵ rounded to x.dtype exactly as
// reference.dequant_matmul, fp32 sums, + bias in fp32, one cast to x.dtype). This
// path needs fp16/bf16 x with scales in x.dtype, K % 64 == 0, G % 32 == 0, and x,
// qweight and its rows 16-byte aligned; the Python wrapper checks and otherwise
// keeps its default route (dequantize once, then cuBLAS).
//
// The block's data flow and index maps are in gemm_fragments.cuh (host-emulated
// by gemm_emulate.cpp in the CPU tests): cp.async double buffering of the x tile
// and the packed codes, dequantization of each code once per block into a
// swizzled ŵ tile, ldmatrix + mma.sync.m16n8k16 with fp32 accumulators, 64 × 32
// outputs per warp. Rows of x past M and of ŵ past N are zero-filled by the
// copies and their outputs dropped.
#include <atomic>

#include "gemm_fragments.cuh"
#include "qdpo_device.cuh"

namespace qdpo {
namespace {

struct GemmArgs {
  const uint16_t* x;  // (M, K) contiguous
  int x_dtype;
  int m, n, k;
  int bits;
  int ng;
  int g, g_shift;  // group size; log2(G) when a power of two (31: one group per row), else -1
  const uint8_t* q;
  int64_t stride_qn;  // bytes
  const uint16_t* s;  // (N, NG) in x.dtype
  const uint8_t* z;   // (N, NG)
  const void* bias;   // (N,) or null
  int b_dtype;
  void* y;            // (M, N), x.dtype
};

#if defined(QDPO_EMULATE)  // the host build of emulate/cuda_emulate.h
__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) { qdpo_emu::ldsm_x4(addr, r); }
#else
__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
#endif

// cp.async of K tile `kt` into stage buffers (x tile at xs, packed codes at ws; shared addresses).
template <int BITS>
__device__ __forceinline__ void copy_tile(const GemmArgs& a, int m0, int n0, int kt, uint32_t xs, uint32_t ws) {
  const int tid = threadIdx.x, k0 = kt * gemm::kBK;
  QDPO_UNROLL
  for (int i = 0; i < gemm::kXCopies; ++i) {
    int row, chunk;
    gemm::x_copy(tid, i, row, chunk);
    const bool ok = m0 + row < a.m;
    const uint16_t* src = ok ? a.x + static_cast<int64_t>(m0 + row) * a.k + k0 + 8 * chunk : a.x;
    cp_async16(xs + gemm::swz(row, chunk), src, ok);
  }
  QDPO_UNROLL
  for (int i = 0; i < gemm::kBN * (gemm::kBK * BITS / 8) / 16 / gemm::kThreads; ++i) {
    int row, byte;
    gemm::w_copy(tid, i, BITS, row, byte);
    const bool ok = n0 + row < a.n;
    const uint8_t* src = ok ? a.q + (n0 + row) * a.stride_qn + k0 * BITS / 8 + byte : a.q;
    cp_async16(ws + row * gemm::packed_row_bytes(BITS) + byte, src, ok);
  }
}

// Every thread: 32 codes of one row of the packed tile → 4 chunks of the ŵ tile (x.dtype).
template <int HD, int BITS>
__device__ __forceinline__ void dequant_tile(const GemmArgs& a, int n0, int kt, const uint8_t* ws, uint8_t* wh) {
  int row, half;
  gemm::dequant_part(threadIdx.x, row, half);
  const int n = n0 + row, kq = kt * gemm::kBK + 32 * half;
  uint32_t s_bits = 0u, z = 0u;  // rows past N: ŵ = 0 (their codes are zero-filled, their outputs dropped)
  if (n < a.n) {
    const int p = n * a.ng + (a.g_shift >= 0 ? kq >> a.g_shift : kq / a.g);
    s_bits = a.s[p], z = a.z[p];
  }
  uint32_t codes[BITS];
  const uint4* src = reinterpret_cast<const uint4*>(ws + row * gemm::packed_row_bytes(BITS) + half * 4 * BITS);
  QDPO_UNROLL
  for (int i = 0; i < BITS / 4; ++i) {
    const uint4 u = src[i];
    codes[4 * i] = u.x, codes[4 * i + 1] = u.y, codes[4 * i + 2] = u.z, codes[4 * i + 3] = u.w;
  }
  uint32_t out[4][4];
  gemm::dequant_part_words<BITS>(codes, gemv::row_grid_bits(s_bits, z, HD), HD, out);
  QDPO_UNROLL
  for (int q = 0; q < 4; ++q) {
    *reinterpret_cast<uint4*>(wh + gemm::swz(row, 4 * half + q)) = make_uint4(out[q][0], out[q][1], out[q][2], out[q][3]);
  }
}

template <int HD, int BITS>
__global__ void __launch_bounds__(gemm::kThreads, 2) gemm_mma_kernel(GemmArgs a) {
  QDPO_DYNAMIC_SMEM(128, uint8_t, smem);
  // [x tile 0 | x tile 1 | packed 0 | packed 1 | ŵ tile]: stage b's x at b·kTileBytes, its codes at
  // kWs + b·kPacked (byte offsets; `base` is the shared-space address of smem)
  constexpr int kPacked = gemm::kBN * gemm::kBK * BITS / 8, kWs = 2 * gemm::kTileBytes, kWh = kWs + 2 * kPacked;
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));

  const int m0 = blockIdx.x * gemm::kBM, n0 = blockIdx.y * gemm::kBN;  // M on x: up to 2^31 - 1 blocks
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wm = (warp % gemm::kWarpsM) * gemm::kWM, wn = (warp / gemm::kWarpsM) * gemm::kWN;
  const int tiles = a.k / gemm::kBK;
  float acc[gemm::kMT][gemm::kNT][4] = {};

  copy_tile<BITS>(a, m0, n0, 0, base, base + kWs);
  cp_async_commit();
  for (int kt = 0; kt < tiles; ++kt) {
    const int b = kt & 1, nb = b ^ 1;
    cp_async_wait_all();  // this thread's copies of tile kt have landed ...
    __syncthreads();      // ... and everyone's; every warp is done with tile kt - 1
    if (kt + 1 < tiles) {
      copy_tile<BITS>(a, m0, n0, kt + 1, base + nb * gemm::kTileBytes, base + kWs + nb * kPacked);
    }
    cp_async_commit();
    dequant_tile<HD, BITS>(a, n0, kt, smem + kWs + b * kPacked, smem + kWh);
    __syncthreads();  // the ŵ tile is complete
    const uint32_t xa = base + b * gemm::kTileBytes, wa = base + kWh;
    QDPO_UNROLL
    for (int kk = 0; kk < gemm::kBK / 16; ++kk) {
      uint32_t af[gemm::kMT][4], bf[gemm::kNT][2];
      QDPO_UNROLL
      for (int mt = 0; mt < gemm::kMT; ++mt) ldsm_x4(xa + gemm::a_ldsm(lane, wm + 16 * mt, kk), af[mt]);
      QDPO_UNROLL
      for (int np = 0; np < gemm::kNT / 2; ++np) {
        uint32_t r[4];
        ldsm_x4(wa + gemm::b_ldsm(lane, wn + 16 * np, kk), r);
        bf[2 * np][0] = r[0], bf[2 * np][1] = r[1], bf[2 * np + 1][0] = r[2], bf[2 * np + 1][1] = r[3];
      }
      QDPO_UNROLL
      for (int mt = 0; mt < gemm::kMT; ++mt) {
        QDPO_UNROLL
        for (int nt = 0; nt < gemm::kNT; ++nt) mma16816<HD>(acc[mt][nt], af[mt], bf[nt][0], bf[nt][1]);
      }
    }
  }
  QDPO_UNROLL
  for (int mt = 0; mt < gemm::kMT; ++mt) {
    QDPO_UNROLL
    for (int nt = 0; nt < gemm::kNT; ++nt) {
      QDPO_UNROLL
      for (int i = 0; i < 4; ++i) {
        const int m = m0 + wm + 16 * mt + gemm::c_m(lane, i), n = n0 + wn + 8 * nt + gemm::c_n(lane, i);
        if (m >= a.m || n >= a.n) continue;
        float v = acc[mt][nt][i];
        if (a.bias) v += load1(a.bias, a.b_dtype, n);
        store1(a.y, a.x_dtype, static_cast<int64_t>(m) * a.n + n, v);
      }
    }
  }
}

template <int HD, int BITS>
int launch(const GemmArgs& a, cudaStream_t stream) {
  const int bytes = gemm::smem_bytes(BITS);  // above the default 48 KB: opt in, once per device
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return launch_status();
  static std::atomic<uint64_t> opted{0};
  if (dev >= 64 || !(opted.load() >> dev & 1u)) {
    if (cudaFuncSetAttribute(gemm_mma_kernel<HD, BITS>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) !=
        cudaSuccess) {
      return launch_status();
    }
    if (dev < 64) opted.fetch_or(uint64_t(1) << dev);
  }
  const dim3 grid((a.m + gemm::kBM - 1) / gemm::kBM, (a.n + gemm::kBN - 1) / gemm::kBN);
  QDPO_LAUNCH(grid, gemm::kThreads, bytes, stream, gemm_mma_kernel<HD, BITS>)(a);
  return launch_status();
}

}  // namespace

bool dequant_gemm_supported(int64_t k, int64_t ng, int x_dtype, int s_dtype, ptr_t x, ptr_t qweight,
                            int64_t stride_qn) {
  return (x_dtype == kF16 || x_dtype == kBF16) && s_dtype == x_dtype && ng >= 1 && k % ng == 0 &&
         k % gemm::kBK == 0 && (k / ng) % 32 == 0 && aligned(x, 16) && aligned(qweight, 16) && stride_qn % 16 == 0;
}

int dequant_gemm(ptr_t x, int x_dtype, int64_t m, int64_t n, int64_t k, int64_t ng, int bits, ptr_t qweight,
                 int64_t stride_qn, ptr_t scales, int s_dtype, ptr_t zeros, ptr_t bias, int b_dtype, ptr_t y,
                 ptr_t stream) {
  if (int e = check_grid(n, k, ng, bits)) return e;
  QDPO_REQUIRE(valid_dtype(x_dtype) && valid_dtype(s_dtype) && (bias == 0 || valid_dtype(b_dtype)), kErrDtype);
  QDPO_REQUIRE(m >= 1 && stride_qn >= k * bits / 8, kErrShape);
  QDPO_REQUIRE(dequant_gemm_supported(k, ng, x_dtype, s_dtype, x, qweight, stride_qn), kErrShape);
  QDPO_REQUIRE(m < kInt32Limit && n * stride_qn < kInt32Limit && n * ng < kInt32Limit &&
                   (n + gemm::kBN - 1) / gemm::kBN <= 65535, kErrTooLarge);  // N's tiles: the grid's y
  QDPO_REQUIRE(x != 0 && qweight != 0 && scales != 0 && zeros != 0 && y != 0, kErrNull);
  QDPO_REQUIRE(aligned(y, 2) && aligned(scales, 2) && aligned(bias, bias ? dtype_size(b_dtype) : 1), kErrAlign);
  const GemmArgs a{reinterpret_cast<const uint16_t*>(x), x_dtype, static_cast<int>(m), static_cast<int>(n),
                   static_cast<int>(k), bits, static_cast<int>(ng), static_cast<int>(k / ng),
                   ng == 1 ? 31 : log2_if_pow2(k / ng), reinterpret_cast<const uint8_t*>(qweight), stride_qn,
                   reinterpret_cast<const uint16_t*>(scales), reinterpret_cast<const uint8_t*>(zeros),
                   reinterpret_cast<const void*>(bias), b_dtype, reinterpret_cast<void*>(y)};
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  if (x_dtype == kF16) return bits == 4 ? launch<kF16, 4>(a, st) : launch<kF16, 8>(a, st);
  return bits == 4 ? launch<kBF16, 4>(a, st) : launch<kBF16, 8>(a, st);
}

}  // namespace qdpo
