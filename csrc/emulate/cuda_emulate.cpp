// cuda_emulate.cpp — the scheduler of cuda_emulate.h and the few CUDA runtime calls the launchers make,
// answered on the host (the emulated build links no CUDA library).
#include <cuda_runtime.h>

#include <map>
#include <memory>

#include "../qdpo_device.cuh"

namespace qdpo_emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxThreads = 1024;
constexpr size_t kDefaultSmem = 48 * 1024, kMaxSmem = 227 * 1024;  // per block: without opting in, at most

std::map<const void*, size_t>& smem_limits() {  // cudaFuncSetAttribute(..., MaxDynamicSharedMemorySize)
  static std::map<const void*, size_t> m;
  return m;
}

uint8_t* stack(int t) {
  static std::vector<std::unique_ptr<uint8_t[]>> pool;
  while (static_cast<int>(pool.size()) <= t) pool.emplace_back(new uint8_t[kStackBytes]);
  return pool[t].get();
}

void entry() {
  Launch* l = active();
  l->body();
  l->threads[l->cur].wait = Wait::kDone;  // returns to uc_link: the scheduler
}

const char* wait_name(Wait w) {
  switch (w) {
    case Wait::kRun: return "running";
    case Wait::kBarrier: return "__syncthreads";
    case Wait::kWarp: return "a warp-wide instruction";
    default: return "exited";
  }
}

// One block to the end, or to l.error.
void run_block(Launch& l) {
  const int nt = static_cast<int>(l.block.x * l.block.y * l.block.z);
  for (int t = 0; t < nt; ++t) {
    Thread& th = l.threads[t];
    th.idx = {t % l.block.x, (t / l.block.x) % l.block.y, t / (l.block.x * l.block.y)};
    th.wait = Wait::kRun, th.op = 0, th.copies.clear();
    getcontext(&th.ctx);
    th.ctx.uc_stack.ss_sp = stack(t);
    th.ctx.uc_stack.ss_size = kStackBytes;
    th.ctx.uc_link = &l.sched;
    makecontext(&th.ctx, entry, 0);
  }
  std::fill(l.smem.begin(), l.smem.end(), uint8_t{0xFF});
  l.fresh.clear();
  const int warps = (nt + 31) / 32;
  for (;;) {
    bool progressed = false;
    for (int wi = 0; wi < warps; ++wi) {  // each warp as far as it goes before the next one starts
      const int w = reverse_order() ? warps - 1 - wi : wi, lo = 32 * w, hi = std::min(nt, lo + 32);
      for (bool ran = true; ran;) {
        ran = false;
        for (int i = lo; i < hi; ++i) {
          const int t = reverse_order() ? lo + hi - 1 - i : i;
          if (l.threads[t].wait != Wait::kRun) continue;
          l.cur = t;
          swapcontext(&l.sched, &l.threads[t].ctx);
          if (!l.error.empty()) return;
          ran = true;
        }
        int at = 0, done = 0, op = 0;
        for (int t = lo; t < hi; ++t) {
          const Thread& th = l.threads[t];
          if (th.wait == Wait::kDone) ++done;
          if (th.wait != Wait::kWarp) continue;
          if (at++ == 0) op = th.op;
          if (th.op != op) {
            l.error = "warp " + std::to_string(w) + ": lanes at different warp-wide instructions";
            return;
          }
        }
        if (at > 0 && at < 32 && at + done == hi - lo) {
          l.error = "warp " + std::to_string(w) + ": a warp-wide instruction with " + std::to_string(32 - at) +
                    " lanes exited or missing (full-mask *_sync needs all 32)";
          return;
        }
        if (at == 32) {
          run_warp_op(l.warps[w], op);
          if (!l.error.empty()) return;
          for (int t = lo; t < hi; ++t) l.threads[t].wait = Wait::kRun;
          ran = true;
        }
        progressed = progressed || ran;
      }
    }
    int live = 0, at_barrier = 0;
    for (int t = 0; t < nt; ++t) {
      live += l.threads[t].wait != Wait::kDone;
      at_barrier += l.threads[t].wait == Wait::kBarrier;
    }
    if (live == 0) return;
    if (at_barrier == live) {
      for (int t = 0; t < nt; ++t) {
        if (l.threads[t].wait == Wait::kBarrier) l.threads[t].wait = Wait::kRun;
      }
      progressed = true;
    }
    if (!progressed) {
      std::string s = "deadlock:";
      for (int t = 0; t < nt; ++t) {
        if (t == 0 || l.threads[t].wait != l.threads[t - 1].wait) s += " thread " + std::to_string(t) + "+ " + wait_name(l.threads[t].wait) + ";";
      }
      l.error = s;
      return;
    }
  }
}

}  // namespace

