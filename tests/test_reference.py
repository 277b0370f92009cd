"""Properties of the reference math (qdpo/kernels/reference.py), the spec every kernel meets.

The reference is checked against independent statements of the same rules:
the DESIGN.md formulas written out per element, autograd through an explicit
STE formula, and hypothesis-driven properties.
"""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from qdpo.kernels import reference as ref
from tests.conftest import assert_exact

GROUPS = (-1, 32, 64, 128, 256)


def _weights(n, k, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * scale).to(dtype)


@st.composite
def problems(draw):
    bits = draw(st.sampled_from((4, 8)))
    gs = draw(st.sampled_from(GROUPS))
    n = draw(st.integers(1, 9))
    k = (gs if gs > 0 else 2) * draw(st.integers(1, 3))
    if gs == -1:
        k = 2 * draw(st.integers(1, 80))
    sym = draw(st.booleans())
    dtype = draw(st.sampled_from((torch.float32, torch.float16, torch.bfloat16)))
    mag = draw(st.sampled_from((1e-3, 1.0, 50.0)))
    seed = draw(st.integers(0, 2**16))
    return bits, gs, sym, _weights(n, k, dtype, mag, seed)


@settings(max_examples=60, deadline=None)
@given(problems())
def test_error_at_most_half_a_step_and_codes_in_range(p):
    bits, gs, sym, w = p
    s, z = ref.qparams(w, bits, gs, sym)
    q = ref.quantize_codes(w, s, z, bits)
    assert q.dtype == torch.uint8 and int(q.max()) <= (1 << bits) - 1
    w_hat = ref.dequantize_codes(q, s, z, torch.float32)
    g = w.shape[1] // s.shape[1]
    step = s.float().repeat_interleave(g, dim=1)
    err = (w_hat - w.float()).abs()
    # half a step, plus fp32 rounding slack of the division and product
    assert bool((err <= step * (0.5 + 1e-5) + 1e-30).all()), float((err / step).max())


