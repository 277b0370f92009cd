"""Triton (and cuda) dequantize vs ``qdpo.kernels.reference``: bit-exact in every output dtype.

Runs on the CPU under ``TRITON_INTERPRET=1`` (see conftest). Tests taking the
``backend`` fixture also run the cuda backend on CUDA tensors against the same
CPU reference, on a GPU with the built extension (marked ``gpu``; see conftest);
what only the cuda launchers need is in ``test_cuda_kernels.py``.
"""

import pytest
import torch
from torch.library import opcheck

import qdpo
from qdpo import QuantSpec
from qdpo.kernels import reference as ref
from qdpo.kernels.triton import dequantize as td, quantize as tq
from tests.conftest import DTYPES, GROUPS, LLAMA_SHAPES, ODD_NK, SHAPE_FOR, assert_exact, misaligned, on, randn

OPS = torch.ops.qdpo


def _random_packed(n, k, bits, ng, sdtype, seed=0, mag=1.0):
    """Arbitrary packed bytes (every nibble/byte value), zero points and positive scales."""
    g = torch.Generator().manual_seed(seed)
    qweight = torch.randint(0, 256, (n, k * bits // 8), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 1 << bits, (n, ng), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, ng, generator=g) * mag + 1e-3 * mag).to(sdtype)
    return qweight, scales, zeros


def _assert_dequantize(q, s, z, bits, dtype, backend="triton"):
    """The op equals reference.dequantize run on the CPU."""
    out = OPS.dequantize(*on(backend, q, s, z), bits, dtype, backend)
    assert_exact(out.cpu(), ref.dequantize(q.cpu(), s.cpu(), z.cpu(), bits, dtype), "ŵ")


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("gs", GROUPS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_matches_reference(dtype, bits, gs, sym, backend):
    q, s, z = ref.quantize(randn(*SHAPE_FOR[gs], dtype, seed=gs), bits, gs, sym)
    _assert_dequantize(q, s, z, bits, dtype, backend)


@pytest.mark.parametrize("sdtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_arbitrary_codes_into_every_output_dtype(dtype, sdtype, backend):
    for bits in (4, 8):
        q, s, z = _random_packed(33, 256, bits, 4, sdtype, seed=bits)
        _assert_dequantize(q, s, z, bits, dtype, backend)


@pytest.mark.parametrize("nk", ODD_NK)
def test_odd_shapes_every_group_size(nk, backend):
    n, k = nk
    for gs in GROUPS:
        if gs != -1 and k % gs:
            continue
        ng = 1 if gs == -1 else k // gs
        for bits, sdtype in ((4, torch.bfloat16), (8, torch.float16)):
            q, s, z = _random_packed(n, k, bits, ng, sdtype, seed=n + ng)
            _assert_dequantize(q, s, z, bits, torch.bfloat16 if bits == 4 else torch.float32, backend)


def test_w4_word_and_byte_paths():
    """W4 groups of whole, aligned 32-bit words take the word path (codes masked in place), the rest
    (a group of K = 100 codes, a weight at an odd address, a row stride of 2 mod 4) the byte path; both
    bit-exact, in every output dtype."""
    q, s, z = _random_packed(7, 256, 4, 8, torch.bfloat16, seed=5)
    q100, s100, z100 = _random_packed(7, 100, 4, 1, torch.float32, seed=6)
    wide = torch.zeros(7, 130, dtype=torch.uint8)
    wide[:, :128] = q
    for qw, sc, zp, words in ((q, s, z, True), (q100, s100, z100, False), (misaligned(q), s, z, False),
                              (wide[:, :128], s, z, False)):
        assert (td.int32_words(qw) is not None) == words
        for dtype in DTYPES:
            _assert_dequantize(qw, sc, zp, 4, dtype)


@pytest.mark.parametrize("bits", [4, 8])
def test_long_rows_are_split_over_programs(bits):
    q, s, z = _random_packed(9, 320, bits, 1, torch.float16, seed=3)
    out = td.launch(q, s, z, bits, torch.bfloat16, tq.Config(block_r=4, block_g=64, num_warps=4))
    assert_exact(out, ref.dequantize(q, s, z, bits, torch.bfloat16), "ŵ")


def test_strided_qweight_and_grid(backend):
    q, s, z = on(backend, *_random_packed(7, 96, 4, 3, torch.float32, seed=4))
    q_wide = torch.zeros(7, 64, dtype=torch.uint8, device=q.device)[:, :48]  # row stride 64 bytes
    q_wide.copy_(q)
    s_t, z_t = s.t().contiguous().t(), z.t().contiguous().t()  # column-major (N, NG)
    _assert_dequantize(q_wide, s_t, z_t, 4, torch.float16, backend)
    q_t = q.t().contiguous().t()  # K not contiguous: copied once
    _assert_dequantize(q_t, s, z, 4, torch.float32, backend)


def test_scales_and_zeros_with_different_strides(backend):
    """One of scales and zeros column-major, the other row-major: each read with its own layout (the
    Triton kernels index both at one offset, so the two are made to agree first)."""
    q, s, z = on(backend, *_random_packed(7, 96, 4, 3, torch.float32, seed=5))
    _assert_dequantize(q, s, z.t().contiguous().t(), 4, torch.float32, backend)
    _assert_dequantize(q, s.t().contiguous().t(), z, 4, torch.float16, backend)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # numpy, for the fp16 infs
@pytest.mark.parametrize("mag", [1e-30, 1e30])
def test_tiny_and_huge_scales_fp32(mag, backend):
    for bits in (4, 8):
        q, s, z = _random_packed(5, 256, bits, 8, torch.float32, seed=5, mag=mag)
        _assert_dequantize(q, s, z, bits, torch.float32, backend)
        _assert_dequantize(q, s, z, bits, torch.float16, backend)  # 1e30: ±inf like Tensor.to; 1e-30: zeros


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_groups_dequantize_to_exact_zeros(dtype, backend):
    w = randn(6, 128, dtype, seed=6)
    w[0] = 0
    w[1, :32] = 0
    for bits, gs, sym in ((4, 32, False), (8, -1, True)):
        q, s, z = ref.quantize(w, bits, gs, sym)
        out = OPS.dequantize(*on(backend, q, s, z), bits, dtype, backend).cpu()
        assert out[0].eq(0).all() and out[1, :32].eq(0).all()
        assert_exact(out, ref.dequantize(q, s, z, bits, dtype), "ŵ")


def test_llama_shape_slice(backend):
    n, k = LLAMA_SHAPES["llama3-8b.kv"]
    for bits, gs in ((4, 128), (8, -1)):
        q, s, z = ref.quantize(randn(n, k, torch.bfloat16, seed=7)[:64], bits, gs, False)
        _assert_dequantize(q, s, z, bits, torch.bfloat16, backend)


def test_public_api_with_triton_backend():
    w = randn(33, 128, torch.float16, seed=8)
    qw = qdpo.quantize(w, QuantSpec(4, 32, False), backend="reference")
    assert_exact(qdpo.dequantize(qw, backend="triton"), qdpo.dequantize(qw, backend="reference"), "ŵ")
    assert_exact(qdpo.dequantize(qw, torch.float32, backend="triton"), ref.dequantize(
        qw.qweight, qw.scales, qw.zeros, 4, torch.float32), "ŵ fp32")


def test_errors_are_raised_by_the_op_checks():
    q, s, z = _random_packed(4, 64, 4, 2, torch.float16)
    with pytest.raises(TypeError, match="zero points are stored as uint8"):
        OPS.dequantize(q, s, z.int(), 4, None, "triton")
    with pytest.raises(ValueError, match="must both be"):
        OPS.dequantize(q, s[:2], z[:2], 4, None, "triton")
    with pytest.raises(TypeError, match="qweight must be a 2-D uint8"):
        OPS.dequantize(q.int(), s, z, 4, None, "triton")


def test_opcheck(backend):
    q, s, z = on(backend, *_random_packed(7, 96, 4, 3, torch.float16, seed=9))
    opcheck(OPS.dequantize, (q, s, z, 4, torch.bfloat16, backend))
    q8, s8, z8 = on(backend, *_random_packed(7, 96, 8, 1, torch.float32, seed=10))
    opcheck(OPS.dequantize, (q8, s8, z8, 8, None, backend))
