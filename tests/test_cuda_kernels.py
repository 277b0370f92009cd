"""The ``cuda`` backend (``csrc/`` via ``qdpo._C``) against ``reference.py``, on a GPU.

Same shapes and tolerances as the Triton tests, whose helpers this file
reuses: codes, zero points, scales, ŵ and ∂w bit-exact against the CPU
reference; LSQ scale gradients within ``test_fake_quant._assert_sum_close``;
dequant_matmul outputs by the 2×-of-PyTorch rule (``conftest.assert_close_2x``).
Every op also passes ``torch.library.opcheck`` with ``backend="cuda"``. Each
path of the C++ launchers is forced by its inputs (16-byte chunks or not, the
tensor-core GEMV or the FMA fallback, split-K). Skipped without a GPU (and
without the built extension); ``make gpu-check`` runs them.
"""

import pytest
import torch
from torch.library import opcheck

import qdpo
from qdpo import QuantSpec
from qdpo.kernels import backends
from qdpo.kernels import reference as ref
from tests.conftest import (
    DTYPES, GROUPS, LLAMA_SHAPES, MS, ODD_NK, SHAPE_FOR, assert_close_2x, assert_exact, randn,
)
from tests.test_dequant_matmul import _args, _check_dx, _check_y, _gs_for, _rand, _weight
from tests.test_dequantize import _random_packed
from tests.test_fake_quant import _assert_sum_close, _grid

pytestmark = pytest.mark.gpu
OPS = torch.ops.qdpo
DEV = "cuda"
B = "cuda"  # the backend under test
XDTYPES = (torch.float16, torch.bfloat16, torch.float32)


@pytest.fixture(autouse=True)
def _cuda_backend():
    """The compiled extension; skip (not fail) where it was not built."""
    return pytest.importorskip("qdpo.kernels.cuda", reason="qdpo._C was not built (no nvcc at install time)")


def _cpu(*ts):
    return [t.cpu() if isinstance(t, torch.Tensor) else t for t in ts]


def _gpu(*ts):
    return [t.to(DEV) if isinstance(t, torch.Tensor) else t for t in ts]


