"""The CUDA backend's host side, without a GPU: shared math, GEMV data flow, plans, argument checks.

``csrc/`` is compiled once per session (as ``tests/test_build.py`` does, into a
temporary directory; reused from pytest's cache while the sources are
unchanged) and its ``__host__ __device__`` math is checked bit for bit against
``qdpo/kernels/reference.py``: fp32 → fp16/bf16 rounding, the scale rule
(round *up* to the scale dtype, tiny scale for zero-range groups), zero points,
codes, ŵ, the STE mask and the LSQ factor. The tensor-core GEMV's data flow
(byte offsets, nibble pairs, A/B fragment slots, output map) runs in a host
emulation against ``reference.dequant_matmul``; the launches of dequantize and
fake_quant (forward, backward) run on the host thread by thread, through the
kernels' own plans and thread functions, against their references. The
launchers' argument checks run too: they return before any CUDA call. What needs a GPU is in
``tests/test_cuda_kernels.py``.
"""

import functools
import hashlib
import importlib.util
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qdpo.kernels import backends
from qdpo.kernels import reference as ref
from tests.conftest import DTYPES, assert_exact, randn

ROOT = Path(__file__).resolve().parents[1]
HAS_NVCC = shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))
CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _source_hash() -> str:
    h = hashlib.sha256()
    for p in sorted(q for q in (ROOT / "csrc").iterdir() if q.is_file()) + [ROOT / "setup.py"]:  # (not emulate/)
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


def _build_cached(cache: Path) -> Path:
    """``_C*.so`` built from the current sources, kept under ``cache/<source hash>``.

    A build is kept only if the sources did not change while it ran (another
    checkout operation mid-build would otherwise leave a mixed module). Each
    process builds in a folder of its own (pytest-xdist workers, or two runs at
    once), and the first finished build of a key is the one kept.
    """
    for _ in range(3):
        key = _source_hash()
        found = list((cache / key / "lib" / "qdpo").glob("_C*.so"))
        if found:
            return found[0]
        tmp = cache / f"{key}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp / "lib"),
               "--build-temp", str(tmp / "tmp")]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, f"CUDA extension failed to build:\n{res.stderr[-4000:]}"
        if _source_hash() == key:
            try:
                tmp.rename(cache / key)  # atomic; fails where another process got there first
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    raise AssertionError("csrc/ kept changing during the build")


@pytest.fixture(scope="session")
def C(request):
    """The extension built from this checkout (once per session, cached by source hash)."""
    if not HAS_NVCC:
        pytest.skip("nvcc not installed")
    so = _build_cached(Path(request.config.cache.mkdir("qdpo_cuda_build")))
    spec = importlib.util.spec_from_file_location("_C", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bits16(t: torch.Tensor) -> list[int]:
    return (t.view(torch.int16).to(torch.int32) & 0xFFFF).tolist()


# --------------------------------------------------------------------------- float rounding
def _wide_floats(n: int = 4000, seed: int = 0) -> torch.Tensor:
    """Random magnitudes over ~90 binades, exact ties, fp16 subnormals and the overflow edge."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-40, 50, (n,), generator=g).float())
    ties = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8, 1 + 3 * 2**-8, 2**-24, 3 * 2**-25, 2**-25])
    edge = torch.tensor([65504.0, 65519.99, 65520.0, 65536.0, 3e38, 1e-40, 0.0, -0.0, float("inf"), -float("inf")])
    return torch.cat([x, ties, -ties, edge])


def _prmt(x: int, y: int, s: int) -> int:
    """PTX prmt.b32 (default mode), from its definition: result byte n is byte s[4n+2:4n] of y:x."""
    src = x.to_bytes(4, "little") + y.to_bytes(4, "little")
    return int.from_bytes(bytes(src[(s >> (4 * n)) & 7] for n in range(4)), "little")


def test_byte_permutes_the_kernels_use(C):
    """The host's PRMT (the GEMV's W8 codes, 0x7540 | i; its x pairs, 0x5410 / 0x7632) against the
    instruction's definition, on random words, and what the kernels build from it: fp32 2^23 + byte i,
    and the 16-bit pairs (x_i, x_{i+4}) that x_pair's own formula gives."""
    g = random.Random(5)
    words = [g.getrandbits(32) for _ in range(300)] + [0, 0xFFFFFFFF, 0x80808080, 0x7F7F7F7F]
    for x, y in zip(words, reversed(words)):
        for sel in (0x7540, 0x7541, 0x7542, 0x7543, 0x5410, 0x7632, 0x3210, 0x7654, 0x0123):
            assert C.host_byte_perm(x, y, sel) == _prmt(x, y, sel), (hex(x), hex(y), hex(sel))
        for i in range(4):
            assert C.host_w8_biased(x, i) == 2.0**23 + ((x >> (8 * i)) & 0xFF)
        for odd in (0, 1):
            assert C.host_x_pair(x, y, odd) == _prmt(x, y, 0x7632 if odd else 0x5410)


def test_fp16_rounding_matches_torch(C):
    x = _wide_floats()
    assert [C.host_f16_bits(v) for v in x.tolist()] == _bits16(x.to(torch.float16))
    every = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    back = torch.tensor([C.host_f16_value(b) for b in range(65536)])
    assert torch.equal(back.isnan(), every.isnan())
    assert torch.equal(back[~back.isnan()], every[~every.isnan()])


def test_bf16_rounding_matches_torch(C):
    x = _wide_floats(seed=1)
    assert [C.host_bf16_bits(v) for v in x.tolist()] == _bits16(x.to(torch.bfloat16))
    assert C.host_bf16_bits(float("nan")) & 0x7FC0 == 0x7FC0, "NaN stays a quiet NaN"


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_cast_rounds_up(C, dtype):
    """``cast_up`` is reference.to_scale_dtype: nearest, or the next value above when that was below."""
    s = _wide_floats(seed=2).abs()
    s = s[torch.isfinite(s) & (s > 0)]
    want = ref.to_scale_dtype(s, dtype).float()
    got = torch.tensor([C.host_cast_up(v, CODES[dtype]) for v in s.tolist()])
    assert torch.equal(got, want)
    if dtype != torch.float32:
        assert (got > s.to(dtype).float()).any(), "some scales must have been rounded up"


# --------------------------------------------------------------------------- scale rule
def _edge_weights(dtype) -> torch.Tensor:
    """(8, 256): random groups, all-zero, constant, one-sign groups and a ±7.5 tie row."""
    w = randn(8, 256, seed=3) * 3
    w[0] = 0  # zero-range groups: tiny scale
    w[1, :32] = 0
    w[2, 32:64] = 3  # constant positive
    w[3, 64:96] = -1.5  # constant negative
    w[4] = w[4].abs() + 0.1  # all positive: lo clamps to 0
    w[5] = -w[5].abs()  # all non-positive
    halves = torch.tensor([-7.5, 7.5, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, -0.5, -1.5, -2.5, -3.5, -4.5, -5.5, -6.5])
    w[6] = halves.repeat(16)  # range 15 → s = 1 at 4 bits, z = round(7.5) = 8 (ties to even)
    return w.to(dtype)


def _assert_qparams(C, w, bits, gs, sym):
    s, z = ref.qparams(w, bits, gs, sym)
    n, k = w.shape
    wg = w.float().reshape(n, s.shape[1], -1)
    lo, hi = wg.amin(-1).tolist(), wg.amax(-1).tolist()
    for i in range(n):
        for j in range(s.shape[1]):
            got = C.host_group_qparams(lo[i][j], hi[i][j], bits, sym, CODES[w.dtype])
            assert got == (s[i, j].item(), z[i, j].item()), f"group ({i}, {j}) of {w.dtype} bits={bits} sym={sym}"


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_qparams_match_reference(C, dtype, bits, sym):
    w = _edge_weights(dtype)
    for gs in (32, -1):
        _assert_qparams(C, w, bits, gs, sym)


@pytest.mark.parametrize("mag", [1e-30, 1e30])
def test_group_qparams_tiny_and_huge_fp32(C, mag):
    w = randn(4, 128, seed=4) * mag
    for bits, sym in ((4, False), (8, True)):
        _assert_qparams(C, w, bits, 32, sym)


def test_zero_range_group_gets_tiny_scale(C):
    for dtype in DTYPES:
        s, z = C.host_group_qparams(0.0, 0.0, 4, False, CODES[dtype])
        assert s == torch.finfo(dtype).tiny and z == 0
        assert C.host_fake_quant_one(0.0, s, z, 4) == 0.0


# --------------------------------------------------------------------------- element math
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_codes_fake_quant_and_mask_match_reference(C, dtype, bits):
    w = _edge_weights(dtype)
    s, z = ref.qparams(w, bits, 32, False)
    s = (s.float() * 0.7).to(dtype)  # a shrunk grid: both STE branches, clipping at 0 and qmax
    q = ref.quantize_codes(w, s, z, bits)
    fq = ref.fake_quant(w, s, z, bits, torch.float32)
    mask = ref.fake_quant_mask(w, s, z, bits)
    assert not mask.all() and mask.any()
    sk = s.float().repeat_interleave(32, 1).tolist()
    zk = z.float().repeat_interleave(32, 1).tolist()
    wl = w.float().tolist()
    for i in range(w.shape[0]):
        got_q = [C.host_quantize_one(a, b, c, bits) for a, b, c in zip(wl[i], sk[i], zk[i])]
        got_fq = [C.host_fake_quant_one(a, b, c, bits) for a, b, c in zip(wl[i], sk[i], zk[i])]
        got_m = [C.host_ste_pass(a, b, c, bits) for a, b, c in zip(wl[i], sk[i], zk[i])]
        assert got_q == q[i].tolist() and got_fq == fq[i].tolist() and got_m == mask[i].tolist(), f"row {i}"
        got_dq = [C.host_dequantize_one(c, b, zz) for c, b, zz in zip(got_q, sk[i], zk[i])]
        assert got_dq == fq[i].tolist(), f"dequantize row {i}"