void set_order(int reverse) { reverse_order() = reverse; }
LoadBytes take_load_bytes() {
  const LoadBytes b = load_bytes();
  load_bytes() = {};
  return b;
}
int& last_launch_error() {
  static int e = 0;
  return e;
}
std::string& last_launch_detail() {
  static std::string s;
  return s;
}

void check_and_run_launch(Launch& l, const void* kernel) {
  const auto bad = [](int code, const std::string& what) {
    if (last_launch_error() == 0) last_launch_error() = code, last_launch_detail() = what;
  };
  const int64_t nt = int64_t(l.block.x) * l.block.y * l.block.z;
  const auto it = smem_limits().find(kernel);
  const size_t smem_max = it == smem_limits().end() ? kDefaultSmem : it->second;
  if (nt < 1 || nt > kMaxThreads || l.grid.x < 1 || l.grid.y < 1 || l.grid.z < 1 || l.grid.y > 65535 ||
      l.grid.z > 65535) {
    return bad(cudaErrorInvalidConfiguration, "launch: block of " + std::to_string(nt) + " threads, grid " +
                                                  std::to_string(l.grid.x) + " x " + std::to_string(l.grid.y));
  }
  if (l.smem_bytes > smem_max) {
    return bad(cudaErrorInvalidValue, "launch: " + std::to_string(l.smem_bytes) +
                                          " bytes of dynamic shared memory, more than the kernel's " +
                                          std::to_string(smem_max));
  }
  if (active() != nullptr) return bad(cudaErrorLaunchFailure, "launch: nested launch");
  l.threads.assign(static_cast<size_t>(nt), Thread{});
  l.warps.assign(static_cast<size_t>((nt + 31) / 32), Warp{});
  l.smem.assign(l.smem_bytes + 128, 0);
  l.smem_base = l.smem.data() + (128 - reinterpret_cast<uintptr_t>(l.smem.data()) % 128) % 128;
  active() = &l;
  for (unsigned z = 0; z < l.grid.z && l.error.empty(); ++z) {
    for (unsigned y = 0; y < l.grid.y && l.error.empty(); ++y) {
      for (unsigned x = 0; x < l.grid.x && l.error.empty(); ++x) {
        l.block_idx = {x, y, z};
        run_block(l);
        if (!l.error.empty()) {
          l.error = "block (" + std::to_string(x) + ", " + std::to_string(y) + ", " + std::to_string(z) + "): " +
                    l.error;
        }
      }
    }
  }
  active() = nullptr;
  if (!l.error.empty()) bad(cudaErrorLaunchFailure, l.error);
}

void set_smem_limit(const void* kernel, size_t bytes) { smem_limits()[kernel] = bytes; }

}  // namespace qdpo_emu

// The CUDA runtime as the launchers see it: one device, no error unless a launch made one.
cudaError_t cudaGetLastError() {
  const int e = qdpo_emu::last_launch_error();
  qdpo_emu::last_launch_error() = 0;
  return static_cast<cudaError_t>(e);
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 0;  // emulated kernels take host pointers: no device to offer torch
  return cudaSuccess;
}
cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}
const char* cudaGetErrorString(cudaError_t e) {
  static std::string s;
  s = "emulated launch error " + std::to_string(static_cast<int>(e)) + ": " + qdpo_emu::last_launch_detail();
  return s.c_str();
}
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, const void*, int, size_t) {
  *n = 0;  // as without a GPU: the plan keeps its 8-warp blocks
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > qdpo_emu::kMaxSmem) {
    return cudaErrorInvalidValue;
  }
  qdpo_emu::set_smem_limit(func, static_cast<size_t>(value));
  return cudaSuccess;
}
