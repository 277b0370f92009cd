"""torch.ops.qdpo.*: registration (opcheck), input checks, backend choice, torch.compile.

Kernel-specific comparisons live in tests/test_<op>.py; this file covers the
ops layer with the reference backend, which runs everywhere.
"""

import itertools

import pytest
import torch
from torch.library import opcheck

import qdpo
from qdpo import QuantSpec
from qdpo.kernels import backends, reference as ref
from tests.conftest import assert_exact

OPS = torch.ops.qdpo


def _problem(n=6, k=64, gs=32, bits=4, sym=False, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    q, s, z = OPS.quantize(w, bits, gs, sym)
    return w, q, s, z


def _opcheck_cases():
    w, q, s, z = _problem()
    x = torch.randn(3, 64, requires_grad=True)
    wl = w.clone().requires_grad_()
    sl = s.clone().requires_grad_()
    b = torch.randn(6, requires_grad=True)
    codes = ref.unpack(q, 4)
    return [
        (OPS.qparams, (w, 4, 32, False)),
        (OPS.quantize, (w, 8, -1, True)),
        (OPS.quantize_with, (w, s, z, 4)),
        (OPS.pack, (codes, 4)),
        (OPS.pack, (codes, 8)),  # codes that are their own packing: returned as a copy, never the input
        (OPS.unpack, (q, 4)),
        (OPS.dequantize, (q, s, z, 4, torch.bfloat16)),
        (OPS.fake_quant, (wl, sl, z, 4)),
        (OPS.fake_quant_backward, (torch.randn(6, 64), w, s, z, 4, True)),
        (OPS.dequant_matmul, (x, q, s, z, 4, b)),
        (OPS.dequant_matmul_dx, (torch.randn(3, 6), q, s, z, 4)),
        (OPS.fake_quant_matmul, (x, wl, sl, z, 4, b)),
        (OPS.fake_quant_matmul_backward, (torch.randn(3, 6), x.detach(), w, s, z, 4, False)),
        (OPS.dequant_matmul_experts, (torch.randn(4, 64), torch.tensor([2, 0, 2, 7]), q, s, z, 4, 3, torch.randn(3, 2))),
        (OPS.dequant_matmul_segments, (torch.randn(4, 64), torch.tensor([0, 1, 1, 3], dtype=torch.int32), q, s, z, 4,
                                       3, torch.randn(3, 2))),
    ]


@pytest.mark.parametrize("case", range(15))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    opcheck(op, args)


def test_opcheck_transposed_inputs():
    """Outputs are contiguous whatever the inputs' strides, as the fake implementations say (the reference's
    ŵ of a transposed weight kept the weight's strides, and the backward's fakes copied x's and w's)."""
    w, q, s, z = _problem()
    w_t, x_t = w.t().contiguous().t(), torch.randn(64, 3).t()  # (6, 64) and (3, 64), column-major
    opcheck(OPS.fake_quant, (w_t.clone().requires_grad_(), s, z, 4))
    opcheck(OPS.fake_quant_backward, (torch.randn(6, 64), w_t, s, z, 4, True))
    opcheck(OPS.fake_quant_matmul_backward, (torch.randn(3, 6), x_t, w_t, s, z, 4, True))
    opcheck(OPS.fake_quant_matmul, (x_t.clone().requires_grad_(), w_t.clone().requires_grad_(), s, z, 4))


def test_every_op_has_a_reference_implementation():
    names = {"qparams", "quantize", "quantize_with", "dequantize", "fake_quant", "fake_quant_backward",
             "dequant_matmul", "dequant_matmul_dx", "dequant_matmul_experts", "dequant_matmul_segments",
             "fake_quant_matmul", "fake_quant_matmul_backward"}
    assert names <= set(backends._IMPLS["reference"])


# ----------------------------------------------------------------------------- public API
@pytest.mark.parametrize("bits,gs,sym", [(4, 32, False), (4, -1, True), (8, 64, False), (8, 128, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_public_api_matches_reference(bits, gs, sym, dtype):
    spec = QuantSpec(bits, gs, sym)
    w = torch.randn(5, 256).to(dtype)
    qw = qdpo.quantize(w, spec)
    s, z = ref.qparams(w, bits, gs, sym)
    assert_exact(qw.zeros, z, "zeros")
    assert_exact(qw.scales, s, "scales")
    assert_exact(qw.qweight, ref.pack(ref.quantize_codes(w, s, z, bits), bits), "qweight")
    assert qw.shape == (5, 256) and qw.dtype == dtype
    assert_exact(qdpo.dequantize(qw), ref.fake_quant(w, s, z, bits), "ŵ")
    assert_exact(qdpo.fake_quant(w, spec), ref.fake_quant(w, s, z, bits), "fake_quant")
    x = torch.randn(2, 3, 256).to(dtype)
    assert_exact(qdpo.dequant_matmul(x, qw), ref.dequant_matmul(x, qw.qweight, s, z, bits), "y")
    assert_exact(qdpo.fake_quant_matmul(x, w, spec), ref.fake_quant_matmul(x, w, s, z, bits), "y")


def test_public_autograd_matches_reference_backward():
    spec = QuantSpec(4, 32)
    w0 = torch.randn(7, 64)
    s0, z = ref.qparams(w0, 4, 32, False)
    w = (w0 + 3 * torch.randn_like(w0) * s0.repeat_interleave(32, 1)).requires_grad_()  # some clipping
    s = s0.clone().requires_grad_()
    x = torch.randn(2, 5, 64, requires_grad=True)
    b = torch.randn(7, requires_grad=True)
    y = qdpo.fake_quant_matmul(x, w, spec, s, z, b)
    dy = torch.randn_like(y)
    y.backward(dy)
    dx, dw, ds = ref.fake_quant_matmul_backward(dy, x.detach(), w.detach(), s0, z, 4, True)
    assert_exact(x.grad, dx, "dx")
    assert_exact(w.grad, dw, "dw")
    assert_exact(s.grad, ds, "dscales")
    torch.testing.assert_close(b.grad, dy.sum((0, 1)))
    assert bool((w.grad[~ref.fake_quant_mask(w.detach(), s0, z, 4)] == 0).all())


def test_dequant_matmul_backward_to_x_and_bias():
    qw = qdpo.quantize(torch.randn(6, 64), QuantSpec(8, 32))
    x = torch.randn(4, 64, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    y = qdpo.dequant_matmul(x, qw, b)
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.testing.assert_close(x.grad, dy @ qdpo.dequantize(qw))
    torch.testing.assert_close(b.grad, dy.sum(0))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_outputs_take_in_place_updates_under_autograd(backend):
    """A model may update a linear layer's output in place (Falcon: ``mlp_output += attention_output``).
    With x of 3 dimensions the kernels reshape a 2D product, and such a view would reach autograd as a
    view output of the op, whose in-place update autograd refuses. Updated in place, the outputs carry
    the gradients of the reference's out-of-place update."""
    w, q, s, z = _problem(n=6, k=64)
    x = torch.randn(2, 3, 64, requires_grad=True)
    wl = w.clone().requires_grad_()
    b = torch.randn(6, requires_grad=True)
    dy = torch.randn(2, 3, 6)
    for op, inputs, args in [
        (OPS.dequant_matmul, (x, b), lambda: (x, q, s, z, 4, b, backend)),
        (OPS.fake_quant_matmul, (x, wl, b), lambda: (x, wl, s, z, 4, b, backend)),
    ]:
        y = op(*args())
        y += 1.0  # refused when y is marked a view of the op's intermediate
        grads = torch.autograd.grad((y * dy).sum(), inputs)
        y_ref = op(*args()[:-1], "reference") + 1.0
        expect = torch.autograd.grad((y_ref * dy).sum(), inputs)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, expect):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fake_quant_without_grid_uses_rtn_and_needs_both():
    w = torch.randn(4, 64)
    spec = QuantSpec(4, 64)
    assert_exact(qdpo.fake_quant(w, spec), qdpo.dequantize(qdpo.quantize(w, spec)), "ŵ")
    with pytest.raises(ValueError, match="pass both scales and zeros"):
        qdpo.fake_quant(w, spec, scales=torch.ones(4, 1))


# ----------------------------------------------------------------------------- errors
def test_errors_bad_weights():
    spec = QuantSpec(4, 32)
    with pytest.raises(TypeError, match="dtype torch.int32; use float16, bfloat16 or float32"):
        qdpo.quantize(torch.ones(4, 64, dtype=torch.int32), spec)
    with pytest.raises(ValueError, match="NaN or Inf"):
        qdpo.quantize(torch.tensor([[1.0, float("nan")] * 16]), spec)
    with pytest.raises(ValueError, match="NaN or Inf"):
        qdpo.quantize(torch.tensor([[1.0, float("inf")] * 16]), spec)
    with pytest.raises(ValueError, match="K=48 is not divisible by group_size=32"):
        qdpo.quantize(torch.randn(4, 48), spec)
    with pytest.raises(ValueError, match="must be 2-D"):
        qdpo.quantize(torch.randn(4, 4, 64), spec)
    with pytest.raises(TypeError, match="spec must be a qdpo.QuantSpec"):
        qdpo.quantize(torch.randn(4, 64), {"bits": 4})
    with pytest.raises(ValueError, match="overflow"):
        qdpo.quantize(torch.tensor([[-3e38, 3e38] * 16]), QuantSpec(8, 32, False))


def test_errors_mismatched_shapes():
    w, q, s, z = _problem()
    with pytest.raises(ValueError, match=r"x has shape \(3, 32\) but the weight has in_features K=64"):
        OPS.dequant_matmul(torch.randn(3, 32), q, s, z, 4)
    with pytest.raises(ValueError, match=r"x has shape \(3, 63\) but the weight has in_features K=64"):
        OPS.fake_quant_matmul(torch.randn(3, 63), w, s, z, 4)
    with pytest.raises(ValueError, match=r"bias has shape \(5,\); expected \(6,\)"):
        OPS.dequant_matmul(torch.randn(3, 64), q, s, z, 4, torch.randn(5))
    with pytest.raises(ValueError, match="scales .* and zeros .* must both be"):
        OPS.fake_quant(w, s[:3], z, 4)
    with pytest.raises(ValueError, match="groups per row"):
        OPS.fake_quant(w, torch.ones(6, 3), torch.zeros(6, 3, dtype=torch.uint8), 4)
    with pytest.raises(TypeError, match="zero points are stored as uint8"):
        OPS.fake_quant(w, s, z.float(), 4)
    with pytest.raises(TypeError, match="qweight must be a 2-D uint8"):
        OPS.dequantize(q.int(), s, z, 4)
    with pytest.raises(ValueError, match="bits=3 is not supported"):
        OPS.dequantize(q, s, z, 3)
    with pytest.raises(ValueError, match="4-bit codes need an even K"):
        OPS.pack(torch.zeros(2, 5, dtype=torch.uint8), 4)



def test_pack_refuses_4_bit_codes_past_15():
    """A code past 15 spilled into its neighbour's nibble: pack([[17, 0]], 4) unpacked as [[1, 1]], with no error."""
    codes = torch.tensor([[3, 0, 15, 4], [0, 0, 2, 17]], dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"codes hold 17 at index \[1, 3\]; 4-bit codes are unsigned, in \[0, 15\]"):
        OPS.pack(codes, 4)
    codes[1, 3] = 15
    assert_exact(OPS.unpack(OPS.pack(codes, 4), 4), codes, "codes")
    assert_exact(OPS.unpack(OPS.pack(codes + 240, 8), 8), codes + 240, "8-bit codes")

@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.float64])
def test_errors_output_dtype(dtype, backend):
    """ŵ's dtype is checked by the ops, for every backend (the reference truncated ŵ to integers, Triton
    raised a bare KeyError)."""
    w, q, s, z = _problem()
    with pytest.raises(TypeError, match=f"dtype={dtype} is not supported for ŵ; use float16, bfloat16, float32"):
        OPS.dequantize(q, s, z, 4, dtype, backend)
    with pytest.raises(TypeError, match=f"dtype={dtype} is not supported for ŵ"):
        OPS.fake_quant(w, s, z, 4, dtype, backend)
    with pytest.raises(TypeError, match=f"dtype={dtype} is not supported for ŵ"):
        qdpo.dequantize(qdpo.quantize(w, QuantSpec(4, 32)), dtype, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequant_matmul_experts_rows_are_their_experts_products(dtype):
    """Each row of dequant_matmul_experts is dequant_matmul of that row on its expert's slice of the
    weights (with its expert's bias row), bit for bit, and within rounding of the float64 product; ids
    outside [0, experts), either sign, give zeros; no rows give an empty (0, N)."""
    w, q, s, z = _problem(n=12, k=64, gs=32, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    x, bias = torch.randn(6, 64, generator=g).to(dtype), torch.randn(4, 3, generator=g).to(dtype)
    ids = torch.tensor([3, 0, 3, 4, -2, 1])
    y = OPS.dequant_matmul_experts(x, ids, q, s, z, 4, 4, bias)
    assert y.shape == (6, 3) and y.dtype == dtype
    for p, e in enumerate(ids.tolist()):
        if not 0 <= e < 4:
            assert torch.equal(y[p], torch.zeros(3, dtype=dtype))
            continue
        rows = slice(3 * e, 3 * e + 3)
        assert torch.equal(y[p:p + 1], OPS.dequant_matmul(x[p:p + 1], q[rows], s[rows], z[rows], 4, bias[e]))
        exact = x[p].double() @ ref.dequantize(q[rows], s[rows], z[rows], 4, torch.float64).T + bias[e].double()
        torch.testing.assert_close(y[p].double(), exact, rtol=0, atol=64 * torch.finfo(dtype).eps)
    assert OPS.dequant_matmul_experts(x[:0], ids[:0], q, s, z, 4, 4).shape == (0, 3)


def test_dequant_matmul_experts_errors():
    w, q, s, z = _problem()  # 6 rows
    x, ids = torch.randn(2, 64), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="num_experts=4 does not split the weight's 6 rows"):
        OPS.dequant_matmul_experts(x, ids, q, s, z, 4, 4)
    with pytest.raises(ValueError, match=r"x has shape \(1, 2, 64\); pass one row per \(token, expert\) pair"):
        OPS.dequant_matmul_experts(x[None], ids, q, s, z, 4, 3)
    with pytest.raises(ValueError, match=r"experts has dtype torch.float32 and shape \(2,\); pass one int32"):
        OPS.dequant_matmul_experts(x, ids.float(), q, s, z, 4, 3)
    with pytest.raises(ValueError, match=r"experts has dtype torch.int64 and shape \(3,\)"):
        OPS.dequant_matmul_experts(x, torch.tensor([0, 1, 2]), q, s, z, 4, 3)
    with pytest.raises(ValueError, match=r"bias has shape \(2,\); expected one row per expert: \(3, 2\)"):
        OPS.dequant_matmul_experts(x, ids, q, s, z, 4, 3, torch.randn(2))
    with pytest.raises(ValueError, match="in_features K=64"):
        OPS.dequant_matmul_experts(torch.randn(2, 32), ids, q, s, z, 4, 3)
    with pytest.raises(ValueError, match="max_rows=-1; pass the rows of x one expert is expected to take"):
        OPS.dequant_matmul_experts(x, ids, q, s, z, 4, 3, None, -1)



def test_grouped_ops_refuse_a_gradient_with_their_own_message():
    """The grouped ops are inference only: a backward through them said torch's 'no autograd formula was
    registered. Please use register_autograd to add one'; it now names the op and what to call instead."""
    w, q, s, z = _problem()  # 3 experts of 2 rows
    x = torch.randn(2, 64, requires_grad=True)
    calls = [lambda: OPS.dequant_matmul_experts(x, torch.tensor([0, 2]), q, s, z, 4, 3),
             lambda: OPS.dequant_matmul_segments(x, torch.tensor([0, 1, 1, 2], dtype=torch.int32), q, s, z, 4, 3)]
    for name, call in zip(("dequant_matmul_experts", "dequant_matmul_segments"), calls):
        with pytest.raises(RuntimeError, match=f"qdpo::{name} is inference only.*torch.no_grad.*qdpo::dequant_matmul"):
            call().sum().backward()
        with torch.no_grad():
            assert call().shape == (2, 2)

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequant_matmul_segments_is_the_experts_op_on_sorted_rows(dtype):
    """dequant_matmul_segments on the rows sorted by expert (reference.expert_segments) gives, bit for bit,
    dequant_matmul_experts' rows in that order, ids outside the experts (sorted last) zeros (test_opcheck
    covers its registration); its checks name the offsets' expected shape."""
    w, q, s, z = _problem(n=12, k=64, gs=32, dtype=dtype)
    g = torch.Generator().manual_seed(2)
    x, bias = torch.randn(7, 64, generator=g).to(dtype), torch.randn(4, 3, generator=g).to(dtype)
    ids = torch.tensor([3, 0, 3, 4, -2, 1, 3])
    order, offsets = ref.expert_segments(ids, 4)
    y = OPS.dequant_matmul_segments(x[order], offsets, q, s, z, 4, 4, bias)
    assert torch.equal(y, OPS.dequant_matmul_experts(x, ids, q, s, z, 4, 4, bias)[order])
    assert not y[5:].any() and y[:5].all()  # the two rows of ids outside, sorted last
    assert OPS.dequant_matmul_segments(x[:0], torch.zeros(5, dtype=torch.int32), q, s, z, 4, 4).shape == (0, 3)
    with pytest.raises(ValueError, match=r"offsets has dtype torch.int64 and shape \(5,\); pass the experts' int32"):
        OPS.dequant_matmul_segments(x, offsets.long(), q, s, z, 4, 4)
    with pytest.raises(ValueError, match=r"offsets has dtype torch.int32 and shape \(4,\).*\(5,\)"):
        OPS.dequant_matmul_segments(x, offsets[:4], q, s, z, 4, 4)


def test_expert_segments_sort_rows_by_expert():
    """The grouped kernels' sorted rows: expert order, stable, ids outside the experts last; offsets bound
    each expert's rows (empty for experts no row chose)."""
    ids = torch.tensor([2, 0, 5, 2, -1, 0, 2])
    order, offsets = ref.expert_segments(ids, 4)
    assert order.tolist() == [1, 5, 0, 3, 6, 2, 4] and offsets.tolist() == [0, 2, 2, 5, 5]
    assert offsets.dtype == torch.int32
    assert [ref.rows_per_expert(7, m) for m in (0, 1, 3, 9)] == [7, 1, 3, 7]


def test_segment_blocks_is_the_most_chunks_any_routing_makes():
    """The grouped kernels' segments grid: for every P rows split among E experts (some rows perhaps to no
    expert), the chunks of R rows never exceed segment_blocks(P, E, R), and some routing reaches it (so
    a smaller grid would drop rows). Brute force over every split of P."""
    def most(p, e, r):  # the most chunks p rows make among at most e experts (rows left over: no expert)
        if p == 0 or e == 0:
            return 0
        return max(most(p - c, e - 1, r) + (c + r - 1) // r for c in range(0, p + 1))

    for p, e, r in itertools.product(range(0, 13), range(1, 6), (1, 2, 3, 8, 16)):
        assert ref.segment_blocks(p, e, r) == most(p, e, r), (p, e, r)
    assert ref.segment_blocks(16, 128, 8) == 16 and ref.segment_blocks(128, 128, 16) == 128


def test_errors_in_fake_mode_match_eager():
    """The fake impl doubles as validation: the same error under torch.compile tracing."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    w, q, s, z = _problem()
    with FakeTensorMode() as mode:
        fx, fq, fs, fz = (mode.from_tensor(t) for t in (torch.randn(3, 32), q, s, z))
        with pytest.raises(ValueError, match="in_features K=64"):
            OPS.dequant_matmul(fx, fq, fs, fz, 4)


# ----------------------------------------------------------------------------- backends
def test_backend_choice_and_errors(monkeypatch):
    w, q, s, z = _problem()
    with pytest.raises(ValueError, match="backend='nope' is not known"):
        OPS.dequantize(q, s, z, 4, None, "nope")
    with pytest.raises(RuntimeError, match="the cuda backend needs CUDA tensors"):
        OPS.dequantize(q, s, z, 4, None, "cuda")
    monkeypatch.setenv("QDPO_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda backend needs CUDA tensors.*QDPO_BACKEND=cuda asked for it: unset"):
        OPS.dequantize(q, s, z, 4)  # the environment chose it: the fix is there, not in an argument
    monkeypatch.setenv("QDPO_BACKEND", "reference")
    assert_exact(OPS.dequantize(q, s, z, 4), ref.dequantize(q, s, z, 4), "ŵ")
    assert "reference" in backends.available("cpu")


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    w, q, s, z = _problem()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        OPS.dequantize(q, s, z, 4, None, "triton")


def test_auto_falls_back_and_logs_once(monkeypatch, caplog):
    """A backend that cannot serve a request is skipped under auto, with one log line."""
    calls = []

    def unsupported(*args):
        calls.append(1)
        raise backends.Unsupported("test reason")

    monkeypatch.setitem(backends._IMPLS["triton"], "dequantize", unsupported)
    monkeypatch.setattr(backends, "_device_reason", lambda b, d: None)
    w, q, s, z = _problem()
    cuda_like = torch.device("cuda")  # drive the auto order used on a GPU
    with caplog.at_level("WARNING", logger="qdpo.kernels"):
        for _ in range(2):
            out = backends.call("dequantize", "auto", cuda_like, q, s, z, 4, torch.float32)
    assert_exact(out, ref.dequantize(q, s, z, 4), "ŵ")
    assert len(calls) == 2 and caplog.text.count("test reason") == 1
    with pytest.raises(RuntimeError, match="cannot serve this request: test reason"):
        backends.call("dequantize", "triton", cuda_like, q, s, z, 4, torch.float32)


def test_torch_compile_fullgraph():
    spec = QuantSpec(4, 32)
    w0 = torch.randn(6, 64)
    s, z = ref.qparams(w0, 4, 32, False)

    def f(x, w):
        return qdpo.fake_quant_matmul(x, w, spec, s, z).sum()

    x = torch.randn(3, 64)
    w = w0.clone().requires_grad_()
    out = torch.compile(f, fullgraph=True)(x, w)
    out.backward()
    w2 = w0.clone().requires_grad_()
    f(x, w2).backward()
    torch.testing.assert_close(out, f(x, w0))
    torch.testing.assert_close(w.grad, w2.grad)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_second_derivatives(backend):
    """dequant_matmul's gradient is linear in dy, so it has second derivatives (a gradient penalty through
    a frozen packed layer); the straight-through ones refuse with their own message, not torch's request
    to register an autograd formula."""
    w, q, s, z = _problem()
    x = torch.randn(3, 64, requires_grad=True)
    (gx,) = torch.autograd.grad(OPS.dequant_matmul(x, q, s, z, 4, None, backend).pow(2).sum(), x, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.pow(2).sum(), x)
    xe = x.detach().clone().requires_grad_()
    (gxe,) = torch.autograd.grad(torch.nn.functional.linear(xe, ref.dequantize(q, s, z, 4)).pow(2).sum(), xe,
                                 create_graph=True)
    (ggxe,) = torch.autograd.grad(gxe.pow(2).sum(), xe)
    torch.testing.assert_close(gx, gxe, rtol=1e-4, atol=1e-3)  # Triton sums in another order
    torch.testing.assert_close(ggx, ggxe, rtol=1e-3, atol=1e-2)
    wl = w.clone().requires_grad_()
    (gx,) = torch.autograd.grad(OPS.fake_quant_matmul(x, wl, s, z, 4, None, backend).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives of fake_quant / fake_quant_matmul .* not supported"):
        torch.autograd.grad(gx.sum(), wl)
    (gw,) = torch.autograd.grad(OPS.fake_quant(wl, s, z, 4, None, backend).pow(2).sum(), wl, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(gw.sum(), wl)


@torch._inductor.config.patch(force_disable_caches=True)  # a graph cached before a fake impl changed hides it
def test_torch_compile_fullgraph_transposed_inputs():
    """Weights and inputs stored transposed (a GPT-2 Conv1D's (K, N), a (K, M) activation): compiled code
    reads the ops' outputs with the fake strides."""
    w_kn, x_km = torch.randn(64, 6), torch.randn(64, 3)
    s, z = ref.qparams(w_kn.t(), 4, 32, False)

    def f(x_km, w_kn):
        w_hat = OPS.fake_quant(w_kn.t(), s, z, 4)
        return (OPS.fake_quant_matmul(x_km.t(), w_kn.t(), s, z, 4) * 2).sum() + (w_hat * w_hat).sum()

    grads = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        x, w = x_km.clone().requires_grad_(), w_kn.clone().requires_grad_()
        out = fn(x, w)
        out.backward()
        grads.append((out, x.grad, w.grad))
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want)
