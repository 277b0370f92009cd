// qdpo_device.cuh — device plumbing shared by the element-wise kernels
// (quantize.cu, dequantize.cu, fake_quant.cu): argument-check macro, loads and
// stores of 8- and 16-element chunks with a run-time dtype, packed-code access,
// and the "team" that owns one group row.
//
// Team: a group row is the G elements of one row that share a scale (G = K for
// one group per row). A team of T threads (a power of two) walks its group row
// in chunks of VEC elements (VEC = 8 with 16-byte-aligned operands, 16 where
// dequantize's and fake_quant's plans allow it, else 2 for 4 bits / 1 for 8 bits). T <= 32 teams are lanes of one warp (several per
// block, shuffle reductions); T > 32 is the whole block (one group row per
// block, shared-memory reduction). Every thread reaches every reduction, so
// full-warp shuffles are safe even for teams past the last group row.
//
// Also compiled for the host (team_emulate.cpp, by the C++ compiler): what needs the device (the
// mma, the thread's coordinates, the team sum) is left out there, and a 16-byte store is a copy.
// And with -DQDPO_EMULATE (tests/test_cuda_emulated.py), every .cu is compiled for the host with the
// device's part supplied by emulate/cuda_emulate.h: hence QDPO_LAUNCH for <<<...>>> and QDPO_SHARED /
// QDPO_DYNAMIC_SMEM for __shared__ in the kernel files (the same code for nvcc).
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

#if defined(QDPO_EMULATE)  // the emulated build: the kernels run on the host (emulate/cuda_emulate.h)
#include "emulate/cuda_emulate.h"
#define QDPO_NOINLINE  // (the host compiler's CUDA headers leave __noinline__ undefined)
#else
// kernel<<<grid, block, smem, stream>>>(args) and the kernel's shared memory (dynamic; static: `dims` as
// [A][B]), spelled so that the emulated build can run them on the host.
#define QDPO_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define QDPO_DYNAMIC_SMEM(align, type, name) extern __shared__ __align__(align) type name[]
#define QDPO_SHARED(align, type, name, dims) __shared__ __align__(align) type name dims
#define QDPO_NOINLINE __noinline__
#endif

#include "qdpo_api.h"
#include "qdpo_math.cuh"