@pytest.mark.parametrize("bits", [4, 8])
def test_lsq_term_matches_reference(C, bits):
    """Per-element ∂ŵ/∂s: grad = eye puts each element's factor alone in its row's group sum."""
    w = torch.cat([randn(1, 24, seed=5) * 4, torch.tensor([[0.5, 1.5, -2.5, 7.5, -7.5, 0.0, 9.0, -9.0]])], 1)
    s, z = ref.qparams(w, bits, -1, False)
    s = s * 0.6
    g = w.shape[1]
    rows = w.expand(g, g).contiguous()
    _, ds = ref.fake_quant_backward(torch.eye(g), rows, s.expand(g, 1).contiguous(), z.expand(g, 1).contiguous(),
                                    bits, True)
    got = [C.host_lsq_term(v, s.item(), float(z.item()), bits) for v in w[0].tolist()]
    assert got == ds[:, 0].tolist()


def _near_tie_cases(n_scales: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, s) fp32 pairs whose quotients w / s sit on and a few ulps around every half-integer in
    [-260, 260], over log-uniform scales in [2^-100, 2^100] of both signs; plus random, tiny (down to
    subnormal w) and huge quotients, and w·(1/s) past the fp32 range."""
    g = torch.Generator().manual_seed(seed)
    s = torch.exp2(torch.empty(n_scales).uniform_(-100, 100, generator=g)).float()
    s = torch.cat([s, torch.tensor([2.0**-100, 2.0**100, 1.0, 1 / 3, 0.1, 2.0**-100 * 1.75])])
    s = torch.where(torch.rand(len(s), generator=g) < 0.2, -s, s)
    half = torch.arange(-260, 261, dtype=torch.float32) + 0.5
    w_tie = (half[None, :].double() * s[:, None].double()).float()  # the nearest w to each tie
    ws = [w_tie]
    inf = torch.tensor(float("inf"))
    up, down = w_tie, w_tie
    for _ in range(3):  # 1, 2 and 3 ulps of w either side
        up, down = torch.nextafter(up, inf), torch.nextafter(down, -inf)
        ws += [up, down]
    x = torch.empty(len(s), 2000).uniform_(-300, 300, generator=g)
    ws.append((x.double() * s[:, None].double()).float())
    tiny = torch.exp2(torch.empty(len(s), 200).uniform_(-60, -1, generator=g))
    ws.append((tiny.double() * s[:, None].double()).float())  # |w / s| in [2^-60, 1/2]; w may be subnormal
    huge = torch.exp2(torch.empty(len(s), 200).uniform_(8, 200, generator=g))
    ws.append((huge.double() * s[:, None].double()).clamp(-3e38, 3e38).float())
    ws.append(torch.tensor([3e38, -3e38, 1e-45, -1e-45, 0.0])[None, :].expand(len(s), 5))
    w = torch.cat(ws, dim=1)
    return w.reshape(-1).contiguous(), s[:, None].expand_as(w).reshape(-1).contiguous()


@pytest.mark.parametrize("bits", [4, 8])
def test_fake_quant_by_reciprocal_equals_true_division(C, bits):
    """The kernels' per-group reciprocal (quotient = w·(1/s) + one FMA correction) gives the same ŵ,
    straight-through mask and code (quantize.cu) as IEEE w / s (torch, the reference's formula) on
    about 9 million elements with near-tie, tiny, huge and overflowing quotients, for every scale it
    is used for (|s| from 2^-100 to 2^100; ŵ, whose last step is one FMA, for positive ones), and is
    not used outside that range."""
    w, s = _near_tie_cases(1500, seed=bits)
    z = torch.randint(0, 2**bits, w.shape, generator=torch.Generator().manual_seed(1)).float()
    out, mask = torch.empty_like(w), torch.empty(w.shape, dtype=torch.uint8)
    codes = torch.empty(w.shape, dtype=torch.uint8)
    C.host_fake_quant_recip(w.data_ptr(), s.data_ptr(), z.data_ptr(), w.numel(), bits, out.data_ptr(), mask.data_ptr(),
                            codes.data_ptr())
    assert mask.ne(2).all(), "every scale here takes the reciprocal path"
    u = torch.round(w / s) + z
    want = (u.clamp(0, 2**bits - 1) - z) * s
    pos = s > 0
    assert pos.any() and (~pos).any()
    assert torch.equal(out[pos].view(torch.int32), want[pos].view(torch.int32)), "ŵ differs from true division"
    assert out[~pos].isnan().all(), "ŵ of a negative scale keeps the true division"
    assert torch.equal(mask.bool(), (u >= 0) & (u <= 2**bits - 1)), "mask differs from true division"
    assert torch.equal(codes, u.clamp(0, 2**bits - 1).to(torch.uint8)), "codes differ from true division"
    outside = torch.tensor([2.0**-101, 2.0**101, 1e-40, -2.0**-101], dtype=torch.float32)
    one = torch.ones(4)
    C.host_fake_quant_recip(one.data_ptr(), outside.data_ptr(), one.data_ptr(), 4, bits, out.data_ptr(),
                            mask.data_ptr())
    assert mask[:4].eq(2).all(), "scales past 2^±100 keep the true division"


@pytest.mark.parametrize("n,ng,chunks", [(7, 1, 16), (3, 344, 16), (5, 3, 1), (2, 96, 4), (3, 1, 300), (1, 7, 64),
                                          (33, 2, 32)])
def test_team_kernels_map_every_thread_to_its_group_row(C, n, ng, chunks):
    """The team kernels' thread map (quantize, dequantize, fake_quant; shifts and a multiply, no
    division): each of the n · ng group rows gets exactly one team of `team` lanes 0..team-1, with
    weight row and group r // ng and r % ng; threads past the last row are invalid. Sub-warp teams
    (several per block) and whole-block teams (chunks past 32), odd and Llama group counts."""
    first = C.host_team_of(n, ng, chunks, 0, 0)
    team, block, grid = first[5:]
    assert team >= min(chunks, 256) and team & (team - 1) == 0 and (block == team if team > 32 else block == 256)
    seen = {}
    for b in range(grid):
        for t in range(block):
            r, wn, grp, lane, valid = C.host_team_of(n, ng, chunks, b, t)[:5]
            want_r = b * (block // team) + t // team
            assert valid == (want_r < n * ng) and lane == t % team
            if valid:
                assert (r, wn, grp) == (want_r, want_r // ng, want_r % ng)
                seen.setdefault(r, []).append(lane)
    assert sorted(seen) == list(range(n * ng)) and all(sorted(v) == list(range(team)) for v in seen.values())


def test_team_map_at_the_largest_grids(C):
    """Near 2^31 group rows: the last thread of the last block still finds its row (int64 before the
    check, int32 after), and the first thread past the end is invalid."""
    for n, ng, chunks in ((2**31 // 64 - 1, 64, 16), (2**31 - 1, 1, 1), (2**30, 1, 300)):
        _, _, _, _, _, team, block, grid = C.host_team_of(n, ng, chunks, 0, 0)
        rows = n * ng
        last = rows - 1
        b, t = last // (block // team), (last % (block // team)) * team + team - 1
        r, wn, grp, lane, valid = C.host_team_of(n, ng, chunks, b, t)[:5]
        assert valid and (r, wn, grp, lane) == (last, last // ng, last % ng, team - 1)
        if t + 1 < block:
            assert not C.host_team_of(n, ng, chunks, b, (t + 1) // team * team)[4]
        assert grid == b + 1


def test_division_by_a_group_size_without_a_divide(C):
    """The GEMV's group index: n / d by multiply and shift, exact for every 0 <= n < 2^31 (the
    extremes, multiples of d and their neighbours, random n) and any d: powers of two, odd and
    Llama sizes, 1, 2^31 - 1."""
    rng = random.Random(0)
    top = 2**31 - 1
    for d in (1, 2, 3, 7, 32, 64, 96, 128, 160, 256, 320, 4096, 11008, 14336, 28672, 65535, 2**20 + 1, top):
        ns = {0, 1, d - 1, d, d + 1, top, top - 1, top - top % d, top - top % d - 1}
        ns |= {rng.randrange(top + 1) for _ in range(300)} | {rng.randrange(top // d + 1) * d + e for e in (-1, 0, 1)
                                                             for _ in range(20)}
        for n in sorted(v for v in ns if 0 <= v <= top):
            assert C.host_div_by(n, d) == n // d, (n, d)
    for n, d in ((1, 0), (-1, 3), (1, 2**31)):
        with pytest.raises(ValueError, match="host_div_by"):
            C.host_div_by(n, d)


# --------------------------------------------------------------------------- element-wise launches, emulated
# csrc/team_emulate.cpp runs the launches of quantize, dequantize and fake_quant (forward, backward) on
# the host, thread by thread, through the kernels' own plans and thread functions (csrc/elementwise.cuh):
# the launcher's chunk width and team shape, the thread map, the chunk loops (chunk_pairs), the
# addresses, the loads and stores of each dtype, and the team sums (quantize's range, the LSQ ∂s) in
# the device's order. The wrappers below pass the arguments as qdpo/kernels/cuda.py does, from CPU tensors.
def _host_quantize(C, w, bits, mode, gs=-1, sym=False, scales=None, zeros=None):
    n, k = w.shape
    qweight = None if mode == C.QPARAMS else torch.full((n, k * bits // 8), 0xAB, dtype=torch.uint8)
    if scales is None:
        ng = 1 if gs == -1 else k // gs
        scales, zeros = torch.full((n, ng), float("nan"), dtype=w.dtype), torch.full((n, ng), 0xCD, dtype=torch.uint8)
    C.host_quantize(mode, w.data_ptr(), CODES[w.dtype], w.stride(0), n, k, scales.shape[1], bits, sym,
                    0 if qweight is None else qweight.data_ptr(), scales.data_ptr(), CODES[scales.dtype],
                    zeros.data_ptr())
    return qweight, scales, zeros


def _host_dequantize(C, q, s, z, bits, dtype, max_vec=16):
    n, k = q.shape[0], q.shape[1] * 8 // bits
    out = torch.full((n, k), float("nan"), dtype=dtype)  # a thread that skips its chunk leaves NaN
    s, z = s.contiguous(), z.contiguous()
    C.host_dequantize(q.data_ptr(), q.stride(0), n, k, s.shape[1], bits, s.data_ptr(), CODES[s.dtype], z.data_ptr(),
                      out.data_ptr(), CODES[dtype], max_vec)
    return out


def _host_fake_quant(C, w, s, z, bits, dtype, max_vec=16):
    out = torch.full(w.shape, float("nan"), dtype=dtype)
    s, z = s.contiguous(), z.contiguous()
    C.host_fake_quant(w.data_ptr(), CODES[w.dtype], w.stride(0), *w.shape, s.shape[1], bits, s.data_ptr(),
                      CODES[s.dtype], z.data_ptr(), out.data_ptr(), CODES[dtype], max_vec)
    return out


def _host_fake_quant_backward(C, grad, w, s, z, bits, lsq, max_vec=16):
    grad_w = torch.full(w.shape, float("nan"), dtype=w.dtype)
    s, z = s.contiguous(), z.contiguous()
    grad_s = torch.full(s.shape, float("nan"), dtype=s.dtype) if lsq else None
    C.host_fake_quant_backward(grad.data_ptr(), CODES[grad.dtype], w.data_ptr(), CODES[w.dtype], w.stride(0),
                               *w.shape, s.shape[1], bits, s.data_ptr(), CODES[s.dtype], z.data_ptr(),
                               grad_w.data_ptr(), 0 if grad_s is None else grad_s.data_ptr(), max_vec)
    return grad_w, grad_s


def _cols(t: torch.Tensor, k: int) -> torch.Tensor:
    """The first k columns of t: rows one element longer than k, so 8-element chunks need not be aligned."""
    return t[:, :k]


# (n, K, NG) of the team shapes: one lane (G = 8 or 16), sub-warp teams, a block-wide team (K = 2048,
# one group), teams at the 256-thread cap whose lanes loop with and without a partner chunk (K = 8192,
# 4104; with fake_quant's 16-element chunks K = 16400), several group rows per block; and narrow
# chunks (G % 8 != 0).
TEAM_CASES = [(5, 40, 5), (3, 64, 4), (7, 96, 3), (9, 320, 1), (3, 2048, 1), (2, 8192, 1), (2, 4104, 1), (33, 256, 2),
              (6, 60, 6), (4, 100, 1), (2, 16400, 1)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n,k,ng", TEAM_CASES)
def test_quantize_launches_emulated_match_reference(C, bits, n, k, ng):
    """Every mode bit for bit — scales and zeros from the team's range (asymmetric and symmetric), codes
    with them, codes on a given grid of another dtype — for each weight dtype, on contiguous rows and on
    rows whose chunks are not 16-byte aligned (narrow chunks)."""
    if bits == 4 and (k // ng) % 2:
        pytest.skip("4-bit codes pair up within a group")
    gs = k // ng if ng > 1 else -1
    for i, dtype in enumerate(DTYPES):
        wide = randn(n, k + 1, dtype, seed=i) * torch.linspace(0.01, 3.0, n)[:, None].to(dtype)
        for w, sym in ((wide[:, :k].contiguous(), False), (_cols(wide, k), True)):
            rq, rs, rz = ref.quantize(w, bits, gs, sym)
            _, s, z = _host_quantize(C, w, bits, C.QPARAMS, gs, sym)
            assert_exact(s, rs, "scales"), assert_exact(z, rz, "zeros")
            q, s, z = _host_quantize(C, w, bits, C.QUANTIZE, gs, sym)
            assert_exact(q, rq, "qweight"), assert_exact(s, rs, "scales (with codes)"), assert_exact(z, rz, "zeros")
            s2 = (rs.float() * 0.8).to(DTYPES[i - 1])  # a frozen grid in another dtype: some codes clip
            q, _, _ = _host_quantize(C, w, bits, C.QUANTIZE_WITH, scales=s2, zeros=rz)
            assert_exact(q, ref.quantize(w, bits, gs, sym, s2, rz)[0], "qweight on a given grid")


@pytest.mark.parametrize("max_vec", [16, 8])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n,k,ng", TEAM_CASES)
def test_dequantize_launch_emulated_matches_reference(C, bits, n, k, ng, max_vec):
    """Every output dtype from scales of each dtype, bit for bit, in chunks of up to 16 codes and of up
    to 8 (max_vec); and 1-byte aligned code rows (narrow chunks)."""
    from tests.conftest import misaligned
    from tests.test_dequantize import _random_packed

    if bits == 4 and (k // ng) % 2:
        pytest.skip("4-bit codes pair up within a group")
    for i, (sdtype, dtype) in enumerate(zip(DTYPES, DTYPES[1:] + DTYPES[:1])):
        q, s, z = _random_packed(n, k, bits, ng, sdtype, seed=i)
        want = ref.dequantize(q, s, z, bits, dtype)
        assert_exact(_host_dequantize(C, q, s, z, bits, dtype, max_vec), want, f"ŵ {dtype} from {sdtype} scales")
        assert_exact(_host_dequantize(C, misaligned(q), s, z, bits, dtype, max_vec), want, "ŵ from misaligned codes")


def test_dequantize_w4_words_in_place_at_the_edge_scales(C):
    """W4 words dequantized in place (codes masked where they lie, scales s · 16^-j) wherever that is
    exact, the shifted route elsewhere: bit for bit at and around |s| = 2^-114, where s · 2^-12 stops
    being a normal number, at fp32's smallest normal and subnormal scales, 0, and large ones."""
    from tests.test_dequantize import _random_packed

    edge = [2.0**-114, -(2.0**-114), 2.0**-114 * (1 + 2**-23), 2.0**-114 * (1 - 2**-24), 2.0**-115 * 1.5,
            2.0**-126, 2.0**-126 * 1.25, 1e-40, 2.0**-149, 0.0, -0.0, 3e30, 1.0, 0.37]
    q, _, z = _random_packed(len(edge), 64, 4, 2, torch.float32, seed=3)
    s = torch.tensor(edge).repeat_interleave(2).view(len(edge), 2)
    s[:, 1] *= 1.0 + 2**-20  # another mantissa in each row's second group
    for dtype in DTYPES:
        for max_vec in (16, 8):
            assert_exact(_host_dequantize(C, q, s, z, 4, dtype, max_vec), ref.dequantize(q, s, z, 4, dtype),
                         f"ŵ {dtype}, max_vec={max_vec}")


