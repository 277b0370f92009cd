"""Triton fake-quant matmul (``qdpo/kernels/triton/fake_quant_matmul.py``) against ``reference.py``.

Floats follow the 2×-of-PyTorch rule of ``conftest.py``: the "fp32" reference is
the same reference function run in float64 (x, dy upcast; ŵ and the grid are
the spec's), the low-precision one is the reference in the kernel's dtype.
Latent weights are pushed partly off the grid so the clip mask matters, and
every such test checks that clipping really happened.
"""

import itertools

import pytest
import torch
from torch.library import opcheck

import qdpo
from qdpo import QuantSpec
from qdpo.kernels import reference as ref
from qdpo.kernels.triton import fake_quant_matmul as fqm
from tests.conftest import HAS_GPU, LLAMA_SHAPES, MS, ODD_NK, assert_close_2x, assert_exact, fp32_sum_floor

DEV = "cuda" if HAS_GPU else "cpu"
OPS = torch.ops.qdpo
XDTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _gs_for(k: int, i: int) -> int:
    """A group size that divides k, cycling through the supported ones with i."""
    fits = [g for g in (32, 64, 128, 256) if k % g == 0] + [-1]
    return fits[i % len(fits)]


def _problem(n, k, bits=4, gs=64, sym=False, wdtype=torch.float32, seed=0):
    """Latent ``w`` ``(n, k)`` off its RTN grid (some codes clip), with that grid's scales/zeros."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(n, k, generator=g)
    qw = qdpo.quantize(w0.to(wdtype), QuantSpec(bits, gs, sym), backend="reference")
    s_full = qw.scales.float().repeat_interleave(k // qw.scales.shape[1], 1)
    w = 1.2 * w0 + 3 * s_full * torch.randn(n, k, generator=g)  # beyond the grid's range: clipped
    return w.to(wdtype).to(DEV), qw.scales.to(DEV), qw.zeros.to(DEV)


def _rand(*shape, dtype, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEV)


def _assert_clips(w, s, z, bits):
    mask = ref.fake_quant_mask(w, s, z, bits)
    assert bool(mask.any()) and not bool(mask.all()), "test data must have clipped and unclipped weights"


def _check_forward(x, w, s, z, bits, bias, path):
    y = fqm.fake_quant_matmul(x, w, s, z, bits, bias, path=path)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    y64 = ref.fake_quant_matmul(x.double(), w, s, z, bits, bias)
    assert_close_2x(y, y64, ref.fake_quant_matmul(x, w, s, z, bits, bias), what=f"y ({path})")


def _truth_grads(dy, x, w, s, z, bits):
    """float64 ``dw`` and ``dscales`` from the reference STE applied per element (G = 1)."""
    k = w.shape[1]
    dw_hat = dy.reshape(-1, dy.shape[-1]).double().t() @ x.reshape(-1, k).double()
    rep = k // s.shape[1]
    s1, z1 = s.float().repeat_interleave(rep, 1), z.repeat_interleave(rep, 1)
    _, per_elem = ref.fake_quant_backward(torch.ones_like(w, dtype=torch.float32), w, s1, z1, bits, True)
    mask = ref.fake_quant_mask(w, s, z, bits)
    dw = torch.where(mask, dw_hat, 0.0)
    ds = (dw_hat * per_elem.double()).reshape(w.shape[0], s.shape[1], rep).sum(-1)
    return dw, ds


def _check_backward(dy, x, w, s, z, bits, path, need_s=True, dw_floor=1e-6, ds_floor=1e-6):
    dx, dw, ds = fqm.fake_quant_matmul_backward(dy, x, w, s, z, bits, need_s, path=path)
    rdx, rdw, rds = ref.fake_quant_matmul_backward(dy, x, w, s, z, bits, need_s)
    dx64, _, _ = ref.fake_quant_matmul_backward(dy.double(), x.double(), w, s, z, bits, False)
    dw64, ds64 = _truth_grads(dy, x, w, s, z, bits)
    assert dx.dtype == x.dtype and dw.dtype == w.dtype
    assert_close_2x(dx, dx64, rdx, what=f"dx ({path})")
    assert_close_2x(dw, dw64, rdw, floor=dw_floor, what=f"dw ({path})")
    assert_exact(dw == 0, rdw == 0, "dw zero pattern")
    if need_s:
        assert ds.dtype == s.dtype
        assert_close_2x(ds, ds64, rds, floor=ds_floor, what=f"dscales ({path})")
    else:
        assert ds is None


# ----------------------------------------------------------------------------- ŵ codes
@pytest.mark.parametrize("wdtype,out", list(itertools.product(XDTYPES, XDTYPES)))
def test_workspace_matches_reference_fake_quant_exactly(wdtype, out):
    """The fq device helper shared by every kernel gives the spec's ŵ bit for bit."""
    i = XDTYPES.index(wdtype) * 3 + XDTYPES.index(out)
    bits, gs, sym = (4, 8)[i % 2], (32, 128, -1)[i % 3], i % 4 < 2
    w, s, z = _problem(33, 256, bits, gs, sym, wdtype, seed=i)
    _assert_clips(w, s, z, bits)
    assert_exact(fqm.fake_quant_workspace(w, s, z, bits, out, use_rint=False if not HAS_GPU else None),
                 ref.fake_quant(w, s, z, bits, out), "ŵ")