#define QDPO_REQUIRE(cond, code)                      \
  do {                                                \
    if (!(cond)) return ::qdpo::fail((code), #cond);  \
  } while (0)

namespace qdpo {

constexpr int64_t kInt32Limit = int64_t(1) << 31;  // kernels index with int32 within a row, int64 across rows

inline bool aligned(ptr_t p, int64_t bytes) { return p % static_cast<ptr_t>(bytes) == 0; }

// The launch status: 0 or the cudaError_t of the launch (no GPU: 35 or 100).
inline int launch_status() { return static_cast<int>(cudaGetLastError()); }

// log2(v) when v is a power of two, else -1 (group sizes: a shift instead of a division).
inline int log2_if_pow2(int64_t v) {
  int s = 0;
  while ((int64_t(1) << s) < v) ++s;
  return (int64_t(1) << s) == v ? s : -1;
}

#if defined(__CUDACC__)
// D = A · B + D on tensor cores, fp32 accumulators: A 16 × 16 (a0..a3), B 16 × 8 (b0, b1) in fp16
// (HD = kF16) or bf16, fragments as the PTX ISA lays out mma.sync.m16n8k16.row.col.
template <int HD>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if (HD == kF16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}
#endif

// ------------------------------------------------------------------ loads/stores
__device__ __forceinline__ float load1(const void* p, int dtype, int64_t i) {
  if (dtype == kF32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  return dtype == kF16 ? f16_bits_to_f32(h) : bf16_bits_to_f32(h);
}

__device__ __forceinline__ void store1(void* p, int dtype, int64_t i, float v) {
  if (dtype == kF32) {
    static_cast<float*>(p)[i] = v;
  } else {
    static_cast<uint16_t*>(p)[i] = dtype == kF16 ? f32_to_f16_bits(v) : f32_to_bf16_bits(v);
  }
}

// One 16-byte store of four words. A plain uint4 store of words packed in a branch on the dtype came
// out of ptxas as four 4-byte stores (the four words land in registers that are not one aligned quad):
// each then touches every sector of the warp's 512 bytes with a quarter of its bytes. The vector
// store makes ptxas gather the words into a quad (register moves at most).
// On the host (team_emulate.cpp): a plain 16-byte copy.
__device__ __forceinline__ void st_global_v4(void* p, const uint32_t (&w)[4]) {
#if defined(__CUDA_ARCH__)
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
               : "memory");
#else
  std::memcpy(p, w, 16);
#endif
}

// One chunk of VEC values as loaded, not yet converted (load_raw, unpack_raw): fp32 bits one per
// word; 16-bit values two per word when VEC >= 8 (words 0..VEC/2-1), else one per word (low half).
// VEC == 16 holds 16-bit values only (fake_quant's chunks when its chunked operands are all 16-bit:
// 32 bytes, as an 8-element fp32 chunk). Kept apart from the conversion so that a thread can put
// all its loads in flight before the first instruction that waits on one (chunk_pairs: FirstPair).
template <int VEC>
struct RawChunk {
  uint32_t u[VEC == 16 ? 8 : VEC];
};

// Two 16-byte loads: the 32 bytes at p (16-byte aligned) as eight words.
__device__ __forceinline__ void load_32_bytes(const void* p, uint32_t* u) {
  const uint4 a = static_cast<const uint4*>(p)[0], b = static_cast<const uint4*>(p)[1];
  u[0] = a.x, u[1] = a.y, u[2] = a.z, u[3] = a.w, u[4] = b.x, u[5] = b.y, u[6] = b.z, u[7] = b.w;
}

// VEC values starting at element i: one or two 16-byte accesses when VEC >= 8
// (the launcher checked the alignment), element by element otherwise.
template <int VEC>
__device__ __forceinline__ void load_raw(const void* p, int dtype, int64_t i, RawChunk<VEC>& r) {
  if constexpr (VEC == 16) {  // 16-bit dtypes only
    load_32_bytes(static_cast<const uint16_t*>(p) + i, r.u);
  } else if constexpr (VEC == 8) {
    if (dtype == kF32) {
      load_32_bytes(static_cast<const float*>(p) + i, r.u);
    } else {
      const uint4 a = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p) + i);
      r.u[0] = a.x, r.u[1] = a.y, r.u[2] = a.z, r.u[3] = a.w;
    }
  } else {
    QDPO_UNROLL
    for (int j = 0; j < VEC; ++j) {
      r.u[j] = dtype == kF32 ? static_cast<const uint32_t*>(p)[i + j] : static_cast<const uint16_t*>(p)[i + j];
    }
  }
}

__device__ __forceinline__ float half_bits_to_f32(int dtype, uint32_t h) {
  return dtype == kF16 ? f16_bits_to_f32(static_cast<uint16_t>(h)) : bf16_bits_to_f32(static_cast<uint16_t>(h));
}

// The eight 16-bit values of four words (low half first) as fp32.
__device__ __forceinline__ void unpack_halves(int dtype, const uint32_t* u, float (&v)[8]) {
  QDPO_UNROLL
  for (int j = 0; j < 4; ++j) {
    v[2 * j] = half_bits_to_f32(dtype, u[j]), v[2 * j + 1] = half_bits_to_f32(dtype, u[j] >> 16);
  }
}

template <int VEC>
__device__ __forceinline__ void unpack_raw(int dtype, const RawChunk<VEC>& r, float (&v)[VEC]) {
  static_assert(VEC <= 8, "16-element chunks convert in parts (unpack_part)");
  if (dtype == kF32) {
    QDPO_UNROLL
    for (int j = 0; j < VEC; ++j) v[j] = bits_float(r.u[j]);
  } else if constexpr (VEC == 8) {
    unpack_halves(dtype, r.u, v);
  } else {
    QDPO_UNROLL
    for (int j = 0; j < VEC; ++j) v[j] = half_bits_to_f32(dtype, r.u[j]);
  }
}

// The values a thread converts, computes and stores at once: 8 of a 16-element chunk (its half h),
// the whole chunk otherwise; a 16-element chunk's math then holds no more values than an 8-element one's.
template <int VEC>
constexpr int kPart = VEC == 16 ? 8 : VEC;

template <int VEC>
__device__ __forceinline__ void unpack_part(int dtype, const RawChunk<VEC>& r, int h, float (&v)[kPart<VEC>]) {
  if constexpr (VEC == 16) {
    unpack_halves(dtype, r.u + 4 * h, v);
  } else {
    unpack_raw<VEC>(dtype, r, v);
  }
}

