"""Triton dequant-matmul (``qdpo/kernels/triton/dequant_matmul*.py``) against ``reference.py``.

Floats follow the 2×-of-PyTorch rule of ``conftest.py``: the "fp32" reference
is the reference function run in float64 (x, dy and bias upcast; ŵ is exact),
the low-precision one is the same reference in the kernel's dtype. Paths:
M <= 16 rows run the split-K gemv kernel (M = 1 on FMAs, else ``tl.dot``),
more rows the tiled gemm (or, from ``WORKSPACE_MIN_M``, dequantize + matmul);
tests force each path explicitly as well as going through the op's dispatch.
"""

import itertools

import pytest
import torch
from torch.library import opcheck

import qdpo
from qdpo import QuantSpec
from qdpo.kernels import reference as ref
from qdpo.kernels.backends import Unsupported
from qdpo.kernels.triton import dequant_matmul as dm
from qdpo.kernels.triton import dequant_matmul_gemm as dmg
from tests.conftest import HAS_GPU, LLAMA_SHAPES, MS, ODD_NK, assert_close_2x, fp32_sum_floor, misaligned

DEV = "cuda" if HAS_GPU else "cpu"
OPS = torch.ops.qdpo
XDTYPES = (torch.float16, torch.bfloat16, torch.float32)
GROUPS = (-1, 32, 64, 128, 256)