def test_workspace_with_negative_scales_matches_reference_exactly():
    """A tile with a negative scale takes the division and (c + 0)·s, the others c·s + 0 in one FMA:
    the spec's ŵ either way, the sign of every zero included."""
    w, s, z = _problem(33, 256, 4, 32, False, torch.float32, seed=5)
    some = s.clone()
    some[3:5] = -some[3:5]
    for scales in (some, -s):
        want = ref.fake_quant(w, scales, z, 4, torch.float32)
        assert (want.view(torch.int32) == -(2**31)).any(), "no -0 to check"
        assert_exact(fqm.fake_quant_workspace(w, scales, z, 4, torch.float32,
                                              use_rint=False if not HAS_GPU else None), want, "ŵ")


def test_rounding_ties_go_to_even_and_clip_at_the_edges():
    """w/s exactly at k + 0.5 (power-of-two scales): half to even, as torch.round; mask exact at 0 and qmax."""
    n, k, bits = 4, 64, 4
    s = torch.full((n, 1), 0.25)
    z = torch.tensor([[0], [3], [8], [15]], dtype=torch.uint8)
    w = (torch.arange(k, dtype=torch.float32) * 0.5 - 16.25).repeat(n, 1) * 0.25  # ties and integers
    w, s, z = w.to(DEV), s.to(DEV), z.to(DEV)
    assert_exact(fqm.fake_quant_workspace(w, s, z, bits, torch.float32, use_rint=False if not HAS_GPU else None),
                 ref.fake_quant(w, s, z, bits), "ŵ at ties")
    x, dy = _rand(3, k, dtype=torch.float32), _rand(3, n, dtype=torch.float32, seed=2)
    _, dw, ds = fqm.fake_quant_matmul_backward(dy, x, w, s, z, bits, True, path="fused")
    _, rdw, rds = ref.fake_quant_matmul_backward(dy, x, w, s, z, bits, True)
    assert_exact(dw == 0, rdw == 0, "mask at ties")
    torch.testing.assert_close(ds, rds)


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("path", fqm.PATHS)
@pytest.mark.parametrize("m,nk", list(itertools.product(MS, ODD_NK)))
def test_forward_shapes(m, nk, path):
    n, k = nk
    i = MS.index(m) + ODD_NK.index(nk)
    bits, sym = (4, 8)[i % 2], i % 3 == 0
    w, s, z = _problem(n, k, bits, _gs_for(k, i), sym, seed=i)
    bias = _rand(n, dtype=torch.float32, seed=3) if i % 2 else None
    _check_forward(_rand(m, k, dtype=torch.bfloat16), w, s, z, bits, bias, path)