template <int VEC>
__device__ __forceinline__ void load_vec(const void* p, int dtype, int64_t i, float (&v)[VEC]) {
  RawChunk<VEC> r;
  load_raw<VEC>(p, dtype, i, r);
  unpack_raw<VEC>(dtype, r, v);
}

template <int VEC>
__device__ __forceinline__ void store_vec(void* p, int dtype, int64_t i, const float (&v)[VEC]) {
  if constexpr (VEC == 8) {
    if (dtype == kF32) {
      const uint32_t lo[4] = {float_bits(v[0]), float_bits(v[1]), float_bits(v[2]), float_bits(v[3])};
      const uint32_t hi[4] = {float_bits(v[4]), float_bits(v[5]), float_bits(v[6]), float_bits(v[7])};
      st_global_v4(static_cast<float*>(p) + i, lo);
      st_global_v4(static_cast<float*>(p) + i + 4, hi);
    } else {
      uint32_t w[4];
      QDPO_UNROLL
      for (int j = 0; j < 4; ++j) {
        const uint32_t lo = dtype == kF16 ? f32_to_f16_bits(v[2 * j]) : f32_to_bf16_bits(v[2 * j]);
        const uint32_t hi = dtype == kF16 ? f32_to_f16_bits(v[2 * j + 1]) : f32_to_bf16_bits(v[2 * j + 1]);
        w[j] = lo | (hi << 16);
      }
      st_global_v4(static_cast<uint16_t*>(p) + i, w);
    }
  } else {
    QDPO_UNROLL
    for (int j = 0; j < VEC; ++j) store1(p, dtype, i + j, v[j]);
  }
}

// A lane's chunks of its group row (c = lane, lane + team, ...), two per pass: the second chunk is
// loaded before the first one's math, so a lane keeps two chunks' loads in flight. The element-wise
// launchers size teams for half the chunks (pair_lanes): a lane's own set-up (its group row, scale,
// zero point, reciprocal, addresses: about 90 sm_90 instructions) then serves two chunks, not one
// (16 elements, or 32 with 16-element chunks), and most lanes have just the one pair.
//
// The first pair is loaded on its own (load_first_pair), before the lane's set-up: the kernels load
// it, then the group's zero point and scale, and only then branch on the scale (reciprocal or
// division, in-place W4 codes or not). A thread then waits for one memory round trip, not two (the
// scale's, then its chunks'). Load must only load (RawChunk, CodeWords): an instruction that uses a
// loaded value stalls the thread until it arrives, and those wait for Finish.
template <typename T>
struct FirstPair {
  T x[2];
  int c;     // the lane's first chunk
  int team;
  bool one;  // c is a chunk
  bool two;  // c + team is one too
};

template <typename Load>
__device__ __forceinline__ auto load_first_pair(int lane, int chunks, int team, Load load)
    -> FirstPair<decltype(load(lane))> {
  FirstPair<decltype(load(lane))> p;
  p.c = lane, p.team = team, p.one = lane < chunks, p.two = lane + team < chunks;
  if (p.one) p.x[0] = load(lane);
  if (p.two) p.x[1] = load(lane + team);
  return p;
}

// The lane's chunks from its first pair on (Finish(c, chunk) each; the chunk may be changed).
template <typename T, typename Load, typename Finish>
__device__ __forceinline__ void chunk_pairs(FirstPair<T>& p, int chunks, Load load, Finish finish) {
  if (!p.one) return;
  finish(p.c, p.x[0]);
  if (!p.two) return;
  finish(p.c + p.team, p.x[1]);
  for (int c = p.c + 2 * p.team; c < chunks; c += 2 * p.team) {
    T first = load(c);
    if (c + p.team < chunks) {
      T second = load(c + p.team);
      finish(c, first);
      finish(c + p.team, second);
    } else {
      finish(c, first);
    }
  }
}

template <typename Load, typename Finish>
__device__ __forceinline__ void chunk_pairs(int lane, int chunks, int team, Load load, Finish finish) {
  auto p = load_first_pair(lane, chunks, team, load);
  chunk_pairs(p, chunks, load, finish);
}

