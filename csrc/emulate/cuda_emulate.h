// cuda_emulate.h — the kernels of csrc/*.cu run on the host, every thread of a launch as a fiber, for
// the CPU test suite (tests/test_cuda_emulated.py builds qdpo._C from the same sources with the C++
// compiler and -DQDPO_EMULATE; qdpo_device.cuh includes this header then).
//
// What runs is the kernels' own code, launch plans and launchers included; what this header supplies
// is what a GPU would: the thread coordinates, __syncthreads, the warp-wide instructions
// (__shfl_xor_sync, mma.sync.m16n8k16 from the PTX ISA's fragment tables in mma_emulate.h,
// ldmatrix.x4), cp.async, shared memory, and the launch itself (<<<...>>> is QDPO_LAUNCH in the .cu
// files). A block's threads run one at a time, each until it reaches a barrier or a warp-wide
// instruction; a warp-wide instruction runs as soon as all 32 lanes of the warp wait at it (a lane
// that has exited, or lanes at different instructions, is an error: full-mask *_sync is undefined
// then), and each warp goes as far as it can before the next warp starts; a barrier opens when every
// live thread of the block waits at it. Warps (and lanes within a warp) take their turns first to
// last or, when the test asks (emulate_set_order), last to first: a shared-memory read that a missing
// barrier leaves racing another warp's write then comes before that write in one of the two orders.
// Shared memory, dynamic and static (QDPO_SHARED), starts as 0xFF bytes in every block (NaN as fp16,
// bf16 and fp32), so a read of a byte nobody wrote shows; a cp.async lands only when its thread waits
// for it. selftest.cpp checks each of these.
// Host build only: nothing here reaches nvcc.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include "../mma_emulate.h"
#include "control.h"

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace qdpo_emu {

enum class Wait { kRun, kBarrier, kWarp, kDone };
enum WarpOp : int { kShflXor = 1, kMmaF16 = 2, kMmaBF16 = 3, kLdsmX4 = 4 };

struct Copy {  // a cp.async in flight: 16 bytes (0 valid: zero-fill) from src to shared offset dst
  uint32_t dst;
  const void* src;
  int valid;
};

struct Thread {
  ucontext_t ctx;
  uint3 idx;
  Wait wait = Wait::kRun;
  int op = 0;
  std::vector<Copy> copies;
};

struct Warp {
  uint32_t in[32][10];
  uint32_t out[32][4];
};

struct Launch {
  dim3 grid, block;
  uint3 block_idx;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  std::vector<uint8_t> smem;  // dynamic shared memory (16-byte aligned start: smem_base)
  uint8_t* smem_base = nullptr;
  size_t smem_bytes = 0;
  ucontext_t sched;
  int cur = -1;
  std::string error;
  std::function<void()> body;
  std::vector<const void*> fresh;  // static shared arrays already filled with NaN bytes in this block
};

// The launch running now (launches do not nest; the process runs one at a time).
inline Launch*& active() {
  static Launch* l = nullptr;
  return l;
}
inline Thread& me() { return active()->threads[active()->cur]; }
inline int& reverse_order() {  // set_order (control.h)
  static int r = 0;
  return r;
}
inline LoadBytes& load_bytes() {  // take_load_bytes (control.h)
  static LoadBytes b;
  return b;
}
// The error of the last launch (cudaGetLastError's answer) and its detail (cudaGetErrorString's).
int& last_launch_error();
std::string& last_launch_detail();

inline void yield(Wait w) {
  Launch* l = active();
  l->threads[l->cur].wait = w;
  swapcontext(&l->threads[l->cur].ctx, &l->sched);
}

inline void fail_thread(const std::string& what) {
  Launch* l = active();
  if (l->error.empty()) l->error = what;
  for (;;) yield(Wait::kDone);  // never resumed: the scheduler stops at the error
}

// A warp-wide instruction: this lane's operands in, wait for the warp, results out.
inline const uint32_t* warp_op(int op, const uint32_t* in, int n) {
  Launch* l = active();
  const int t = l->cur, w = t / 32, lane = t % 32;
  std::memcpy(l->warps[w].in[lane], in, sizeof(uint32_t) * n);
  l->threads[t].op = op;
  yield(Wait::kWarp);
  return l->warps[w].out[lane];
}

inline void syncthreads() { yield(Wait::kBarrier); }

inline void fresh_shared(void* p, size_t bytes) {
  std::vector<const void*>& f = active()->fresh;
  if (std::find(f.begin(), f.end(), p) != f.end()) return;
  std::memset(p, 0xFF, bytes);
  f.push_back(p);
}

inline uint8_t* shared_at(uint32_t addr, int bytes) {
  Launch* l = active();
  if (addr % 16 != 0 || addr + static_cast<size_t>(bytes) > l->smem_bytes) {
    fail_thread("shared-memory address " + std::to_string(addr) + " outside the launch's " +
                std::to_string(l->smem_bytes) + " bytes of dynamic shared memory or not 16-byte aligned");
  }
  return l->smem_base + addr;
}

inline uint32_t cvta_to_shared(const void* p) {
  Launch* l = active();
  return static_cast<uint32_t>(static_cast<const uint8_t*>(p) - l->smem_base);
}

inline void cp_async16(uint32_t dst, const void* src, int valid) {
  shared_at(dst, 16);
  me().copies.push_back({dst, src, valid});
  load_bytes().cp_async += static_cast<uint64_t>(valid);
}
inline void cp_async_wait_all() {
  for (const Copy& c : me().copies) {
    uint8_t* d = shared_at(c.dst, 16);
    std::memset(d, 0, 16);
    if (c.valid) std::memcpy(d, c.src, static_cast<size_t>(c.valid));
  }
  me().copies.clear();
}

inline void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) {
  const uint32_t in[1] = {addr};
  const uint32_t* out = warp_op(kLdsmX4, in, 1);
  for (int i = 0; i < 4; ++i) r[i] = out[i];
}