@pytest.mark.parametrize("max_vec", [16, 8])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n,k,ng", TEAM_CASES)
def test_fake_quant_launches_emulated_match_reference(C, bits, n, k, ng, max_vec):
    """Forward ŵ and backward ∂w bit for bit, ∂s within the sum bound: each weight dtype into each
    output dtype and with gradients of each dtype, rows whose chunks are not 16-byte aligned, and
    scales past 2^±100 (the true division instead of the group's reciprocal); with the 16-element
    chunks of 16-bit operands (max_vec 16: w in the forward, w and grad both in the backward) and
    without (8)."""
    from tests.test_fake_quant import _assert_sum_close, _grid

    if bits == 4 and (k // ng) % 2:
        pytest.skip("4-bit codes pair up within a group")
    for i, (wdtype, dtype) in enumerate(zip(DTYPES, DTYPES[2:] + DTYPES[:2])):
        wide = randn(n, k + 1, wdtype, seed=i)
        cases = [wide[:, :k].contiguous(), _cols(wide, k)]
        if wdtype == torch.float32:
            cases.append(cases[0] * 2.0**-110)
        for w in cases:
            s, z = _grid(w, bits, k // ng if ng > 1 else -1, False)
            want = ref.fake_quant(w, s, z, bits, dtype)
            assert_exact(_host_fake_quant(C, w, s, z, bits, dtype, max_vec), want, "ŵ")
            # negative scales (the division: a zero ŵ is then -0, as (q - z) · s gives it)
            assert_exact(_host_fake_quant(C, w, -s, z, bits, dtype, max_vec), ref.fake_quant(w, -s, z, bits, dtype),
                         "ŵ, negative scales")
            for gdtype in (dtype, wdtype):  # fp16 + fp16, bf16 + fp16, bf16 + bf16: 16-element chunks
                grad = randn(n, k, gdtype, seed=i + 7)
                rw, rs = ref.fake_quant_backward(grad, w, s, z, bits, True)
                assert_exact(_host_fake_quant_backward(C, grad, w, s, z, bits, False, max_vec)[0], rw, "grad_w")
                gw, gs = _host_fake_quant_backward(C, grad, w, s, z, bits, True, max_vec)
                assert_exact(gw, rw, "grad_w (LSQ)")
                _assert_sum_close(gs, rs, grad, bits)


def test_lsq_team_sum_follows_the_device_order(C):
    """∂s of one group whose terms cancel: the emulated team sum is the shuffle tree's fp32 result
    (lane pairs at distance 16, 8, ..., 1 within a warp, then warps in order), not a lane-by-lane sum's."""
    k = 256 * 8 * 2  # one group: a block-wide team of 256 lanes, two 8-element chunks each
    w = torch.full((1, k), 0.25)  # round(w / s) - w / s = -0.25 everywhere (inside the grid)
    s, z = torch.ones(1, 1), torch.full((1, 1), 8, dtype=torch.uint8)
    grad = torch.zeros(1, k)
    lane_of = (torch.arange(k) // 8) % 256  # chunk c belongs to lane c % team
    grad[0, lane_of == 0] = 2.0**24
    grad[0, (lane_of == 1) | (lane_of == 3)] = 1.0
    grad[0, lane_of == 255] = -(2.0**24)
    _, gs = _host_fake_quant_backward(C, grad, w, s, z, 4, True)
    # Lanes 0, 1, 3 and 255 hold -2^26, -4, -4 and 2^26 (16 exact terms each). The tree adds lanes 1
    # and 3 (distance 2) before their sum meets lane 0's: -2^26 - 8 is an fp32 value (an ulp there is
    # 8), and warp 7's 2^26 leaves -8. Lane by lane, each -4 would tie back to -2^26: 0.
    assert gs.item() == -8.0


def test_emulated_launches_check_their_arguments(C):
    """The emulations go through the launchers' plans: the same checks, before any thread runs."""
    buf = torch.zeros(4096, dtype=torch.uint8)
    p = buf.data_ptr()
    with pytest.raises(ValueError, match="unknown mode"):
        C.host_quantize(7, p, 0, 256, 4, 256, 8, 4, False, p, p, 0, p)
    with pytest.raises(ValueError, match="bits not in"):
        C.host_dequantize(p, 128, 4, 256, 8, 5, p, 0, p, p, 0)
    with pytest.raises(ValueError, match="unknown mode"):  # max_vec neither 16 nor 8
        C.host_dequantize(p, 128, 4, 256, 8, 4, p, 0, p, p, 0, 32)
    with pytest.raises(ValueError, match="unsupported dtype"):
        C.host_fake_quant(p, 0, 256, 4, 256, 8, 4, p, 0, p, p, 9)
    with pytest.raises(ValueError, match="null pointer"):
        C.host_fake_quant_backward(0, 0, p, 0, 256, 4, 256, 8, 4, p, 0, p, p, 0)
    with pytest.raises(ValueError, match="unknown mode"):  # max_vec neither 16 nor 8
        C.host_fake_quant(p, 1, 256, 4, 256, 8, 4, p, 0, p, p, 1, 4)


# --------------------------------------------------------------------------- GEMV and GEMM data flow
def _check_emulated(emulate, bits, xdtype, m, rows, k, gs, exact_w=False):
    """``emulate`` (a host emulation of a tensor-core kernel's data flow) equals x @ ŵᵀ with ŵ rounded
    to x.dtype (fp64 sums; only their order differs) — or, ``exact_w``, with ŵ = (q - z) · s exact —
    and a zero weight row gives exactly 0."""
    w = randn(rows, k, xdtype, seed=m + k)
    w[rows // 2] = 0  # a zero row: ŵ = 0 exactly, so y = 0 exactly
    qw, s, z = ref.quantize(w, bits, gs, symmetric=bits == 8)
    x = randn(m, k, xdtype, seed=rows)
    y = torch.full((m, rows), float("nan"))
    sf, xb = s.float().contiguous(), x.view(torch.int16).contiguous()
    emulate(qw.data_ptr(), qw.stride(0), rows, k, s.shape[1], bits, sf.data_ptr(), z.data_ptr(), xb.data_ptr(), m,
            CODES[x.dtype], y.data_ptr())
    w_hat = ref.dequantize(qw, s.double(), z, bits, torch.float64) if exact_w else ref.dequantize(qw, s, z, bits,
                                                                                                 xdtype)
    want = x.double() @ w_hat.double().t()
    torch.testing.assert_close(y.double(), want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
    assert y[:, rows // 2].eq(0).all()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,rows,k,gs", [(1, 16, 128, 32), (3, 7, 256, 64), (8, 16, 320, -1), (9, 16, 512, 128),
                                         (16, 13, 256, 256), (5, 16, 96, 32)])
def test_gemv_fragment_flow_matches_reference(C, bits, xdtype, m, rows, k, gs):
    """One emulated 16-row tile of the decode GEMV."""
    _check_emulated(C.host_gemv_mma_emulate, bits, xdtype, m, rows, k, gs)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,rows,k,gs,splits", [(1, 16, 128, 32, 1), (2, 7, 384, 128, 1), (1, 16, 320, -1, 1),
                                                (2, 13, 1088, 64, 1), (2, 9, 1088, 64, 3), (1, 16, 1280, 128, 4)])
def test_gemv_x_smem_flow_matches_reference(C, bits, xdtype, m, rows, k, gs, splits):
    """The same tile with x through the x_smem variant's shared-memory layout: pairs written at
    xs_offset, read at xs_lane_offset + 16·chunk (a hole or an overlap would show), zeros past K (K =
    320, 1088 end inside a step), lanes past M reading row M - 1; split-K ranges refill it (1088 in
    3 ranges of 3, 3 and 3 steps of which the last ends inside K's last step)."""
    emulate = functools.partial(C.host_gemv_mma_emulate, x_smem=True, splits=splits)
    _check_emulated(emulate, bits, xdtype, m, rows, k, gs)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,rows,k,gs,x_smem", [(1, 16, 384, 128, False), (3, 7, 512, 256, False),
                                                (16, 13, 320, -1, False), (9, 16, 640, -1, False),
                                                (2, 16, 1056, -1, True), (1, 11, 768, 128, True)])