// Codes k .. k+VEC-1 of a packed row (qdpo/quant/format.py): VEC == 8 is one
// 4-byte (W4) or 8-byte (W8) access; W4 chunks start at an even k.
template <int BITS, int VEC>
__device__ __forceinline__ void load_codes(const uint8_t* row, int64_t k, uint8_t (&c)[VEC]) {
  if (BITS == 4 && VEC == 8) {
    const uint32_t w = *reinterpret_cast<const uint32_t*>(row + k / 2);
    QDPO_UNROLL
    for (int j = 0; j < 8; ++j) c[j] = static_cast<uint8_t>((w >> (4 * j)) & 0xFu);
  } else if (BITS == 8 && VEC == 8) {
    const uint2 u = *reinterpret_cast<const uint2*>(row + k);
    QDPO_UNROLL
    for (int j = 0; j < 4; ++j) c[j] = static_cast<uint8_t>(u.x >> (8 * j)), c[4 + j] = static_cast<uint8_t>(u.y >> (8 * j));
  } else if (BITS == 4) {
    QDPO_UNROLL
    for (int j = 0; j < VEC; j += 2) {
      const uint8_t b = row[(k + j) / 2];
      c[j] = unpack_nibble(b, 0), c[j + 1] = unpack_nibble(b, 1);
    }
  } else {
    QDPO_UNROLL
    for (int j = 0; j < VEC; ++j) c[j] = row[k + j];
  }
}

template <int BITS, int VEC>
__device__ __forceinline__ void store_codes(uint8_t* row, int64_t k, const uint8_t (&c)[VEC]) {
  if (BITS == 4 && VEC == 8) {
    uint32_t w = 0;
    QDPO_UNROLL
    for (int j = 0; j < 8; ++j) w |= static_cast<uint32_t>(c[j]) << (4 * j);
    *reinterpret_cast<uint32_t*>(row + k / 2) = w;
  } else if (BITS == 8 && VEC == 8) {
    uint2 u = make_uint2(0, 0);
    QDPO_UNROLL
    for (int j = 0; j < 4; ++j) u.x |= static_cast<uint32_t>(c[j]) << (8 * j), u.y |= static_cast<uint32_t>(c[4 + j]) << (8 * j);
    *reinterpret_cast<uint2*>(row + k) = u;
  } else if (BITS == 4) {
    QDPO_UNROLL
    for (int j = 0; j < VEC; j += 2) row[(k + j) / 2] = pack_nibbles(c[j], c[j + 1]);
  } else {
    QDPO_UNROLL
    for (int j = 0; j < VEC; ++j) row[k + j] = c[j];
  }
}

// ------------------------------------------------------------------ teams
// (TeamGrid, Team and team_of live in qdpo_math.cuh, where the host tests reach them.)
#if defined(__CUDACC__) || defined(QDPO_EMULATE)  // device only (team_emulate.cpp emulates the team sum)
__device__ __forceinline__ Team my_team(const TeamGrid& t) { return team_of(t, blockIdx.x, blockDim.x, threadIdx.x); }

// All-reduce of v over the team (fixed order: deterministic). `op` is a binary functor.
template <typename Op>
__device__ __forceinline__ float team_allreduce(float v, int team, Op op) {
  const int width = team < 32 ? team : 32;
  for (int o = width >> 1; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  if (team > 32) {  // the team is the block
    QDPO_SHARED(4, float, buf, [32]);
    __syncthreads();  // the previous call's readers are done with buf
    if ((threadIdx.x & 31) == 0) buf[threadIdx.x >> 5] = v;
    __syncthreads();
    v = buf[0];
    for (int i = 1; i < team / 32; ++i) v = op(v, buf[i]);
  }
  return v;
}

// ------------------------------------------------------------------ cp.async (sm_80+)
// 16 bytes global -> shared (dst: a shared-space address, __cvta_generic_to_shared); `valid` false:
// nothing is read and the 16 bytes are zero-filled (src-size 0). A thread sees its own copies after
// cp_async_wait_all, the block everyone's after a barrier behind that.
#if defined(QDPO_EMULATE)  // the host build of emulate/cuda_emulate.h (dynamic shared memory only)
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  qdpo_emu::cp_async16(dst, src, valid ? 16 : 0);
}
__device__ __forceinline__ void cp_async_commit() {}
__device__ __forceinline__ void cp_async_wait_all() { qdpo_emu::cp_async_wait_all(); }
#else
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }
#endif