// The warp-wide instructions, once all 32 lanes wait at op.
inline void run_warp_op(Warp& w, int op) {
  if (op == kShflXor) {
    for (int lane = 0; lane < 32; ++lane) w.out[lane][0] = w.in[(lane ^ w.in[lane][1]) & 31][0];
  } else if (op == kMmaF16 || op == kMmaBF16) {
    uint32_t a[32][4], b[32][2];
    double acc[32][4];
    for (int lane = 0; lane < 32; ++lane) {
      for (int i = 0; i < 4; ++i) a[lane][i] = w.in[lane][i], acc[lane][i] = qdpo::bits_float(w.in[lane][6 + i]);
      b[lane][0] = w.in[lane][4], b[lane][1] = w.in[lane][5];
    }
    qdpo::mma_emulate(a, b, op == kMmaF16 ? qdpo::kF16 : qdpo::kBF16, acc);
    for (int lane = 0; lane < 32; ++lane) {
      for (int i = 0; i < 4; ++i) w.out[lane][i] = qdpo::float_bits(static_cast<float>(acc[lane][i]));
    }
  } else {  // kLdsmX4: matrix i's row r from lane 8i + r's address; lane l gets (row l / 4, word l % 4)
    uint32_t out[32][4];
    for (int lane = 0; lane < 32; ++lane) {
      for (int i = 0; i < 4; ++i) {
        std::memcpy(&out[lane][i], shared_at(w.in[8 * i + lane / 4][0], 16) + 4 * (lane % 4), 4);
      }
    }
    std::memcpy(w.out, out, sizeof(out));
  }
}

// Checks the launch's configuration, then runs every block in turn (cuda_emulate.cpp).
void check_and_run_launch(Launch& l, const void* kernel);

