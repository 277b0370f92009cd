"""Triton (and cuda) fake_quant and its STE / LSQ backward vs ``qdpo.kernels.reference``.

Forward and ``grad_w`` are bit-exact; ``grad_scales`` is an fp32 sum taken in
another order, so it is compared within the bound of :func:`_assert_sum_close`,
against ``reference.fake_quant_backward`` and against autograd through
``reference.fake_quant_autograd``. Runs on the CPU under ``TRITON_INTERPRET=1``.
Tests taking the ``backend`` fixture also run the cuda backend on CUDA tensors
against the same CPU reference, on a GPU with the built extension (marked
``gpu``; see conftest); what only the cuda launchers need is in
``test_cuda_kernels.py``.
"""

import pytest
import torch
from torch.library import opcheck

import qdpo
from qdpo import QuantSpec
from qdpo.kernels import reference as ref
from qdpo.kernels.triton import fake_quant as tf, quantize as tq
from tests.conftest import DTYPES, GROUPS, LLAMA_SHAPES, ODD_NK, SHAPE_FOR, assert_exact, on, randn

OPS = torch.ops.qdpo


def _grid(w, bits, gs, sym, shrink=0.8):
    """RTN scales shrunk so that some codes clip (both STE branches are exercised)."""
    s, z = ref.qparams(w, bits, gs, sym)
    return (s.float() * shrink).to(s.dtype), z


def _assert_sum_close(actual, expected, grad, bits, what="grad_scales"):
    """Per-group sums in fp32 (any order) then one cast: |Δ| ≤ 2·G·2⁻²⁴·Σ|g|·qmax + an ulp of the dtype.

    ``qmax`` bounds every term's factor ``|round(w/s) - w/s|`` or ``|q - z|``.
    """
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    n, ng = expected.shape
    g_abs = grad.float().abs().reshape(n, ng, -1)
    bound = 2 * g_abs.shape[-1] * 2.0**-24 * g_abs.sum(-1) * ((1 << bits) - 1)
    tol = bound + torch.finfo(expected.dtype).eps * expected.float().abs()
    err = (actual.float() - expected.float()).abs()
    assert (err <= tol).all(), f"{what}: error {err.max().item():.3g} over the bound {tol.min().item():.3g}"


