// gemm_emulate.cpp — a host emulation of one block of the tensor-core prefill GEMM
// (dequant_matmul_gemm.cu), for the CPU test suite.
//
// Every thread's copies into shared memory, its dequantization of the packed tile,
// every lane's ldmatrix addresses and the output map run through the same
// gemm_fragments.cuh functions the kernel calls, on byte arrays standing in for
// shared memory. The instructions are emulated from the PTX ISA, written out here
// independently of gemm_fragments.cuh: cp.async copies 16 bytes (zeros when its
// source size is 0); ldmatrix.x4 gives lane i, from matrix j (whose 8 row addresses
// lanes 8j .. 8j+7 supply), the 32-bit word at row i / 4, bytes 4·(i % 4) .. +3, as
// register j; mma.sync.m16n8k16 as mma_emulate.h has it, in double. A wrong swizzle,
// copy map, nibble order, fragment address or output map makes y differ from
// reference.dequant_matmul.
#include <cstring>
#include <vector>

#include "gemm_fragments.cuh"
#include "mma_emulate.h"
#include "qdpo_api.h"

namespace qdpo {

namespace {

// Registers of one ldmatrix.x4: `addr[lane]` is the row address lane `lane` supplies.
void ldsm_x4_emulate(const uint8_t* smem, const int (&addr)[32], uint32_t (&out)[32][4]) {
  for (int lane = 0; lane < 32; ++lane) {
    for (int j = 0; j < 4; ++j) std::memcpy(&out[lane][j], smem + addr[8 * j + lane / 4] + 4 * (lane % 4), 4);
  }
}

template <int BITS>
void dequant_emulate(const uint8_t* ws, int n, int64_t k0, int64_t ng, int g_size, const float* scales,
                     const uint8_t* zeros, int hd, uint8_t* wh) {
  for (int tid = 0; tid < gemm::kThreads; ++tid) {
    int row, half;
    gemm::dequant_part(tid, row, half);
    const int64_t kq = k0 + 32 * half;
    float s = 0.f, z = 0.f;
    if (row < n) s = scales[row * ng + kq / g_size], z = zeros[row * ng + kq / g_size];
    uint32_t codes[BITS], out[4][4];
    std::memcpy(codes, ws + row * gemm::packed_row_bytes(BITS) + half * 4 * BITS, 4 * BITS);
    gemm::dequant_part_words<BITS>(codes, gemv::row_grid(s, z, hd), hd, out);
    for (int q = 0; q < 4; ++q) std::memcpy(wh + gemm::swz(row, 4 * half + q), out[q], 16);
  }
}

}  // namespace

int gemm_mma_emulate(const uint8_t* qweight, int64_t stride_qn, int n, int64_t k, int64_t ng, int bits,
                     const float* scales, const uint8_t* zeros, const uint16_t* x, int m, int x_dtype, float* y) {
  if (bits != 4 && bits != 8) return fail(kErrBits, "bits == 4 || bits == 8");
  if (x_dtype != kF16 && x_dtype != kBF16) return fail(kErrDtype, "x_dtype is fp16 or bf16");
  if (n < 1 || n > gemm::kBN || m < 1 || m > gemm::kBM || ng < 1 || k % ng || k % gemm::kBK || (k / ng) % 32) {
    return fail(kErrShape, "one block: 1 <= M, N <= 128; K % 64 == 0 and G % 32 == 0");
  }
  const int g_size = static_cast<int>(k / ng), pbytes = gemm::packed_row_bytes(bits);
  std::vector<uint8_t> xs(gemm::kTileBytes), ws(gemm::packed_tile_bytes(bits)), wh(gemm::kTileBytes);
  std::vector<double> acc(gemm::kWarpsM * gemm::kWarpsN * gemm::kMT * gemm::kNT * 32 * 4, 0.0);
  for (int64_t k0 = 0; k0 < k; k0 += gemm::kBK) {
    for (int tid = 0; tid < gemm::kThreads; ++tid) {  // the kernel's copy_tile
      for (int i = 0; i < gemm::kXCopies; ++i) {
        int row, chunk;
        gemm::x_copy(tid, i, row, chunk);
        uint8_t* dst = xs.data() + gemm::swz(row, chunk);
        if (row < m) {
          std::memcpy(dst, x + row * k + k0 + 8 * chunk, 16);
        } else {
          std::memset(dst, 0, 16);
        }
      }
      for (int i = 0; i < gemm::w_copies(bits); ++i) {
        int row, byte;
        gemm::w_copy(tid, i, bits, row, byte);
        uint8_t* dst = ws.data() + row * pbytes + byte;
        if (row < n) {
          std::memcpy(dst, qweight + row * stride_qn + k0 * bits / 8 + byte, 16);
        } else {
          std::memset(dst, 0, 16);
        }
      }
    }
    if (bits == 4) {  // the kernel's dequant_tile
      dequant_emulate<4>(ws.data(), n, k0, ng, g_size, scales, zeros, x_dtype, wh.data());
    } else {
      dequant_emulate<8>(ws.data(), n, k0, ng, g_size, scales, zeros, x_dtype, wh.data());
    }
    for (int warp = 0; warp < gemm::kWarpsM * gemm::kWarpsN; ++warp) {  // the kernel's main loop
      const int wm = (warp % gemm::kWarpsM) * gemm::kWM, wn = (warp / gemm::kWarpsM) * gemm::kWN;
      for (int kk = 0; kk < gemm::kBK / 16; ++kk) {
        uint32_t af[gemm::kMT][32][4], bf[gemm::kNT][32][2];
        for (int mt = 0; mt < gemm::kMT; ++mt) {
          int addr[32];
          for (int lane = 0; lane < 32; ++lane) addr[lane] = gemm::a_ldsm(lane, wm + 16 * mt, kk);
          ldsm_x4_emulate(xs.data(), addr, af[mt]);
        }
        for (int np = 0; np < gemm::kNT / 2; ++np) {
          int addr[32];
          uint32_t r[32][4];
          for (int lane = 0; lane < 32; ++lane) addr[lane] = gemm::b_ldsm(lane, wn + 16 * np, kk);
          ldsm_x4_emulate(wh.data(), addr, r);
          for (int lane = 0; lane < 32; ++lane) {
            bf[2 * np][lane][0] = r[lane][0], bf[2 * np][lane][1] = r[lane][1];
            bf[2 * np + 1][lane][0] = r[lane][2], bf[2 * np + 1][lane][1] = r[lane][3];
          }
        }
        for (int mt = 0; mt < gemm::kMT; ++mt) {
          for (int nt = 0; nt < gemm::kNT; ++nt) {
            double(*a)[4] = reinterpret_cast<double(*)[4]>(
                acc.data() + ((warp * gemm::kMT + mt) * gemm::kNT + nt) * 32 * 4);
            mma_emulate(af[mt], bf[nt], x_dtype, a);
          }
        }
      }
    }
  }
  for (int warp = 0; warp < gemm::kWarpsM * gemm::kWarpsN; ++warp) {  // the kernel's epilogue map
    const int wm = (warp % gemm::kWarpsM) * gemm::kWM, wn = (warp / gemm::kWarpsM) * gemm::kWN;
    for (int mt = 0; mt < gemm::kMT; ++mt) {
      for (int nt = 0; nt < gemm::kNT; ++nt) {
        for (int lane = 0; lane < 32; ++lane) {
          for (int i = 0; i < 4; ++i) {
            const int row = wm + 16 * mt + gemm::c_m(lane, i), col = wn + 8 * nt + gemm::c_n(lane, i);
            if (row < m && col < n) {
              y[row * n + col] = static_cast<float>(acc[(((warp * gemm::kMT + mt) * gemm::kNT + nt) * 32 + lane) * 4 + i]);
            }
          }
        }
      }
    }
  }
  return kOk;
}

}  // namespace qdpo