# --------------------------------------------------------------------------- quantize
def _assert_quantize(w, bits, gs, sym):
    """The fused cuda op equals reference.quantize (on the CPU) on all three outputs."""
    q, s, z = OPS.quantize(w.to(DEV), bits, gs, sym, B)
    rq, rs, rz = ref.quantize(w.cpu(), bits, gs, sym)
    assert_exact(s.cpu(), rs, "scales")
    assert_exact(z.cpu(), rz, "zeros")
    assert_exact(q.cpu(), rq, "qweight")


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("gs", GROUPS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_matches_reference(dtype, bits, gs, sym):
    _assert_quantize(randn(*SHAPE_FOR[gs], dtype, seed=bits + gs), bits, gs, sym)


@pytest.mark.parametrize("nk", ODD_NK)
@pytest.mark.parametrize("bits,sym,dtype", [(4, False, torch.float16), (8, True, torch.bfloat16)])
def test_quantize_odd_shapes_every_group_size(nk, bits, sym, dtype):
    w = randn(*nk, dtype, seed=nk[0])
    for gs in GROUPS:
        if gs == -1 or nk[1] % gs == 0:
            _assert_quantize(w, bits, gs, sym)


@pytest.mark.parametrize("k,bits", [(14336, 4), (4100, 4), (4101, 8), (66, 4)])
def test_quantize_long_and_narrow_rows(k, bits):
    """One group per row: a block-wide team (K = 14336), 2-/1-code chunks (K % 8 != 0)."""
    for sym in (False, True):
        _assert_quantize(randn(9, k, torch.bfloat16, seed=k), bits, -1, sym)


@pytest.mark.parametrize("gs", [-1, 64])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_qparams_matches_reference(dtype, sym, gs):
    w = randn(33, 128, dtype, seed=3) * 4
    s, z = OPS.qparams(w.to(DEV), 4, gs, sym, B)
    rs, rz = ref.qparams(w, 4, gs, sym)
    assert_exact(s.cpu(), rs, "scales")
    assert_exact(z.cpu(), rz, "zeros")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_with_frozen_grid_clips_like_reference(dtype, bits):
    w = randn(67, 320, dtype, seed=5)
    s, z = ref.qparams(w, bits, 64, False)
    s = (s.float() * 0.4).to(dtype)
    z = (z.int() + 2).clamp(max=(1 << bits) - 1).to(torch.uint8)
    out = OPS.quantize_with(*_gpu(w, s, z), bits, B)
    codes = ref.quantize_codes(w, s, z, bits)
    assert (codes == 0).any() and (codes == (1 << bits) - 1).any()
    assert_exact(out.cpu(), ref.quantize_codes_packed(w, s, z, bits), "qweight")


@pytest.mark.parametrize("sdtype", [torch.float32, torch.bfloat16])
def test_quantize_with_other_scale_dtype_and_strided_grid(sdtype):
    w = randn(7, 96, torch.float16, seed=6)
    s, z = ref.qparams(w.float(), 8, 32, True)
    s_t = s.to(sdtype).to(DEV).t().contiguous().t()  # (N, NG) with column-major strides
    z_t = z.to(DEV).t().contiguous().t()
    out = OPS.quantize_with(w.to(DEV), s_t, z_t, 8, B)
    assert_exact(out.cpu(), ref.quantize_codes_packed(w, s.to(sdtype), z, 8), "qweight")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_zero_and_constant_groups(dtype, bits):
    w = randn(6, 128, dtype, seed=8)
    w[0] = 0
    w[1, :32] = 0
    w[2, 32:64] = 3
    w[3, 64:96] = -1.5
    w[4] = 0.25
    for gs, sym in [(32, False), (32, True), (-1, False), (-1, True)]:
        _assert_quantize(w, bits, gs, sym)


@pytest.mark.parametrize("mag", [1e-30, 1e30])
def test_quantize_tiny_and_huge_magnitudes_fp32(mag):
    w = randn(5, 256, seed=9) * mag
    for bits, gs, sym in [(4, 32, False), (8, 128, True), (4, -1, True), (8, -1, False)]:
        _assert_quantize(w, bits, gs, sym)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_exact_half_ties_round_to_even(dtype):
    halves = [0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, -0.5, -1.5, -2.5, -3.5, -4.5, -5.5, -6.5]
    for row, sym in ((torch.tensor([7.0, 0.0] + halves), True), (torch.tensor([-7.5, 7.5] + halves), False)):
        w = row.repeat(3, 2).to(dtype)  # (3, 32), unit scales
        _assert_quantize(w, 4, -1, sym)
        _assert_quantize(w, 4, 32, sym)


@pytest.mark.parametrize("bits,gs,sym", [(4, 128, False), (8, -1, True)])
def test_quantize_llama_slices_and_strides(bits, gs, sym):
    n, k = LLAMA_SHAPES["llama2-7b.qkv"]
    _assert_quantize(randn(n, k, torch.float16, seed=10)[:64], bits, gs, sym)
    wide = randn(64, k + 128, torch.bfloat16, seed=11).to(DEV)[:, :k]  # row stride K + 128
    q, s, z = OPS.quantize(wide, bits, gs, sym, B)
    for got, want in zip((q, s, z), ref.quantize(wide.cpu(), bits, gs, sym)):
        assert_exact(got.cpu(), want)
    odd = randn(64, k + 1, torch.float32, seed=12).to(DEV)[:, 1:]  # 4-byte aligned only: narrow chunks
    q, s, z = OPS.quantize(odd, bits, gs, sym, B)
    for got, want in zip((q, s, z), ref.quantize(odd.cpu(), bits, gs, sym)):
        assert_exact(got.cpu(), want)
    _assert_quantize(randn(256, 48, seed=12).t(), bits, gs if gs == -1 else 128, sym)  # K not contiguous


def test_quantize_public_api_and_opcheck():
    w = randn(33, 128, torch.bfloat16, seed=13).to(DEV)
    for spec in (QuantSpec(4, 64, False), QuantSpec(8, -1, True)):
        qw, rw = qdpo.quantize(w, spec, backend=B), qdpo.quantize(w.cpu(), spec, backend="reference")
        for name in ("qweight", "scales", "zeros"):
            assert_exact(getattr(qw, name).cpu(), getattr(rw, name), name)
    w = randn(7, 96, seed=14).to(DEV)
    s, z = ref.qparams(w, 4, 32, False)
    opcheck(OPS.qparams, (w, 4, 32, False, B))
    opcheck(OPS.quantize, (w, 8, -1, True, B))
    opcheck(OPS.quantize_with, (w, s, z, 4, B))


# --------------------------------------------------------------------------- dequantize
def _assert_dequantize(q, s, z, bits, dtype):
    out = OPS.dequantize(*_gpu(q, s, z), bits, dtype, B)
    assert_exact(out.cpu(), ref.dequantize(*_cpu(q, s, z), bits, dtype), "ŵ")


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("gs", GROUPS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_matches_reference(dtype, bits, gs, sym):
    q, s, z = ref.quantize(randn(*SHAPE_FOR[gs], dtype, seed=gs), bits, gs, sym)
    _assert_dequantize(q, s, z, bits, dtype)


@pytest.mark.parametrize("sdtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_arbitrary_codes_into_every_output_dtype(dtype, sdtype):
    for bits in (4, 8):
        _assert_dequantize(*_random_packed(33, 256, bits, 4, sdtype, seed=bits), bits, dtype)


@pytest.mark.parametrize("nk", ODD_NK)
def test_dequantize_odd_shapes_every_group_size(nk):
    n, k = nk
    for gs in GROUPS:
        if gs != -1 and k % gs:
            continue
        ng = 1 if gs == -1 else k // gs
        for bits, sdtype in ((4, torch.bfloat16), (8, torch.float16)):
            q, s, z = _random_packed(n, k, bits, ng, sdtype, seed=n + ng)
            _assert_dequantize(q, s, z, bits, torch.bfloat16 if bits == 4 else torch.float32)


def test_dequantize_strided_misaligned_and_long_rows():
    q, s, z = _random_packed(7, 96, 4, 3, torch.float32, seed=4)
    q_wide = torch.zeros(7, 64, dtype=torch.uint8, device=DEV)[:, :48]  # row stride 64 bytes
    q_wide.copy_(q.to(DEV))
    s_t, z_t = s.to(DEV).t().contiguous().t(), z.to(DEV).t().contiguous().t()
    assert_exact(OPS.dequantize(q_wide, s_t, z_t, 4, torch.float16, B).cpu(),
                 ref.dequantize(q, s, z, 4, torch.float16), "ŵ")
    q_odd = torch.zeros(7, 49, dtype=torch.uint8, device=DEV)[:, 1:]  # 1-byte aligned rows: narrow chunks
    q_odd.copy_(q.to(DEV))
    assert_exact(OPS.dequantize(q_odd, s.to(DEV), z.to(DEV), 4, torch.float32, B).cpu(),
                 ref.dequantize(q, s, z, 4, torch.float32), "ŵ")
    for k, bits in ((14336, 4), (4101, 8)):
        _assert_dequantize(*_random_packed(5, k, bits, 1, torch.float16, seed=k), bits, torch.bfloat16)


@pytest.mark.parametrize("mag", [1e-30, 1e30])
def test_dequantize_tiny_and_huge_scales_fp32(mag):
    for bits in (4, 8):
        q, s, z = _random_packed(5, 256, bits, 8, torch.float32, seed=5, mag=mag)
        _assert_dequantize(q, s, z, bits, torch.float32)
        _assert_dequantize(q, s, z, bits, torch.float16)  # 1e30: ±inf like Tensor.to; 1e-30: zeros


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_zero_groups_give_exact_zeros(dtype):
    w = randn(6, 128, dtype, seed=6)
    w[0] = 0
    w[1, :32] = 0
    for bits, gs, sym in ((4, 32, False), (8, -1, True)):
        q, s, z = ref.quantize(w, bits, gs, sym)
        out = OPS.dequantize(*_gpu(q, s, z), bits, dtype, B).cpu()
        assert out[0].eq(0).all() and out[1, :32].eq(0).all()
        assert_exact(out, ref.dequantize(q, s, z, bits, dtype), "ŵ")


def test_dequantize_llama_slice_and_opcheck():
    n, k = LLAMA_SHAPES["llama3-8b.kv"]
    for bits, gs in ((4, 128), (8, -1)):
        q, s, z = ref.quantize(randn(n, k, torch.bfloat16, seed=7)[:64], bits, gs, False)
        _assert_dequantize(q, s, z, bits, torch.bfloat16)
    q, s, z = _gpu(*_random_packed(7, 96, 4, 3, torch.float16, seed=9))
    opcheck(OPS.dequantize, (q, s, z, 4, torch.bfloat16, B))
    q8, s8, z8 = _gpu(*_random_packed(7, 96, 8, 1, torch.float32, seed=10))
    opcheck(OPS.dequantize, (q8, s8, z8, 8, None, B))


# --------------------------------------------------------------------------- fake_quant
def _assert_fq_backward(grad, w, s, z, bits):
    gw, gs = OPS.fake_quant_backward(*_gpu(grad, w, s, z), bits, True, B)
    rw, rs = ref.fake_quant_backward(*_cpu(grad, w, s, z), bits, True)
    assert_exact(gw.cpu(), rw, "grad_w")
    _assert_sum_close(gs.cpu(), rs, grad.cpu(), bits)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("gs", GROUPS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_quant_forward_and_backward_match_reference(dtype, bits, gs, sym):
    n, k = SHAPE_FOR[gs]
    w = randn(n, k, dtype, seed=gs)
    s, z = _grid(w, bits, gs, sym)
    assert not ref.fake_quant_mask(w, s, z, bits).all(), "the grid should clip some codes"
    assert_exact(OPS.fake_quant(*_gpu(w, s, z), bits, None, B).cpu(), ref.fake_quant(w, s, z, bits), "ŵ")
    grad = randn(n, k, dtype, seed=gs + 1)
    _assert_fq_backward(grad, w, s, z, bits)
    gw, gs_ = OPS.fake_quant_backward(*_gpu(grad, w, s, z), bits, False, B)
    assert_exact(gw.cpu(), ref.fake_quant_backward(grad, w, s, z, bits)[0], "grad_w")
    assert gs_.numel() == 0


@pytest.mark.parametrize("nk", ODD_NK)
def test_fake_quant_odd_shapes_every_group_size(nk):
    w = randn(*nk, torch.bfloat16, seed=nk[0])
    grad = randn(*nk, seed=nk[1])  # fp32 grad into a bf16 weight: grad_w rounds to nearest even
    for gs in GROUPS:
        if gs == -1 or nk[1] % gs == 0:
            s, z = _grid(w, 4, gs, False)
            assert_exact(OPS.fake_quant(*_gpu(w, s, z), 4, torch.float32, B).cpu(),
                         ref.fake_quant(w, s, z, 4, torch.float32), "ŵ")
            _assert_fq_backward(grad, w, s, z, 4)


@pytest.mark.parametrize("k,bits", [(14336, 4), (4100, 4), (4101, 8)])
def test_fake_quant_long_and_narrow_rows(k, bits):
    """One group per row: a block-wide LSQ team sum, 2-/1-element chunks."""
    w = randn(9, k, torch.float16, seed=k)
    s, z = _grid(w, bits, -1, bits == 8)
    assert_exact(OPS.fake_quant(*_gpu(w, s, z), bits, None, B).cpu(), ref.fake_quant(w, s, z, bits), "ŵ")
    _assert_fq_backward(randn(9, k, torch.float16, seed=k + 1), w, s, z, bits)


@pytest.mark.parametrize("bits,gs", [(4, 32), (8, -1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quant_lsq_gradient_matches_autograd(dtype, bits, gs):
    w = randn(33, 128, dtype, seed=1)
    s, z = _grid(w, bits, gs, False)
    grad = randn(33, 128, dtype, seed=2)
    w_leaf, s_leaf = w.clone().requires_grad_(), s.clone().requires_grad_()
    ref.fake_quant_autograd(w_leaf, s_leaf, z, bits).backward(grad)
    gw, gs_ = OPS.fake_quant_backward(*_gpu(grad, w, s, z), bits, True, B)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(gw.cpu(), w_leaf.grad, rtol=2 * eps, atol=0)
    _assert_sum_close(gs_.cpu(), s_leaf.grad, grad, bits, "grad_scales vs autograd")


def test_fake_quant_mixed_dtypes_of_output_grad_and_scales():
    w = randn(7, 96, torch.bfloat16, seed=3)
    s, z = _grid(w.float(), 8, 32, True)
    s16 = s.half()
    for out_dtype in DTYPES:
        assert_exact(OPS.fake_quant(*_gpu(w, s16, z), 8, out_dtype, B).cpu(),
                     ref.fake_quant(w, s16, z, 8, out_dtype), "ŵ")
    _assert_fq_backward(randn(7, 96, torch.float16, seed=4), w, s16, z, 8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_quant_zero_and_constant_groups(dtype):
    w = randn(6, 128, dtype, seed=7)
    w[0] = 0
    w[1, :32] = 0
    w[2, 32:64] = 3
    w[3] = -0.25
    grad = randn(6, 128, dtype, seed=8)
    for bits, gs, sym in ((4, 32, False), (8, -1, True)):
        s, z = ref.qparams(w, bits, gs, sym)
        out = OPS.fake_quant(*_gpu(w, s, z), bits, None, B).cpu()
        assert out[0].eq(0).all() and out[1, :32].eq(0).all()
        assert_exact(out, ref.fake_quant(w, s, z, bits), "ŵ")
        gw, gs_ = OPS.fake_quant_backward(*_gpu(grad, w, s, z), bits, True, B)
        assert_exact(gw.cpu(), grad, "grad_w (nothing clips on an RTN grid)")
        assert gs_[0].eq(0).all(), "a zero group has round(w/s) - w/s = 0"
        _assert_fq_backward(grad, w, s, z, bits)


@pytest.mark.parametrize("mag", [1e-30, 1e30])
def test_fake_quant_tiny_and_huge_magnitudes_fp32(mag):
    w = randn(5, 256, seed=9) * mag
    grad = randn(5, 256, seed=10)
    for bits, gs, sym in ((4, 32, False), (8, -1, True)):
        s, z = _grid(w, bits, gs, sym)
        assert_exact(OPS.fake_quant(*_gpu(w, s, z), bits, None, B).cpu(), ref.fake_quant(w, s, z, bits), "ŵ")
        _assert_fq_backward(grad, w, s, z, bits)


def test_fake_quant_exact_half_ties_round_to_even():
    halves = [0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, -0.5, -1.5, -2.5, -3.5, -4.5, -5.5, -6.5, 8.5, -7.5]
    w = torch.tensor(halves).repeat(2, 2)  # (2, 32); s = 1, z = 8: 8.5 clips, -7.5 stays inside
    s, z = torch.ones(2, 1), torch.full((2, 1), 8, dtype=torch.uint8)
    assert_exact(OPS.fake_quant(*_gpu(w, s, z), 4, None, B).cpu(), ref.fake_quant(w, s, z, 4), "ŵ")
    _assert_fq_backward(torch.ones(2, 32), w, s, z, 4)


def test_fake_quant_llama_slice():
    n, k = LLAMA_SHAPES["llama3-8b.q"]
    w = randn(n, k, torch.bfloat16, seed=11)[:64]
    s, z = _grid(w, 4, 128, False)
    assert_exact(OPS.fake_quant(*_gpu(w, s, z), 4, None, B).cpu(), ref.fake_quant(w, s, z, 4), "ŵ")
    _assert_fq_backward(randn(64, k, torch.bfloat16, seed=12), w, s, z, 4)


def test_fake_quant_public_api_autograd():
    spec = QuantSpec(4, 64, False)
    w = randn(33, 128, torch.float16, seed=13)
    s, z = _grid(w, 4, 64, False)
    grad = randn(33, 128, torch.float16, seed=14)
    grads = {}
    for backend, dev in ((B, DEV), ("reference", "cpu")):
        wl, sl = w.to(dev).clone().requires_grad_(), s.to(dev).clone().requires_grad_()
        out = qdpo.fake_quant(wl, spec, sl, z.to(dev), backend=backend)
        out.backward(grad.to(dev))
        grads[backend] = (out.detach().cpu(), wl.grad.cpu(), sl.grad.cpu())
    (o, gw, gs), (ro, rgw, rgs) = grads[B], grads["reference"]
    assert_exact(o, ro, "ŵ")
    assert_exact(gw, rgw, "grad_w")
    _assert_sum_close(gs, rgs, grad, 4)
    wl = w.to(DEV).requires_grad_()  # a gradient from .sum() arrives stride-0 expanded
    qdpo.fake_quant(wl, spec, s.to(DEV), z.to(DEV), backend=B).sum().backward()
    assert_exact(wl.grad.cpu(), ref.fake_quant_mask(w, s, z, 4).to(w.dtype), "grad_w from .sum()")


def test_fake_quant_opcheck_and_compile():
    w = randn(7, 96, seed=15)
    w, s, z = _gpu(w, *_grid(w, 4, 32, False))
    opcheck(OPS.fake_quant, (w.clone().requires_grad_(), s.clone().requires_grad_(), z, 4, None, B))
    opcheck(OPS.fake_quant_backward, (randn(7, 96, seed=16).to(DEV), w, s, z, 4, True, B))

    def loss_fn(w, s, z):
        return OPS.fake_quant(w, s, z, 4, None, B).square().sum()

    wc, we = w.clone().requires_grad_(), w.clone().requires_grad_()
    loss_c, loss_e = torch.compile(loss_fn, fullgraph=True)(wc, s, z), loss_fn(we, s, z)
    loss_c.backward()
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(wc.grad, we.grad)


# --------------------------------------------------------------------------- dequant_matmul
def _path(x, qw) -> str:
    from qdpo.kernels import cuda

    q, s, _, bits = _args(qw)
    s = s if x.dtype == torch.float32 or s.dtype == x.dtype else s.to(x.dtype)
    return cuda.gemv_plan(x.reshape(-1, x.shape[-1]), q, s, bits)["kernel"]


@pytest.mark.parametrize("i,m,nk", [(i, m, nk) for i, (m, nk) in enumerate((m, nk) for m in MS for nk in ODD_NK)])
def test_dequant_matmul_odd_shapes(i, m, nk):
    """Every M × odd (N, K): served up to 16 rows, a clear Unsupported above (auto then uses triton)."""
    n, k = nk
    bits, sym, has_bias = (4, 8)[i % 2], bool(i // 2 % 2), i % 3 != 0
    qw = _weight(n, k, bits, _gs_for(k, i), sym, seed=i)
    x = _rand(m, k, dtype=XDTYPES[i % 3], seed=i)
    b = _rand(n, seed=i + 100) if has_bias else None
    if m <= 16:
        _check_y(OPS.dequant_matmul(x, *_args(qw), b, B), x, qw, b, f"cuda {_path(x, qw)} M={m}")
        return
    with pytest.raises(RuntimeError, match="cuda backend cannot serve this request.*M <= 16"):
        OPS.dequant_matmul(x, *_args(qw), b, B)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backends, "CUDA_IN_AUTO", True)
        _check_y(OPS.dequant_matmul(x, *_args(qw), b, "auto"), x, qw, b, "auto falls back")


@pytest.mark.parametrize("xdtype", XDTYPES)
@pytest.mark.parametrize("bits", (4, 8))
@pytest.mark.parametrize("gs", GROUPS)
def test_dequant_matmul_dtypes_and_groups(xdtype, bits, gs):
    """All x dtypes × bits × group sizes at 1, 3, 9 and 16 rows; scale dtypes differ from x's in some cases."""
    case = XDTYPES.index(xdtype) + 3 * GROUPS.index(gs)
    sym = (case + bits // 4) % 2 == 1
    qw = _weight(33, 512, bits, gs, sym, wdtype=XDTYPES[case % 3], seed=case)
    b = _rand(33, dtype=xdtype, seed=7)
    for m in (1, 3, 9, 16):
        x = _rand(m, 512, dtype=xdtype, seed=m)
        want = "fma" if xdtype == torch.float32 else "mma"
        assert _path(x, qw) == want
        _check_y(OPS.dequant_matmul(x, *_args(qw), b, B), x, qw, b, f"{want} M={m}")


def test_dequant_matmul_every_launcher_path():
    """mma; fma for fp32 x, a misaligned x and K % 32 != 0; split-K (deterministic); batch dims and bias."""
    qw = _weight(67, 320, 4, 64, sym=False)
    x, b = _rand(2, 3, 320, dtype=torch.bfloat16), _rand(67)
    assert _path(x, qw) == "mma"
    _check_y(OPS.dequant_matmul(x, *_args(qw), b, B), x, qw, b, "mma, batch dims")
    _check_y(qdpo.dequant_matmul(x, qw, b, backend=B), x, qw, b, "public API")
    buf = _rand(1 + 5 * 320, dtype=torch.float16)
    xm = buf[1:].view(5, 320)  # 2-byte aligned: the FMA path
    assert _path(xm, qw) == "fma"
    _check_y(OPS.dequant_matmul(xm, *_args(qw), b, B), xm, qw, b, "fma, misaligned x")
    qw80 = _weight(19, 80, 8, -1, sym=True)
    x80 = _rand(4, 80, dtype=torch.bfloat16)
    assert _path(x80, qw80) == "fma"
    _check_y(OPS.dequant_matmul(x80, *_args(qw80), None, B), x80, qw80, what="fma, K % 32 != 0")
    qws = _weight(64, 8192, 4, 128, sym=False, wdtype=torch.bfloat16)
    from qdpo.kernels import cuda

    for m in (1, 7, 16):
        xs = _rand(m, 8192, dtype=torch.bfloat16, seed=m)
        assert cuda.gemv_plan(xs, *_args(qws)[:2], 4)["splits"] > 1, "a 64-row weight should split K"
        y = OPS.dequant_matmul(xs, *_args(qws), b[:64].contiguous(), B)
        _check_y(y, xs, qws, b[:64], f"split-K M={m}")
        assert torch.equal(y, OPS.dequant_matmul(xs, *_args(qws), b[:64].contiguous(), B)), "deterministic"


def test_dequant_matmul_zero_rows_give_the_bias_exactly():
    w = torch.randn(5, 256)
    w[1] = 0.0
    w[3] = 0.25
    qw = qdpo.quantize(w, QuantSpec(4, 64, False), backend="reference").to(DEV)
    b = _rand(5)
    for xdtype in (torch.bfloat16, torch.float32):
        for m in (1, 3, 16):
            x = _rand(m, 256, dtype=xdtype, seed=m)
            y = OPS.dequant_matmul(x, *_args(qw), b, B)
            assert torch.equal(y[:, 1], b[1].to(xdtype).expand(m)), "zero row must give the bias exactly"
            _check_y(y, x, qw, b)


@pytest.mark.parametrize("name", list(LLAMA_SHAPES))
@pytest.mark.parametrize("bits,gs", [(4, 128), (8, -1)])
def test_dequant_matmul_llama_shapes(name, bits, gs):
    n, k = LLAMA_SHAPES[name]
    qw = _weight(n, k, bits, gs, wdtype=torch.bfloat16)
    for m in (1, 4, 16):
        x = _rand(m, k, dtype=torch.bfloat16, seed=m)
        _check_y(OPS.dequant_matmul(x, *_args(qw), None, B), x, qw, what=f"{name} M={m}")


@pytest.mark.parametrize("xdtype", XDTYPES)
def test_dequant_matmul_8192(xdtype):
    qw = _weight(8192, 8192, 4, 128, wdtype=torch.float16)
    b = _rand(8192, dtype=xdtype)
    for m in (1, 16):
        x = _rand(m, 8192, dtype=xdtype, seed=m)
        y = OPS.dequant_matmul(x, *_args(qw), b, B)
        _check_y(y, x, qw, b, f"M={m}")
        assert torch.equal(y, OPS.dequant_matmul(x, *_args(qw), b, B)), "deterministic"


def test_dequant_matmul_not_served_ops_say_so():
    """dx has no cuda kernel: backend='cuda' names the op; auto serves it through triton."""
    qw = _weight(7, 96, 4, 32)
    with pytest.raises(RuntimeError, match="cuda backend does not implement qdpo::dequant_matmul_dx"):
        OPS.dequant_matmul_dx(_rand(3, 7), *_args(qw), B)
    dy = _rand(3, 7)
    _check_dx(OPS.dequant_matmul_dx(dy, *_args(qw), "auto"), dy, qw)


def test_dequant_matmul_opcheck_and_graph_capture():
    qw = _weight(7, 96, 4, 32)
    for m, dtype in ((1, torch.float16), (3, torch.bfloat16), (5, torch.float32)):
        opcheck(OPS.dequant_matmul, (_rand(m, 96, dtype=dtype), *_args(qw), _rand(7), B))
    qw = _weight(4096, 4096, 4, 128, wdtype=torch.bfloat16)
    x = _rand(1, 4096, dtype=torch.bfloat16)
    y = OPS.dequant_matmul(x, *_args(qw), None, B)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        yg = OPS.dequant_matmul(x, *_args(qw), None, B)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(yg, y)
    assert_close_2x(y, *(ref.dequant_matmul(t, *_args(qw)) for t in (x.double(), x)))
