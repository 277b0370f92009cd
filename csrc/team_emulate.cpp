// team_emulate.cpp — the element-wise team kernels (quantize, dequantize, fake_quant forward and
// backward) run on the host, every thread of the launch in turn, for the CPU test suite.
//
// The launch goes through the kernels' own plans and thread functions (elementwise.cuh): the same
// argument checks, chunk width, team shape, thread map, chunk loops, addresses and dtype handling as
// on the GPU. The threads of these kernels share nothing but their team sums, so running a block's
// threads one after another, phase by phase around each sum, is what a GPU computes. The sums are
// emulated here in team_allreduce's order (qdpo_device.cuh: a butterfly of xor shuffles within each
// warp's slice of the team, then, for a block-wide team, the warps' results combined in warp order).
#include <algorithm>
#include <vector>

#include "elementwise.cuh"

namespace qdpo {
namespace {

// Every block of the launch `sh` in turn: f(teams), the Team of each of its threads.
template <typename F>
void each_block(const TeamShape& sh, F&& f) {
  std::vector<Team> teams(sh.block);
  for (int64_t b = 0; b < sh.grid; ++b) {
    for (int t = 0; t < sh.block; ++t) teams[t] = team_of(sh.tg, static_cast<unsigned>(b), sh.block, t);
    f(teams);
  }
}

// The threads of the launch that own a group row, in turn (kernels with no team sum).
template <typename F>
void each_valid_thread(const TeamShape& sh, F&& f) {
  each_block(sh, [&](const std::vector<Team>& teams) {
    for (const Team& tm : teams) {
      if (tm.valid) f(tm);
    }
  });
}

// team_allreduce(v, team, op) over one block's values v[thread], as the device computes it.
template <typename Op>
void team_reduce(std::vector<float>& v, int team, Op op) {
  const int width = std::min(team, 32);
  for (size_t w0 = 0; w0 < v.size(); w0 += 32) {
    for (int o = width >> 1; o > 0; o >>= 1) {
      float next[32];
      for (int l = 0; l < 32; ++l) next[l] = op(v[w0 + l], v[w0 + (l ^ o)]);
      std::copy(next, next + 32, v.begin() + w0);
    }
  }
  if (team > 32) {  // the team is the block: buf[warp] = its result, then buf[0], buf[1], ... in order
    float r = v[0];
    for (int i = 1; i < team / 32; ++i) r = op(r, v[32 * i]);
    std::fill(v.begin(), v.end(), r);
  }
}

}  // namespace

int quantize_emulate(int mode, ptr_t w, int w_dtype, int64_t stride_wn, int64_t n, int64_t k, int64_t ng, int bits,
                     bool symmetric, ptr_t qweight, ptr_t scales, int s_dtype, ptr_t zeros) {
  return quantize_plan(
      mode, w, w_dtype, stride_wn, n, k, ng, bits, symmetric, qweight, scales, s_dtype, zeros,
      [&](auto b, auto v, const TeamShape& sh, const QuantizeArgs& a) {
        constexpr int BITS = decltype(b)::value, VEC = decltype(v)::value;
        std::vector<float> lo(sh.block), hi(sh.block);
        each_block(sh, [&](const std::vector<Team>& teams) {
          if (mode != kQuantizeWith) {  // the first phase, then the team sums
            for (int t = 0; t < sh.block; ++t) {
              const Range r = quantize_range<VEC>(a, teams[t]);
              lo[t] = r.lo, hi[t] = r.hi;
            }
            team_reduce(lo, sh.tg.team, MinOp()), team_reduce(hi, sh.tg.team, MaxOp());
          }
          for (int t = 0; t < sh.block; ++t) {
            const Range r{lo[t], hi[t]};
            if (mode == kQParams) quantize_thread<BITS, VEC, kQParams>(a, teams[t], r);
            if (mode == kQuantize) quantize_thread<BITS, VEC, kQuantize>(a, teams[t], r);
            if (mode == kQuantizeWith) quantize_thread<BITS, VEC, kQuantizeWith>(a, teams[t], r);
          }
        });
        return kOk;
      });
}

int dequantize_emulate(ptr_t qweight, int64_t stride_qn, int64_t n, int64_t k, int64_t ng, int bits, ptr_t scales,
                       int s_dtype, ptr_t zeros, ptr_t out, int out_dtype, int max_vec) {
  return dequantize_plan(qweight, stride_qn, n, k, ng, bits, scales, s_dtype, zeros, out, out_dtype, max_vec,
                         [&](auto b, auto v, const TeamShape& sh, const DequantizeArgs& a) {
                           constexpr int BITS = decltype(b)::value, VEC = decltype(v)::value;
                           each_valid_thread(sh, [&](const Team& tm) { dequantize_thread<BITS, VEC>(a, tm); });
                           return kOk;
                         });
}

int fake_quant_emulate(ptr_t w, int w_dtype, int64_t stride_wn, int64_t n, int64_t k, int64_t ng, int bits,
                       ptr_t scales, int s_dtype, ptr_t zeros, ptr_t out, int out_dtype, int max_vec) {
  return fake_quant_plan(w, w_dtype, stride_wn, n, k, ng, bits, scales, s_dtype, zeros, out, out_dtype, max_vec,
                         [&](auto b, auto v, const TeamShape& sh, const FakeQuantArgs& a) {
                           constexpr int BITS = decltype(b)::value, VEC = decltype(v)::value;
                           each_valid_thread(sh, [&](const Team& tm) { fake_quant_thread<BITS, VEC>(a, tm); });
                           return kOk;
                         });
}

int fake_quant_backward_emulate(ptr_t grad, int g_dtype, ptr_t w, int w_dtype, int64_t stride_wn, int64_t n,
                                int64_t k, int64_t ng, int bits, ptr_t scales, int s_dtype, ptr_t zeros,
                                ptr_t grad_w, ptr_t grad_s, int max_vec) {
  return fake_quant_backward_plan(
      grad, g_dtype, w, w_dtype, stride_wn, n, k, ng, bits, scales, s_dtype, zeros, grad_w, grad_s, max_vec,
      [&](auto b, auto v, const TeamShape& sh, const FakeQuantArgs& a) {
        constexpr int BITS = decltype(b)::value, VEC = decltype(v)::value;
        std::vector<float> acc(sh.block);
        each_block(sh, [&](const std::vector<Team>& teams) {
          for (int t = 0; t < sh.block; ++t) {
            if (grad_s == 0) {
              if (teams[t].valid) fake_quant_backward_thread<BITS, VEC, false>(a, teams[t]);
            } else {
              acc[t] = fake_quant_backward_thread<BITS, VEC, true>(a, teams[t]);
            }
          }
          if (grad_s == 0) return;
          team_reduce(acc, sh.tg.team, SumOp());
          for (int t = 0; t < sh.block; ++t) store_grad_s(a, teams[t], acc[t]);
        });
        return kOk;
      });
}

}  // namespace qdpo