def _assert_backward(grad, w, s, z, bits, backend="triton"):
    """The op's ``(grad_w, grad_scales)`` vs reference.fake_quant_backward run on the CPU."""
    gw, gs = OPS.fake_quant_backward(*on(backend, grad, w, s, z), bits, True, backend)
    rw, rs = ref.fake_quant_backward(grad.cpu(), w.cpu(), s.cpu(), z.cpu(), bits, True)
    assert_exact(gw.cpu(), rw, "grad_w")
    _assert_sum_close(gs.cpu(), rs, grad.cpu(), bits)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("gs", GROUPS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_reference(dtype, bits, gs, sym, backend):
    w = randn(*SHAPE_FOR[gs], dtype, seed=gs)
    s, z = _grid(w, bits, gs, sym)
    assert_exact(OPS.fake_quant(*on(backend, w, s, z), bits, None, backend).cpu(), ref.fake_quant(w, s, z, bits), "ŵ")


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("gs", GROUPS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_reference(dtype, bits, gs, sym, backend):
    n, k = SHAPE_FOR[gs]
    w = randn(n, k, dtype, seed=gs)
    s, z = _grid(w, bits, gs, sym)
    assert not ref.fake_quant_mask(w, s, z, bits).all(), "the grid should clip some codes"
    grad = randn(n, k, dtype, seed=gs + 1)
    _assert_backward(grad, w, s, z, bits, backend)
    gw, gs_ = OPS.fake_quant_backward(*on(backend, grad, w, s, z), bits, False, backend)
    assert_exact(gw.cpu(), ref.fake_quant_backward(grad, w, s, z, bits)[0], "grad_w")
    assert gs_.numel() == 0


@pytest.mark.parametrize("nk", ODD_NK)
def test_odd_shapes_every_group_size(nk, backend):
    w = randn(*nk, torch.bfloat16, seed=nk[0])
    grad = randn(*nk, seed=nk[1])  # fp32 grad into a bf16 weight: grad_w rounds to nearest even
    for gs in GROUPS:
        if gs == -1 or nk[1] % gs == 0:
            s, z = _grid(w, 4, gs, False)
            assert_exact(OPS.fake_quant(*on(backend, w, s, z), 4, torch.float32, backend).cpu(),
                         ref.fake_quant(w, s, z, 4, torch.float32), "ŵ")
            _assert_backward(grad, w, s, z, 4, backend)


@pytest.mark.parametrize("bits,gs", [(4, 32), (8, -1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lsq_gradient_matches_autograd(dtype, bits, gs, backend):
    """An independent statement of the gradients: autograd through the fake-quant formula."""
    w = randn(33, 128, dtype, seed=1)
    s, z = _grid(w, bits, gs, False)
    grad = randn(33, 128, dtype, seed=2)
    w_leaf, s_leaf = w.clone().requires_grad_(), s.clone().requires_grad_()
    ref.fake_quant_autograd(w_leaf, s_leaf, z, bits).backward(grad)
    gw, gs_ = OPS.fake_quant_backward(*on(backend, grad, w, s, z), bits, True, backend)
    # autograd's ∂w is (g·s)/s: within an ulp of g before the cast
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(gw.cpu(), w_leaf.grad, rtol=2 * eps, atol=0)
    _assert_sum_close(gs_.cpu(), s_leaf.grad, grad, bits, "grad_scales vs autograd")


def test_mixed_dtypes_of_output_grad_and_scales(backend):
    w = randn(7, 96, torch.bfloat16, seed=3)
    s, z = _grid(w.float(), 8, 32, True)
    s16 = s.half()
    for out_dtype in DTYPES:
        assert_exact(OPS.fake_quant(*on(backend, w, s16, z), 8, out_dtype, backend).cpu(),
                     ref.fake_quant(w, s16, z, 8, out_dtype), "ŵ")
    _assert_backward(randn(7, 96, torch.float16, seed=4), w, s16, z, 8, backend)


def test_scales_and_zeros_with_different_strides(backend):
    """One of scales and zeros column-major, the other row-major, forward and backward."""
    w = randn(7, 96, torch.float32, seed=8)
    s, z = _grid(w, 4, 32, False)
    grad = randn(7, 96, torch.float32, seed=9)
    for s_, z_ in ((s, z.t().contiguous().t()), (s.t().contiguous().t(), z)):
        assert_exact(OPS.fake_quant(*on(backend, w, s_, z_), 4, None, backend).cpu(), ref.fake_quant(w, s, z, 4), "ŵ")
        _assert_backward(grad, w, s_, z_, 4, backend)
        gw, _ = OPS.fake_quant_backward(*on(backend, grad, w, s_, z_), 4, False, backend)
        assert_exact(gw.cpu(), ref.fake_quant_backward(grad, w, s, z, 4)[0], "grad_w")


def test_negative_scales_give_the_reference_bits(backend):
    """RTN and AWQ make positive scales only, and the kernels finish ŵ with one FMA, c·s + 0, where every
    scale of a tile or group is positive; a grid given with negative scales takes the other route and
    still matches the reference bit for bit, the sign of every zero ŵ included (-0 for s < 0)."""
    w = randn(40, 64, torch.float32, seed=8)
    s, z = _grid(w, 4, 32, False)
    some = s.clone()
    some[5:7] = -some[5:7]  # a few rows: tiles and groups of both kinds
    for scales in (some, -s):
        want = ref.fake_quant(w, scales, z, 4)
        assert (want == 0).any() and (want.view(torch.int32) == -(2**31)).any(), "no -0 to check"
        assert_exact(OPS.fake_quant(*on(backend, w, scales, z), 4, None, backend).cpu(), want, "ŵ")
        _assert_backward(randn(40, 64, seed=9), w, scales, z, 4, backend)


@pytest.mark.parametrize("bits,sym", [(4, False), (8, True)])
def test_long_rows_are_processed_in_chunks(bits, sym):
    """Per-row mode with a row longer than a tile (forced small tile): split forward, looped LSQ sum."""
    w = randn(9, 320, torch.float16, seed=5)
    s, z = _grid(w, bits, -1, sym)
    grad = randn(9, 320, torch.float16, seed=6)
    cfg = tq.Config(block_r=4, block_g=64, num_warps=4)  # 5 chunks per row
    assert_exact(tf.fake_quant(w, s, z, bits, torch.float16, cfg), ref.fake_quant(w, s, z, bits), "ŵ")
    for need in (False, True):
        gw, gs = tf.fake_quant_backward(grad, w, s, z, bits, need, cfg)
        rw, rs = ref.fake_quant_backward(grad, w, s, z, bits, need)
        assert_exact(gw, rw, "grad_w")
        if need:
            _assert_sum_close(gs, rs, grad, bits)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_and_constant_groups(dtype, backend):
    w = randn(6, 128, dtype, seed=7)
    w[0] = 0
    w[1, :32] = 0
    w[2, 32:64] = 3
    w[3] = -0.25
    grad = randn(6, 128, dtype, seed=8)
    for bits, gs, sym in ((4, 32, False), (8, -1, True)):
        s, z = ref.qparams(w, bits, gs, sym)
        out = OPS.fake_quant(*on(backend, w, s, z), bits, None, backend).cpu()
        assert out[0].eq(0).all() and out[1, :32].eq(0).all()
        assert_exact(out, ref.fake_quant(w, s, z, bits), "ŵ")
        gw, gs_ = OPS.fake_quant_backward(*on(backend, grad, w, s, z), bits, True, backend)
        assert_exact(gw.cpu(), grad, "grad_w (nothing clips on an RTN grid)")
        assert gs_[0].eq(0).all(), "a zero group has round(w/s) - w/s = 0"
        _assert_backward(grad, w, s, z, bits, backend)


@pytest.mark.parametrize("mag", [1e-30, 1e30])
def test_tiny_and_huge_magnitudes_fp32(mag, backend):
    w = randn(5, 256, seed=9) * mag
    grad = randn(5, 256, seed=10)
    for bits, gs, sym in ((4, 32, False), (8, -1, True)):
        s, z = _grid(w, bits, gs, sym)
        assert_exact(OPS.fake_quant(*on(backend, w, s, z), bits, None, backend).cpu(),
                     ref.fake_quant(w, s, z, bits), "ŵ")
        _assert_backward(grad, w, s, z, bits, backend)


def test_exact_half_ties_round_to_even(backend):
    halves = [0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, -0.5, -1.5, -2.5, -3.5, -4.5, -5.5, -6.5, 8.5, -7.5]
    w = torch.tensor(halves).repeat(2, 2)  # (2, 32)
    # s = 1, z = 8: 8.5 rounds to 8 and clips (u = 16); -7.5 rounds to -8, u = 0 is still inside
    s, z = torch.ones(2, 1), torch.full((2, 1), 8, dtype=torch.uint8)
    mask = ref.fake_quant_mask(w, s, z, 4)
    assert not mask[:, 14].any() and mask[:, 15].all()
    assert_exact(OPS.fake_quant(*on(backend, w, s, z), 4, None, backend).cpu(), ref.fake_quant(w, s, z, 4), "ŵ")
    _assert_backward(torch.ones(2, 32), w, s, z, 4, backend)


def test_llama_shape_slice(backend):
    n, k = LLAMA_SHAPES["llama3-8b.q"]
    w = randn(n, k, torch.bfloat16, seed=11)[:64]
    s, z = _grid(w, 4, 128, False)
    assert_exact(OPS.fake_quant(*on(backend, w, s, z), 4, None, backend).cpu(), ref.fake_quant(w, s, z, 4), "ŵ")
    _assert_backward(randn(64, k, torch.bfloat16, seed=12), w, s, z, 4, backend)


def test_public_api_autograd(backend):
    spec = QuantSpec(4, 64, False)
    w = randn(33, 128, torch.float16, seed=13)
    s, z = _grid(w, 4, 64, False)
    grad = randn(33, 128, torch.float16, seed=14)
    grads = {}
    for name in (backend, "reference"):  # on() leaves the reference's inputs on the CPU
        wl, sl = on(name, w).clone().requires_grad_(), on(name, s).clone().requires_grad_()
        out = qdpo.fake_quant(wl, spec, sl, on(name, z), backend=name)
        out.backward(on(name, grad))
        grads[name] = (out.detach().cpu(), wl.grad.cpu(), sl.grad.cpu())
    (o, gw, gs), (ro, rgw, rgs) = grads[backend], grads["reference"]
    assert_exact(o, ro, "ŵ")
    assert_exact(gw, rgw, "grad_w")
    _assert_sum_close(gs, rgs, grad, 4)
    # a gradient from .sum() arrives as a stride-0 expanded tensor
    wl = on(backend, w).clone().requires_grad_()
    qdpo.fake_quant(wl, spec, *on(backend, s, z), backend=backend).sum().backward()
    assert_exact(wl.grad.cpu(), ref.fake_quant_mask(w, s, z, 4).to(w.dtype), "grad_w from .sum()")


def test_errors():
    w = randn(6, 64)
    s, z = ref.qparams(w, 4, 32, False)
    with pytest.raises(ValueError, match="grad has shape"):
        OPS.fake_quant_backward(torch.randn(3, 64), w, s, z, 4, False, "triton")
    with pytest.raises(ValueError, match="does not split K=64"):
        OPS.fake_quant(w, s[:, :1].expand(6, 3).contiguous(), z[:, :1].expand(6, 3).contiguous(), 4, None,
                       "triton")
    with pytest.raises(TypeError, match="zero points are stored as uint8"):
        OPS.fake_quant(w, s, z.float(), 4, None, "triton")


def test_opcheck(backend):
    w = randn(7, 96, seed=15)
    w, s, z = on(backend, w, *_grid(w, 4, 32, False))
    opcheck(OPS.fake_quant, (w.clone().requires_grad_(), s.clone().requires_grad_(), z, 4, None, backend))
    opcheck(OPS.fake_quant_backward, (on(backend, randn(7, 96, seed=16)), w, s, z, 4, True, backend))
    w_t = w.t().contiguous().t()  # column-major: ŵ and grad_w are contiguous all the same
    opcheck(OPS.fake_quant, (w_t.clone().requires_grad_(), s, z, 4, None, backend))
    opcheck(OPS.fake_quant_backward, (on(backend, randn(7, 96, seed=16)), w_t, s, z, 4, True, backend))


def test_torch_compile_fullgraph_forward_and_backward(backend):
    def loss_fn(w, s, z):
        return OPS.fake_quant(w, s, z, 4, None, backend).square().sum()

    w = randn(7, 96, seed=17)
    s, z = _grid(w, 4, 32, False)
    compiled = torch.compile(loss_fn, fullgraph=True)
    w_b, s_b, z_b = on(backend, w, s, z)
    wc, we = w_b.clone().requires_grad_(), w_b.clone().requires_grad_()
    loss_c, loss_e = compiled(wc, s_b, z_b), loss_fn(we, s_b, z_b)
    loss_c.backward()
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(wc.grad, we.grad)
    assert_exact(we.grad.cpu(), ref.fake_quant_backward(2 * ref.fake_quant(w, s, z, 4), w, s, z, 4)[0], "grad_w")


def _near_ties(bits: int, n_scales: int = 200):
    """``(w, s, z)`` rows of one group each: quotients w / s on and 1-3 ulps of w around every
    half-integer of the grid's reach, tiny, huge and random ones (``test_cuda_host._near_tie_cases``),
    for log-uniform scales of both signs in [2^-100, 2^100] (where the kernels divide through a
    reciprocal); random zero points."""
    from tests.test_cuda_host import _near_tie_cases

    w, s = _near_tie_cases(n_scales, seed=bits)  # flat, one scale per run of elements
    rows = n_scales + 6  # _near_tie_cases adds 6 chosen scales
    w, s = w.reshape(rows, -1), s.reshape(rows, -1)[:, :1].contiguous()
    z = torch.randint(0, 1 << bits, (rows, 1), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    return w, s, z


def _assert_near_ties(bits, outside, backend, device=None):
    """ŵ, the straight-through mask (grad_w of ones) and the codes of quantize_with equal the reference's
    (IEEE w / s) on about a million near-tie, tiny and huge quotients; ``outside``: one row's scale past
    2^100 or below 2^-100 in every tile, which has the kernels divide instead. ``device``: where the
    inputs go (default: where ``backend`` runs them, ``on``)."""
    w, s, z = _near_ties(bits)
    if outside:
        s[::8] = torch.tensor([2.0**-110, 2.0**110, -(2.0**-101), 2.0**101]).repeat(len(s[::8]))[: len(s[::8]), None]
    put = (lambda *ts: [t.to(device) for t in ts]) if device else (lambda *ts: on(backend, *ts))
    assert_exact(OPS.fake_quant(*put(w, s, z), bits, None, backend).cpu(), ref.fake_quant(w, s, z, bits), "ŵ")
    gw, _ = OPS.fake_quant_backward(*put(torch.ones_like(w), w, s, z), bits, False, backend)
    assert_exact(gw.cpu(), ref.fake_quant_mask(w, s, z, bits).float(), "mask")
    k = w.shape[1] - w.shape[1] % 2  # W4 packs pairs
    ws = w[:, :k].contiguous()
    assert_exact(OPS.quantize_with(*put(ws, s, z), bits, backend).cpu(), ref.quantize(ws, bits, -1, False, s, z)[0],
                 "codes")


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")  # w·(1/s) past fp32
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("outside", [False, True])
def test_near_ties_match_true_division(bits, outside, backend):
    _assert_near_ties(bits, outside, backend)
