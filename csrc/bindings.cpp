// bindings.cpp — the pybind11 module qdpo._C. Functions take plain integers
// (device pointers, sizes, dtype codes, a stream) so the module links against
// the CUDA runtime only; qdpo/kernels/cuda.py turns them into the `cuda`
// backend of torch.ops.qdpo. A launcher's Status becomes an exception here:
// ValueError for a bad argument (nothing was launched), RuntimeError for a
// CUDA error.
#include <pybind11/pybind11.h>

#include <limits>
#include <stdexcept>
#include <string>
#include <tuple>

#include "gemv_fragments.cuh"
#include "qdpo_api.h"
#include "qdpo_math.cuh"

namespace qdpo {
int device_count(int* count);
int runtime_version();
const char* error_string(int code);
}  // namespace qdpo

#if defined(QDPO_EMULATE)  // the emulated build (emulate/cuda_emulate.cpp): kernels run on the host
#include "emulate/control.h"
#define QDPO_MODULE _C_emulated
#else
#define QDPO_MODULE _C
#endif

namespace py = pybind11;
using qdpo::ptr_t;

namespace {

void check(const char* fn, int code) {
  if (code == qdpo::kOk) return;
  const std::string where = std::string("qdpo._C.") + fn + ": ";
  if (code < 0) {
    throw py::value_error(where + qdpo::status_name(code) + " (failed check: " + qdpo::last_detail() +
                          "; status " + std::to_string(code) + ")");
  }
  throw std::runtime_error(where + "CUDA error " + std::to_string(code) + " (" + qdpo::cuda_error_string(code) +
                           ")");
}

// A GEMV plan as dequant_matmul_plan and dequant_matmul_experts_plan return it.
py::dict plan_dict(const qdpo::GemvPlan& p) {
  return py::dict(py::arg("kernel") = p.kernel == qdpo::kGemvMma ? "mma" : "fma", py::arg("mt") = p.mt,
                  py::arg("rt") = p.rt, py::arg("splits") = p.splits, py::arg("workspace_bytes") = p.workspace_bytes,
                  py::arg("warps") = p.warps, py::arg("blocks_per_sm") = p.blocks_per_sm,
                  py::arg("x_smem") = p.x_smem != 0, py::arg("scale_after") = p.scale_after != 0,
                  py::arg("zero_after") = p.zero_after != 0, py::arg("shared_x") = p.shared_x != 0,
                  py::arg("block_rows") = qdpo::gemv_block_rows(p));
}

void def_host_math(py::module_& m) {
  // Host builds of the shared math, so the CPU test suite checks it bit-exactly.
  m.def("host_quantize_one", &qdpo::quantize_one, py::arg("w"), py::arg("s"), py::arg("z"), py::arg("bits"));
  m.def("host_dequantize_one", &qdpo::dequantize_one, py::arg("q"), py::arg("s"), py::arg("z"));
  m.def("host_fake_quant_one", &qdpo::fake_quant_one, py::arg("w"), py::arg("s"), py::arg("z"), py::arg("bits"));
  m.def("host_ste_pass", &qdpo::ste_pass, py::arg("w"), py::arg("s"), py::arg("z"), py::arg("bits"));
  m.def("host_lsq_term", &qdpo::lsq_term, py::arg("w"), py::arg("s"), py::arg("z"), py::arg("bits"));
  m.def("host_pack_nibbles", &qdpo::pack_nibbles, py::arg("even"), py::arg("odd"));
  m.def("host_unpack_nibble", &qdpo::unpack_nibble, py::arg("byte"), py::arg("k"));
  m.def("host_byte_perm", &qdpo::gemv::byte_perm, py::arg("x"), py::arg("y"), py::arg("selector"),
        "PRMT / __byte_perm as the host emulates it");
  m.def("host_w8_biased", &qdpo::gemv::w8_biased, py::arg("word"), py::arg("i"), "fp32 2^23 + byte i of word");
  m.def("host_x_pair", &qdpo::gemv::x_pair, py::arg("lo_word"), py::arg("hi_word"), py::arg("odd"));
  m.def("host_f16_bits", &qdpo::f32_to_f16_bits, py::arg("x"), "fp32 → fp16 bits, round to nearest even");
  m.def("host_f16_value", &qdpo::f16_bits_to_f32, py::arg("bits"));
  m.def("host_bf16_bits", &qdpo::f32_to_bf16_bits, py::arg("x"), "fp32 → bf16 bits, round to nearest even");
  m.def("host_div_by", [](int n, int64_t d) {
    if (n < 0 || d < 1 || d > 0x7FFFFFFF) throw py::value_error("host_div_by: needs 0 <= n and 1 <= d < 2^31");
    return qdpo::div_by(n, qdpo::div_magic(static_cast<uint32_t>(d)));
  }, py::arg("n"), py::arg("d"), "n / d (0 <= n < 2^31, 1 <= d < 2^31) by the kernels' multiply-and-shift");
  m.def("host_fake_quant_recip", [](ptr_t w, ptr_t s, ptr_t z, int64_t n, int bits, ptr_t out, ptr_t mask,
                                    ptr_t codes) {
    const float *wp = reinterpret_cast<const float*>(w), *sp = reinterpret_cast<const float*>(s),
                *zp = reinterpret_cast<const float*>(z);
    float* op = reinterpret_cast<float*>(out);
    uint8_t *mp = reinterpret_cast<uint8_t*>(mask), *cp = reinterpret_cast<uint8_t*>(codes);
    for (int64_t i = 0; i < n; ++i) {
      const qdpo::Recip d = qdpo::recip_of(sp[i]);
      if (!d.fast) {
        op[i] = std::numeric_limits<float>::quiet_NaN(), mp[i] = 2;
        if (cp) cp[i] = 255;
        continue;
      }
      op[i] = d.s > 0.f ? qdpo::fake_quant_recip(wp[i], d, zp[i], bits) : std::numeric_limits<float>::quiet_NaN();
      mp[i] = qdpo::ste_pass_recip(wp[i], d, zp[i], bits);
      if (cp) cp[i] = qdpo::quantize_recip(wp[i], d, zp[i], bits);
    }
  }, py::arg("w"), py::arg("s"), py::arg("z"), py::arg("n"), py::arg("bits"), py::arg("out"), py::arg("mask"),
     py::arg("codes") = 0,
     "ŵ, the straight-through mask and (codes != 0) the code of n fp32 elements, each on its own grid (s, z), "
     "through the kernels' reciprocal path (pointers to CPU buffers); where that path is not taken: NaN, "
     "mask 2 and code 255 (and ŵ NaN for a negative scale, which the forward divides by)");
  m.def("host_team_of", [](int64_t n, int64_t ng, int64_t chunks, int64_t block, int tid) {
    const qdpo::TeamShape sh = qdpo::team_shape(n, ng, chunks);
    if (block < 0 || block >= sh.grid || tid < 0 || tid >= sh.block) throw std::invalid_argument("host_team_of: no such thread");
    const qdpo::Team t = qdpo::team_of(sh.tg, static_cast<unsigned>(block), sh.block, tid);
    return py::make_tuple(t.r, t.n, t.grp, t.lane, t.valid, sh.tg.team, sh.block, sh.grid);
  }, py::arg("n"), py::arg("ng"), py::arg("chunks"), py::arg("block"), py::arg("tid"),
     "(group row, weight row, group, lane, valid, team, block size, grid) of one thread of a team kernel over "
     "n · ng group rows of `chunks` chunks (host)");
  m.def("host_cast_up", &qdpo::cast_up, py::arg("s"), py::arg("dtype"), "reference.to_scale_dtype of one scale");
  m.def("host_group_qparams", [](float wmin, float wmax, int bits, bool symmetric, int dtype) {
    const qdpo::GroupParams p = qdpo::group_qparams(wmin, wmax, bits, symmetric, dtype);
    return std::make_tuple(p.s, static_cast<int>(p.z));
  }, py::arg("wmin"), py::arg("wmax"), py::arg("bits"), py::arg("symmetric"), py::arg("dtype"),
        "(scale, zero) of one group from its min and max, as reference.qparams");
  m.def("host_quantize", [](int mode, ptr_t w, int w_dtype, int64_t stride_wn, int64_t n, int64_t k, int64_t ng,
                            int bits, bool symmetric, ptr_t qweight, ptr_t scales, int s_dtype, ptr_t zeros) {
    check("host_quantize", qdpo::quantize_emulate(mode, w, w_dtype, stride_wn, n, k, ng, bits, symmetric, qweight,
                                                  scales, s_dtype, zeros));
  }, "quantize's launch run on the host, thread by thread, the team min and max in the device's order (the "
     "arguments of quantize without the stream)");
  m.def("host_dequantize", [](ptr_t qweight, int64_t stride_qn, int64_t n, int64_t k, int64_t ng, int bits,
                              ptr_t scales, int s_dtype, ptr_t zeros, ptr_t out, int out_dtype, int max_vec) {
    check("host_dequantize", qdpo::dequantize_emulate(qweight, stride_qn, n, k, ng, bits, scales, s_dtype, zeros,
                                                      out, out_dtype, max_vec));
  }, "dequantize's launch run on the host, thread by thread, from CPU buffers (pointers; the arguments of "
     "dequantize without the stream)",
     py::arg("qweight"), py::arg("stride_qn"), py::arg("n"), py::arg("k"), py::arg("ng"), py::arg("bits"),
     py::arg("scales"), py::arg("s_dtype"), py::arg("zeros"), py::arg("out"), py::arg("out_dtype"),
     py::arg("max_vec") = 16);
  m.def("host_fake_quant", [](ptr_t w, int w_dtype, int64_t stride_wn, int64_t n, int64_t k, int64_t ng, int bits,
                              ptr_t scales, int s_dtype, ptr_t zeros, ptr_t out, int out_dtype, int max_vec) {
    check("host_fake_quant", qdpo::fake_quant_emulate(w, w_dtype, stride_wn, n, k, ng, bits, scales, s_dtype, zeros,
                                                      out, out_dtype, max_vec));
  }, "fake_quant's launch run on the host, thread by thread (the arguments of fake_quant without the stream)",
     py::arg("w"), py::arg("w_dtype"), py::arg("stride_wn"), py::arg("n"), py::arg("k"), py::arg("ng"),
     py::arg("bits"), py::arg("scales"), py::arg("s_dtype"), py::arg("zeros"), py::arg("out"), py::arg("out_dtype"),
     py::arg("max_vec") = 16);
  m.def("host_fake_quant_backward", [](ptr_t grad, int g_dtype, ptr_t w, int w_dtype, int64_t stride_wn, int64_t n,
                                       int64_t k, int64_t ng, int bits, ptr_t scales, int s_dtype, ptr_t zeros,
                                       ptr_t grad_w, ptr_t grad_s, int max_vec) {
    check("host_fake_quant_backward", qdpo::fake_quant_backward_emulate(grad, g_dtype, w, w_dtype, stride_wn, n, k,
                                                                        ng, bits, scales, s_dtype, zeros, grad_w,
                                                                        grad_s, max_vec));
  }, "fake_quant_backward's launch run on the host, thread by thread, the LSQ team sum in the device's order "
     "(the arguments of fake_quant_backward without the stream)",
     py::arg("grad"), py::arg("g_dtype"), py::arg("w"), py::arg("w_dtype"), py::arg("stride_wn"), py::arg("n"),
     py::arg("k"), py::arg("ng"), py::arg("bits"), py::arg("scales"), py::arg("s_dtype"), py::arg("zeros"),
     py::arg("grad_w"), py::arg("grad_s"), py::arg("max_vec") = 16);
  m.def("host_gemv_mma_emulate", [](ptr_t qweight, int64_t stride_qn, int rows, int64_t k, int64_t ng, int bits,
                                    ptr_t scales, ptr_t zeros, ptr_t x, int m, int x_dtype, ptr_t y, bool x_smem,
                                    bool scale_after, bool zero_after, int splits, bool shared_x) {
    check("host_gemv_mma_emulate",
          qdpo::gemv_mma_emulate(reinterpret_cast<const uint8_t*>(qweight), stride_qn, rows, k, ng, bits,
                                 reinterpret_cast<const float*>(scales), reinterpret_cast<const uint8_t*>(zeros),
                                 reinterpret_cast<const uint16_t*>(x), m, x_dtype, reinterpret_cast<float*>(y),
                                 x_smem, scale_after, zero_after, splits, shared_x));
  }, "One 16-row tile of the tensor-core GEMV emulated on the host from CPU buffers (pointers): "
     "y (m, rows) fp32 from qweight (rows, K·b/8) uint8, scales (rows, ng) fp32, zeros (rows, ng) uint8, "
     "x (m, K) as 16-bit words; x_smem: x through the shared-memory layout of that variant (m <= 2); "
     "scale_after: the scale-after variant's data flow (G a multiple of 128 or G = K); zero_after: the "
     "zero point in a second mma too (W4, bf16 x, scale_after); splits: K in that many ranges (split-K); "
     "shared_x: x through the shared_x kernel's chunks of shared memory (any m <= 16)",
     py::arg("qweight"), py::arg("stride_qn"), py::arg("rows"), py::arg("k"), py::arg("ng"), py::arg("bits"),
     py::arg("scales"), py::arg("zeros"), py::arg("x"), py::arg("m"), py::arg("x_dtype"), py::arg("y"),
     py::arg("x_smem") = false, py::arg("scale_after") = false, py::arg("zero_after") = false,
     py::arg("splits") = 1, py::arg("shared_x") = false);
  m.def("host_gemm_mma_emulate", [](ptr_t qweight, int64_t stride_qn, int n, int64_t k, int64_t ng, int bits,
                                    ptr_t scales, ptr_t zeros, ptr_t x, int m, int x_dtype, ptr_t y) {
    check("host_gemm_mma_emulate",
          qdpo::gemm_mma_emulate(reinterpret_cast<const uint8_t*>(qweight), stride_qn, n, k, ng, bits,
                                 reinterpret_cast<const float*>(scales), reinterpret_cast<const uint8_t*>(zeros),
                                 reinterpret_cast<const uint16_t*>(x), m, x_dtype, reinterpret_cast<float*>(y)));
  }, "One 128 × 128 block of the tensor-core prefill GEMM emulated on the host from CPU buffers (pointers): "
     "y (m, n) fp32 from qweight (n, K·b/8) uint8, scales (n, ng) fp32, zeros (n, ng) uint8, x (m, K) as "
     "16-bit words");
}

void def_kernels(py::module_& m) {
  m.def("quantize", [](int mode, ptr_t w, int w_dtype, int64_t stride_wn, int64_t n, int64_t k, int64_t ng, int bits,
                       bool symmetric, ptr_t qweight, ptr_t scales, int s_dtype, ptr_t zeros, ptr_t stream) {
    check("quantize", qdpo::quantize(mode, w, w_dtype, stride_wn, n, k, ng, bits, symmetric, qweight, scales, s_dtype,
                                     zeros, stream));
  }, "mode 0: scales/zeros; 1: plus packed codes; 2: codes on the given scales/zeros (see csrc/quantize.cu)");
  m.def("dequantize", [](ptr_t qweight, int64_t stride_qn, int64_t n, int64_t k, int64_t ng, int bits, ptr_t scales,
                         int s_dtype, ptr_t zeros, ptr_t out, int out_dtype, ptr_t stream, int max_vec) {
    check("dequantize", qdpo::dequantize(qweight, stride_qn, n, k, ng, bits, scales, s_dtype, zeros, out, out_dtype,
                                         max_vec, stream));
  }, "ŵ (N, K) from packed codes (see csrc/dequantize.cu); max_vec: the widest chunk, 16 or 8 codes",
     py::arg("qweight"), py::arg("stride_qn"), py::arg("n"), py::arg("k"), py::arg("ng"), py::arg("bits"),
     py::arg("scales"), py::arg("s_dtype"), py::arg("zeros"), py::arg("out"), py::arg("out_dtype"),
     py::arg("stream"), py::arg("max_vec") = 16);
  m.def("fake_quant", [](ptr_t w, int w_dtype, int64_t stride_wn, int64_t n, int64_t k, int64_t ng, int bits,
                         ptr_t scales, int s_dtype, ptr_t zeros, ptr_t out, int out_dtype, ptr_t stream,
                         int max_vec) {
    check("fake_quant", qdpo::fake_quant(w, w_dtype, stride_wn, n, k, ng, bits, scales, s_dtype, zeros, out,
                                         out_dtype, max_vec, stream));
  }, "ŵ = dequantize(quantize(w)) on a given grid (see csrc/fake_quant.cu); max_vec: the widest chunk, 16 or 8",
     py::arg("w"), py::arg("w_dtype"), py::arg("stride_wn"), py::arg("n"), py::arg("k"), py::arg("ng"),
     py::arg("bits"), py::arg("scales"), py::arg("s_dtype"), py::arg("zeros"), py::arg("out"), py::arg("out_dtype"),
     py::arg("stream"), py::arg("max_vec") = 16);
  m.def("fake_quant_backward", [](ptr_t grad, int g_dtype, ptr_t w, int w_dtype, int64_t stride_wn, int64_t n,
                                  int64_t k, int64_t ng, int bits, ptr_t scales, int s_dtype, ptr_t zeros,
                                  ptr_t grad_w, ptr_t grad_s, ptr_t stream, int max_vec) {
    check("fake_quant_backward", qdpo::fake_quant_backward(grad, g_dtype, w, w_dtype, stride_wn, n, k, ng, bits,
                                                           scales, s_dtype, zeros, grad_w, grad_s, max_vec, stream));
  }, "STE backward; grad_s = 0 skips the LSQ scale gradient (see csrc/fake_quant.cu); max_vec: the widest chunk, "
     "16 or 8",
     py::arg("grad"), py::arg("g_dtype"), py::arg("w"), py::arg("w_dtype"), py::arg("stride_wn"), py::arg("n"),
     py::arg("k"), py::arg("ng"), py::arg("bits"), py::arg("scales"), py::arg("s_dtype"), py::arg("zeros"),
     py::arg("grad_w"), py::arg("grad_s"), py::arg("stream"), py::arg("max_vec") = 16);
  m.def("dequant_matmul_plan", [](int64_t m, int64_t n, int64_t k, int64_t ng, int bits, int x_dtype, int s_dtype,
                                  ptr_t x, ptr_t qweight, int64_t stride_qn, int sm_count, int force_splits,
                                  int force_warps, int force_x_smem, int force_scale_after,
                                  int force_zero_after, int force_shared_x, int force_row_tiles) {
    qdpo::GemvPlan p{};
    const qdpo::GemvForce force{force_splits,     force_warps,    force_x_smem,   force_scale_after,
                                force_zero_after, force_shared_x, force_row_tiles};
    check("dequant_matmul_plan", qdpo::dequant_matmul_plan(m, n, k, ng, bits, x_dtype, s_dtype, x, qweight, stride_qn,
                                                           sm_count, &p, force));
    return plan_dict(p);
  }, "The GEMV kernel, tile, split-K and block-size choice for these sizes and pointers (host; without a GPU "
     "the occupancy is unknown: blocks_per_sm 0, 8 warps); force_splits / force_warps > 0 override the split-K "
     "count / the warps per block (4 or 8); force_x_smem 1 / 2: x in registers / in shared memory (where "
     "the M <= 2 tile and 48 KB allow); force_scale_after 1 / 2: scale in ŵ / after the mma (where G is a "
     "multiple of 128 or K); force_zero_after 2: the zero point in a second mma too (W4, bf16 x, scale_after); "
     "force_shared_x 2: warps that each own 16 rows and share x staged in shared memory (not with x_smem); "
     "force_row_tiles 1 / 2: the 16-row tiles each warp computes (M <= 8; not with x_smem or shared_x)",
     py::arg("m"), py::arg("n"), py::arg("k"), py::arg("ng"), py::arg("bits"), py::arg("x_dtype"), py::arg("s_dtype"),
     py::arg("x"), py::arg("qweight"), py::arg("stride_qn"), py::arg("sm_count"), py::arg("force_splits") = 0,
     py::arg("force_warps") = 0, py::arg("force_x_smem") = 0, py::arg("force_scale_after") = 0,
     py::arg("force_zero_after") = 0, py::arg("force_shared_x") = 0, py::arg("force_row_tiles") = 0);
  m.def("gemv_auto_warps", &qdpo::gemv_auto_warps, py::arg("tiles"), py::arg("sm_count"), py::arg("blocks8"),
        py::arg("blocks4"), "Warps per block the plan picks for the M <= 2 tile, from the grid's tiles and the "
        "blocks of 8 / 4 warps an SM holds (host only)");
  m.def("dequant_gemm_supported", &qdpo::dequant_gemm_supported, py::arg("k"), py::arg("ng"), py::arg("x_dtype"),
        py::arg("s_dtype"), py::arg("x"), py::arg("qweight"), py::arg("stride_qn"),
        "Whether the tensor-core prefill GEMM serves these sizes, dtypes and pointers (host only)");
  m.def("dequant_gemm", [](ptr_t x, int x_dtype, int64_t mrows, int64_t n, int64_t k, int64_t ng, int bits,
                           ptr_t qweight, int64_t stride_qn, ptr_t scales, int s_dtype, ptr_t zeros, ptr_t bias,
                           int b_dtype, ptr_t y, ptr_t stream) {
    check("dequant_gemm", qdpo::dequant_gemm(x, x_dtype, mrows, n, k, ng, bits, qweight, stride_qn, scales, s_dtype,
                                             zeros, bias, b_dtype, y, stream));
  }, "y = x @ ŵᵀ (+ bias) for any M on tensor cores (see csrc/dequant_matmul_gemm.cu)",
     py::arg("x"), py::arg("x_dtype"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("ng"), py::arg("bits"),
     py::arg("qweight"), py::arg("stride_qn"), py::arg("scales"), py::arg("s_dtype"), py::arg("zeros"),
     py::arg("bias"), py::arg("b_dtype"), py::arg("y"), py::arg("stream"));
  m.def("dequant_matmul", [](ptr_t x, int x_dtype, int64_t mrows, int64_t n, int64_t k, int64_t ng, int bits,
                             ptr_t qweight, int64_t stride_qn, ptr_t scales, int s_dtype, ptr_t zeros, ptr_t bias,
                             int b_dtype, ptr_t y, ptr_t workspace, int64_t workspace_bytes, int sm_count,
                             ptr_t stream, int force_splits, int force_warps, int force_x_smem,
                             int force_scale_after, int force_zero_after, int force_shared_x,
                             int force_row_tiles) {
    const qdpo::GemvForce force{force_splits,     force_warps,    force_x_smem,   force_scale_after,
                                force_zero_after, force_shared_x, force_row_tiles};
    check("dequant_matmul", qdpo::dequant_matmul(x, x_dtype, mrows, n, k, ng, bits, qweight, stride_qn, scales,
                                                 s_dtype, zeros, bias, b_dtype, y, workspace, workspace_bytes,
                                                 sm_count, stream, force));
  }, "y = x @ ŵᵀ (+ bias) for M <= 16 rows of x (see csrc/dequant_matmul_gemv.cu)",
     py::arg("x"), py::arg("x_dtype"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("ng"), py::arg("bits"),
     py::arg("qweight"), py::arg("stride_qn"), py::arg("scales"), py::arg("s_dtype"), py::arg("zeros"),
     py::arg("bias"), py::arg("b_dtype"), py::arg("y"), py::arg("workspace"), py::arg("workspace_bytes"),
     py::arg("sm_count"), py::arg("stream"), py::arg("force_splits") = 0, py::arg("force_warps") = 0,
     py::arg("force_x_smem") = 0, py::arg("force_scale_after") = 0, py::arg("force_zero_after") = 0,
     py::arg("force_shared_x") = 0, py::arg("force_row_tiles") = 0);
  m.def("dequant_matmul_experts_plan", [](int64_t pairs, int64_t n, int64_t k, int64_t ng, int bits, int x_dtype,
                                          int s_dtype, ptr_t x, ptr_t qweight, int64_t stride_qn, int sm_count,
                                          int64_t seg_rows) {
    qdpo::GemvPlan p{};
    check("dequant_matmul_experts_plan", qdpo::dequant_matmul_experts_plan(pairs, n, k, ng, bits, x_dtype, s_dtype, x,
                                                                           qweight, stride_qn, sm_count, &p,
                                                                           seg_rows));
    return plan_dict(p);
  }, "The grouped GEMV's plan (as dequant_matmul_plan's; kernel 'fma': it cannot serve these, host only); "
     "seg_rows > 0: segments, the tile of that many rows per expert",
     py::arg("pairs"), py::arg("n"), py::arg("k"), py::arg("ng"), py::arg("bits"), py::arg("x_dtype"),
     py::arg("s_dtype"), py::arg("x"), py::arg("qweight"), py::arg("stride_qn"), py::arg("sm_count"),
     py::arg("seg_rows") = 0);
  m.def("segment_blocks", &qdpo::segment_blocks, "a segments launch's grid: the most chunks of `rows` rows P rows "
        "sorted among E experts can make", py::arg("pairs"), py::arg("experts"), py::arg("rows"));
  m.def("dequant_matmul_experts", [](ptr_t x, int x_dtype, int64_t pairs, ptr_t pair_expert, int64_t experts,
                                     int64_t n, int64_t k, int64_t ng, int bits, ptr_t qweight, int64_t stride_qn,
                                     ptr_t scales, int s_dtype, ptr_t zeros, ptr_t bias, int b_dtype, ptr_t y,
                                     int sm_count, ptr_t stream, int64_t seg_rows) {
    check("dequant_matmul_experts", qdpo::dequant_matmul_experts(x, x_dtype, pairs, pair_expert, experts, n, k, ng,
                                                                 bits, qweight, stride_qn, scales, s_dtype, zeros,
                                                                 bias, b_dtype, y, sm_count, stream, seg_rows));
  }, "y[p] = x[p] @ ŵ_{ids[p]}ᵀ (+ bias[ids[p]]) for P pairs of a row of x and an expert, ids (int32) on the "
     "device (see csrc/dequant_matmul_gemv.cu)",
     py::arg("x"), py::arg("x_dtype"), py::arg("pairs"), py::arg("pair_expert"), py::arg("experts"), py::arg("n"),
     py::arg("k"), py::arg("ng"), py::arg("bits"), py::arg("qweight"), py::arg("stride_qn"), py::arg("scales"),
     py::arg("s_dtype"), py::arg("zeros"), py::arg("bias"), py::arg("b_dtype"), py::arg("y"), py::arg("sm_count"),
     py::arg("stream"), py::arg("seg_rows") = 0);
}

}  // namespace

PYBIND11_MODULE(QDPO_MODULE, m) {
  m.doc() = "qdpo CUDA extension (built from csrc/ by setup.py)";
#if defined(QDPO_EMULATE)
  m.doc() = "qdpo CUDA extension built for the host: every launch runs its kernel's threads on the CPU, from CPU "
            "buffers (tests/test_cuda_emulated.py)";
  m.def("emulate_set_order", &qdpo_emu::set_order, py::arg("reverse"),
        "run a block's threads first to last (0) or last to first (1) between barriers");
  m.def("emulate_selftest", [](const std::string& kind) {
    std::string error;
    py::list out;
    for (const float v : qdpo_emu::selftest(kind, &error)) out.append(v);
    return py::make_tuple(out, error);
  }, py::arg("kind"), "(outputs, launch error or '') of one of csrc/emulate/selftest.cpp's kernels");
  m.def("emulate_take_load_bytes", [] {
    const qdpo_emu::LoadBytes b = qdpo_emu::take_load_bytes();
    return py::make_tuple(b.ldg, b.ldcs, b.cp_async);
  }, "(bytes through __ldg, __ldcs, cp.async) since the last call: the GEMV's x and streamed weights, the "
     "GEMM's tiles");
#endif
  m.def("runtime_version", &qdpo::runtime_version, "CUDA runtime version the module was linked with");
  m.def("device_count", []() {
    int n = 0;
    int err = qdpo::device_count(&n);
    if (err != 0) {
      throw std::runtime_error(std::string("qdpo._C: no usable CUDA device (") +
                               qdpo::error_string(err) + ", code " + std::to_string(err) + ")");
    }
    return n;
  }, "Number of CUDA devices; raises RuntimeError when there is no usable GPU");
  m.attr("F32") = static_cast<int>(qdpo::kF32);
  m.attr("F16") = static_cast<int>(qdpo::kF16);
  m.attr("BF16") = static_cast<int>(qdpo::kBF16);
  m.attr("QPARAMS") = static_cast<int>(qdpo::kQParams);
  m.attr("QUANTIZE") = static_cast<int>(qdpo::kQuantize);
  m.attr("QUANTIZE_WITH") = static_cast<int>(qdpo::kQuantizeWith);
  m.attr("GEMV_MAX_M") = qdpo::kGemvMaxM;
  m.attr("MAX_GROUPED_PAIRS") = qdpo::kMaxGroupedPairs;
  def_host_math(m);
  def_kernels(m);
}
