// control.h — what the tests steer and read of the emulated build (cuda_emulate.cpp, selftest.cpp), as
// bindings.cpp exposes it (emulate_*). Plain C++: no CUDA headers.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace qdpo_emu {

// Run a block's warps (and a warp's lanes) first to last (0) or last to first (1) between barriers.
void set_order(int reverse);

// Bytes loaded through __ldg, __ldcs (the GEMV's x and its streamed weights) and cp.async (the GEMM's
// tiles; zero-fills read nothing) since the last take_load_bytes: what a launch reads, to check the
// bytes-moved claims.
struct LoadBytes {
  uint64_t ldg = 0, ldcs = 0, cp_async = 0;
};
LoadBytes take_load_bytes();

// One of selftest.cpp's kernels: its outputs, and in *error the launch's error detail ("" if none).
std::vector<float> selftest(const std::string& kind, std::string* error);

}  // namespace qdpo_emu
