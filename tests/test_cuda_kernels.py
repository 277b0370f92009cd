"""What only the ``cuda`` backend (``csrc/`` via ``qdpo._C``) needs tested, on a GPU.

The test bodies the cuda backend shares with Triton (quantize, dequantize and
fake_quant against the CPU reference, public API, opcheck, torch.compile) live
in ``test_quantize.py``, ``test_dequantize.py`` and ``test_fake_quant.py``,
parametrized over the ``backend`` fixture (see conftest). Here, with the same
helpers and tolerances: the paths of the C++ launchers forced by their inputs
(block-wide teams on long rows, narrow chunks on misaligned rows, the
tensor-core GEMV or the FMA fallback, split-K), ``gemv_plan``, the prefill,
dx and fake_quant_matmul routes (cuda kernel for ŵ, cuBLAS for the product),
and CUDA graph capture. dequant_matmul outputs
follow the 2×-of-PyTorch rule (``conftest.assert_close_2x``). Skipped without
a GPU (and without the built extension); ``make gpu-check`` runs them.
"""

import itertools

import pytest
import torch
from torch.library import opcheck

import qdpo
from qdpo.kernels import backends
from qdpo.kernels import reference as ref
from tests.conftest import GROUPS, LLAMA_SHAPES, assert_close_2x, assert_exact, fp32_sum_floor, on, randn
from tests.test_dequant_matmul import (
    ODD_CASES, _args, _check_dx, _check_y, _check_zero_and_constant_rows, _dtype_group_case, _odd_case, _rand,
    _weight,
)
from tests.test_dequantize import _assert_dequantize, _random_packed
from tests.test_fake_quant import _assert_backward, _assert_sum_close, _grid
from tests.test_quantize import _assert_quantize

pytestmark = pytest.mark.gpu
OPS = torch.ops.qdpo
DEV = "cuda"
B = "cuda"  # the backend under test
XDTYPES = (torch.float16, torch.bfloat16, torch.float32)


@pytest.fixture(autouse=True)
def _cuda_backend():
    """The compiled extension; skip (not fail) where it was not built."""
    return pytest.importorskip("qdpo.kernels.cuda", reason="qdpo._C was not built (no nvcc at install time)")


# --------------------------------------------------------------------------- quantize
@pytest.mark.parametrize("k,bits", [(14336, 4), (4100, 4), (4101, 8), (66, 4)])
def test_quantize_long_and_narrow_rows(k, bits):
    """One group per row: a block-wide team (K = 14336), 2-/1-code chunks (K % 8 != 0)."""
    for sym in (False, True):
        _assert_quantize(randn(9, k, torch.bfloat16, seed=k), bits, -1, sym, B)


@pytest.mark.parametrize("bits,gs,sym", [(4, 128, False), (8, -1, True)])
def test_quantize_rows_aligned_to_4_bytes_only(bits, gs, sym):
    """Llama-width rows one fp32 column into a wider tensor: 4-byte aligned only, narrow chunks."""
    k = LLAMA_SHAPES["llama2-7b.qkv"][1]
    odd = randn(64, k + 1, torch.float32, seed=12).to(DEV)[:, 1:]
    _assert_quantize(odd, bits, gs, sym, B)


# --------------------------------------------------------------------------- dequantize
def test_dequantize_misaligned_and_long_rows():
    """1-byte aligned qweight rows (narrow chunks); one group per row on long rows."""
    q, s, z = _random_packed(7, 96, 4, 3, torch.float32, seed=4)
    q_odd = torch.zeros(7, 49, dtype=torch.uint8, device=DEV)[:, 1:]  # 1-byte aligned rows: narrow chunks
    q_odd.copy_(q.to(DEV))
    _assert_dequantize(q_odd, s, z, 4, torch.float32, B)
    for k, bits in ((14336, 4), (4101, 8)):
        _assert_dequantize(*_random_packed(5, k, bits, 1, torch.float16, seed=k), bits, torch.bfloat16, B)


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_both_chunk_widths(bits):
    """The 16-code chunks the kernel picks (max_vec 16) and the 8-code ones the benchmarks set beside
    them (max_vec 8) give the reference's ŵ; and max_vec must be one of the two."""
    from qdpo.kernels import cuda

    for k, ng in ((4096, 32), (14336, 1), (240, 3)):
        q, s, z = _random_packed(5, k, bits, ng, torch.bfloat16, seed=k)
        want = ref.dequantize(q, s, z, bits, torch.bfloat16)
        for max_vec in (16, 8):
            got = cuda.dequantize(*on(B, q, s, z), bits, torch.bfloat16, max_vec=max_vec)
            assert_exact(got.cpu(), want, f"ŵ K={k} max_vec={max_vec}")
    with pytest.raises(ValueError, match="max_vec"):
        cuda.dequantize(*on(B, q, s, z), bits, torch.bfloat16, max_vec=32)


