"""Triton (and cuda) qparams / quantize / quantize_with vs ``qdpo.kernels.reference``.

Codes, zero points and packed bytes are bit-exact; scales are exactly equal
(same fp32 operations, the same round-up cast to the weight dtype). Runs on
the CPU under ``TRITON_INTERPRET=1`` (see conftest). Tests taking the
``backend`` fixture also run the cuda backend on CUDA tensors against the same
CPU reference, on a GPU with the built extension (marked ``gpu``; see conftest);
what only the cuda launchers need is in ``test_cuda_kernels.py``.
"""

import numpy as np
import pytest
import torch
from torch.library import opcheck

import qdpo
from qdpo import QuantSpec
from qdpo.kernels import reference as ref
from qdpo.kernels.triton import quantize as tq
from tests.conftest import DTYPES, GROUPS, LLAMA_SHAPES, ODD_NK, SHAPE_FOR, assert_exact, on, randn

OPS = torch.ops.qdpo


def _assert_quantize(w, bits, gs, sym, backend="triton"):
    """The fused op equals reference.quantize (on the CPU) on all three outputs."""
    q, s, z = OPS.quantize(on(backend, w), bits, gs, sym, backend)
    rq, rs, rz = ref.quantize(w.cpu(), bits, gs, sym)
    assert_exact(s.cpu(), rs, "scales")
    assert_exact(z.cpu(), rz, "zeros")
    assert_exact(q.cpu(), rq, "qweight")


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("gs", GROUPS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_matches_reference(dtype, bits, gs, sym, backend):
    _assert_quantize(randn(*SHAPE_FOR[gs], dtype, seed=bits + gs), bits, gs, sym, backend)


@pytest.mark.parametrize("nk", ODD_NK)
@pytest.mark.parametrize("bits,sym,dtype", [(4, False, torch.float16), (8, True, torch.bfloat16)])
def test_odd_shapes_every_group_size(nk, bits, sym, dtype, backend):
    w = randn(*nk, dtype, seed=nk[0])
    for gs in GROUPS:
        if gs == -1 or nk[1] % gs == 0:
            _assert_quantize(w, bits, gs, sym, backend)


@pytest.mark.parametrize("gs", [-1, 64])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_qparams_matches_reference(dtype, sym, gs, backend):
    w = randn(33, 128, dtype, seed=3) * 4
    s, z = OPS.qparams(on(backend, w), 4, gs, sym, backend)
    rs, rz = ref.qparams(w, 4, gs, sym)
    assert_exact(s.cpu(), rs, "scales")
    assert_exact(z.cpu(), rz, "zeros")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_with_frozen_grid_clips_like_reference(dtype, bits, backend):
    # scales shrunk so that many codes clip at 0 and qmax; zeros off-centre
    w = randn(67, 320, dtype, seed=5)
    s, z = ref.qparams(w, bits, 64, False)
    s = (s.float() * 0.4).to(dtype)
    z = (z.int() + 2).clamp(max=(1 << bits) - 1).to(torch.uint8)
    out = OPS.quantize_with(*on(backend, w, s, z), bits, backend)
    codes = ref.quantize_codes(w, s, z, bits)
    assert (codes == 0).any() and (codes == (1 << bits) - 1).any()
    assert_exact(out.cpu(), ref.quantize_codes_packed(w, s, z, bits), "qweight")


@pytest.mark.parametrize("sdtype", [torch.float32, torch.bfloat16])
def test_quantize_with_other_scale_dtype_and_strided_grid(sdtype, backend):
    w = randn(7, 96, torch.float16, seed=6)
    s, z = ref.qparams(w.float(), 8, 32, True)
    s_t, z_t = on(backend, s.to(sdtype), z)
    s_t, z_t = s_t.t().contiguous().t(), z_t.t().contiguous().t()  # (N, NG) with column-major strides
    assert not s_t.is_contiguous()
    assert_exact(OPS.quantize_with(on(backend, w), s_t, z_t, 8, backend).cpu(),
                 ref.quantize_codes_packed(w, s_t.cpu(), z_t.cpu(), 8), "qweight")


def test_quantize_with_scales_and_zeros_with_different_strides(backend):
    w = randn(7, 96, torch.float32, seed=7)
    s, z = ref.qparams(w, 4, 32, False)
    expect = ref.quantize_codes_packed(w, s, z, 4)
    w, s, z = on(backend, w, s, z)
    for s_, z_ in ((s, z.t().contiguous().t()), (s.t().contiguous().t(), z)):  # one column-major, one not
        assert_exact(OPS.quantize_with(w, s_, z_, 4, backend).cpu(), expect, "qweight")


@pytest.mark.parametrize("bits,sym", [(4, False), (8, True)])
def test_long_rows_are_quantized_in_chunks(bits, sym):
    """Per-row mode with a row longer than a tile: two passes over chunks (forced small tile)."""
    w = randn(9, 320, torch.bfloat16, seed=7)
    cfg = tq.Config(block_r=4, block_g=64, num_warps=4)  # 5 chunks per row
    q, s, z = tq.launch(w, bits, -1, sym, cfg=cfg)
    rq, rs, rz = ref.quantize(w, bits, -1, sym)
    assert_exact(s, rs, "scales")
    assert_exact(z, rz, "zeros")
    assert_exact(q, rq, "qweight")
    assert_exact(tq.launch(w, bits, -1, sym, rs, rz, cfg=cfg)[0], rq, "qweight (frozen)")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_and_constant_groups(dtype, bits, backend):
    w = randn(6, 128, dtype, seed=8)
    w[0] = 0  # all-zero row: tiny scale, codes = zero point
    w[1, :32] = 0  # one all-zero group among random ones
    w[2, 32:64] = 3  # constant positive group
    w[3, 64:96] = -1.5  # constant negative group
    w[4] = 0.25  # constant row
    for gs, sym in [(32, False), (32, True), (-1, False), (-1, True)]:
        _assert_quantize(w, bits, gs, sym, backend)


@pytest.mark.parametrize("mag", [1e-30, 1e30])
def test_tiny_and_huge_magnitudes_fp32(mag, backend):
    w = randn(5, 256, seed=9) * mag
    for bits, gs, sym in [(4, 32, False), (8, 128, True), (4, -1, True), (8, -1, False)]:
        _assert_quantize(w, bits, gs, sym, backend)


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_half_ties_round_to_even(dtype, backend):
    halves = [0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, -0.5, -1.5, -2.5, -3.5, -4.5, -5.5, -6.5]
    sym_row = torch.tensor([7.0, 0.0] + halves)  # max|w| = 7 → s = 1
    asym_row = torch.tensor([-7.5, 7.5] + halves)  # range 15 → s = 1, z = round(7.5) = 8
    for row, sym in ((sym_row, True), (asym_row, False)):
        w = row.repeat(3, 2).to(dtype)  # (3, 32)
        assert ref.qparams(w, 4, 16, sym)[0].float().eq(1.0).all(), "the tie case needs unit scales"
        _assert_quantize(w, 4, -1, sym, backend)
        _assert_quantize(w, 4, 32, sym, backend)


@pytest.mark.parametrize("bits,gs,sym", [(4, 128, False), (8, -1, True)])
def test_llama_shape_slices_and_strides(bits, gs, sym, backend):
    n, k = LLAMA_SHAPES["llama2-7b.qkv"]
    w = randn(n, k, torch.float16, seed=10)[:64]  # first 64 rows of a real layer
    _assert_quantize(w, bits, gs, sym, backend)
    wide = on(backend, randn(64, k + 128, torch.bfloat16, seed=11))[:, :k]  # row stride K + 128
    _assert_quantize(wide, bits, gs, sym, backend)
    transposed = randn(256, 48, seed=12).t()  # K not contiguous: copied once
    _assert_quantize(transposed, bits, gs if gs == -1 else 128, sym, backend)


@pytest.mark.parametrize("spec", [QuantSpec(4, 64, False), QuantSpec(8, -1, True)])
def test_public_api(spec, backend):
    w = randn(33, 128, torch.bfloat16, seed=13)
    qw, rw = qdpo.quantize(on(backend, w), spec, backend=backend), qdpo.quantize(w, spec, backend="reference")
    for name in ("qweight", "scales", "zeros"):
        assert_exact(getattr(qw, name).cpu(), getattr(rw, name), name)
    assert qw.shape == rw.shape and qw.dtype == rw.dtype


def test_errors_are_raised_by_the_op_checks():
    with pytest.raises(ValueError, match="not divisible by group_size=64"):
        OPS.quantize(torch.randn(4, 96), 4, 64, False, "triton")
    with pytest.raises(ValueError, match="K=33 is odd"):
        OPS.quantize(torch.randn(4, 33), 4, -1, False, "triton")
    with pytest.raises(ValueError, match="NaN or Inf"):
        OPS.quantize(torch.full((2, 64), float("nan")), 8, 32, True, "triton")
    with pytest.raises(ValueError, match="bits=3"):
        OPS.qparams(torch.randn(4, 64), 3, 32, True, "triton")


def test_opcheck(backend):
    w = on(backend, randn(7, 96, seed=14))
    s, z = ref.qparams(w, 4, 32, False)
    opcheck(OPS.qparams, (w, 4, 32, False, backend))
    opcheck(OPS.quantize, (w, 8, -1, True, backend))
    opcheck(OPS.quantize_with, (w, s, z, 4, backend))


def test_div_magic_divides_every_31_bit_numerator():
    """``group_rows`` finds a group row's matrix row as ``umulhi(2r, m) >> l`` (:func:`tq.div_magic`): equal
    to ``r // d`` at the edges of every quotient and at random numerators, for every divisor to 4096, the
    powers of two and random ones up to 2³¹ (numpy's uint64 arithmetic, independent of the kernels)."""
    rng = np.random.default_rng(0)
    divisors = np.unique(np.concatenate([np.arange(1, 4097), 2 ** np.arange(31), rng.integers(1, 2**31, 2000),
                                         2**31 - 1 - np.arange(8)]))
    for d in divisors.tolist():
        m, l = tq.div_magic(d)
        assert 2**31 <= m < 2**32
        n = np.concatenate([rng.integers(0, 2**31, 512), np.arange(3), 2**31 - 1 - np.arange(3)])
        k = np.unique(np.minimum(n // d, (2**31 - 1) // d))
        n = np.concatenate([n, k * d, k * d + d - 1, np.maximum(k * d - 1, 0)])
        n = n[(n >= 0) & (n < 2**31)].astype(np.uint64)
        got = ((2 * n * np.uint64(m)) >> np.uint64(32)) >> np.uint64(l)
        assert np.array_equal(got, n // np.uint64(d)), f"d={d}"
    with pytest.raises(ValueError, match="divisor"):
        tq.div_magic(0)


def test_wide_offsets_switch_at_2_to_the_31():
    """The element-wise kernels index with int32 unless an offset up to one row past a tensor's end
    reaches 2³¹ (``tq.wide_offsets``: shapes and strides only, so stand-ins serve)."""
    class T:
        def __init__(self, shape, strides):
            self.shape, self._strides = shape, strides

        def stride(self, i):
            return self._strides[i]

    assert not tq.wide_offsets(T((4095, 4096), (4096, 1)), None)
    assert not tq.wide_offsets(T((2**31 // 4096 - 2, 4096), (4096, 1)))
    assert tq.wide_offsets(T((2**31 // 4096, 4096), (4096, 1)))
    assert tq.wide_offsets(T((2, 8), (2**30, 1)))  # a strided view: the stride counts, not the size
    assert tq.wide_offsets(None, T((1, 8), (8, 1)), T((3, 2**30), (2**30, 1)))


def test_int64_offsets_give_the_same_results(monkeypatch):
    """The WIDE (int64) variant of every element-wise kernel, forced on small tensors, matches the
    reference as the int32 one does."""
    from qdpo.kernels.triton import dequantize as td, fake_quant as tf

    for mod in (tq, td, tf):
        monkeypatch.setattr(mod, "wide_offsets", lambda *ts: True)
    w = randn(19, 96, seed=3)
    for bits, gs in ((4, 32), (8, -1)):
        q, s, z = OPS.quantize(w, bits, gs, False, "triton")
        assert_exact(q, ref.quantize(w, bits, gs, False)[0], "codes")
        assert_exact(OPS.dequantize(q, s, z, bits, torch.bfloat16, "triton"),
                     ref.dequantize(q, s, z, bits, torch.bfloat16), "ŵ")
        assert_exact(OPS.fake_quant(w, s, z, bits, None, "triton"), ref.fake_quant(w, s, z, bits), "fake ŵ")
        gw, _ = OPS.fake_quant_backward(torch.ones_like(w), w, s, z, bits, False, "triton")
        assert_exact(gw, ref.fake_quant_mask(w, s, z, bits).float(), "mask")