// ------------------------------------------------------------------ programmatic dependent launch (sm_90+)
// A kernel started by launch_dependent may begin while the kernel ahead of it in the stream still
// runs: pdl_wait, before it reads anything that kernel writes, waits until that kernel has completed
// and its writes are visible. pdl_trigger, in the kernel ahead, lets the dependent be launched once
// every block of it has triggered or exited (without it: once all have exited). Below sm_90, and in
// the emulated build (launches one after the other), both are nothing.
#if defined(QDPO_EMULATE)
__device__ __forceinline__ void pdl_wait() {}
__device__ __forceinline__ void pdl_trigger() {}
#else
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
#endif

// Compute capability major of the current device (0 if the runtime cannot say), asked once per device.
inline int device_major() {
  static int majors[64] = {};  // 0: not asked yet
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) {
    (void)cudaGetLastError();
    return 0;
  }
  if (majors[dev] == 0 && cudaDeviceGetAttribute(&majors[dev], cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    majors[dev] = 0;
  }
  return majors[dev];
}

// kernel<<<grid, block, smem, stream>>>(args...), allowed to begin before the kernel ahead of it in the
// stream completes (programmatic stream serialization, compute capability 9.0 and up; CUDA graphs keep
// it as a programmatic edge): the kernel must call pdl_wait before it reads that kernel's results.
// Returns the launch status.
template <typename... P, typename... A>
int launch_dependent(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, A... args) {
#if defined(QDPO_EMULATE)
  QDPO_LAUNCH(grid, block, smem, stream, kernel)(args...);
#else
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid, cfg.blockDim = block, cfg.dynamicSmemBytes = smem, cfg.stream = stream;
  cfg.attrs = &attr;
  // CUDA graphs take the attribute as a programmatic edge from 12.3 on
  cfg.numAttrs = CUDART_VERSION >= 12030 && device_major() >= 9 ? 1 : 0;
  if (cudaLaunchKernelEx(&cfg, kernel, static_cast<P>(args)...) != cudaSuccess && cfg.numAttrs) {
    (void)cudaGetLastError();  // refused with the attribute: an ordinary launch (its error is the status)
    cfg.numAttrs = 0;
    (void)cudaLaunchKernelEx(&cfg, kernel, static_cast<P>(args)...);
  }
#endif
  return launch_status();
}
#endif

struct MinOp {
  __device__ float operator()(float a, float b) const { return fminf(a, b); }
};
struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  __device__ float operator()(float a, float b) const { return a + b; }
};

// Common checks of an (N, K) weight split into ng groups along K.
inline int check_grid(int64_t n, int64_t k, int64_t ng, int bits) {
  QDPO_REQUIRE(bits == 4 || bits == 8, kErrBits);
  QDPO_REQUIRE(n >= 1 && k >= 1 && ng >= 1 && k % ng == 0, kErrShape);
  QDPO_REQUIRE(bits == 8 || (k / ng) % 2 == 0, kErrShape);  // 4-bit codes pair up within a group
  QDPO_REQUIRE(k < kInt32Limit && n * ng < kInt32Limit, kErrTooLarge);
  return kOk;
}

template <int V>
using Int = std::integral_constant<int, V>;

// Calls f(Int<BITS>, Int<VEC>) for the run-time bits and chunk width: VEC 8 when
// every operand allows 16-byte chunks, else the narrowest chunk (2 codes share
// a byte at 4 bits). Two instantiations per bits value, not one per dtype:
// dtypes are run-time arguments of the kernels (a uniform branch per chunk).
template <typename F>
int dispatch_bits_vec(int bits, bool vec8, F&& f) {
  if (bits == 4) return vec8 ? f(Int<4>(), Int<8>()) : f(Int<4>(), Int<2>());
  return vec8 ? f(Int<8>(), Int<8>()) : f(Int<8>(), Int<1>());
}
// The same with 16-element chunks too (vec 16, 8, or anything else for the narrowest).
template <typename F>
int dispatch_bits_vec16(int bits, int vec, F&& f) {
  if (vec != 16) return dispatch_bits_vec(bits, vec == 8, f);
  return bits == 4 ? f(Int<4>(), Int<16>()) : f(Int<8>(), Int<16>());
}

}  // namespace qdpo
