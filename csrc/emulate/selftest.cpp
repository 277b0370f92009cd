// selftest.cpp — small kernels with the mistakes cuda_emulate.h claims to expose, for
// tests/test_cuda_emulated.py (emulate_selftest): a shared-memory read that a missing barrier leaves
// racing its write, a read of shared memory (dynamic or static) nobody wrote, a cp.async read before its wait, a
// warp-wide instruction with a lane that has exited and lanes at different warp-wide instructions.
// Compiled into the emulated build only.
#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "../qdpo_device.cuh"

namespace qdpo_emu {
namespace {

constexpr int kThreads = 64;

// out[t] = what thread t reads of thread 63 - t's word (63 - t with the barrier).
__global__ void exchange_kernel(float* out, bool barrier) {
  QDPO_DYNAMIC_SMEM(16, float, words);
  const int t = static_cast<int>(threadIdx.x);
  words[t] = static_cast<float>(t);
  if (barrier) __syncthreads();
  out[t] = words[kThreads - 1 - t];
}

// out[t] = a word of shared memory written only by even threads (odd threads' words: never written).
__global__ void unwritten_kernel(float* out) {
  QDPO_DYNAMIC_SMEM(16, float, words);
  const int t = static_cast<int>(threadIdx.x);
  if (t % 2 == 0) words[t] = static_cast<float>(t);
  __syncthreads();
  out[t] = words[t];
}

// The same with static shared memory, in each of two blocks: out[64 · block + t].
__global__ void unwritten_static_kernel(float* out) {
  QDPO_SHARED(16, float, words, [kThreads]);
  const int t = static_cast<int>(threadIdx.x);
  if (t % 2 == 0) words[t] = static_cast<float>(t);
  __syncthreads();
  out[kThreads * blockIdx.x + t] = words[t];
}

// Thread t copies 16 bytes (4 floats) from src to shared memory by cp.async; out[t] is the first
// word read before the wait (wait = false) or after it.
__global__ void cp_async_kernel(const float* src, float* out, bool wait) {
  QDPO_DYNAMIC_SMEM(16, float, words);
  const int t = static_cast<int>(threadIdx.x);
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(words));
  cp_async16(base + 16 * t, src + 4 * t, 16);
  if (wait) cp_async_wait_all();
  out[t] = words[4 * t];
}

// A shuffle lane 5 never reaches (it has returned).
__global__ void exited_lane_kernel(float* out) {
  const int t = static_cast<int>(threadIdx.x);
  if (t == 5) return;
  out[t] = __shfl_xor_sync(0xFFFFFFFFu, static_cast<float>(t), 1);
}

// Half the warp at a shuffle, half at an mma.
__global__ void split_warp_kernel(float* out) {
  const int t = static_cast<int>(threadIdx.x);
  if (t < 16) {
    out[t] = __shfl_xor_sync(0xFFFFFFFFu, static_cast<float>(t), 1);
  } else {
    float c[4] = {};
    const uint32_t a[4] = {};
    qdpo::mma16816<qdpo::kBF16>(c, a, 0u, 0u);
    out[t] = c[0];
  }
}

}  // namespace

// One self-test: its kernel's outputs, or the launch's error detail (cudaGetLastError's).
std::vector<float> selftest(const std::string& kind, std::string* error) {
  std::vector<float> out(2 * kThreads, -1.f), src(4 * kThreads);
  for (int i = 0; i < 4 * kThreads; ++i) src[i] = static_cast<float>(i);
  const size_t smem = 16 * kThreads;
  if (kind == "exchange" || kind == "exchange_no_barrier") {
    QDPO_LAUNCH(1, kThreads, smem, 0, exchange_kernel)(out.data(), kind == "exchange");
  } else if (kind == "unwritten") {
    QDPO_LAUNCH(1, kThreads, smem, 0, unwritten_kernel)(out.data());
  } else if (kind == "unwritten_static") {
    QDPO_LAUNCH(2, kThreads, 0, 0, unwritten_static_kernel)(out.data());
  } else if (kind == "cp_async" || kind == "cp_async_no_wait") {
    QDPO_LAUNCH(1, kThreads, smem, 0, cp_async_kernel)(src.data(), out.data(), kind == "cp_async");
  } else if (kind == "exited_lane") {
    QDPO_LAUNCH(1, 32, 0, 0, exited_lane_kernel)(out.data());
  } else if (kind == "split_warp") {
    QDPO_LAUNCH(1, 32, 0, 0, split_warp_kernel)(out.data());
  } else if (kind == "too_much_smem") {
    QDPO_LAUNCH(1, 32, 49 * 1024, 0, unwritten_kernel)(out.data());
  } else {
    *error = "unknown self-test " + kind;
    return {};
  }
  if (kind != "unwritten_static") out.resize(kThreads);  // one block's
  const int e = static_cast<int>(cudaGetLastError());
  *error = e ? cudaGetErrorString(static_cast<cudaError_t>(e)) : "";
  return out;
}

}  // namespace qdpo_emu