@pytest.mark.parametrize("path", fqm.PATHS)
@pytest.mark.parametrize("bits", (4, 8))
@pytest.mark.parametrize("wdtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("xdtype", XDTYPES)
def test_forward_dtypes(xdtype, wdtype, bits, path):
    w, s, z = _problem(67, 320, bits, 64, bits == 8, wdtype)
    _assert_clips(w, s, z, bits)
    x = _rand(2, 9, 320, dtype=xdtype)  # leading batch dims
    _check_forward(x, w, s, z, bits, _rand(67, dtype=torch.bfloat16, seed=3), path)


# ----------------------------------------------------------------------------- backward
@pytest.mark.parametrize("gs,bits,sym", list(itertools.product((-1, 32, 64, 128, 256), (4, 8), (False, True))))
def test_group_sizes_forward_and_backward(gs, bits, sym):
    i = (-1, 32, 64, 128, 256).index(gs)
    path = fqm.PATHS[(i + bits + sym) % 2]
    w, s, z = _problem(33, 256, bits, gs, sym, seed=i)
    _assert_clips(w, s, z, bits)
    x, dy = _rand(17, 256, dtype=torch.bfloat16), _rand(17, 33, dtype=torch.bfloat16, seed=2)
    _check_forward(x, w, s, z, bits, None, path)
    _check_backward(dy, x, w, s, z, bits, path)


@pytest.mark.parametrize("path", fqm.PATHS)
@pytest.mark.parametrize("xdtype,wdtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.float32, torch.float32), (torch.float32, torch.bfloat16)])
def test_backward_dtypes(xdtype, wdtype, path):
    w, s, z = _problem(67, 320, 4, 64, False, wdtype)
    x, dy = _rand(3, 43, 320, dtype=xdtype), _rand(3, 43, 67, dtype=xdtype, seed=2)
    _check_backward(dy, x, w, s, z, 4, path, need_s=xdtype != torch.float16)


@pytest.mark.parametrize("m", MS)
def test_backward_shapes(m):
    n, k = ODD_NK[MS.index(m) + 1]
    w, s, z = _problem(n, k, 8 if m == 3 else 4, _gs_for(k, m), m == 17, seed=m)
    _check_backward(_rand(m, n, dtype=torch.bfloat16, seed=2), _rand(m, k, dtype=torch.bfloat16), w, s, z,
                    8 if m == 3 else 4, "fused")


def test_dw_is_exact_and_zero_where_clipped():
    """Integer-valued x and dy make dŵ exact in fp32: dw must then equal the reference bit for bit."""
    w, s, z = _problem(67, 320, 4, 32, False, torch.bfloat16, seed=7)
    g = torch.Generator().manual_seed(8)
    x = torch.randint(-4, 5, (129, 320), generator=g).to(torch.bfloat16).to(DEV)
    dy = torch.randint(-4, 5, (129, 67), generator=g).to(torch.bfloat16).to(DEV)
    _, dw, _ = fqm.fake_quant_matmul_backward(dy, x, w, s, z, 4, False, path="fused")
    _, rdw, _ = ref.fake_quant_matmul_backward(dy, x, w, s, z, 4, False)
    assert_exact(dw, rdw, "dw")
    mask = ref.fake_quant_mask(w, s, z, 4)
    assert 0 < int((~mask).sum()) and bool((dw[~mask] == 0).all()) and bool((dw[mask] != 0).any())


def test_one_group_per_row_and_k_equal_to_group():
    for gs, k in ((128, 128), (-1, 96)):
        w, s, z = _problem(7, k, 4, gs, False, seed=k)
        assert s.shape == (7, 1)
        x, dy = _rand(17, k, dtype=torch.bfloat16), _rand(17, 7, dtype=torch.bfloat16, seed=2)
        _check_forward(x, w, s, z, 4, None, "fused")
        _check_backward(dy, x, w, s, z, 4, "fused")


def test_scales_dtype_differs_from_weight():
    """fp16 scales on fp32 latent weights: ŵ uses the fp16 values, dscales comes back in fp16."""
    w, s, z = _problem(33, 128, 4, 32, False)
    s = s.half()
    x, dy = _rand(17, 128, dtype=torch.bfloat16), _rand(17, 33, dtype=torch.bfloat16, seed=2)
    _check_forward(x, w, s, z, 4, None, "fused")
    _check_backward(dy, x, w, s, z, 4, "fused")


def test_sliced_llama_shape():
    n, k = LLAMA_SHAPES["llama3-8b.kv"]
    w, s, z = _problem(48, k, 4, 128, False)  # the real K, a slice of the rows
    x, dy = _rand(17, k, dtype=torch.bfloat16), _rand(17, 48, dtype=torch.bfloat16, seed=2)
    _check_forward(x, w, s, z, 4, None, "fused")
    _check_backward(dy, x, w, s, z, 4, "fused")


def test_empty_batch():
    w, s, z = _problem(7, 64, 4, 32)
    x, dy = torch.empty(0, 64, device=DEV), torch.empty(0, 7, device=DEV)
    assert fqm.fake_quant_matmul(x, w, s, z, 4, path="fused").shape == (0, 7)
    dx, dw, ds = fqm.fake_quant_matmul_backward(dy, x, w, s, z, 4, True, path="fused")
    assert dx.shape == (0, 64) and bool((dw == 0).all()) and bool((ds == 0).all())


# ----------------------------------------------------------------------------- autograd and ops
@pytest.mark.parametrize("xdtype", XDTYPES)
def test_autograd_through_the_op(xdtype):
    """backend="triton" vs the reference backend and vs autograd through reference.fake_quant_autograd."""
    bits, gs = 4, 32
    w0, s0, z = _problem(33, 128, bits, gs, False)
    x0, b0 = _rand(2, 9, 128, dtype=xdtype), _rand(33, dtype=xdtype, seed=3)
    dy = _rand(2, 9, 33, dtype=xdtype, seed=2)
    grads = {}
    for name in ("triton", "reference", "autograd"):
        x, w, s, b = (t.clone().requires_grad_() for t in (x0, w0, s0, b0))
        if name == "autograd":
            y = torch.nn.functional.linear(x, ref.fake_quant_autograd(w, s, z, bits).to(xdtype), b)
        else:
            y = qdpo.fake_quant_matmul(x, w, QuantSpec(bits, gs), s, z, b, backend=name)
        y.backward(dy)
        grads[name] = (x.grad, w.grad, s.grad, b.grad)
    dx64, _, _ = ref.fake_quant_matmul_backward(dy.double(), x0.double(), w0, s0, z, bits, False)
    truth = (dx64, *_truth_grads(dy, x0, w0, s0, z, bits), dy.double().sum((0, 1)))
    for i, what in enumerate(("dx", "dw", "dscales", "dbias")):
        for lowp in ("reference", "autograd"):
            assert_close_2x(grads["triton"][i], truth[i], grads[lowp][i], what=f"{what} vs {lowp}")
    assert_exact(grads["triton"][1] == 0, grads["reference"][1] == 0, "dw zero pattern")


def test_opcheck_forward_op():
    w, s, z = _problem(7, 64, 4, 32)
    x = _rand(3, 64, dtype=torch.float32).requires_grad_()
    opcheck(OPS.fake_quant_matmul, (x, w.requires_grad_(), s.requires_grad_(), z, 4, _rand(7, dtype=torch.float32),
                                    "triton"))


def test_opcheck_backward_op():
    w, s, z = _problem(7, 64, 4, 32)
    args = (_rand(3, 7, dtype=torch.float32, seed=2), _rand(3, 64, dtype=torch.float32), w, s, z, 4)
    opcheck(OPS.fake_quant_matmul_backward, (*args, True, "triton"))
    opcheck(OPS.fake_quant_matmul_backward, (*args, False, "triton"))
    x_t, w_t = args[1].t().contiguous().t(), w.t().contiguous().t()  # column-major: dx and dw are contiguous
    opcheck(OPS.fake_quant_matmul_backward, (args[0], x_t, w_t, s, z, 4, True, "triton"))


def test_errors():
    w, s, z = _problem(7, 64, 4, 32)
    x = _rand(3, 64, dtype=torch.float32)
    dy16 = _rand(3, 7, dtype=torch.float16)
    for backend in ("reference", "triton"):  # the ops layer's check, so every backend's (and the fake's) words
        with pytest.raises(TypeError, match="dy has dtype torch.float16 but x has torch.float32"):
            OPS.fake_quant_matmul_backward(dy16, x, w, s, z, 4, False, backend)
    with pytest.raises(TypeError, match="dy has dtype torch.float16 but x has torch.float32"):
        OPS.fake_quant_matmul_backward(*(t.to("meta") for t in (dy16, x, w, s, z)), 4, False)
    with pytest.raises(ValueError, match="must have the same leading dimensions"):  # the ops layer's check
        OPS.fake_quant_matmul_backward(_rand(4, 7, dtype=torch.float32), x, w, s, z, 4, False, "triton")
    with pytest.raises(ValueError, match="path='cublas' is not known"):
        fqm.fake_quant_matmul(x, w, s, z, 4, path="cublas")


def test_default_dispatch_by_rows(monkeypatch):
    """WORKSPACE_MIN_M picks the path; both give the same result here."""
    calls = []
    monkeypatch.setattr(fqm, "fake_quant_workspace", lambda *a, **k: calls.append(1) or ref.fake_quant(*a[:4], a[4]))
    w, s, z = _problem(7, 64, 4, 32)
    x = _rand(5, 64, dtype=torch.float32)
    monkeypatch.setattr(fqm, "WORKSPACE_MIN_M", 5)
    y_ws = fqm.fake_quant_matmul(x, w, s, z, 4)
    monkeypatch.setattr(fqm, "WORKSPACE_MIN_M", 6)
    y_fused = fqm.fake_quant_matmul(x, w, s, z, 4)
    assert len(calls) == 1
    torch.testing.assert_close(y_ws, y_fused)


# ----------------------------------------------------------------------------- GPU, real sizes
@pytest.mark.gpu
def test_gpu_rint_and_floor_rounding_agree():
    n, k = LLAMA_SHAPES["llama2-7b.qkv"]
    w, s, z = _problem(n, k, 4, 128)
    expect = ref.fake_quant(w, s, z, 4, torch.bfloat16)
    for use_rint in (True, False):
        assert_exact(fqm.fake_quant_workspace(w, s, z, 4, torch.bfloat16, use_rint=use_rint), expect, "ŵ")


@pytest.mark.gpu
@pytest.mark.parametrize("path", fqm.PATHS)
def test_gpu_real_size(path):
    n, k = LLAMA_SHAPES["llama3-8b.kv"]
    w, s, z = _problem(n, k, 4, 128)
    x, dy = _rand(4096, k, dtype=torch.bfloat16), _rand(4096, n, dtype=torch.bfloat16, seed=2)
    _check_forward(x, w, s, z, 4, None, path)
    # dŵ sums 4096 rows; the scale gradient 4096 · 128 terms per group
    _check_backward(dy, x, w, s, z, 4, path, dw_floor=fp32_sum_floor(4096), ds_floor=fp32_sum_floor(4096 * 128))


def _peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.gpu
def test_gpu_peak_memory_below_fake_quant_then_matmul():
    """Forward + backward at M = 4096 needs less memory than ``fake_quant`` followed by a matmul."""
    n, k = LLAMA_SHAPES["llama2-7b.gate_up"]
    w0, s, z = _problem(n, k, 4, 128)
    x0, dy = _rand(4096, k, dtype=torch.bfloat16), _rand(4096, n, dtype=torch.bfloat16, seed=2)
    spec = QuantSpec(4, 128)

    def run(triton: bool):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        if triton:
            y = qdpo.fake_quant_matmul(x, w, spec, s, z, backend="triton")
        else:
            y = torch.nn.functional.linear(x, OPS.fake_quant(w, s, z, 4, torch.bfloat16, "reference"))
        y.backward(dy)

    peaks = {t: _peak_bytes(lambda: run(t)) for t in (True, False)}
    assert peaks[True] < peaks[False], peaks


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")  # w·(1/s) past fp32
@pytest.mark.parametrize("bits", [4, 8])
def test_near_ties_match_true_division(bits):
    """The fused kernels' tile quantizer (``fq_rows``: w / s through each row's reciprocal) gives the
    reference's ŵ on about a million near-tie, tiny and huge quotients, with every scale of a tile
    within 2^±100 and with one past it (the division)."""
    from tests.test_fake_quant import _near_ties

    w, s, z = _near_ties(bits)
    for outside in (False, True):
        if outside:
            s[::8] = 2.0**110
        got = fqm.fake_quant_workspace(*(t.to(DEV) for t in (w, s, z)), bits, torch.float32).cpu()
        assert_exact(got, ref.fake_quant(w, s, z, bits, torch.float32), f"ŵ (a scale past 2^100: {outside})")