def test_gemv_scale_after_flow_matches_exact_products(C, bits, xdtype, m, rows, k, gs, x_smem):
    """The scale-after variant: the mma sums q - z, each step's sums times the row's scale. Its y is
    x @ ((q - z) · s)ᵀ with ŵ never rounded to x.dtype (the x.dtype-rounded ŵ is about 2⁻⁹ off and
    fails this tolerance); K = 320, 1056 end inside a step, whose lanes past K take the step's scale."""
    emulate = functools.partial(C.host_gemv_mma_emulate, x_smem=x_smem, scale_after=True)
    _check_emulated(emulate, bits, xdtype, m, rows, k, gs, exact_w=True)


@pytest.mark.parametrize("xdtype", [torch.bfloat16])
@pytest.mark.parametrize("m,rows,k,gs,splits,place", [
    (1, 16, 384, 128, 1, "x_smem"), (2, 13, 1056, -1, 1, "x_smem"), (2, 16, 512, 256, 1, "x_smem"),
    (1, 9, 320, -1, 1, "x_smem"), (2, 13, 1056, -1, 4, "x_smem"), (1, 16, 1280, 128, 3, "x_smem"),
    (1, 16, 384, 128, 1, "registers"), (3, 7, 1056, -1, 1, "registers"), (16, 16, 512, 256, 2, "registers"),
    (9, 13, 640, 128, 1, "registers"), (1, 16, 640, 128, 1, "shared_x"), (3, 13, 1056, -1, 1, "shared_x"),
    (9, 16, 2048, 256, 3, "shared_x"), (16, 11, 2560, 128, 4, "shared_x")])
def test_gemv_zero_after_flow_matches_exact_products(C, xdtype, m, rows, k, gs, splits, place):
    """The zero-after variant (W4, bf16 x, scale after): the mma sums (bias + q)·x, and a second mma per
    k-tile adds the zero fragment -(bias + z) times the same x, before the scale. Its y is x @ ((q - z) ·
    s)ᵀ exactly, up to the fp32 rounding of the two cancelling sums (a wrong fragment slot, sign or zero
    point shows far above it); K = 1056 and 320 end inside a step, whose codes past K meet x = 0; with x
    in registers, in shared memory (x_smem, M <= 2) and shared by row warps (shared_x, any M)."""
    kw = {} if place == "registers" else {place: True}
    emulate = functools.partial(C.host_gemv_mma_emulate, scale_after=True, zero_after=True, splits=splits, **kw)
    _check_emulated(emulate, 4, xdtype, m, rows, k, gs, exact_w=True)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,rows,k,gs,splits,scale_after", [
    (1, 16, 128, 32, 1, False), (3, 7, 1088, 64, 1, False), (9, 16, 2048, 128, 3, False), (8, 16, 320, -1, 1, False),
    (16, 13, 1056, -1, 2, True), (16, 16, 640, 128, 1, True), (5, 11, 2560, 256, 4, True)])