# --------------------------------------------------------------------------- fake_quant
@pytest.mark.parametrize("k,bits", [(14336, 4), (4100, 4), (4101, 8)])
def test_fake_quant_long_and_narrow_rows(k, bits):
    """One group per row: a block-wide LSQ team sum, 2-/1-element chunks."""
    w = randn(9, k, torch.float16, seed=k)
    s, z = _grid(w, bits, -1, bits == 8)
    assert_exact(OPS.fake_quant(*on(B, w, s, z), bits, None, B).cpu(), ref.fake_quant(w, s, z, bits), "ŵ")
    _assert_backward(randn(9, k, torch.float16, seed=k + 1), w, s, z, bits, B)


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k,gs", [(4096, 128), (14336, -1), (200, 40)])
def test_fake_quant_both_chunk_widths(wdtype, k, gs):
    """16-bit w (and grad): the 16-element chunks the kernels pick (max_vec 16) and the 8-element ones
    the benchmarks set beside them (max_vec 8) give the reference's ŵ, ∂w and ∂s; and max_vec must be
    one of the two."""
    from qdpo.kernels import cuda

    w = randn(6, k, wdtype, seed=k)
    s, z = _grid(w, 4, gs, False)
    grad = randn(6, k, wdtype, seed=k + 1)
    want, (rw, rs) = ref.fake_quant(w, s, z, 4, wdtype), ref.fake_quant_backward(grad, w, s, z, 4, True)
    w_, s_, z_, grad_ = on(B, w, s, z, grad)
    for max_vec in (16, 8):
        what = f"max_vec={max_vec}"
        assert_exact(cuda.fake_quant(w_, s_, z_, 4, wdtype, max_vec=max_vec).cpu(), want, f"ŵ {what}")
        gw, gs_ = cuda.fake_quant_backward(grad_, w_, s_, z_, 4, True, max_vec=max_vec)
        assert_exact(gw.cpu(), rw, f"∂w {what}")
        _assert_sum_close(gs_.cpu(), rs, grad, 4, f"∂s {what}")
    with pytest.raises(ValueError, match="max_vec"):
        cuda.fake_quant(w_, s_, z_, 4, wdtype, max_vec=4)


# --------------------------------------------------------------------------- dequant_matmul
def _path(x, qw) -> str:
    from qdpo.kernels import cuda

    q, s, _, bits = _args(qw)
    s = s if x.dtype == torch.float32 or s.dtype == x.dtype else s.to(x.dtype)
    return cuda.gemv_plan(x.reshape(-1, x.shape[-1]), q, s, bits)["kernel"]