def _weight(n, k, bits=4, gs=64, sym=False, wdtype=torch.float32, seed=0):
    """A quantized ``(n, k)`` weight (reference quantizer) on ``DEV``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(wdtype)
    return qdpo.quantize(w, QuantSpec(bits, gs, sym), backend="reference").to(DEV)


def _rand(*shape, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEV)


def _args(qw):
    return qw.qweight, qw.scales, qw.zeros, qw.spec.bits


def _check_y(y, x, qw, bias=None, what="y", floor=1e-6):
    """``y`` vs the reference forward: float64 truth, x.dtype PyTorch as the error budget.

    The budget is PyTorch's error on the inputs as the kernel may take them: the tensor-core paths
    read 16-bit x's scales in x.dtype (qdpo/kernels/cuda.py rounds fp32 scales first), which moves
    every ŵ of a group together, so PyTorch's error with the scales so rounded counts too, where it
    is the larger. And a 16-bit y is rounded once, after the bias is added in fp32, where PyTorch
    rounds the product and then its sum with the bias: the two can land an ulp apart, and PyTorch's
    own error over a few outputs can be smaller than that, so ``floor`` is at least y's unit
    roundoff (half an ulp)."""
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], qw.shape[0])
    floor = max(floor, torch.finfo(y.dtype).eps / 2)
    q, s, z, bits = _args(qw)
    hi = ref.dequant_matmul(x.double(), q, s, z, bits, None if bias is None else bias.double())
    lo = ref.dequant_matmul(x, q, s, z, bits, bias)
    if x.dtype != torch.float32 and s.dtype != x.dtype:
        lo_s = ref.dequant_matmul(x, q, s.to(x.dtype), z, bits, bias)
        if (lo_s.double() - hi).abs().max() > (lo.double() - hi).abs().max():
            lo = lo_s
    assert_close_2x(y, hi, lo, floor=floor, what=what)


def _check_dx(dx, dy, qw, what="dx", floor=1e-6):
    assert dx.dtype == dy.dtype and dx.shape == (*dy.shape[:-1], qw.shape[1])
    hi = ref.dequant_matmul_dx(dy.double(), *_args(qw))
    assert_close_2x(dx, hi, ref.dequant_matmul_dx(dy, *_args(qw)), floor=floor, what=what)


def _gs_for(k: int, i: int) -> int:
    """A group size dividing k, cycling through the supported ones with i."""
    fits = [g for g in GROUPS if g == -1 or k % g == 0]
    return fits[i % len(fits)]


# (i, M, (N, K)): every M × odd (N, K), numbered
ODD_CASES = [(i, m, nk) for i, (m, nk) in enumerate(itertools.product(MS, ODD_NK))]


def _odd_case(i, m, nk):
    """``(qw, x, bias)`` for one of ODD_CASES: dtype, bits, group, symmetry and bias cycle with i."""
    n, k = nk
    bits, sym, has_bias = (4, 8)[i % 2], bool(i // 2 % 2), i % 3 != 0
    qw = _weight(n, k, bits, _gs_for(k, i), sym, seed=i)
    x = _rand(m, k, dtype=XDTYPES[i % 3], seed=i)
    b = _rand(n, seed=i + 100) if has_bias else None
    return qw, x, b


def _dtype_group_case(xdtype, bits, gs):
    """``(qw, bias)`` ``(33, 512)`` for x dtype × bits × group size; symmetry and scale dtype alternate."""
    case = XDTYPES.index(xdtype) + 3 * GROUPS.index(gs)
    sym = (case + bits // 4) % 2 == 1
    qw = _weight(33, 512, bits, gs, sym, wdtype=XDTYPES[case % 3], seed=case)
    return qw, _rand(33, dtype=xdtype, seed=7)


def _check_zero_and_constant_rows(backend, ms, xdtypes=(torch.float32,)):
    """An all-zero row gives exactly the bias; a constant row gives c · Σx (within the 2× rule)."""
    w = torch.randn(5, 256)
    w[1] = 0.0
    w[3] = 0.25
    qw = qdpo.quantize(w, QuantSpec(4, 64, False), backend="reference").to(DEV)
    b = _rand(5)
    for xdtype in xdtypes:
        for m in ms:
            x = _rand(m, 256, dtype=xdtype, seed=m)
            y = OPS.dequant_matmul(x, *_args(qw), b, backend)
            assert torch.equal(y[:, 1], b[1].to(xdtype).expand(m)), "zero row must give the bias exactly"
            _check_y(y, x, qw, b)


# --------------------------------------------------------------------------- forward
@pytest.mark.parametrize("i,m,nk", ODD_CASES)
def test_forward_odd_shapes(i, m, nk):
    """Every M × odd (N, K) through the op; dtype, bits, group, symmetry and bias cycle with i."""
    qw, x, b = _odd_case(i, m, nk)
    _check_y(OPS.dequant_matmul(x, *_args(qw), b, "triton"), x, qw, b, f"{dm.choose_path(m)} path")


@pytest.mark.parametrize("xdtype", XDTYPES)
@pytest.mark.parametrize("bits", (4, 8))
@pytest.mark.parametrize("gs", GROUPS)
def test_forward_dtypes_and_groups(xdtype, bits, gs):
    """All dtypes × bits × group sizes, on the three paths; symmetry and scale dtype alternate."""
    qw, b = _dtype_group_case(xdtype, bits, gs)
    for m, path in ((1, "gemv"), (3, "gemv"), (17, "gemm"), (5, "workspace")):
        x = _rand(m, 512, dtype=xdtype, seed=m)
        _check_y(dm.forward(x, *_args(qw), b, path=path), x, qw, b, f"{path} M={m}")


@pytest.mark.parametrize("path", dm.PATHS)
def test_every_path_with_bias_and_batch_dims(path):
    """The public API with leading batch dims ``(2, 3, K)``, forced through each path."""
    qw = _weight(67, 320, 4, 64, sym=False)
    x, b = _rand(2, 3, 320, dtype=torch.bfloat16), _rand(67, dtype=torch.float32)
    _check_y(dm.forward(x, *_args(qw), b, path=path), x, qw, b, path)
    _check_y(qdpo.dequant_matmul(x, qw, b, backend="triton"), x, qw, b, "public API")


def test_default_dispatch_by_rows():
    """M picks the path: gemv to GEMV_MAX_M rows, then gemm, then the workspace."""
    assert [dm.choose_path(m) for m in (1, 3, dm.GEMV_MAX_M)] == ["gemv"] * 3
    assert dm.choose_path(dm.GEMV_MAX_M + 1) == "gemm"
    assert dm.choose_path(dm.WORKSPACE_MIN_M - 1) == "gemm"
    assert dm.choose_path(dm.WORKSPACE_MIN_M) == "workspace"
    assert dm.choose_path(dm.WORKSPACE_MIN_M, 2**31) == "gemm", "a workspace past int32 indexing"


@pytest.mark.parametrize("cfg", dm.GEMV_GPU + (dm.GemvConfig(32, 32, 3, 4, 1),), ids=str)
def test_gemv_configs(cfg):
    """Each GPU gemv config (tile sizes, split-K incl. uneven splits) computes the same y."""
    qw = _weight(67, 640, 4, 32, sym=True)
    for m in (1, 5):
        x = _rand(m, 640, dtype=torch.float16, seed=m)
        y = torch.empty(m, 67, dtype=x.dtype, device=DEV)
        dm._launch_gemv(x, dmg.Packed.of(*_args(qw)), None, y, cfg)
        _check_y(y, x, qw, what=f"gemv {cfg} M={m}")


@pytest.mark.parametrize("bits", (4, 8))
def test_m1_word_and_byte_paths(bits):
    """M = 1 reads the weight as 32-bit words where every row is whole, aligned words; a K that leaves a
    partial word (one group per row) or a weight at an odd address takes the byte path. Both match."""
    for k, gs, move, words in ((96, 32, False, True), (100 if bits == 4 else 98, -1, False, False),
                               (128, 64, True, False)):
        qw = _weight(37, k, bits, gs, sym=False, seed=k)
        args = (misaligned(qw.qweight) if move else qw.qweight, qw.scales, qw.zeros, bits)
        assert (dm.int32_words(dmg.Packed.of(*args).qweight) is not None) == words, (k, gs, move)
        for xdtype in XDTYPES:
            x = _rand(1, k, dtype=xdtype, seed=k)
            _check_y(dm.forward(x, *args, path="gemv"), x, qw, what=f"K={k} words={words} {xdtype}")


@pytest.mark.parametrize("cfg", dmg.GEMM_GPU, ids=str)
def test_gemm_configs(cfg):
    """Each GPU gemm config (tiles, grouped program order) computes the same y."""
    qw = _weight(130, 256, 8, 128, sym=False)
    x, b = _rand(70, 256, dtype=torch.bfloat16), _rand(130)
    y = torch.empty(70, 130, dtype=x.dtype, device=DEV)
    dmg.launch_gemm(x, dmg.Packed.of(*_args(qw)), b, y, cfg)
    _check_y(y, x, qw, b, f"gemm {cfg}")


def test_gemm_grouped_order_covers_every_tile():
    """7 row-blocks in groups of 3 (a short last group) × 3 column-blocks: each tile written once."""
    qw = _weight(67, 128, 4, 64)
    x = _rand(100, 128, dtype=torch.float16)
    y = torch.full((100, 67), float("nan"), dtype=x.dtype, device=DEV)
    dmg.launch_gemm(x, dmg.Packed.of(*_args(qw)), None, y, dmg.GemmConfig(16, 32, 64, 3, 4, 1))
    _check_y(y, x, qw, what="grouped order")


def test_one_group_per_row_and_k_equal_to_group():
    """G = K as group_size=-1 (K not a power of two) and as K equal to one explicit group."""
    for gs, k in ((-1, 96), (-1, 320), (128, 128), (256, 256)):
        qw = _weight(33, k, 4, gs, sym=False, seed=k)
        for m in (1, 3, 17):
            x = _rand(m, k, dtype=torch.float16, seed=m)
            _check_y(OPS.dequant_matmul(x, *_args(qw), None, "triton"), x, qw, what=f"G={gs} K={k} M={m}")


def test_zero_and_constant_rows():
    """An all-zero row gives exactly the bias; a constant row gives c · Σx."""
    _check_zero_and_constant_rows("triton", (1, 3, 17))


def test_sliced_llama_shape():
    """64 output rows of a Llama-2-7B projection (K = 4096), W4 g128 bf16: forward and dx."""
    n, k = 64, LLAMA_SHAPES["llama2-7b.qkv"][1]
    qw = _weight(n, k, 4, 128, sym=False, wdtype=torch.bfloat16)
    for m in (1, 3, 17):
        x = _rand(m, k, dtype=torch.bfloat16, seed=m)
        _check_y(OPS.dequant_matmul(x, *_args(qw), None, "triton"), x, qw, what=f"M={m}")
    dy = _rand(5, n, dtype=torch.bfloat16)
    _check_dx(OPS.dequant_matmul_dx(dy, *_args(qw), "triton"), dy, qw)


def test_empty_batch():
    qw = _weight(7, 96, 4, 32)
    y = OPS.dequant_matmul(_rand(0, 96), *_args(qw), None, "triton")
    assert y.shape == (0, 7)
    assert OPS.dequant_matmul_dx(_rand(2, 0, 7), *_args(qw), "triton").shape == (2, 0, 96)


# --------------------------------------------------------------------------- backward
@pytest.mark.parametrize("path", ("fused", "workspace"))
@pytest.mark.parametrize("i,m,nk", ODD_CASES)
def test_dx_shapes(i, m, nk, path):
    """``dy @ ŵ`` over M × odd (N, K); dtype, bits, group and symmetry cycle with i."""
    n, k = nk
    qw = _weight(n, k, (4, 8)[i % 2], _gs_for(k, i + 1), bool(i // 2 % 2), seed=i)
    dy = _rand(m, n, dtype=XDTYPES[i % 3], seed=i)
    _check_dx(dm.backward_dx(dy, *_args(qw), path=path), dy, qw, f"dx {path}")


@pytest.mark.parametrize("xdtype", XDTYPES)
@pytest.mark.parametrize("bits", (4, 8))
def test_autograd_x_and_bias(xdtype, bits):
    """x.grad and bias.grad through qdpo.dequant_matmul(backend="triton"), batch dims (2, 3, K)."""
    qw = _weight(67, 256, bits, 32 if bits == 4 else -1, sym=bits == 8)
    x = _rand(2, 3, 256, dtype=xdtype).requires_grad_()
    b = _rand(67, dtype=xdtype).requires_grad_()
    dy = _rand(2, 3, 67, dtype=xdtype, seed=3)
    y = qdpo.dequant_matmul(x, qw, b, backend="triton")
    _check_y(y.detach(), x.detach(), qw, b.detach())
    y.backward(dy)
    _check_dx(x.grad, dy, qw, "x.grad")
    db_hi = dy.double().sum((0, 1))
    assert_close_2x(b.grad, db_hi, dy.sum((0, 1)), what="bias.grad")


def test_autograd_from_sum_and_large_m():
    """A stride-0 gradient from ``.sum()``, M = 129 rows (gemm forward, fused dx)."""
    qw = _weight(33, 128, 4, 64)
    x = _rand(129, 128, dtype=torch.float16).requires_grad_()
    qdpo.dequant_matmul(x, qw, backend="triton").float().sum().backward()
    _check_dx(x.grad, torch.ones(129, 33, dtype=torch.float16, device=DEV), qw, "x.grad")


# --------------------------------------------------------------------------- grouped (experts)
@pytest.mark.parametrize("bits,gs,xdtype", [(4, 32, torch.bfloat16), (8, -1, torch.float32), (4, -1, torch.float16)])
def test_experts_rows_are_each_experts_one_row_gemv(bits, gs, xdtype):
    """dequant_matmul_experts on the triton backend, max_rows 1: each row of x bit for bit the M = 1 GEMV (one split,
    as the grouped launch runs) on its expert's rows of the weights with its bias row, and within the
    2×-of-PyTorch rule of the reference; ids outside the experts (either sign) give zero rows; 20 rows
    per expert (a partial block), K = 96 (a partial K tile, and odd words for W4 with G = K)."""
    e, n, k = 3, 20, 96
    qw = _weight(e * n, k, bits, gs, seed=bits)
    q, s, z, _ = _args(qw)
    if xdtype != torch.float32:
        s = s.to(xdtype)
    bias = _rand(e, n, dtype=xdtype, seed=4)
    ids = [2, 0, 2, 3, -1, 1]
    x = _rand(len(ids), k, dtype=xdtype, seed=5)
    y = OPS.dequant_matmul_experts(x, torch.tensor(ids, device=DEV), q, s, z, bits, e, bias, 1, backend="triton")
    for p, eid in enumerate(ids):
        if not 0 <= eid < e:
            assert torch.equal(y[p], torch.zeros_like(y[p]))
            continue
        rows = slice(eid * n, (eid + 1) * n)
        w = dmg.Packed.of(q[rows], s[rows], z[rows], bits)
        one = torch.empty(1, n, dtype=xdtype, device=DEV)
        cfg = dmg._BEST[("gemv-experts", dmg.tuning_key(x, w, 1))] if x.is_cuda else dm.GEMV_CPU  # the grouped launch's
        dm._launch_gemv(x[p:p + 1], w, bias[eid], one, cfg._replace(split_k=1))
        assert torch.equal(y[p:p + 1], one), (p, eid)
        want = ref.dequant_matmul(x[p:p + 1].double(), q[rows], s[rows], z[rows], bits, bias[eid].double())
        lo = ref.dequant_matmul(x[p:p + 1], q[rows], s[rows], z[rows], bits, bias[eid])
        assert_close_2x(y[p:p + 1], want, lo, floor=fp32_sum_floor(k), what=f"row {p}")


@pytest.mark.parametrize("bits,gs,xdtype,max_rows", [(4, 32, torch.bfloat16, 3), (8, -1, torch.float32, 0)])
def test_experts_rows_of_one_expert_run_together(bits, gs, xdtype, max_rows):
    """With several rows per expert the triton backend sorts the rows by expert on the device and one
    program takes up to 16 of an expert's rows (the tl.dot path), so each chosen expert's weights are
    read once: an expert's rows bit for bit the unsplit GEMV of just those rows on its slice where it
    has several (one row alone takes the M = 1 path there), every row within the 2×-of-PyTorch rule;
    ids outside the experts give zeros; 18 rows of one expert take two chunks."""
    e, n, k = 3, 20, 96
    qw = _weight(e * n, k, bits, gs, seed=bits + 1)
    q, s, z, _ = _args(qw)
    if xdtype != torch.float32:
        s = s.to(xdtype)
    bias = _rand(e, n, dtype=xdtype, seed=4)
    g = torch.Generator().manual_seed(9)
    ids = (torch.cat([torch.randperm(e, generator=g)[:2] for _ in range(max_rows)]) if max_rows else
           torch.cat([torch.full((18,), 1), torch.tensor([0, 2, 2, -4, 5])])[torch.randperm(23, generator=g)])
    x = _rand(len(ids), k, dtype=xdtype, seed=6)
    _check_both_grouped_ops(x, ids, q, s, z, bits, e, bias, max_rows)
    # offsets that are not the experts' ranges (decreasing, past P, negative): wrong rows, nothing outside x, y
    bad = torch.tensor([0, 9, -4, 10**6], dtype=torch.int32, device=DEV)
    assert OPS.dequant_matmul_segments(x[:5], bad, q, s, z, bits, e, bias, max_rows, backend="triton").isfinite().all()


def test_experts_segments_need_no_program_per_expert():
    """The triton segments grid holds one program per chunk of 16 rows any routing could make
    (segment_blocks), not one per expert, and each program finds its chunk from all the experts' offsets:
    300 experts with every row its own expert (the grid is then exactly full), then 3 experts with 1, 17
    and 33 rows and a row of an id past them (exactly full again, and beyond max_rows = 2, which only
    sizes the tuning, each expert still gets all its rows)."""
    k, n = 96, 20
    for e, counts in ((300, {0: 1, 5: 1, 131: 1, 255: 1, 256: 1, 299: 1}), (3, {2: 1, 0: 17, 1: 33, 7: 1})):
        qw = _weight(e * n, k, 4, 32, seed=e)
        q, s, z, _ = _args(qw)
        bias = _rand(e, n, seed=3)
        g = torch.Generator().manual_seed(e)
        ids = torch.cat([torch.full((c,), i) for i, c in counts.items()])[torch.randperm(sum(counts.values()),
                                                                                          generator=g)]
        chosen = [c for i, c in counts.items() if 0 <= i < e]
        assert ref.segment_blocks(len(ids), e, 16) == sum(-(-c // 16) for c in chosen), e
        x = _rand(len(ids), k, seed=4)
        y = OPS.dequant_matmul_experts(x, ids.to(DEV), q, s, z, 4, e, bias, 2, backend="triton")
        _check_triton_segments(y, x, ids, q, s, z, 4, e, bias, 2)


@pytest.mark.parametrize("max_rows,bits,xdtype", [(20, 4, torch.float32), (40, 8, torch.bfloat16), (0, 4, torch.float16)])
def test_experts_segments_take_wider_tiles_for_more_rows(max_rows, bits, xdtype):
    """More rows expected per expert (a prefill's ``max_rows``) widen the triton segments tile to 32 or 64
    rows (``tl.dot`` as in the per-expert GEMM); the grid is still one program per chunk any routing could
    make: experts with 1, 1 + R and 1 + 2R rows (R the tile) fill it exactly, and each gets all its rows."""
    tile = dm.segment_tile(max_rows or 10**6)
    assert tile == {20: 32, 40: 64, 0: 64}[max_rows]
    e, n, k = 3, 20, 96
    qw = _weight(e * n, k, bits, 32, seed=11)
    q, s, z, _ = _args(qw)
    if xdtype != torch.float32:
        s = s.to(xdtype)
    bias = _rand(e, n, dtype=xdtype, seed=5)
    counts = {1: 1, 2: 1 + tile, 0: 1 + 2 * tile}
    g = torch.Generator().manual_seed(tile)
    ids = torch.cat([torch.full((c,), i) for i, c in counts.items()])[torch.randperm(sum(counts.values()), generator=g)]
    assert ref.segment_blocks(len(ids), e, tile) == 1 + 2 + 3
    _check_both_grouped_ops(_rand(len(ids), k, dtype=xdtype, seed=7), ids, q, s, z, bits, e, bias, max_rows)


def _check_both_grouped_ops(x, ids, q, s, z, bits, e, bias, max_rows):
    """dequant_matmul_experts on the triton backend as :func:`_check_triton_segments` says, and the same
    launch on the rows sorted by the caller (dequant_matmul_segments) equal to it, in that order."""
    y = OPS.dequant_matmul_experts(x, ids.to(DEV), q, s, z, bits, e, bias, max_rows, backend="triton")
    _check_triton_segments(y, x, ids, q, s, z, bits, e, bias, max_rows)
    order, offsets = ref.expert_segments(ids.to(DEV), e)
    ys = OPS.dequant_matmul_segments(x[order], offsets, q, s, z, bits, e, bias, max_rows, backend="triton")
    assert torch.equal(ys, y[order])


def _check_triton_segments(y, x, ids, q, s, z, bits, e, bias, max_rows):
    """Each expert's rows of y, a tile at a time (16, 32 or 64 rows: ``segment_tile`` of the rows one
    expert is expected to take), bit for bit an independent launch of just those rows on its slice of
    the weights with its bias row: the unsplit GEMV for a 16-row tile (one row alone takes the M = 1
    path there, so only the rule below), the per-expert GEMM kernel with the same tiles for wider ones;
    every row within the 2×-of-PyTorch rule; rows of ids outside the experts zero."""
    n, k = q.shape[0] // e, x.shape[1]
    tile = dm.segment_tile(ref.rows_per_expert(len(ids), max_rows))
    for eid in set(ids.tolist()):
        sel = (ids == eid).nonzero()[:, 0].to(DEV)
        if not 0 <= eid < e:
            assert torch.equal(y[sel], torch.zeros_like(y[sel]))
            continue
        rows = slice(eid * n, (eid + 1) * n)
        w = dmg.Packed.of(q[rows], s[rows], z[rows], bits)
        cfg = dmg._BEST[("gemv-experts", dmg.tuning_key(x, w, tile))] if x.is_cuda else dm.GEMV_CPU
        for lo in range(0, len(sel), tile):
            part = sel[lo:lo + tile]
            one = torch.empty(len(part), n, dtype=x.dtype, device=DEV)
            if tile > 16:
                gemm = dmg.GemmConfig(tile, cfg.block_n, cfg.block_k, 1, cfg.num_warps, cfg.num_stages)
                dmg.launch_gemm(x[part], w, bias[eid], one, gemm)
                assert torch.equal(y[part], one), (eid, lo)
            elif len(part) > 1:
                dm._launch_gemv(x[part], w, bias[eid], one, cfg._replace(split_k=1))
                assert torch.equal(y[part], one), (eid, lo)
            want = ref.dequant_matmul(x[part].double(), q[rows], s[rows], z[rows], bits, bias[eid].double())
            lo_ref = ref.dequant_matmul(x[part], q[rows], s[rows], z[rows], bits, bias[eid])
            assert_close_2x(y[part], want, lo_ref, floor=fp32_sum_floor(k), what=f"expert {eid}")


# --------------------------------------------------------------------------- registration, errors
def test_opcheck_forward():
    qw = _weight(7, 96, 4, 32)
    for m in (3, 17):
        x = _rand(m, 96, dtype=torch.float32).requires_grad_()
        opcheck(OPS.dequant_matmul, (x, *_args(qw), _rand(7).requires_grad_(), "triton"))
    opcheck(OPS.dequant_matmul, (_rand(1, 96, dtype=torch.float16), *_args(qw), None, "triton"))


def test_opcheck_dx():
    qw = _weight(7, 96, 8, -1)
    opcheck(OPS.dequant_matmul_dx, (_rand(2, 3, 7), *_args(qw), "triton"))


def test_errors():
    qw = _weight(7, 96, 4, 32)
    x = _rand(3, 96)
    q, s, z, bits = _args(qw)
    s48, z48 = s[:, :2].contiguous(), z[:, :2].contiguous()  # two groups of 48: not a power of two
    with pytest.raises(Unsupported, match="group size 48"):
        dm.dequant_matmul(x, q, s48, z48, bits)
    with pytest.raises(Unsupported, match="dtype torch.int32"):
        dm.dequant_matmul(x.int(), q, s, z, bits)
    with pytest.raises(Unsupported, match="last dimension must be 7"):
        dm.dequant_matmul_dx(_rand(3, 96), q, s, z, bits)
    with pytest.raises(Unsupported, match="bits=3"):
        dm.dequant_matmul(x, q, s, z, 3)
    with pytest.raises(ValueError, match="cannot serve M=17"):
        dm.forward(_rand(17, 96), q, s, z, bits, path="gemv")
    with pytest.raises(ValueError, match="path='tiles'"):
        dm.backward_dx(_rand(3, 7), q, s, z, bits, path="tiles")


# --------------------------------------------------------------------------- GPU, real sizes
@pytest.mark.gpu
@pytest.mark.parametrize("name", list(LLAMA_SHAPES))
@pytest.mark.parametrize("bits,gs", [(4, 128), (8, -1)])
def test_gpu_llama_shapes(name, bits, gs):
    """Real layer shapes at decode (1, 16) and prefill (512, 4096) rows, bf16, forward and dx."""
    n, k = LLAMA_SHAPES[name]
    qw = _weight(n, k, bits, gs, wdtype=torch.bfloat16)
    for m in (1, 16, 512, 4096):
        x = _rand(m, k, dtype=torch.bfloat16, seed=m)
        _check_y(OPS.dequant_matmul(x, *_args(qw), None, "triton"), x, qw, what=f"{name} M={m}")
    dy = _rand(512, n, dtype=torch.bfloat16)
    _check_dx(OPS.dequant_matmul_dx(dy, *_args(qw), "triton"), dy, qw, f"{name} dx")


@pytest.mark.gpu
@pytest.mark.parametrize("xdtype", XDTYPES)
def test_gpu_every_path_at_8192(xdtype):
    """Every path (and fused dx) forced on an 8192 × 8192 W4 g128 weight; gemv is deterministic."""
    qw = _weight(8192, 8192, 4, 128, wdtype=torch.float16)
    b = _rand(8192, dtype=xdtype)
    for m, path in ((1, "gemv"), (16, "gemv"), (16, "gemm"), (1024, "gemm"), (1024, "workspace")):
        x = _rand(m, 8192, dtype=xdtype, seed=m)
        y = dm.forward(x, *_args(qw), b, path=path)
        _check_y(y, x, qw, b, f"{path} M={m}", floor=fp32_sum_floor(8192))
        if path == "gemv":
            assert torch.equal(y, dm.forward(x, *_args(qw), b, path=path)), "split-K must be deterministic"
    dy = _rand(64, 8192, dtype=xdtype)
    _check_dx(dm.backward_dx(dy, *_args(qw), path="fused"), dy, qw, floor=fp32_sum_floor(8192))  # sums over N


@pytest.mark.gpu
def test_gpu_torch_compile():
    """The op inside torch.compile(fullgraph=True), forward and backward."""
    qw = _weight(4096, 4096, 4, 128, wdtype=torch.bfloat16)
    x = _rand(8, 4096, dtype=torch.bfloat16).requires_grad_()
    f = torch.compile(lambda t: qdpo.dequant_matmul(t, qw, backend="triton"), fullgraph=True)
    y = f(x)
    _check_y(y.detach(), x.detach(), qw)
    y.backward(torch.ones_like(y))
    _check_dx(x.grad, torch.ones_like(y), qw)