def test_gemv_shared_x_flow_matches_reference(C, bits, xdtype, m, rows, k, gs, splits, scale_after):
    """One warp's 16 rows in the shared_x kernel: x of all m rows staged 4 steps (512 codes) at a time,
    piece by piece as the block's threads copy, pairs at xs_offset, rows kSxRowBytes apart, read at
    xs_lane_offset + 16·chunk for x tile 0 and 1 (rows g and g + 8, or M - 1 past M); zeros past K (1088,
    320, 1056 end inside a step); chunks restart at each K range (2048 in 3 ranges of 6, 6 and 4 steps:
    chunks of 4 and 2; 2560 in 4 ranges of 5); with the scale in ŵ and after the mma."""
    emulate = functools.partial(C.host_gemv_mma_emulate, shared_x=True, scale_after=scale_after, splits=splits)
    _check_emulated(emulate, bits, xdtype, m, rows, k, gs, exact_w=scale_after)


def test_gemv_emulation_checks_its_arguments(C):
    buf = torch.zeros(64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="bad shape"):
        C.host_gemv_mma_emulate(buf.data_ptr(), 48, 16, 96, 2, 4, 0, 0, 0, 1, 1, 0)  # G = 48
    with pytest.raises(ValueError, match="unsupported dtype"):
        C.host_gemv_mma_emulate(buf.data_ptr(), 64, 16, 128, 1, 4, 0, 0, 0, 1, 0, 0)  # fp32 x
    with pytest.raises(ValueError, match="bad shape"):
        C.host_gemv_mma_emulate(buf.data_ptr(), 64, 16, 128, 1, 4, 0, 0, 0, 3, 1, 0, x_smem=True)  # M > 2
    with pytest.raises(ValueError, match="bad shape"):
        C.host_gemv_mma_emulate(buf.data_ptr(), 64, 16, 128, 2, 4, 0, 0, 0, 1, 1, 0, scale_after=True)  # G = 64
    for kw in ({"x_smem": True}, {}, {"shared_x": True}, {"scale_after": True, "bits": 8},
               {"scale_after": True, "x_dtype": CODES[torch.float16]}, {"shared_x": True, "scale_after": True, "bits": 8}):
        bits, x_dtype = kw.pop("bits", 4), kw.pop("x_dtype", CODES[torch.bfloat16])
        args = [buf.data_ptr(), 64, 16, 128, 1, bits, 0, 0, 0, 1, x_dtype, 0]
        with pytest.raises(ValueError, match="bad shape"):
            C.host_gemv_mma_emulate(*args, zero_after=True, **kw)  # needs W4, bf16 x and scale_after
    args = [buf.data_ptr(), 64, 16, 128, 1, 4, 0, 0, 0, 1, CODES[torch.bfloat16], 0]
    with pytest.raises(ValueError, match="bad shape"):
        C.host_gemv_mma_emulate(*args, shared_x=True, x_smem=True)  # one place for x at a time


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("xdtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,gs", [(1, 16, 64, 32), (37, 100, 192, 64), (128, 128, 256, 128), (65, 128, 128, -1),
                                      (128, 7, 320, 32), (16, 121, 128, 64)])
def test_gemm_block_flow_matches_reference(C, bits, xdtype, m, n, k, gs):
    """One emulated block of the prefill GEMM: copies, swizzle, dequantization into shared memory,
    ldmatrix fragments and output map; rows past M and N are in the tile but not in y."""
    _check_emulated(C.host_gemm_mma_emulate, bits, xdtype, m, n, k, gs)


def test_gemm_emulation_and_support_check_their_arguments(C):
    buf = torch.zeros(64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="bad shape"):
        C.host_gemm_mma_emulate(buf.data_ptr(), 48, 16, 96, 1, 4, 0, 0, 0, 1, 1, 0)  # K % 64 != 0
    with pytest.raises(ValueError, match="bad shape"):
        C.host_gemm_mma_emulate(buf.data_ptr(), 64, 129, 128, 1, 4, 0, 0, 0, 1, 1, 0)  # more rows than a block
    with pytest.raises(ValueError, match="unsupported dtype"):
        C.host_gemm_mma_emulate(buf.data_ptr(), 64, 16, 128, 1, 4, 0, 0, 0, 1, 0, 0)  # fp32 x
    bf16, fp16, fp32 = CODES[torch.bfloat16], CODES[torch.float16], CODES[torch.float32]
    ok = dict(k=4096, ng=32, x_dtype=bf16, s_dtype=bf16, x=1 << 20, qweight=1 << 24, stride_qn=2048)
    assert C.dequant_gemm_supported(**ok)
    assert C.dequant_gemm_supported(**{**ok, "x_dtype": fp16, "s_dtype": fp16, "ng": 1})
    for bad in ({"x_dtype": fp32, "s_dtype": fp32}, {"s_dtype": fp32}, {"k": 4000, "ng": 125},  # K % 64 != 0
                {"ng": 256},  # G = 16 {"x": (1 << 20) + 8}, {"qweight": (1 << 24) + 8},
                {"stride_qn": 2056}):
        assert not C.dequant_gemm_supported(**{**ok, **bad}), bad