@settings(max_examples=40, deadline=None)
@given(problems())
def test_pack_unpack_identity(p):
    bits, gs, sym, w = p
    s, z = ref.qparams(w, bits, gs, sym)
    q = ref.quantize_codes(w, s, z, bits)
    packed = ref.pack(q, bits)
    assert packed.shape == (w.shape[0], w.shape[1] * bits // 8)
    assert_exact(ref.unpack(packed, bits), q)


def test_nibble_order_is_documented_one():
    q = torch.tensor([[1, 2, 3, 4, 15, 0]], dtype=torch.uint8)
    assert ref.pack(q, 4).tolist() == [[1 | 2 << 4, 3 | 4 << 4, 15]]


def test_matches_design_formula_elementwise():
    """Asymmetric and symmetric RTN written out per element from DESIGN.md."""
    w = _weights(3, 64, seed=3)
    for bits in (4, 8):
        qmax = (1 << bits) - 1
        s, z = ref.qparams(w, bits, 32, symmetric=False)
        q = ref.quantize_codes(w, s, z, bits)
        for n in range(3):
            for g in range(2):
                blk = w[n, g * 32:(g + 1) * 32]
                lo, hi = blk.min().clamp_max(0), blk.max().clamp_min(0)  # fp32 scalars
                sc = (hi - lo) / qmax
                assert s[n, g] == sc
                zz = min(max(round((-lo / sc).item()), 0), qmax)  # Python's round is half to even
                assert z[n, g] == zz
                for j in range(32):
                    qq = min(max(round((blk[j] / sc).item()) + zz, 0), qmax)
                    assert q[n, g * 32 + j] == qq
        s, z = ref.qparams(w, bits, -1, symmetric=True)
        half = 1 << (bits - 1)
        assert bool((z == half).all())
        q = ref.quantize_codes(w, s, z, bits).int() - half
        expect = torch.clamp(torch.round(w / s), -half, half - 1).int()
        assert_exact(q, expect)


def test_rounding_is_half_to_even():
    # scale 1 exactly: w = [-8, 7] range in a symmetric 4-bit... use asym with lo=0, hi=15
    w = torch.tensor([[0.0, 15.0, 0.5, 1.5, 2.5, 3.5, 4.5, 13.5]])
    s, z = ref.qparams(w, 4, -1, symmetric=False)
    assert s.item() == 1.0 and z.item() == 0
    assert ref.quantize_codes(w, s, z, 4).tolist() == [[0, 15, 0, 2, 2, 4, 4, 14]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sym", [False, True])
def test_zero_group_gets_tiny_scale_and_exact_zeros(dtype, sym):
    w = torch.zeros(2, 64, dtype=dtype)
    w[1, 32:] = torch.randn(32).to(dtype)
    s, z = ref.qparams(w, 4, 32, sym)
    assert s[0, 0] == torch.finfo(dtype).tiny and s[0, 1] == torch.finfo(dtype).tiny
    w_hat = ref.fake_quant(w, s, z, 4)
    assert bool(torch.isfinite(w_hat).all())
    assert bool((w_hat[0] == 0).all()) and bool((w_hat[1, :32] == 0).all())


@pytest.mark.parametrize("c", [3.0, -2.5, 1e-30, -1e30])
@pytest.mark.parametrize("bits", [4, 8])
def test_constant_group_is_exact(c, bits):
    w = torch.full((2, 32), c)
    s, z = ref.qparams(w, bits, 32, symmetric=False)
    assert_exact(ref.fake_quant(w, s, z, bits), w, "ŵ")


def test_low_precision_scales_round_up_so_the_range_fits():
    w = torch.tensor([[-1.5259e-03, 1.6861e-03] * 16], dtype=torch.bfloat16)
    s, z = ref.qparams(w, 8, 32, symmetric=False)
    exact = (w.float().max() - w.float().min()) / 255
    assert s.float().item() >= exact.item()
    assert ref.fake_quant_mask(w, s, z, 8).all()


@pytest.mark.parametrize("mag", [1e-30, 1e30])
def test_tiny_and_huge_magnitudes(mag):
    w = _weights(4, 64, scale=mag)
    s, z = ref.qparams(w, 8, 64, symmetric=True)
    err = (ref.fake_quant(w, s, z, 8) - w).abs().max() / w.abs().max()
    assert bool(torch.isfinite(s).all()) and err < 1e-2


def test_ste_mask_matches_autograd_of_explicit_formula():
    w0 = _weights(5, 64, seed=1)
    s, z = ref.qparams(w0, 4, 32, symmetric=False)
    w = (w0 + torch.randn_like(w0) * 2 * s.repeat_interleave(32, 1)).requires_grad_()  # push some codes out
    scales = s.clone().requires_grad_()
    g = torch.randn_like(w0)
    (ref.fake_quant_autograd(w, scales, z, 4) * g).sum().backward()
    gw, gs = ref.fake_quant_backward(g, w.detach(), s, z, 4, need_scales_grad=True)
    mask = ref.fake_quant_mask(w.detach(), s, z, 4)
    assert 0 < int((~mask).sum()) < mask.numel()  # the test exercises clipping
    # autograd multiplies by s and divides by s again: equal up to fp32 rounding
    torch.testing.assert_close(gw, w.grad, rtol=1e-6, atol=0)
    assert_exact(gw == 0, ~mask | (g == 0), "mask")
    assert_exact(w.grad == 0, ~mask | (g == 0), "autograd mask")
    torch.testing.assert_close(gs, scales.grad, rtol=1e-5, atol=1e-5)


def test_fake_quant_forward_equals_autograd_formula():
    w = _weights(4, 128, seed=2)
    for sym in (False, True):
        s, z = ref.qparams(w, 4, 64, sym)
        assert_exact(ref.fake_quant(w, s, z, 4), ref.fake_quant_autograd(w, s, z, 4), "ŵ")


def test_matmul_reference_gradients():
    x = torch.randn(3, 5, 64, requires_grad=True)
    w0 = _weights(7, 64, seed=4)
    s, z = ref.qparams(w0, 4, 32, symmetric=False)
    w = w0.clone().requires_grad_()
    scales = s.clone().requires_grad_()
    y = torch.nn.functional.linear(x, ref.fake_quant_autograd(w, scales, z, 4))
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    dx, dw, ds = ref.fake_quant_matmul_backward(dy, x.detach(), w0, s, z, 4, need_scales_grad=True)
    torch.testing.assert_close(dx, x.grad)
    torch.testing.assert_close(dw, w.grad)
    torch.testing.assert_close(ds, scales.grad, rtol=1e-4, atol=1e-5)
    qweight = ref.pack(ref.quantize_codes(w0, s, z, 4), 4)
    torch.testing.assert_close(ref.dequant_matmul_dx(dy, qweight, s, z, 4), x.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [4, 8])
def test_fake_quant_with_mask_is_both_functions(dtype, bits):
    w0 = _weights(6, 128, seed=5)
    s, z = ref.qparams(w0, bits, 64, symmetric=False)
    w = (w0 + torch.randn_like(w0) * 3 * s.repeat_interleave(64, 1)).to(dtype)  # some clipping
    w_hat, mask = ref.fake_quant_with_mask(w, s, z, bits, torch.float16)
    assert_exact(w_hat, ref.fake_quant(w, s, z, bits, torch.float16), "ŵ")
    assert_exact(mask, ref.fake_quant_mask(w, s, z, bits), "mask")
    assert 0 < int((~mask).sum())
