// qdpo_math.cuh — the quantization math shared by every CUDA kernel and by the
// host-side test module: round half to even, clamp, nibble pack/unpack.
// Everything is __host__ __device__ so the CPU test suite can check it
// bit-exactly against qdpo/kernels/reference.py without a GPU.
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define QDPO_HD __host__ __device__ __forceinline__
#else
#define QDPO_HD inline
#endif

namespace qdpo {

// torch.round semantics: ties to even (rintf uses the default FE_TONEAREST mode).
QDPO_HD float round_half_even(float x) { return rintf(x); }

QDPO_HD float clampf(float x, float lo, float hi) { return fminf(fmaxf(x, lo), hi); }

// Code of w on the grid (s, z): clamp(round(w / s) + z, 0, qmax). True division, as the reference.
QDPO_HD uint8_t quantize_one(float w, float s, float z, int bits) {
  const float qmax = static_cast<float>((1 << bits) - 1);
  return static_cast<uint8_t>(clampf(round_half_even(w / s) + z, 0.f, qmax));
}

// ŵ = (q - z) · s in fp32.
QDPO_HD float dequantize_one(uint8_t q, float s, float z) { return (static_cast<float>(q) - z) * s; }

// Straight-through mask: 1 where round(w / s) + z was inside [0, qmax].
QDPO_HD bool ste_pass(float w, float s, float z, int bits) {
  const float u = round_half_even(w / s) + z;
  return u >= 0.f && u <= static_cast<float>((1 << bits) - 1);
}

// Canonical 4-bit packing: code k = 2j in the low nibble of byte j, k = 2j + 1 in the high one.
QDPO_HD uint8_t pack_nibbles(uint8_t even, uint8_t odd) {
  return static_cast<uint8_t>((even & 0xF) | ((odd & 0xF) << 4));
}
QDPO_HD uint8_t unpack_nibble(uint8_t byte, int k) { return (k & 1) ? (byte >> 4) : (byte & 0xF); }

}  // namespace qdpo