# --------------------------------------------------------------------------- plans
def _plan(C, m=1, n=4096, k=4096, ng=32, bits=4, xdtype=torch.bfloat16, sdtype=None, x=1 << 20, q=1 << 24,
          stride=None, sms=132, **force):
    return C.dequant_matmul_plan(m, n, k, ng, bits, CODES[xdtype], CODES[sdtype or xdtype], x, q,
                                 k * bits // 8 if stride is None else stride, sms, **force)


def test_plan_picks_the_tensor_core_path_for_16_bit_x(C):
    for xdtype in (torch.float16, torch.bfloat16):
        for bits in (4, 8):
            assert _plan(C, xdtype=xdtype, bits=bits)["kernel"] == "mma"
    assert [(_plan(C, m=m)["mt"], _plan(C, m=m)["rt"]) for m in (1, 2, 3, 8, 9, 16)] == [
        (1, 1), (1, 1), (1, 2), (1, 2), (2, 2), (2, 2)]
    assert _plan(C, k=96, ng=1)["kernel"] == "mma", "one group per row with K % 32 == 0"


def test_plan_falls_back_to_fma(C):
    assert _plan(C, xdtype=torch.float32)["kernel"] == "fma"
    assert _plan(C, sdtype=torch.float32)["kernel"] == "fma", "scales not in x.dtype (the wrapper casts them)"
    assert _plan(C, k=80, ng=1)["kernel"] == "fma", "K % 32 != 0"
    assert _plan(C, x=(1 << 20) + 2)["kernel"] == "fma", "x not 16-byte aligned"
    assert _plan(C, q=(1 << 24) + 8)["kernel"] == "fma", "qweight not 16-byte aligned"
    assert _plan(C, stride=4096 // 2 + 8)["kernel"] == "fma", "qweight rows not 16-byte aligned"


def test_experts_plan_is_the_one_row_plan_unsplit(C):
    """dequant_matmul_experts' plan: the M = 1 plan of one expert's N rows without a split (where that
    alone would split K: 64 tiles of 16 rows), its kernel "fma" where the grouped launch refuses (fp32 x,
    misaligned rows), at most 65535 pairs (the grid's third axis)."""
    def plan(pairs=2, n=1024, xdtype=torch.bfloat16, stride=2048):
        return C.dequant_matmul_experts_plan(pairs, n, 4096, 32, 4, CODES[xdtype], CODES[xdtype], 1 << 20, 1 << 24,
                                             stride, 132)
    assert _plan(C, n=128)["splits"] > 1 and plan(n=128)["splits"] == 1
    one = _plan(C, n=1024, force_splits=1)
    assert {k: v for k, v in plan().items() if k not in ("warps", "blocks_per_sm")} == {
        k: v for k, v in one.items() if k not in ("warps", "blocks_per_sm")}
    assert plan(xdtype=torch.float32)["kernel"] == "fma" and plan(stride=2056)["kernel"] == "fma"
    assert plan(pairs=65535)["kernel"] == "mma" and plan(pairs=0)["kernel"] == "mma"
    with pytest.raises(ValueError, match="shape"):
        plan(pairs=65536)
    # segments (rows sorted by expert, at most seg_rows per expert): the plan of that M, unsplit
    for seg, tile in ((2, (1, 1)), (5, (1, 2)), (12, (2, 2)), (40, (2, 2))):
        got = C.dequant_matmul_experts_plan(64, 128, 4096, 32, 4, CODES[torch.bfloat16], CODES[torch.bfloat16],
                                            1 << 20, 1 << 24, 2048, 132, seg_rows=seg)
        assert (got["mt"], got["rt"], got["splits"]) == (*tile, 1), seg
    # the segments grid: the launcher's count is the reference's (tests/test_ops.py checks it is the most
    # chunks any routing makes)
    for p, e, r in itertools.product((0, 1, 7, 16, 64, 65535), (1, 3, 128, 300), (8, 16)):
        assert C.segment_blocks(p, e, r) == ref.segment_blocks(p, e, r), (p, e, r)


def test_plan_splits_k_only_when_rows_fill_a_quarter_of_the_sms(C):
    """The rule measured on an H200 (README "GPU results"): unsplit unless tiles <= SMs / 4."""
    assert _plan(C, n=8192)["splits"] == 1 and _plan(C, n=8192)["workspace_bytes"] == 0
    assert _plan(C, m=8, n=4096, k=11008, ng=86)["splits"] == 1, "128 tiles of 32 rows on 132 SMs"
    assert _plan(C, m=1, n=1024)["splits"] == 1, "64 tiles of 16 rows"
    assert _plan(C, m=16, n=1024)["splits"] == 4, "32 tiles: about one block per SM"
    p = _plan(C, m=3, n=64, k=8192, ng=64)
    assert p["splits"] > 1 and p["workspace_bytes"] == p["splits"] * 3 * 64 * 4
    steps = 8192 // 128
    assert steps // p["splits"] >= 8, "every warp of a split keeps at least one K step"
    assert _plan(C, n=64, k=256, ng=2)["splits"] == 1, "too few K steps to split"


def test_plan_takes_a_forced_split_count(C):
    p = _plan(C, m=1, n=8192, k=4096, force_splits=3)
    assert (p["splits"], p["workspace_bytes"]) == (3, 3 * 8192 * 4)
    assert _plan(C, m=1, k=4096, force_splits=16)["splits"] == 16
    assert _plan(C, m=1, k=256, ng=2, force_splits=16)["splits"] == 2, "trimmed to the two 128-code K steps"
    assert _plan(C, m=1, k=2048, force_splits=5)["splits"] == 4, "no empty K range: 16 steps in ranges of 4"
    for bad in (17, -1):
        with pytest.raises(ValueError, match="bad shape"):
            _plan(C, force_splits=bad)


def test_plan_takes_forced_warps_for_every_tile(C):
    p = _plan(C, m=1)
    assert (p["warps"], p["blocks_per_sm"]) == (8, 0), "no GPU to ask for the occupancy: 8-warp blocks"
    assert [_plan(C, m=m, force_warps=4)["warps"] for m in (1, 2, 3, 16)] == [4, 4, 4, 4]
    assert _plan(C, m=1, force_warps=8)["warps"] == 8
    # any 1-8 (a kernel built for 8 warps runs 5-8, one for 4 runs 1-4); a block's rows stay 16 · rt
    for m, w in itertools.product((1, 2, 3, 16), range(1, 9)):
        p = _plan(C, m=m, force_warps=w)
        assert (p["warps"], p["block_rows"]) == (w, 16 * p["rt"]), (m, w, p)
    for bad in (9, 16, -1):
        with pytest.raises(ValueError, match="bad shape"):
            _plan(C, force_warps=bad)
    # shared_x: a warp owns 16 rows of its own, blocks of 4 or 8 warps only
    assert _plan(C, m=1, force_warps=4, force_shared_x=2)["block_rows"] == 64
    for bad in (3, 6):
        with pytest.raises(ValueError, match="bad shape"):
            _plan(C, force_warps=bad, force_shared_x=2)


def test_plan_puts_x_in_shared_memory_only_when_asked_and_where_it_fits(C):
    assert not _plan(C, m=1)["x_smem"], "not measured yet: x stays in registers by default"
    assert [_plan(C, m=m, force_x_smem=2)["x_smem"] for m in (1, 2, 3, 16)] == [True, True, False, False]
    assert not _plan(C, m=1, force_x_smem=1)["x_smem"]
    # M = 2, K = 16384: 2 rows of 256 steps' pairs (36 896 bytes each) pass 48 KB; two K ranges halve it
    assert not _plan(C, m=2, k=16384, ng=128, force_x_smem=2)["x_smem"]
    assert _plan(C, m=2, k=16384, ng=128, force_x_smem=2, force_splits=2)["x_smem"]
    assert _plan(C, m=1, k=16384, ng=128, force_x_smem=2)["x_smem"]
    # M = 2, K = 10240: 2 · 23 072 bytes fit 48 KB alone, not next to the 8 warps' 4 KB reduction buffer
    # (the launch would fail); 4 warps' 2 KB leave room
    assert not _plan(C, m=2, k=10240, ng=80, force_x_smem=2)["x_smem"]
    assert _plan(C, m=2, k=10240, ng=80, force_x_smem=2, force_warps=4)["x_smem"]
    # the buffer is the kernel's (built for 8 warps or for 4), not the launch's count of warps
    assert not _plan(C, m=2, k=10240, ng=80, force_x_smem=2, force_warps=5)["x_smem"]
    assert _plan(C, m=2, k=10240, ng=80, force_x_smem=2, force_warps=3)["x_smem"]
    for bad in (-1, 3):
        with pytest.raises(ValueError, match="bad shape"):
            _plan(C, force_x_smem=bad)


def test_plan_takes_the_zero_point_after_the_mma_only_with_w4_bf16_x_and_scale_after(C):
    """zero_after: off until measured; W4, bf16 x, with scale_after (a step in one group), for every
    tile and place of x (registers, x_smem, shared_x)."""
    za = {"force_scale_after": 2, "force_zero_after": 2}
    assert not _plan(C, force_scale_after=2)["zero_after"], "not measured yet: off by default"
    for m in (1, 2, 3, 9, 16):
        for place in ({}, {"force_x_smem": 2}, {"force_shared_x": 2}):
            p = _plan(C, m=m, **za, **place)
            assert p["zero_after"] and p["scale_after"], (m, place)
            assert p["x_smem"] == ("force_x_smem" in place and m <= 2) and p["shared_x"] == ("force_shared_x" in place)
    assert not _plan(C, force_zero_after=2)["zero_after"], "needs scale_after"
    assert not _plan(C, force_x_smem=2, force_zero_after=2)["zero_after"], "needs scale_after"
    assert not _plan(C, bits=8, **za)["zero_after"], "W4 only"
    assert not _plan(C, xdtype=torch.float16, **za)["zero_after"], "bf16 x only"
    assert not _plan(C, ng=64, **za)["zero_after"], "G = 64: no scale_after"
    for bad in (-1, 3):
        with pytest.raises(ValueError, match="bad shape"):
            _plan(C, force_zero_after=bad)


def test_plan_takes_the_forced_row_tiles_where_x_fits_one_tile(C):
    """row_tiles: the plan's 1 at M <= 2 and 2 up to M = 8 unless forced; 1 or 2 where x fits one tile
    (M <= 8), the other tile count refused above (M > 8 has only the 2 × 2 tile); x_smem and shared_x
    take one tile, so x_smem is refused with two and shared_x overrides them. Two tiles make blocks
    of 32 rows (half the blocks, 4 · tiles <= SMs splits K as before)."""
    for m, own in ((1, 1), (2, 1), (3, 2), (8, 2), (9, 2), (16, 2)):
        assert _plan(C, m=m)["rt"] == own
        for rt in (1, 2):
            assert _plan(C, m=m, force_row_tiles=rt)["rt"] == (rt if m <= 8 else 2), (m, rt)
    p = _plan(C, m=1, force_row_tiles=2)
    assert (p["mt"], p["rt"], p["block_rows"], p["warps"]) == (1, 2, 32, 8)
    assert _plan(C, m=1, force_row_tiles=2, force_scale_after=2, force_zero_after=2)["zero_after"]
    p = _plan(C, m=1, force_row_tiles=2, force_x_smem=2)
    assert p["rt"] == 2 and not p["x_smem"], "x_smem serves one tile"
    p = _plan(C, m=1, force_row_tiles=2, force_shared_x=2)
    assert p["rt"] == 1 and p["shared_x"]
    # 1024 rows: 32 blocks of 32 rows fill under a quarter of 132 SMs -> 4 ranges; 64 blocks of 16 do not
    assert _plan(C, m=1, n=1024, force_row_tiles=2)["splits"] == 4
    assert _plan(C, m=1, n=1024)["splits"] == 1
    for bad in (-1, 3):
        with pytest.raises(ValueError, match="bad shape"):
            _plan(C, force_row_tiles=bad)


def test_plan_shares_x_between_row_warps_only_when_asked(C):
    """shared_x: off until measured; any M; a warp owns 16 rows, so a block 16 · warps; x_smem wins where
    both are asked for (M <= 2); zero_after with it too; about two blocks per SM from splitting K,
    each range at least two chunks of 4 steps."""
    assert not _plan(C, m=16)["shared_x"], "not measured yet: off by default"
    for m in (1, 2, 3, 9, 16):
        p = _plan(C, m=m, force_shared_x=2)
        assert p["shared_x"] and (p["mt"], p["rt"], p["warps"], p["block_rows"]) == (1 if m <= 8 else 2, 1, 8, 128)
        assert not p["x_smem"]
    assert _plan(C, m=16, force_shared_x=2, force_warps=4)["block_rows"] == 64
    assert _plan(C, m=16)["block_rows"] == 32 and _plan(C, m=1)["block_rows"] == 16
    assert _plan(C, m=16, force_shared_x=2, force_scale_after=2)["scale_after"]
    p = _plan(C, m=1, force_shared_x=2, force_x_smem=2)
    assert p["x_smem"] and not p["shared_x"], "x_smem where both are asked for"
    p = _plan(C, m=3, force_shared_x=2, force_x_smem=2)
    assert p["shared_x"] and not p["x_smem"], "x_smem does not serve M = 3"
    p = _plan(C, m=2, n=32768, k=16384, ng=128, force_shared_x=2, force_x_smem=2)
    assert p["shared_x"] and not p["x_smem"], "x_smem past 48 KB: shared_x, not neither"
    assert _plan(C, m=16, force_shared_x=2, force_scale_after=2, force_zero_after=2)["zero_after"]
    # 8192 rows: 64 blocks of 128 on 132 SMs -> 4 ranges of 16 steps; 4096 rows: 32 blocks, but K = 4096
    # (32 steps) keeps ranges of at least 8 steps -> 4; 1024 rows: 8 blocks -> 16 at most, 8192 / 128 / 8
    assert _plan(C, m=16, n=8192, k=8192, ng=64, force_shared_x=2)["splits"] == 4
    assert _plan(C, m=16, n=4096, force_shared_x=2)["splits"] == 4
    assert _plan(C, m=16, n=1024, k=8192, ng=64, force_shared_x=2)["splits"] == 8
    assert _plan(C, m=16, n=16384, k=8192, ng=64, force_shared_x=2)["splits"] == 2
    assert _plan(C, m=16, n=32768, k=8192, ng=64, force_shared_x=2)["splits"] == 1
    assert _plan(C, m=16, n=64, k=512, ng=4, force_shared_x=2)["splits"] == 1, "one chunk: no split"
    assert _plan(C, m=16, n=8192, k=8192, ng=64, force_shared_x=2, force_splits=3)["splits"] == 3
    for bad in (-1, 3):
        with pytest.raises(ValueError, match="bad shape"):
            _plan(C, force_shared_x=bad)


def test_plan_scales_after_the_mma_only_when_asked_and_the_groups_allow(C):
    assert not _plan(C)["scale_after"], "not measured yet: the scale stays in ŵ by default"
    # K = 4096: G = 128 (ng 32), 256 (16), K (1) allow it; G = 64 (ng 64) and 32 (128) span a step's lanes
    assert [_plan(C, ng=ng, force_scale_after=2)["scale_after"] for ng in (32, 16, 1, 64, 128)] == [
        True, True, True, False, False]
    assert _plan(C, k=320, ng=1, force_scale_after=2)["scale_after"], "G = K, not a multiple of 128"
    assert all(_plan(C, m=m, bits=bits, force_scale_after=2)["scale_after"] for m in (1, 3, 16) for bits in (4, 8))
    assert not _plan(C, force_scale_after=1)["scale_after"]
    assert _plan(C, xdtype=torch.float32, force_scale_after=2)["kernel"] == "fma"
    for bad in (-1, 3):
        with pytest.raises(ValueError, match="bad shape"):
            _plan(C, force_scale_after=bad)


# Blocks per SM of the M <= 2 kernel (8 warps, 4 warps) in the H200 sweep's build (sm_90, nvcc 13.0,
# ptxas: W4 78 registers per thread for both; W8 99 and 96): register file 64 K, 256 per warp granule.
# The kernel's __launch_bounds__ (min_blocks) now hold these counts whatever ptxas would choose.
H200_BLOCKS = {"W4g128": (3, 6), "W8": (2, 5)}


def test_auto_warps_picks_the_faster_block_size_of_the_h200_sweep(C):
    """The rule against measurements (benchmarks/results/NVIDIA-H200-sweep_gemv.json, M = 1, one K
    range): for every weight it picks the block size that ran faster there."""
    sweep = json.loads((ROOT / "benchmarks/results/NVIDIA-H200-sweep_gemv.json").read_text())
    sm = sweep["meta"]["sm_count"]
    cases = [r for r in sweep["rows"] if r["M"] == 1]
    assert len(cases) >= 16
    for r in cases:
        ms = {f["warps"]: f["ms"] for f in r["forced"] if f["splits"] == 1}
        pick = C.gemv_auto_warps(-(-r["N"] // 16), sm, *H200_BLOCKS[r["fmt"]])
        assert ms[pick] == min(ms.values()), f"{r['case']}: picked {pick} warps, measured {ms}"


def test_auto_warps_keeps_8_warp_blocks_unless_a_second_wave_idles_sms(C):
    assert C.gemv_auto_warps(10_000, 132, 0, 0) == 8, "occupancy unknown"
    assert C.gemv_auto_warps(396, 132, 3, 6) == 8, "one full wave of 8-warp blocks"
    assert C.gemv_auto_warps(397, 132, 3, 6) == 4, "a second wave: 4-warp blocks fit in one"
    assert C.gemv_auto_warps(793, 132, 3, 6) == 8, "two waves either way, the same warps resident"
    assert C.gemv_auto_warps(10_000, 132, 2, 5) == 4, "4-warp blocks keep 20 warps resident, 8-warp 16"


def test_plan_rejects_what_no_path_serves(C):
    with pytest.raises(ValueError, match="bad shape"):
        _plan(C, m=17)
    with pytest.raises(ValueError, match="bits not in"):
        _plan(C, bits=3)
    with pytest.raises(ValueError, match="bad shape"):
        _plan(C, k=4096, ng=3)


# --------------------------------------------------------------------------- argument checks
def _quantize(C, **kw):
    a = dict(mode=1, w=1 << 20, w_dtype=0, stride_wn=256, n=4, k=256, ng=8, bits=4, symmetric=False,
             qweight=1 << 21, scales=1 << 22, s_dtype=0, zeros=1 << 23, stream=0)
    a.update(kw)
    return C.quantize(*a.values())


@pytest.mark.parametrize("kw,match", [
    (dict(bits=3), "bits not in"),
    (dict(ng=3), "bad shape.*k % ng == 0"),
    (dict(k=250, stride_wn=250, ng=1, n=4), None),  # fine: K even, one group
    (dict(k=255, stride_wn=255, ng=1), "bad shape"),  # odd K at 4 bits
    (dict(w_dtype=5), "unsupported dtype"),
    (dict(s_dtype=1), "unsupported dtype.*s_dtype == w_dtype"),
    (dict(w=0), "null pointer"),
    (dict(mode=7), "unknown mode"),
    (dict(stride_wn=100), "bad shape.*stride_wn >= k"),
    (dict(w=(1 << 20) + 1), "misaligned"),
    (dict(n=1 << 28, ng=16), "too large"),
])
def test_launcher_argument_checks(C, kw, match):
    if match is None:
        if torch.cuda.is_available():
            pytest.skip("valid arguments with fake pointers would launch on the GPU")
        with pytest.raises(RuntimeError, match="CUDA error"):
            _quantize(C, **kw)
        return
    with pytest.raises(ValueError, match=match):
        _quantize(C, **kw)


def test_every_launcher_checks_before_launching(C):
    with pytest.raises(ValueError, match="bits not in"):
        C.dequantize(1 << 20, 128, 4, 256, 8, 5, 1 << 21, 0, 1 << 22, 1 << 23, 0, 0)
    with pytest.raises(ValueError, match="unsupported dtype"):
        C.fake_quant(1 << 20, 0, 256, 4, 256, 8, 4, 1 << 21, 0, 1 << 22, 1 << 23, 9, 0)
    with pytest.raises(ValueError, match="null pointer"):
        C.fake_quant_backward(0, 0, 1 << 20, 0, 256, 4, 256, 8, 4, 1 << 21, 0, 1 << 22, 1 << 23, 0, 0)
    with pytest.raises(ValueError, match="workspace too small"):  # this plan splits K: partials needed
        C.dequant_matmul(1 << 20, 2, 3, 64, 8192, 64, 4, 1 << 24, 4096, 1 << 21, 2, 1 << 22, 0, 0, 1 << 23,
                         0, 0, 132, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_valid_launch_without_gpu_raises_cuda_error(C):
    with pytest.raises(RuntimeError, match=r"CUDA error (35|100)"):
        C.fake_quant(1 << 20, 0, 256, 4, 256, 8, 4, 1 << 21, 0, 1 << 22, 1 << 23, 0, 0)


# --------------------------------------------------------------------------- backend registry
def test_cuda_backend_registers_its_ops():
    pytest.importorskip("qdpo.kernels.cuda", reason="qdpo._C not built in this checkout")
    assert set(backends._IMPLS["cuda"]) == set(backends._IMPLS["reference"]), "the cuda backend serves every op"


@pytest.mark.parametrize("in_auto", [False, True])
def test_auto_tries_cuda_only_when_enabled(monkeypatch, in_auto):
    """CUDA_IN_AUTO gates the cuda backend under auto; an explicit backend='cuda' always reaches it."""
    calls = []

    def fake_cuda(*args):
        calls.append("cuda")
        raise backends.Unsupported("fake")

    monkeypatch.setattr(backends, "CUDA_IN_AUTO", in_auto)
    monkeypatch.setitem(backends._IMPLS["cuda"], "dequantize", fake_cuda)
    monkeypatch.setitem(backends._AUTO_IF["cuda"], "dequantize", lambda *a: True)
    monkeypatch.setitem(backends._IMPLS["triton"], "dequantize", lambda *a: "triton")
    monkeypatch.setattr(backends, "_device_reason", lambda b, d: None)
    assert backends.call("dequantize", "auto", torch.device("cuda"), None) == "triton"
    assert calls == (["cuda"] if in_auto else [])
    with pytest.raises(RuntimeError, match="cuda backend cannot serve this request: fake"):
        backends.call("dequantize", "cuda", torch.device("cuda"), None)


def test_auto_uses_cuda_only_where_its_registration_says(monkeypatch):
    """auto: the cuda dequant_matmul for decode-sized x (M <= 16 rows), Triton for prefill and other ops."""
    cuda = pytest.importorskip("qdpo.kernels.cuda", reason="qdpo._C not built in this checkout")
    monkeypatch.setattr(backends, "CUDA_IN_AUTO", True)
    monkeypatch.setattr(backends, "_device_reason", lambda b, d: None)
    monkeypatch.setitem(backends._IMPLS["cuda"], "dequant_matmul", lambda *a: "cuda")
    monkeypatch.setitem(backends._IMPLS["triton"], "dequant_matmul", lambda *a: "triton")
    monkeypatch.setitem(backends._IMPLS["triton"], "dequantize", lambda *a: "triton")
    qweight = torch.zeros(8, 32, dtype=torch.uint8)
    for rows, want in ((1, "cuda"), (cuda.GEMV_MAX_M, "cuda"), (cuda.GEMV_MAX_M + 1, "triton")):
        x = torch.zeros(rows, 64, dtype=torch.bfloat16)
        assert backends.call("dequant_matmul", "auto", torch.device("cuda"), x, qweight, None, None, 4) == want
    x32 = torch.zeros(1, 64)  # fp32 x: the FMA fallback, not measured faster
    assert backends.call("dequant_matmul", "auto", torch.device("cuda"), x32, qweight, None, None, 4) == "triton"
    x3 = torch.zeros(2, 8, 64, dtype=torch.float16)  # 16 rows in batch dims
    assert backends.call("dequant_matmul", "auto", torch.device("cuda"), x3, qweight, None, None, 4) == "cuda"
    assert backends.call("dequantize", "auto", torch.device("cuda"), qweight, None, None, 4, None) == "triton"
    monkeypatch.setattr(backends, "CUDA_IN_AUTO", False)
    assert backends.call("dequant_matmul", "auto", torch.device("cuda"), x3, qweight, None, None, 4) == "triton"


def test_fp32_product_of_16_bit_operands_falls_back_where_the_fast_overload_is_missing():
    """cuda._mm_fp32: the fp32 product of bf16 operands; on the CPU (no ``mm.dtype`` kernel) by upcasting."""
    cuda = pytest.importorskip("qdpo.kernels.cuda", reason="qdpo._C not built in this checkout")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(37, 300, generator=g).bfloat16(), torch.randn(300, 11, generator=g).bfloat16()
    got = cuda._mm_fp32(a, b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), a.double() @ b.double(), rtol=1e-5, atol=1e-5)
    assert cuda._mm_fp32(a.float(), b.float()).dtype == torch.float32


def test_a_gpu_without_a_kernel_image_is_unsupported_not_an_error(monkeypatch):
    """CUDA error 209 (no kernel for this arch) becomes Unsupported, so auto falls back to Triton."""
    cuda = pytest.importorskip("qdpo.kernels.cuda", reason="qdpo._C not built in this checkout")

    class Stream:
        cuda_stream = 0

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(cuda, "_capability", lambda index: (12, 0))

    def no_image(*args, **kwargs):
        raise RuntimeError("qdpo._C.dequantize: CUDA error 209 (no kernel image is available for execution)")

    def other(*args, **kwargs):
        raise RuntimeError("qdpo._C.dequantize: CUDA error 700 (an illegal memory access was encountered)")

    dev = torch.device("cuda", 0)
    with pytest.raises(backends.Unsupported, match="compute capability 12.0.*QDPO_CUDA_ARCHS=120"):
        cuda._launch(dev, no_image, 1, 2)
    with pytest.raises(RuntimeError, match="CUDA error 700"):
        cuda._launch(dev, other, 1, 2)


@pytest.fixture(scope="session")
def sass90(C) -> dict:
    """The sm_90 SASS of the built extension, function by function (benchmarks/static_sass.py's cuobjdump
    and parsing; one disassembly for every test that reads it)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import static_sass

    try:
        tool = static_sass.cuobjdump()
    except SystemExit as e:
        pytest.skip(str(e))
    sass = subprocess.run([tool, "-sass", "-arch", "sm_90", C.__file__], capture_output=True, text=True, timeout=300)
    assert sass.returncode == 0, sass.stderr[-2000:]
    return static_sass.functions(sass.stdout)


def test_split_k_reduction_waits_for_the_gemv_before_it_reads(sass90):
    """The split-K reduction is launched as the GEMV's programmatic dependent (qdpo_device.cuh:
    launch_dependent), so on sm_90 it may start while the GEMV still writes its partials: its SASS must
    wait (griddepcontrol.wait, ACQBULK) before any global load. The emulation runs launches one after
    the other and cannot show a missing wait; the machine code can."""
    import static_sass

    reduce = [body for name, body in sass90.items() if "splitk_reduce_kernel" in name]
    assert len(reduce) == 1, sorted(sass90)
    ops = [text for _, text in static_sass.instructions(reduce[0])]
    first_load = next(i for i, t in enumerate(ops) if re.search(r"\bLDG\b", t))
    assert any(t.startswith("ACQBULK") for t in ops[:first_load]), ops[:first_load + 1]


def _main_loop(ins: list) -> list:
    """The instructions of a kernel's largest loop (from a backward branch's target to the branch)."""
    best = (0, 0, -1)
    for addr, text in ins:
        target = re.search(r"BRA 0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            lo = int(target.group(1), 16)
            best = max(best, (sum(1 for a, _ in ins if lo <= a <= addr), lo, addr))
    return [t for a, t in ins if best[1] <= a <= best[2]]


def _reads_before_next_mma(loop: list, i: int, reg: str) -> str | None:
    """The first instruction after loop[i] and before the next HMMA that reads (or stores) ``reg``."""
    for text in loop[i + 1:]:
        if text.startswith("HMMA"):
            return None
        op, _, rest = text.partition(" ")
        operands = [o.strip() for o in rest.split(",")]
        reads = operands if op.startswith("@") or op.startswith("ST") else operands[1:]
        if any(re.search(rf"\b{reg}\b", o) for o in reads):
            return text
    return None


def test_gemv_steps_do_not_wait_for_the_grid_they_just_loaded(sass90):
    """The GEMV's main loop loads the next step's weights, scales and zero points, then runs this step's
    mma. Where a kernel defers the grid (gemv_kernels.cuh: WStage, defer_grid), no instruction before the
    step's next HMMA reads a scale or zero point just loaded (LDG.U16 / LDG.U8), so the warp does not
    wait a memory round trip for them before its math (with the conversion in the loader, every one was
    read there: static sm_90). Every kernel the plan picks by default defers but bf16 W8's one-tile
    kernels of 4 warps, and no main loop touches local memory that did not before (x_smem with the scale
    after the mma)."""
    import static_sass

    name_re = re.compile(r"gemv_(mma|shared_x)_kernelILi(\d)ELi(\d)ELi(\d)ELi(\d)ELi(\d)E(?:Lb(\d)ELb(\d)ELi(\d)EL[bi](\d))?")
    seen = deferred = 0
    for name, body in sass90.items():
        m = name_re.search(name)
        if not m:
            continue
        seen += 1
        if m.group(1) == "shared_x":
            defer, hd, bits, xs, sc = True, int(m.group(2)), int(m.group(3)), False, int(m.group(6))
        else:
            hd, bits, mt, rt, w = (int(m.group(k)) for k in range(2, 7))
            xs, sc = m.group(8) == "1", int(m.group(9))
            one_tile = mt * rt == 1
            defer = not xs and not (one_tile and (sc == 2 or (hd == 2 and bits == 8 and w == 4)))
            if sc == 0 and not xs and not (hd == 2 and bits == 8 and w == 4 and one_tile):
                assert defer, name
        loop = _main_loop(static_sass.instructions(body))
        spills = [t for t in loop if re.match(r"(STL|LDL)", t)]
        assert not spills or (xs and sc == 1), (name, spills)
        if not defer:
            continue
        deferred += 1
        for i, text in enumerate(loop):
            load = re.match(r"(?:@!?P\d )?LDG\.E\.(?:U16|U8) (R\d+),", text)
            if load:
                use = _reads_before_next_mma(loop, i, load.group(1))
                assert use is None, (name, text, use)
    assert seen >= 190 and deferred >= 150, (seen, deferred)  # 196 and 151 in this build


def test_element_wise_kernels_store_16_bytes_at_a_time(sass90):
    """The 8-element chunks of the element-wise kernels (dequantize, fake_quant forward and backward)
    leave as 16-byte stores in every output dtype (sm_90 SASS of this build). A 16-bit output packed
    in a branch on its dtype once left as four 4-byte stores, each writing a quarter of every sector
    of the warp's 512 bytes; the fp32 outputs, stored 16 bytes at a time, had reached 95 % of copy
    bandwidth and the bf16 ones 66-72 % (H200)."""
    functions = sass90
    chunked = {name: body for name, body in functions.items()
               if re.search(r"(dequantize_kernel|fake_quant_kernel|fake_quant_backward_kernel)ILi[48]ELi8E", name)}
    assert len(chunked) == 8, sorted(functions)
    for name, body in chunked.items():
        stores = re.findall(r"\bSTG\.E(\.[A-Z0-9]+)?\b", body)
        wide = stores.count(".128")
        lsq = "ELb1E" in name  # grad_s: one scalar per group row
        assert wide >= 3, f"{name}: {wide} 16-byte stores (fp32 needs 2, a 16-bit dtype 1)"
        assert lsq or set(stores) == {".128"}, f"{name}: narrower stores {sorted(set(stores))}"