// kernel<<<grid, block, smem>>>(args...) on the host: QDPO_LAUNCH(grid, block, smem, stream, kernel)(args...).
template <typename... P>
struct Launcher {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A&&... args) const {
    Launch l;
    l.grid = grid, l.block = block, l.smem_bytes = smem;
    auto params = std::make_tuple(static_cast<P>(args)...);  // by value, as a launch copies its arguments
    auto* k = kernel;
    l.body = [k, &params] { std::apply(k, params); };
    check_and_run_launch(l, reinterpret_cast<const void*>(kernel));
  }
};

template <typename... P>
Launcher<P...> launch(dim3 grid, dim3 block, size_t smem, void (*kernel)(P...)) {
  return {kernel, grid, block, smem};
}

}  // namespace qdpo_emu

#define QDPO_LAUNCH(grid, block, smem, stream, ...) ::qdpo_emu::launch((grid), (block), (smem), __VA_ARGS__)
#define QDPO_DYNAMIC_SMEM(align, type, name) type* name = reinterpret_cast<type*>(::qdpo_emu::active()->smem_base)
// Static shared memory: one copy per kernel instance (a launch's blocks run one after another), NaN bytes
// again for each block (the first of its threads to reach the declaration fills them).
#define QDPO_SHARED(align, type, name, dims) \
  alignas(align) static type name dims;      \
  ::qdpo_emu::fresh_shared(name, sizeof(name))

#define threadIdx (::qdpo_emu::me().idx)
#define blockIdx (::qdpo_emu::active()->block_idx)
#define blockDim (::qdpo_emu::active()->block)
#define gridDim (::qdpo_emu::active()->grid)

template <typename T>
inline T __ldg(const T* p) {
  ::qdpo_emu::load_bytes().ldg += sizeof(T);
  return *p;
}
template <typename T>
inline T __ldcs(const T* p) {
  ::qdpo_emu::load_bytes().ldcs += sizeof(T);
  return *p;
}
inline void __syncthreads() { ::qdpo_emu::syncthreads(); }
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  if (mask != 0xFFFFFFFFu) ::qdpo_emu::fail_thread("__shfl_xor_sync: only the full mask is emulated");
  const uint32_t in[2] = {qdpo::float_bits(v), static_cast<uint32_t>(lane_mask)};
  return qdpo::bits_float(::qdpo_emu::warp_op(::qdpo_emu::kShflXor, in, 2)[0]);
}
inline int __shfl_xor_sync(unsigned mask, int v, int lane_mask) {  // the same exchange, of the int's bits
  if (mask != 0xFFFFFFFFu) ::qdpo_emu::fail_thread("__shfl_xor_sync: only the full mask is emulated");
  const uint32_t in[2] = {static_cast<uint32_t>(v), static_cast<uint32_t>(lane_mask)};
  return static_cast<int>(::qdpo_emu::warp_op(::qdpo_emu::kShflXor, in, 2)[0]);
}
inline size_t __cvta_generic_to_shared(const void* p) { return ::qdpo_emu::cvta_to_shared(p); }
using std::max;
using std::min;

// The C++ forms of two runtime calls (cuda_runtime.h declares them for nvcc only).
template <typename T>
inline cudaError_t cudaFuncSetAttribute(T* kernel, cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}
template <typename T>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, T* kernel, int threads, size_t smem) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(n, reinterpret_cast<const void*>(kernel), threads, smem);
}

namespace qdpo {
template <int HD>
inline void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const uint32_t in[10] = {a[0], a[1], a[2], a[3], b0, b1, float_bits(c[0]), float_bits(c[1]), float_bits(c[2]),
                           float_bits(c[3])};
  const uint32_t* out = ::qdpo_emu::warp_op(HD == kF16 ? ::qdpo_emu::kMmaF16 : ::qdpo_emu::kMmaBF16, in, 10);
  for (int i = 0; i < 4; ++i) c[i] = bits_float(out[i]);
}
}  // namespace qdpo