@pytest.mark.parametrize("i,m,nk", ODD_CASES)
def test_dequant_matmul_odd_shapes(i, m, nk):
    """Every M × odd (N, K): the GEMV up to 16 rows, dequantize + cuBLAS above; auto with cuda first agrees."""
    qw, x, b = _odd_case(i, m, nk)
    how = _path(x, qw) if m <= 16 else "dequantize + cuBLAS"
    _check_y(OPS.dequant_matmul(x, *_args(qw), b, B), x, qw, b, f"cuda {how} M={m}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backends, "CUDA_IN_AUTO", True)
        _check_y(OPS.dequant_matmul(x, *_args(qw), b, "auto"), x, qw, b, f"auto {how} M={m}")


@pytest.mark.parametrize("xdtype", XDTYPES)
@pytest.mark.parametrize("bits", (4, 8))
@pytest.mark.parametrize("gs", GROUPS)
def test_dequant_matmul_dtypes_and_groups(xdtype, bits, gs):
    """All x dtypes × bits × group sizes at 1, 3, 9 and 16 rows; scale dtypes differ from x's in some cases."""
    qw, b = _dtype_group_case(xdtype, bits, gs)
    for m in (1, 3, 9, 16):
        x = _rand(m, 512, dtype=xdtype, seed=m)
        want = "fma" if xdtype == torch.float32 else "mma"
        assert _path(x, qw) == want
        _check_y(OPS.dequant_matmul(x, *_args(qw), b, B), x, qw, b, f"{want} M={m}")


@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", (4, 8))
@pytest.mark.parametrize("gs", [128, 256, -1])
def test_dequant_matmul_scale_after_dtypes_and_groups(xdtype, bits, gs):
    """The scale-after variant (opt-in) for both 16-bit x dtypes, bits and the group sizes it serves,
    every tile (1, 3, 9, 16 rows), with x in registers, (M <= 2) in shared memory and shared by row
    warps, the zero point after the mma too (W4, bf16 x; x_smem and shared_x)."""
    from qdpo.kernels import cuda

    qw, b = _dtype_group_case(xdtype, bits, gs)
    for m, x_smem, za, sx in ((1, False, False, False), (1, True, False, False), (2, True, True, False),
                              (1, True, True, False), (3, False, False, False), (9, False, False, False),
                              (16, False, False, False), (1, False, False, True), (16, False, False, True),
                              (1, False, True, True), (5, False, True, True), (16, False, True, True)):
        x = _rand(m, 512, dtype=xdtype, seed=m)
        kw = {"scale_after": True, "x_smem": x_smem, "zero_after": za, "shared_x": sx}
        plan = cuda.gemv_plan(x, *_args(qw)[:2], bits, **kw)
        assert plan["scale_after"] and plan["zero_after"] == (za and bits == 4 and xdtype == torch.bfloat16)
        _check_y(cuda.dequant_matmul(x, *_args(qw), b, **kw), x, qw, b, f"M={m} {kw}")


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


@pytest.mark.parametrize("bits,gs", [(4, 128), (8, -1), (4, 32)])
def test_dequant_matmul_every_forced_split(bits, gs):
    """Every split-K count, block size, place of x, place of the scale and count of row tiles per warp
    ``benchmarks/sweep_gemv.py`` times gives the reference's result (so the plan may choose any of them),
    for each kernel tile (M = 1, 2, 5, 16); rows past N in the last tile (shared_x: whole warps past N); 3 and 6 splits
    leave warps without a step, 16 gives shared_x one-step chunks; G = 32 refuses scale_after (a step
    spans 4 groups) and W8 zero_after, so those choices plan a launch already run, which runs once."""
    from qdpo.kernels import cuda

    qw = _weight(200, 2048, bits, gs, wdtype=torch.bfloat16, seed=bits + gs)
    b = _rand(200, dtype=torch.bfloat16, seed=3)
    for m in (1, 2, 5, 16):
        x = _rand(m, 2048, dtype=torch.bfloat16, seed=m)
        ran = set()
        for choice in cuda.gemv_choices(m):
            # 16 K steps: each count is exact (the tile count the plan does not take: two of them)
            for splits in (1, 3) if choice["row_tiles"] else (1, 2, 3, 4, 8, 16):
                kw = {"splits": splits, **choice}
                plan = cuda.gemv_plan(x, *_args(qw)[:2], bits, **kw)
                assert plan["kernel"] == "mma" and all(plan[key] == kw[key] for key in (
                    "splits", "warps", "x_smem", "shared_x"))
                assert plan["rt"] == (kw["row_tiles"] or (1 if m <= 2 else 2)) or kw["shared_x"]
                assert plan["scale_after"] == (kw["scale_after"] and gs != 32)
                assert plan["zero_after"] == (kw["zero_after"] and gs != 32 and bits == 4)
                if tuple(sorted(plan.items())) in ran:
                    continue
                ran.add(tuple(sorted(plan.items())))
                y = cuda.dequant_matmul(x, *_args(qw), b, **kw)
                _check_y(y, x, qw, b, f"M={m} {kw}")


def test_dequant_matmul_row_tiles_sum_the_same_terms():
    """One or two 16-row tiles per warp (row_tiles) run each row's mma in the same order with the same
    warps and splits: bit for bit the same y (what lets a table of measured launches take either), for
    each place of the scale and zero point, and against the reference."""
    from qdpo.kernels import cuda

    qw = _weight(72, 1024, 4, 128, wdtype=torch.bfloat16, seed=5)
    for m in (1, 2, 5):
        x = _rand(m, 1024, dtype=torch.bfloat16, seed=m)
        for grid in ({}, {"scale_after": True}, {"scale_after": True, "zero_after": True}):
            ys = [cuda.dequant_matmul(x, *_args(qw), splits=2, warps=4, row_tiles=rt, **grid) for rt in (1, 2)]
            assert [cuda.gemv_plan(x, *_args(qw)[:2], 4, row_tiles=rt)["rt"] for rt in (1, 2)] == [1, 2]
            assert torch.equal(ys[0], ys[1]), (m, grid)
            _check_y(ys[1], x, qw, what=f"M={m} row_tiles=2 {grid}")


EXPERTS_CASES = [(4, 128, torch.bfloat16, 1024), (8, -1, torch.float16, 2080), (4, 32, torch.float16, 2080)]


@pytest.mark.parametrize("bits,gs,xdtype,k", EXPERTS_CASES)
def test_dequant_matmul_experts_gives_each_row_its_experts_gemv(bits, gs, xdtype, k):
    """One grouped launch over (row of x, expert) pairs (dequant_matmul_experts, max_rows 1) gives each row bit for
    bit what the M = 1 GEMV gives on its expert's rows of the weights with its expert's bias row (unsplit,
    as the grouped launch runs): the same kernel code, reading its expert from the ids on the device.
    Repeated experts, 40 rows per expert (a partial last block), K with a partial last step (K = 2080);
    ids past the experts, negative or past int32, give zero rows; int32 and int64 ids alike; no rows,
    no launch. fp32 x is refused by name (auto then takes the reference)."""
    from qdpo.kernels import cuda

    e, n = 3, 40
    qw = _weight(e * n, k, bits, gs, wdtype=xdtype, seed=bits + k)
    q, s, z, _ = _args(qw)
    bias = _rand(e, n, dtype=xdtype, seed=5)
    ids = [2, 0, 2, 5, -1, 1, 2**40]
    x = _rand(len(ids), k, dtype=xdtype, seed=7)
    plan = cuda.experts_plan(x, q, s.to(xdtype), bits, e, 1)  # the block size: by the blocks of all pairs
    assert plan["kernel"] == "mma" and plan["splits"] == 1 and plan["rt"] == 1 and plan["warps"] in (4, 8)
    assert plan["segment_rows"] == 0
    ids32 = [min(i, 2**31 - 1) for i in ids]
    ys = [OPS.dequant_matmul_experts(x, torch.tensor(i, dtype=d, device=DEV), q, s, z, bits, e, b, 1, backend=B)
          for i, d in ((ids, torch.int64), (ids32, torch.int32)) for b in (bias, None)]
    for p, eid in enumerate(ids):
        if not 0 <= eid < e:
            assert all(torch.equal(y[p], torch.zeros_like(y[p])) for y in ys), p
            continue
        rows = slice(eid * n, (eid + 1) * n)
        for y, b in zip(ys[:2], (bias[eid], None)):
            want = cuda.dequant_matmul(x[p:p + 1], q[rows], s[rows], z[rows], bits, b, splits=1, warps=plan["warps"])
            assert torch.equal(y[p:p + 1], want), (p, eid, b is None)
    assert torch.equal(ys[0], ys[2]) and torch.equal(ys[1], ys[3])  # int32 ids
    empty = OPS.dequant_matmul_experts(x[:0], torch.zeros(0, dtype=torch.int64, device=DEV), q, s, z, bits, e, None, backend=B)
    assert empty.shape == (0, n) and empty.dtype == xdtype
    ids_t = torch.tensor(ids[:4], device=DEV)
    with pytest.raises(RuntimeError, match="fp16 and bf16"):
        OPS.dequant_matmul_experts(x[:4].float(), ids_t, q, s, z, bits, e, None, backend=B)
    assert torch.equal(OPS.dequant_matmul_experts(x[:4].float(), ids_t, q, s, z, bits, e),
                       OPS.dequant_matmul_experts(x[:4].float(), ids_t, q, s, z, bits, e, None, backend="reference"))


SEGMENT_CASES = [(4, 128, torch.bfloat16, 1024, 2), (8, -1, torch.float16, 2080, 6), (4, 32, torch.bfloat16, 2080, 0)]


@pytest.mark.parametrize("bits,gs,xdtype,k,max_rows", SEGMENT_CASES)
def test_dequant_matmul_experts_takes_each_experts_rows_together(bits, gs, xdtype, k, max_rows):
    """Several rows per expert (max_rows > 1, or 0 with more than one row): the rows are sorted by expert
    on the device and one block takes all of an expert's rows of a tile (segments), so each chosen
    expert's weights are read once. Each expert's rows come out bit for bit as the GEMV of just those
    rows on its slice of the weights (unsplit, the grouped plan's block size), in their own places of y;
    rows past the experts give zeros; an expert with 20 rows (max_rows 0: up to all 26) takes two
    chunks of 16."""
    from qdpo.kernels import cuda

    e, n = 4, 40
    qw = _weight(e * n, k, bits, gs, wdtype=xdtype, seed=bits + 3)
    q, s, z, _ = _args(qw)
    bias = _rand(e, n, dtype=xdtype, seed=6)
    g = torch.Generator().manual_seed(k + max_rows)
    if max_rows:  # tokens that each pick distinct experts: at most max_rows rows per expert
        ids = torch.cat([torch.randperm(e, generator=g)[:2] for _ in range(max_rows)])
        ids[3] = e + 5
    else:
        ids = torch.cat([torch.full((20,), 1), torch.tensor([3, 0, 3, -1, 7, 0])])[torch.randperm(26, generator=g)]
    x = _rand(len(ids), k, dtype=xdtype, seed=8)
    plan = cuda.experts_plan(x, q, s.to(xdtype), bits, e, max_rows)
    assert plan["segment_rows"] == (max_rows or len(ids)) and plan["kernel"] == "mma" and plan["splits"] == 1
    y = OPS.dequant_matmul_experts(x, ids.to(DEV), q, s, z, bits, e, bias, max_rows, backend=B)
    _check_segments(y, x, ids, q, s, z, bits, e, bias, plan["warps"])
    # the same launch on rows the caller sorted (dequant_matmul_segments): y in that order
    order, offsets = ref.expert_segments(ids.to(DEV), e)
    ys = OPS.dequant_matmul_segments(x[order], offsets, q, s, z, bits, e, bias, max_rows, backend=B)
    assert torch.equal(ys, y[order])
    # offsets that are not the experts' ranges (decreasing, past P, negative): wrong rows, nothing outside x, y
    bad = torch.tensor([0, 9, 2, -4, 10**6], dtype=torch.int32, device=DEV)
    assert OPS.dequant_matmul_segments(x[:5], bad, q, s, z, bits, e, bias, max_rows, backend=B).isfinite().all()


def _check_segments(y, x, ids, q, s, z, bits, e, bias, warps):
    """Each expert's rows of y bit for bit the unsplit GEMV of just those rows (16 at a time) on its slice
    of the weights with its bias row, in blocks of ``warps`` warps; rows of ids outside the experts zero."""
    from qdpo.kernels import cuda

    n = q.shape[0] // e
    for eid in ids.unique().tolist():
        sel = (ids == eid).nonzero()[:, 0].to(DEV)
        if not 0 <= eid < e:
            assert torch.equal(y[sel], torch.zeros_like(y[sel])), eid
            continue
        rows = slice(eid * n, (eid + 1) * n)
        for lo in range(0, len(sel), 16):  # a row's sum does not depend on the rows beside it
            part = sel[lo:lo + 16]
            want = cuda.dequant_matmul(x[part], q[rows], s[rows], z[rows], bits, bias[eid], splits=1, warps=warps)
            assert torch.equal(y[part], want), (eid, lo)


@pytest.mark.parametrize("max_rows", [2, 12])
def test_dequant_matmul_experts_segments_need_no_block_per_expert(max_rows):
    """The segments grid holds one block per chunk any routing could make (segment_blocks), not one per
    expert, and each block finds its chunk from all the experts' offsets on the device: 300 experts (two
    or three rounds of a block's threads) with every row its own expert (the grid is then exactly full:
    a block short, a row of zeros), then 3 experts with 1, 1 + R and 1 + 2R rows and a row of an id past
    them (R = 8 or 16, the tile max_rows picks: again exactly full; and beyond max_rows, which only sizes
    the tile, an expert still gets all its rows)."""
    from qdpo.kernels import cuda

    k, n = 256, 16
    for e, counts in ((300, {0: 1, 5: 1, 131: 1, 255: 1, 256: 1, 299: 1}),
                      (3, {2: 1, 0: 1 + 8 * (1 + max_rows // 9), 1: 1 + 16 * (1 + max_rows // 9), 7: 1})):
        qw = _weight(e * n, k, 4, 128, wdtype=torch.bfloat16, seed=e)
        q, s, z, _ = _args(qw)
        bias = _rand(e, n, dtype=torch.bfloat16, seed=3)
        g = torch.Generator().manual_seed(e + max_rows)
        ids = torch.cat([torch.full((c,), i) for i, c in counts.items()])[torch.randperm(sum(counts.values()),
                                                                                          generator=g)]
        x = _rand(len(ids), k, dtype=torch.bfloat16, seed=4)
        plan = cuda.experts_plan(x, q, s, 4, e, max_rows)
        seg, tile = min(max_rows, len(ids)), 8 * plan["mt"]
        assert plan["segment_rows"] == seg and tile == (8 if seg <= 8 else 16)
        chosen = [c for i, c in counts.items() if 0 <= i < e]
        assert ref.segment_blocks(len(ids), e, tile) == sum(-(-c // tile) for c in chosen), (e, tile)
        y = OPS.dequant_matmul_experts(x, ids.to(DEV), q, s, z, 4, e, bias, max_rows, backend=B)
        _check_segments(y, x, ids, q, s, z, 4, e, bias, plan["warps"])


RANDOM_CASES = range(16)


@pytest.mark.parametrize("case", RANDOM_CASES)
def test_dequant_matmul_random_shapes_every_choice(case):
    """Drawn shapes (seeded: N 1-90, K up to 6 steps with a partial last one where the group allows,
    M 1-16, W4/W8, every group size, fp16/bf16, asymmetric or symmetric, with or without bias), each
    with ten forced launch choices drawn from all the sweep may time, blocks of 1-8 warps included,
    and two split counts: the combinations the fixed-shape tests above do not meet, against the
    reference."""
    import random

    from qdpo.kernels import cuda

    r = random.Random(1000 + case)
    bits, gs = r.choice((4, 8)), r.choice((32, 64, 128, 256, -1))
    k = max(128, gs) * r.randint(1, 6) + (r.choice((0, 32, 64, 96)) if gs in (32, -1) else 0)
    n, m = r.randint(1, 90), r.choice((1, 2, 3, 5, 8, 9, 13, 16))
    xd = r.choice((torch.float16, torch.bfloat16))
    qw = _weight(n, k, bits, gs, sym=r.random() < 0.3, wdtype=xd, seed=case)
    x, b = _rand(m, k, dtype=xd, seed=case + 1), _rand(n, dtype=xd, seed=case + 2) if r.random() < 0.5 else None
    choices = cuda.gemv_choices(m, more_warps=(1, 2, 3, 5, 6, 7))
    ran = set()
    for choice in r.sample(choices, min(10, len(choices))):
        for splits in r.sample((1, 2, 3, 5, 8), 2):
            kw = {"splits": splits, **choice}
            plan = cuda.gemv_plan(x, *_args(qw)[:2], bits, **kw)
            assert plan["kernel"] == "mma", f"K = {k} (a multiple of 32) and 16-bit x take the tensor cores"
            if tuple(sorted(plan.items())) in ran:
                continue
            ran.add(tuple(sorted(plan.items())))
            y = cuda.dequant_matmul(x, *_args(qw), b, **kw)
            _check_y(y, x, qw, b, f"M={m} N={n} K={k} W{bits} g{gs} {xd} {kw}")
    assert ran, "at least one launch ran"


def test_dequant_matmul_launches_by_the_device_table(tmp_path):
    """A table of measured launches (read from a file, as the package's are) holding one exact case:
    dequant_matmul and gemv_plan take its launch where nothing is forced, bit for bit the same result as
    forcing it, and keep the plan's rules for another M and for any forced choice."""
    import json

    from qdpo.kernels import cuda, gemv_table

    qw = _weight(200, 2048, 4, 128, wdtype=torch.bfloat16, seed=5)
    x, x2 = _rand(1, 2048, dtype=torch.bfloat16, seed=1), _rand(2, 2048, dtype=torch.bfloat16, seed=2)
    saved = dict(cuda._TABLES)
    try:
        cuda.use_gemv_table(None)
        rule, rule2 = cuda.gemv_plan(x, *_args(qw)[:2], 4), cuda.gemv_plan(x2, *_args(qw)[:2], 4)
        launch = {"splits": 2 if rule["splits"] == 4 else 4, "warps": 12 - rule["warps"], "x_smem": True,
                  "shared_x": False}
        dev = torch.cuda.current_device()
        path = tmp_path / "table.json"
        path.write_text(json.dumps({"device": torch.cuda.get_device_name(dev), "sm_count": cuda._sm_count(dev),
                                    "entries": [{"bits": 4, "group": 128, "dtype": "bfloat16", "m": 1, "n": 200,
                                                 "k": 2048, "launch": launch}]}))
        cuda.use_gemv_table(path)
        assert isinstance(cuda.gemv_table_for(dev), gemv_table.GemvTable)
        plan = cuda.gemv_plan(x, *_args(qw)[:2], 4)
        assert all(plan[key] == value for key, value in launch.items()), (plan, launch)
        y = cuda.dequant_matmul(x, *_args(qw))
        assert torch.equal(y, cuda.dequant_matmul(x, *_args(qw), **launch))
        _check_y(y, x, qw, what="the table's launch")
        assert cuda.gemv_plan(x2, *_args(qw)[:2], 4) == rule2  # M = 2: not in the table
        forced = cuda.gemv_plan(x, *_args(qw)[:2], 4, warps=rule["warps"])
        assert forced["warps"] == rule["warps"] and not forced["x_smem"]  # a forced choice: the table stays out
    finally:
        cuda._TABLES.clear()
        cuda._TABLES.update(saved)


@pytest.mark.parametrize("gs", [32, -1])
def test_dequant_matmul_on_a_partial_last_step(gs):
    """K = 2080 ends 32 codes into its 17th step: only that step checks bounds, and its lanes past K add
    exactly nothing — for both block sizes, one range and two, one and two rows of x, x in registers,
    in shared memory (x_smem) and shared by row warps (shared_x: the step is a chunk of its own), the
    scale in ŵ and (G = K) after the mma, where lanes past K take the step's scale, and (bf16 x) the
    zero point after it too; fp16 and bf16 x."""
    from qdpo.kernels import cuda

    qw = _weight(37, 2080, 4, gs, wdtype=torch.bfloat16, seed=gs + 7)
    for m, xdtype in itertools.product((1, 2, 7), (torch.float16, torch.bfloat16)):
        x = _rand(m, 2080, dtype=xdtype, seed=m + 11)
        for choice in cuda.gemv_choices(m):
            for splits in (1, 2):
                kw = {"splits": splits, **choice}
                y = cuda.dequant_matmul(x, *_args(qw), **kw)
                _check_y(y, x, qw, None, f"M={m} {kw}")


@pytest.mark.parametrize("warps", range(1, 9))
def test_dequant_matmul_any_block_size(warps):
    """Any forced block size of 1-8 warps (the plan's rules pick 8 or 4; the sweep times others, and a
    table may launch them; a kernel built for 8 runs 5-8, one for 4 runs 1-4): K = 2080 is 17 steps,
    prime, so no count of warps shares them evenly, and the partial last step falls to whichever warp's
    turn it is, with one K range and two; M = 1 and 2 with x in registers and in shared memory, with the
    scale and the zero point after the mma too, M = 5 and 16; W4 (one group per row) and W8 (G = 32).
    shared_x refuses counts other than 4 and 8, with a ValueError that says so."""
    from qdpo.kernels import cuda

    for bits, gs in ((4, -1), (8, 32)):
        qw = _weight(37, 2080, bits, gs, wdtype=torch.bfloat16, seed=warps + bits)
        b = _rand(37, dtype=torch.bfloat16, seed=warps)
        for m in (1, 2, 5, 16):
            x = _rand(m, 2080, dtype=torch.bfloat16, seed=m + warps)
            xs_choices = ((False, False, False), (True, False, False), (True, True, True)) if m <= 2 else (
                (False, False, False),)
            for (x_smem, scale_after, zero_after), splits in itertools.product(xs_choices, (1, 2)):
                kw = {"splits": splits, "warps": warps, "x_smem": x_smem, "scale_after": scale_after,
                      "zero_after": zero_after}
                plan = cuda.gemv_plan(x, *_args(qw)[:2], bits, **kw)
                assert (plan["warps"], plan["splits"], plan["x_smem"]) == (warps, splits, x_smem), plan
                _check_y(cuda.dequant_matmul(x, *_args(qw), b, **kw), x, qw, b, f"W{bits} M={m} {kw}")
    if warps % 4:
        with pytest.raises(ValueError, match="shared_x=True 4 or 8"):
            cuda.dequant_matmul(x, *_args(qw), b, warps=warps, shared_x=True)


@pytest.mark.parametrize("bits,gs", [(4, 128), (8, -1), (4, 32)])
@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16])
def test_dequant_matmul_gemm_path(bits, gs, xdtype):
    """The hand-written tensor-core GEMM (path="gemm") against the reference: M and N that leave
    partial 128-row tiles (rows past M and N zero-filled, their outputs dropped), 18 K tiles,
    bias, batch dimensions, and M at and below the GEMV's range."""
    check_gemm_path(bits, gs, xdtype, 1152, (1, 16, 17, 130, 300), 129)


def check_gemm_path(bits, gs, xdtype, k, ms, batch_m):
    """path="gemm" on a 200-row weight of K = k against the reference, with bias, for each M in ``ms``
    (deterministic), and without bias for x of shape (2, batch_m, k)."""
    from qdpo.kernels import cuda

    qw = _weight(200, k, bits, gs, wdtype=xdtype, seed=bits + gs)
    b = _rand(200, dtype=xdtype, seed=5)
    for m in ms:
        x = _rand(m, k, dtype=xdtype, seed=m)
        y = cuda.dequant_matmul(x, *_args(qw), b, path="gemm")
        _check_y(y, x, qw, b, f"gemm M={m}")
        assert torch.equal(y, cuda.dequant_matmul(x, *_args(qw), b, path="gemm")), "deterministic"
    x = _rand(2, batch_m, k, dtype=xdtype, seed=9)
    _check_y(cuda.dequant_matmul(x, *_args(qw), None, path="gemm"), x, qw, None, "gemm, batch dims")


def test_dequant_matmul_paths_refuse_what_they_cannot_serve():
    from qdpo.kernels import cuda

    qw = _weight(64, 96, 4, 32, wdtype=torch.bfloat16)
    x = _rand(40, 96, dtype=torch.bfloat16)
    with pytest.raises(backends.Unsupported, match="K % 64 == 0"):
        cuda.dequant_matmul(x, *_args(qw), path="gemm")
    _check_y(cuda.dequant_matmul(x, *_args(qw), path="workspace"), x, qw, None, "workspace, K = 96")
    qw = _weight(64, 128, 4, 32, wdtype=torch.bfloat16)
    with pytest.raises(backends.Unsupported, match="fp16/bf16 x"):
        cuda.dequant_matmul(_rand(40, 128), *_args(qw), path="gemm")
    with pytest.raises(ValueError, match="gemv: M <= 16"):
        cuda.dequant_matmul(_rand(17, 128, dtype=torch.bfloat16), *_args(qw), path="gemv")
    with pytest.raises(ValueError, match="one of"):
        cuda.dequant_matmul(_rand(2, 128, dtype=torch.bfloat16), *_args(qw), path="fused")


def test_dequant_matmul_zero_rows_give_the_bias_exactly():
    _check_zero_and_constant_rows(B, (1, 3, 16), (torch.bfloat16, torch.float32))


@pytest.mark.parametrize("name", list(LLAMA_SHAPES))
@pytest.mark.parametrize("bits,gs", [(4, 128), (8, -1)])
def test_dequant_matmul_llama_shapes(name, bits, gs):
    n, k = LLAMA_SHAPES[name]
    qw = _weight(n, k, bits, gs, wdtype=torch.bfloat16)
    for m in (1, 4, 16):
        x = _rand(m, k, dtype=torch.bfloat16, seed=m)
        _check_y(OPS.dequant_matmul(x, *_args(qw), None, B), x, qw, what=f"{name} M={m}")
    from qdpo.kernels import cuda

    x = _rand(512, k, dtype=torch.bfloat16, seed=512)  # the prefill GEMM at a real layer size
    _check_y(cuda.dequant_matmul(x, *_args(qw), path="gemm"), x, qw, what=f"{name} gemm M=512",
             floor=fp32_sum_floor(k))


@pytest.mark.parametrize("xdtype", XDTYPES)
def test_dequant_matmul_8192(xdtype):
    qw = _weight(8192, 8192, 4, 128, wdtype=torch.float16)
    b = _rand(8192, dtype=xdtype)
    for m in (1, 16):
        x = _rand(m, 8192, dtype=xdtype, seed=m)
        y = OPS.dequant_matmul(x, *_args(qw), b, B)
        _check_y(y, x, qw, b, f"M={m}")
        assert torch.equal(y, OPS.dequant_matmul(x, *_args(qw), b, B)), "deterministic"


@pytest.mark.parametrize("m", (3, 17, 300))
def test_dequant_matmul_dx_and_prefill(m):
    """dx = dy @ ŵ and M > 16 products: ŵ from the cuda dequantize kernel, the product from cuBLAS."""
    for bits, gs, xdtype in ((4, 32, torch.bfloat16), (8, -1, torch.float16), (4, 128, torch.float32)):
        qw = _weight(96, 256, bits, gs)
        dy = _rand(m, 96, dtype=xdtype, seed=m)
        _check_dx(OPS.dequant_matmul_dx(dy, *_args(qw), B), dy, qw)
        x = _rand(2, m, 256, dtype=xdtype, seed=m + 1)
        _check_y(OPS.dequant_matmul(x, *_args(qw), None, B), x, qw, what=f"M={2 * m}")


@pytest.mark.parametrize("m", (1, 16, 40))
def test_fake_quant_matmul_forward_and_backward(m):
    """fake_quant_matmul through the cuda fake_quant kernels + cuBLAS against the reference (2× rule)."""
    from tests import test_fake_quant_matmul as T

    for bits, gs, xdtype in ((4, 64, torch.bfloat16), (8, 32, torch.float16), (4, -1, torch.float32)):
        w, s, z = T._problem(48, 192, bits, gs, wdtype=torch.float32, seed=m)
        T._assert_clips(w, s, z, bits)
        x, dy, b = (T._rand(m, 192, dtype=xdtype), T._rand(m, 48, dtype=xdtype, seed=2),
                    T._rand(48, dtype=xdtype, seed=3))
        y = OPS.fake_quant_matmul(x, w, s, z, bits, b, B)
        assert y.dtype == xdtype
        assert_close_2x(y, ref.fake_quant_matmul(x.double(), w, s, z, bits, b),
                        ref.fake_quant_matmul(x, w, s, z, bits, b), what="y")
        dx, dw, ds = OPS.fake_quant_matmul_backward(dy, x, w, s, z, bits, True, B)
        rdx, rdw, rds = ref.fake_quant_matmul_backward(dy, x, w, s, z, bits, True)
        dx64, _, _ = ref.fake_quant_matmul_backward(dy.double(), x.double(), w, s, z, bits, False)
        dw64, ds64 = T._truth_grads(dy, x, w, s, z, bits)
        assert_close_2x(dx, dx64, rdx, what="dx")
        assert_close_2x(dw, dw64, rdw, what="dw")
        assert_exact(dw == 0, rdw == 0, "dw zero pattern")
        assert_close_2x(ds, ds64, rds, what="dscales")


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
    # split K: the reduction is the GEMV's programmatic dependent (sm_90), a programmatic edge in a graph
    from qdpo.kernels import cuda

    qs, xs = _weight(256, 8192, 4, 128, wdtype=torch.bfloat16), _rand(4, 8192, dtype=torch.bfloat16)
    assert cuda.gemv_plan(xs, *_args(qs)[:2], 4)["splits"] > 1
    ys = OPS.dequant_matmul(xs, *_args(qs), None, B)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ysg = OPS.dequant_matmul(xs, *_args(qs), None, B)
    for _ in range(2):
        ysg.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(ysg, ys)
