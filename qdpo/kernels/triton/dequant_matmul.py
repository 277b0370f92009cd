"""W4A16 / W8A16 dequant-matmul: ``y = x @ ŵᵀ (+ bias)`` and its x-gradient ``dx = dy @ ŵ``.

Contract (the spec is ``qdpo.kernels.reference.dequant_matmul`` / ``dequant_matmul_dx``)::

    ŵ[n, k] = (q[n, k] - zeros[n, k // G]) · scales[n, k // G]        (fp32)
    y[m, n] = Σ_k x[m, k] · ŵ[n, k]  (+ bias[n])                      (fp32 accumulate, one cast)
    dx[m, k] = Σ_n dy[m, n] · ŵ[n, k]

==========  ===================================  =============================  =====================
tensor      shape                                dtype                          layout
==========  ===================================  =============================  =====================
x / dy      ``(..., K)`` / ``(..., N)``          fp16, bf16, fp32               contiguous
qweight     ``(N, K/2)`` W4, ``(N, K)`` W8       uint8                          ``qdpo/quant/format.py``:
                                                                                byte j = codes 2j (low
                                                                                nibble), 2j+1 (high)
scales      ``(N, K/G)``                         fp16, bf16, fp32               row-major
zeros       ``(N, K/G)``                         uint8                          row-major
bias        ``(N,)`` or None                     any float (added in fp32)
y / dx      ``(..., N)`` / ``(..., K)``          x's / dy's dtype
==========  ===================================  =============================  =====================

Constraints: ``G = K`` (one group per row, any even K for W4) or ``G`` a power
of two ≥ 16 dividing K (qdpo uses 32/64/128/256); every operand below 2³¹
elements. Anything else raises :class:`~qdpo.kernels.backends.Unsupported`.

Paths, by the number of rows ``M`` of x (thresholds below; estimates for an
H100, not yet measured there):

* ``gemv`` (``M <= GEMV_MAX_M``, decode): split-K weight streaming. Programs
  own ``BLOCK_N`` rows of ŵ and one of ``SPLIT_K`` K-ranges, so the packed
  weight is read exactly once. M = 1 uses CUDA-core FMAs: where rows are whole
  4-byte words, on 32-bit words whose codes stay in place under the bits of
  2²³ (one AND and two FMAs per code, the scale once per word:
  ``_row_dot_words``), else on even/odd nibble halves of bytes; 2 ≤ M ≤ 16
  pads M to 16 and uses ``tl.dot``. With
  ``SPLIT_K > 1`` the fp32 partials ``[SPLIT_K, M, N]`` are summed in a fixed
  order by a second tiny kernel (deterministic; no atomics), which adds the
  bias and casts once.
* ``gemm`` (``GEMV_MAX_M < M < WORKSPACE_MIN_M``): tiled ``tl.dot``; each K
  step dequantizes a ``[BLOCK_N, BLOCK_K]`` weight tile in registers.
* ``workspace`` (``M >= WORKSPACE_MIN_M``, long prefill / training): ŵ is
  dequantized once into an ``(N, K)`` buffer of x's dtype and ``torch.matmul``
  (cuBLAS) does the product: at that M the ``N·K·e`` extra bytes cost less than
  the gap between cuBLAS and a fused Triton GEMM.

Accuracy: accumulation is fp32 everywhere. On a GPU, fp16/bf16 products run on
tensor cores with ŵ rounded to x's dtype (as the reference does); at M = 1 ŵ
stays fp32 (closer to the exact product than the reference); fp32 uses
IEEE fp32 dots (no TF32). Under the Triton interpreter the dot operands are
fp32 (its bf16 dot is wrong); outputs are always cast once with PyTorch's
round-to-nearest-even.

Backward (registered in ``qdpo/kernels/ops.py``): ``∂x = dequant_matmul_dx(dy)``
(``_dx_kernel``: tiles of dx reduce over N, reading ``qweight`` column-slab
by column-slab, nothing materialised; the workspace path above the same M);
``∂bias = Σ_m dy`` in fp32. The weight is frozen (no gradient).

Bytes moved (e = x's element size, b = bits): forward reads
``N·K·b/8 + N·(K/G)·(e_s + 1)`` of weight (once, gemv; once per BLOCK_M rows
of x, gemm, mostly from L2) and ``M·K·e`` of x, writes ``M·N·e`` (+ ``2·SPLIT_K·M·N·4``
of partials); ``2·M·N·K`` FLOPs. At M = 1 the weight dominates: W4 moves ~¼ of
a bf16 ``torch.matmul``'s bytes, so the roofline speed-up is ~3.8× (W8 ~2×).

Configs: one fixed config per kernel under the interpreter (tests); on a GPU a
handful of candidates per kernel, timed on first use for each (dtype, bits, G,
M, N, K rounded up to powers of two) and cached (``pick_config``). Make that
first call before capturing a CUDA graph.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from qdpo.kernels.backends import Unsupported, register
from qdpo.kernels.reference import expert_segments, rows_per_expert, segment_blocks
from qdpo.kernels.triton._common import cast_out, codes_in_place, codes_minus_z, int32_words, tl_dtype, word_halves
from qdpo.kernels.triton.dequant_matmul_gemm import (
    DX_CPU, DX_GPU, GEMM_CPU, GEMM_GPU, INT32_LIMIT, Packed, _dequant_tile, _group_params, _packed,
    _store_yt, dequantize_workspace, dot_dtype, launch_dx, launch_gemm, pick_config, tuning_key,
)

GEMV_MAX_M = 16  # at most this many rows: the split-K streaming kernel (tl.dot pads M to 16)
MAX_PAIRS = 65535  # rows of x one grouped launch takes (the grid's third axis)
WORKSPACE_MIN_M = 1024  # at least this many rows: dequantize once + cuBLAS (estimated H100 crossover)
PATHS = ("gemv", "gemm", "workspace")
FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _row_dot(x_ptr, qw_ptr, s_ptr, z_ptr, offs_n, k_lo, k_hi, N, K, G, stride_qn, stride_sn,
             BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``Σ_{k_lo <= k < k_hi} ŵ[offs_n, k] · x[k]`` for one row of x: ``[BLOCK_N, 1]`` fp32 (FMAs)."""
    if BITS == 4:
        # even and odd columns stay apart (low/high nibbles): no register shuffles
        acc = tl.zeros([BLOCK_N, BLOCK_K // 2], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            s, z = _group_params(s_ptr, z_ptr, offs_n, k0, N, G, stride_sn)
            b = _packed(qw_ptr, offs_n, k0 // 2, N, K // 2, stride_qn, BLOCK_K // 2).to(tl.uint32)
            # x in one contiguous (vector) load, split into even and odd columns in registers
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            xe, xo = tl.split(tl.reshape(xv, [BLOCK_K // 2, 2]))
            acc += codes_minus_z(b & 0xF, z) * s * xe[None, :]
            acc += codes_minus_z(b >> 4, z) * s * xo[None, :]
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            w = _dequant_tile(qw_ptr, s_ptr, z_ptr, offs_n, k0, N, K, G, stride_qn, stride_sn,
                              BITS, BLOCK_N, BLOCK_K)
            acc += w * xv[None, :]
    return tl.sum(acc, axis=1)[:, None]  # one cross-lane reduction, after the loop


@triton.jit
def _words_of(qw_ptr, offs_n, k0, N, K, stride_qn, CPW: tl.constexpr, BLOCK_W: tl.constexpr):
    """Words ``k0 / CPW ...`` of rows ``offs_n`` (0 outside) as their halves under the bits of 2²³
    (:func:`~qdpo.kernels.triton._common.word_halves`): ``[BLOCK_N, BLOCK_W]`` uint32 twice."""
    cols = k0 // CPW + tl.arange(0, BLOCK_W)
    return word_halves(tl.load(qw_ptr + offs_n[:, None] * stride_qn + cols[None, :],
                               mask=(offs_n < N)[:, None] & (cols < K // CPW)[None, :], other=0))


@triton.jit
def _half_w4(half, z, xa, xb, xc, xd, part):
    """``part + Σ (q - z) · x`` over the four W4 codes of a 16-bit half (:func:`_words_of`), in place."""
    part = tl.fma(codes_in_place(half, 0xF, 1.0, z), xa[None, :], part)
    part = tl.fma(codes_in_place(half, 0xF0, 0.0625, z), xb[None, :], part)
    part = tl.fma(codes_in_place(half, 0xF00, 0.00390625, z), xc[None, :], part)
    return tl.fma(codes_in_place(half, 0xF000, 0.000244140625, z), xd[None, :], part)


@triton.jit
def _half_w8(half, z, xa, xb, part):
    """The same over the two W8 codes of a 16-bit half."""
    part = tl.fma(codes_in_place(half, 0xFF, 1.0, z), xa[None, :], part)
    return tl.fma(codes_in_place(half, 0xFF00, 0.00390625, z), xb[None, :], part)


@triton.jit
def _row_dot_words(x_ptr, qw_ptr, s_ptr, z_ptr, offs_n, k_lo, k_hi, N, K, G, stride_qn, stride_sn,
                   BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """:func:`_row_dot` reading the weight as 32-bit words (``qw_ptr``: int32, ``stride_qn`` in words).

    Each code stays in its word where the fp32 mantissa holds it (``_common.codes_in_place``): per W4
    word (8 codes) one shift, 8 LOP3, 16 FMAs, and the scale once per word (``s · Σ (q - z) x`` in fp32: ŵ is
    never rounded, which is closer to the exact product than the reference's x.dtype ŵ). Static sm_90
    loop: 5.5 instructions per W4 code at 64 × 128 tiles, 4.4 at 128 × 128, against 7.7 per byte.
    """
    CPW: tl.constexpr = 32 // BITS  # codes per word
    BLOCK_W: tl.constexpr = BLOCK_K // CPW
    acc = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        s, z = _group_params(s_ptr, z_ptr, offs_n, k0, N, G, stride_sn)
        lo, hi = _words_of(qw_ptr, offs_n, k0, N, K, stride_qn, CPW, BLOCK_W)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        if BITS == 4:
            # code j of a word at bits 4j: j = 4 i1 + 2 i2 + i3 in the reshape, split last axis first
            xe, xo = tl.split(tl.reshape(xv, [BLOCK_W, 2, 2, 2]))
            xe0, xe1 = tl.split(xe)
            xo0, xo1 = tl.split(xo)
            x0, x4 = tl.split(xe0)
            x2, x6 = tl.split(xe1)
            x1, x5 = tl.split(xo0)
            x3, x7 = tl.split(xo1)
            part = _half_w4(lo, z, x0, x1, x2, x3, tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32))
            part = _half_w4(hi, z, x4, x5, x6, x7, part)
        else:
            xe, xo = tl.split(tl.reshape(xv, [BLOCK_W, 2, 2]))
            x0, x2 = tl.split(xe)
            x1, x3 = tl.split(xo)
            part = _half_w8(lo, z, x0, x1, tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32))
            part = _half_w8(hi, z, x2, x3, part)
        acc = tl.fma(part, s, acc)
    return tl.sum(acc, axis=1)[:, None]  # one cross-lane reduction, after the loop


@triton.jit
def _gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr,  # pointers (out: y, or fp32 partials)
    M, N, K, G, K_PER_SPLIT,  # sizes; K_PER_SPLIT is a multiple of BLOCK_K
    stride_xm, stride_qn, stride_sn, stride_om, stride_os,  # strides (stride_os: per split)
    BITS: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
    OUT_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WORDS: tl.constexpr = False,
    ids_ptr=None, GROUPED: tl.constexpr = False, SEGMENTS: tl.constexpr = False, EXPERTS=1,
    EXPERTS_BLOCK: tl.constexpr = 1,
):
    """``yᵀ[BLOCK_N rows, all M <= BLOCK_M]`` over one K-range: program (n-block, split). WORDS (M = 1):
    ``qw_ptr`` is the packed weight as int32 words and ``stride_qn`` counts words. GROUPED (one split;
    dequant_matmul_experts), the weights' slices of N rows one per expert: program axis 2 is a pair of
    row p of x and expert ``ids[p]`` (M = 1), whose N rows (and row of bias) give row p of y (-1: the
    program returns at once, leaving the row as the caller zeroed it);
    or with SEGMENTS, x's rows sorted by expert, ``ids`` the EXPERTS experts' offsets (expert e's rows
    ``ids[e] .. ids[e + 1]``, EXPERTS_BLOCK >= EXPERTS a power of two): axis 2 is the z-th chunk of
    BLOCK_M rows of one expert in expert order, found from all the offsets (a prefix sum of the
    experts' chunk counts); a program past the last chunk returns at once."""
    if GROUPED:
        if SEGMENTS:
            z = tl.program_id(2)
            ex = tl.arange(0, EXPERTS_BLOCK)
            # M is P here: offsets clamped to 0 <= lo <= hi <= P, so offsets that are not the experts'
            # ranges (dequant_matmul_segments takes them from the caller) never reach outside x and y
            lo_e = tl.minimum(tl.maximum(tl.load(ids_ptr + ex, mask=ex < EXPERTS, other=0), 0), M)
            hi_e = tl.minimum(tl.maximum(tl.load(ids_ptr + ex + 1, mask=ex < EXPERTS, other=0), lo_e), M)
            n_e = (hi_e - lo_e + BLOCK_M - 1) // BLOCK_M
            ends = tl.cumsum(n_e, 0)  # non-decreasing: the chunks of experts 0 .. e
            e = tl.sum((ends <= z).to(tl.int32), 0)  # the first expert whose chunks reach past z
            if e >= EXPERTS:
                return
            mine = ex == e
            lo = tl.sum(tl.where(mine, lo_e + BLOCK_M * (z - ends + n_e), 0), 0)
            M = tl.minimum(tl.sum(tl.where(mine, hi_e, 0), 0) - lo, BLOCK_M)
            row0 = e * N
            x_ptr += lo * stride_xm
            out_ptr += lo * stride_om
        else:
            pair = tl.program_id(2)
            e = tl.load(ids_ptr + pair)
            if e < 0:  # no expert (-1): its row of y stays as the caller zeroed it, no weight is read
                return
            row0 = e * N
            x_ptr += pair * stride_xm
            out_ptr += pair * stride_om
        qw_ptr += row0 * stride_qn
        s_ptr += row0 * stride_sn
        z_ptr += row0 * stride_sn
        if HAS_BIAS:
            b_ptr += row0
    pid_s = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    k_lo = pid_s * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    if BLOCK_M == 1 and WORDS:
        acc = _row_dot_words(x_ptr, qw_ptr, s_ptr, z_ptr, offs_n, k_lo, k_hi, N, K, G, stride_qn, stride_sn,
                             BITS, BLOCK_N, BLOCK_K)
    elif BLOCK_M == 1:
        acc = _row_dot(x_ptr, qw_ptr, s_ptr, z_ptr, offs_n, k_lo, k_hi, N, K, G, stride_qn, stride_sn,
                       BITS, BLOCK_N, BLOCK_K)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0.0)
            w = _dequant_tile(qw_ptr, s_ptr, z_ptr, offs_n, k0, N, K, G, stride_qn, stride_sn,
                              BITS, BLOCK_N, BLOCK_K)
            acc = tl.dot(w.to(DOT_DTYPE), tl.trans(x.to(DOT_DTYPE)), acc, input_precision="ieee")
    if PARTIAL:
        ptrs = out_ptr + pid_s * stride_os + offs_m[None, :] * stride_om + offs_n[:, None]
        tl.store(ptrs, acc, mask=(offs_n < N)[:, None] & (offs_m < M)[None, :])
    else:
        _store_yt(out_ptr, acc, offs_m, offs_n, M, N, stride_om, b_ptr, HAS_BIAS, OUT_DTYPE)


@triton.jit
def _splitk_reduce_kernel(p_ptr, b_ptr, y_ptr, MN, N, SPLIT,
                          HAS_BIAS: tl.constexpr, OUT_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """``y = Σ_s partials[s] (+ bias)``, summed in split order (deterministic), cast once."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(p_ptr + s * MN + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, cast_out(acc, OUT_DTYPE), mask=ok)


# --------------------------------------------------------------------------- configs
class GemvConfig(NamedTuple):
    block_n: int
    block_k: int  # clamped to the group size by Packed.block_k
    split_k: int  # upper bound; fewer splits when K has fewer BLOCK_K tiles
    num_warps: int
    num_stages: int


# One fixed config under the interpreter (tests): big tiles, few programs, and
# K split in two so the partials + reduction path is exercised too.
GEMV_CPU = GemvConfig(128, 128, 2, 4, 1)
# GPU candidates, timed once per tuning key (dequant_matmul_gemm.pick_config).
GEMV_GPU = (
    GemvConfig(64, 128, 1, 4, 3), GemvConfig(64, 128, 2, 4, 3), GemvConfig(64, 128, 4, 4, 3),
    GemvConfig(32, 128, 4, 4, 3), GemvConfig(32, 256, 8, 4, 3), GemvConfig(128, 128, 2, 8, 3),
    GemvConfig(128, 64, 4, 4, 4), GemvConfig(64, 256, 4, 4, 3), GemvConfig(128, 128, 4, 4, 3),
)


# --------------------------------------------------------------------------- launches
SEGMENT_TILES = (16, 32, 64)  # rows of one expert per program of the segments grid


def segment_tile(rows: int) -> int:
    """The segments tile for ``rows`` rows expected per expert: the smallest of :data:`SEGMENT_TILES` that
    holds them, else the largest (an expert's rows past it take more programs, each reading its weights
    again). Up to 16 rows one GEMV tile; more, a ``tl.dot`` as wide as the per-expert GEMM's."""
    return next((t for t in SEGMENT_TILES if rows <= t), SEGMENT_TILES[-1])


def _launch_gemv(x2, w: Packed, bias, y, cfg: GemvConfig, ids: torch.Tensor | None = None,
                 segments: int = 0) -> None:
    """``y = x2 @ ŵᵀ (+ bias)`` for ``M <= 16`` rows with ``_gemv_kernel`` (+ the reduction). ``ids``
    (int32, in range): row p of x2 on rows ``ids[p]·N ..`` of the weights into row p of y (one split);
    with ``segments`` (a tile of :data:`SEGMENT_TILES`), the experts' offsets into x2 sorted by expert,
    one program per chunk of ``segments`` rows that any routing could make."""
    m = (segments or 1) if ids is not None else x2.shape[0]
    experts = ids.shape[0] - 1 if segments else 1
    bk = w.block_k(cfg.block_k)
    tiles = triton.cdiv(w.k, bk)
    per_split = triton.cdiv(tiles, min(cfg.split_k if ids is None else 1, tiles))
    split = triton.cdiv(tiles, per_split)  # no empty K-ranges
    out = torch.empty(split, m, w.n, dtype=torch.float32, device=x2.device) if split > 1 else y
    if out.numel() >= INT32_LIMIT:
        raise Unsupported(f"split-K partials of {tuple(out.shape)} exceed int32 indexing")
    grid = (triton.cdiv(w.n, cfg.block_n), split) + (
        () if ids is None else (segment_blocks(x2.shape[0], experts, m),) if segments else (ids.shape[0],))
    # whole aligned words: the word path (M = 1 only; the M <= 16 dot path gained nothing, static sm_90)
    words = int32_words(w.qweight) if m == 1 else None
    qw = w.qweight if words is None else words
    _gemv_kernel[grid](
        x2, qw, w.scales, w.zeros, y if bias is None else bias, out,
        x2.shape[0] if segments else m, w.n, w.k, w.g, per_split * bk,  # segments: P, the offsets' bound
        x2.stride(0), qw.stride(0), w.scales.stride(0), out.stride(-2), m * w.n,
        BITS=w.bits, HAS_BIAS=bias is not None, PARTIAL=split > 1,
        OUT_DTYPE=tl_dtype(y.dtype), DOT_DTYPE=dot_dtype(x2),
        BLOCK_M=1 if m == 1 else max(m, 16), BLOCK_N=cfg.block_n, BLOCK_K=bk, WORDS=words is not None,
        ids_ptr=ids, GROUPED=ids is not None, SEGMENTS=segments, EXPERTS=experts,
        EXPERTS_BLOCK=max(16, triton.next_power_of_2(experts)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        block = 1024 if x2.is_cuda else 4096
        _splitk_reduce_kernel[(triton.cdiv(m * w.n, block),)](
            out, y if bias is None else bias, y, m * w.n, w.n, split,
            HAS_BIAS=bias is not None, OUT_DTYPE=tl_dtype(y.dtype), BLOCK=block, num_warps=4,
        )


def _check_rows(t: torch.Tensor, width: int, name: str) -> None:
    if t.dtype not in FLOATS:
        raise Unsupported(f"{name} has dtype {t.dtype}; the kernels take float16, bfloat16 or float32")
    if t.dim() < 1 or t.shape[-1] != width:
        raise Unsupported(f"{name} has shape {tuple(t.shape)}; its last dimension must be {width}")
    if t.numel() >= INT32_LIMIT:
        raise Unsupported(f"{name} has {t.numel()} elements, beyond the kernels' int32 indexing")


def choose_path(m: int, nk: int = 0) -> str:
    """The forward path for ``m`` rows of x and an ``nk``-element weight (module docstring)."""
    if m <= GEMV_MAX_M:
        return "gemv"
    return "workspace" if m >= WORKSPACE_MIN_M and nk < INT32_LIMIT else "gemm"


def forward(x, qweight, scales, zeros, bits, bias=None, path: str | None = None) -> torch.Tensor:
    """``x @ ŵᵀ (+ bias)``; ``path`` forces one of :data:`PATHS` (default: :func:`choose_path`)."""
    w = Packed.of(qweight, scales, zeros, bits)
    _check_rows(x, w.k, "x")
    if bias is not None:
        _check_rows(bias, w.n, "bias")
        bias = bias.contiguous()
    x2 = x.reshape(-1, w.k).contiguous()  # [M, K]
    m = x2.shape[0]
    path = path or choose_path(m, w.n * w.k)
    if path not in PATHS or (path == "gemv" and m > GEMV_MAX_M):
        raise ValueError(f"path={path!r} cannot serve M={m}; use one of {PATHS} (gemv: M <= {GEMV_MAX_M})")
    if m * w.n >= INT32_LIMIT:
        raise Unsupported(f"y of ({m}, {w.n}) exceeds the kernels' int32 indexing")
    y = torch.empty(m, w.n, dtype=x.dtype, device=x.device)  # [M, N]
    if m == 0:
        pass
    elif path == "workspace":
        y = F.linear(x2, dequantize_workspace(w, x.dtype), None if bias is None else bias.to(x.dtype))
    elif path == "gemv":
        cands = (GEMV_CPU,) if not x.is_cuda else GEMV_GPU
        cfg = pick_config("gemv", tuning_key(x, w, m), cands, lambda c: _launch_gemv(x2, w, bias, y, c))
        _launch_gemv(x2, w, bias, y, cfg)
    else:
        cands = (GEMM_CPU,) if not x.is_cuda else tuple(
            c for c in GEMM_GPU if c.block_m <= max(32, triton.next_power_of_2(m)))
        cfg = pick_config("gemm", tuning_key(x, w, m), cands, lambda c: launch_gemm(x2, w, bias, y, c))
        launch_gemm(x2, w, bias, y, cfg)
    return y.reshape(*x.shape[:-1], w.n)


def backward_dx(dy, qweight, scales, zeros, bits, path: str | None = None) -> torch.Tensor:
    """``dy @ ŵ``; ``path`` is ``"fused"`` or ``"workspace"`` (default: as the forward's choice)."""
    w = Packed.of(qweight, scales, zeros, bits)
    _check_rows(dy, w.n, "dy")
    dy2 = dy.reshape(-1, w.n).contiguous()  # [M, N]; a gradient may arrive stride-0 expanded
    m = dy2.shape[0]
    path = path or ("workspace" if choose_path(m, w.n * w.k) == "workspace" else "fused")
    if path not in ("fused", "workspace"):
        raise ValueError(f"path={path!r}; use 'fused' or 'workspace'")
    if m * w.k >= INT32_LIMIT:
        raise Unsupported(f"dx of ({m}, {w.k}) exceeds the kernels' int32 indexing")
    dx = torch.empty(m, w.k, dtype=dy.dtype, device=dy.device)  # [M, K]
    if m == 0:
        pass
    elif path == "workspace":
        dx = dy2 @ dequantize_workspace(w, dy.dtype)
    else:
        cands = (DX_CPU,) if not dy.is_cuda else tuple(
            c for c in DX_GPU if c.block_m <= max(16, triton.next_power_of_2(m)))
        cfg = pick_config("dx", tuning_key(dy, w, m), cands, lambda c: launch_dx(dy2, w, dx, c))
        launch_dx(dy2, w, dx, cfg)
    return dx.reshape(*dy.shape[:-1], w.k)


@register("triton", "dequant_matmul")
def dequant_matmul(x, qweight, scales, zeros, bits, bias=None):
    """``qdpo::dequant_matmul`` on the triton backend: ``x @ ŵᵀ (+ bias)`` in x's dtype."""
    return forward(x, qweight, scales, zeros, bits, bias)


def _grouped(x, qweight, scales, zeros, bits, num_experts, bias, max_rows):
    """What both grouped ops share: the checks, the weights of one expert (its pointers: all of them),
    the tuned config (as the GEMV of a tile's rows on one expert's N rows) and y, empty."""
    w_all = Packed.of(qweight, scales, zeros, bits)
    _check_rows(x, w_all.k, "x")
    w = dataclasses.replace(w_all, n=w_all.n // num_experts)  # one expert's rows; the pointers: all of them
    p = x.shape[0]
    if bias is not None:
        bias = bias.contiguous()
        _check_rows(bias, w.n, "bias")
    if p > MAX_PAIRS or p * w.n >= INT32_LIMIT or w_all.qweight.numel() >= INT32_LIMIT:
        raise Unsupported(f"{p} rows of x on ({w_all.n}, {w.k}) weights: at most {MAX_PAIRS} rows, and every "
                          f"operand within int32 indexing")
    y = torch.empty(p, w.n, dtype=x.dtype, device=x.device)
    rows = rows_per_expert(p, max_rows)
    tile = 1 if rows <= 1 else segment_tile(rows)  # a program's rows at most
    cands = (GEMV_CPU,) if not x.is_cuda else GEMV_GPU
    if tile == 1:
        def run(c):
            _launch_gemv(x[:1], w, bias, y[:1], c._replace(split_k=1))
    else:  # the segments launch itself, on one expert's chunk of a tile's rows (or all P)
        m = min(tile, p)
        one = torch.tensor([0, m], dtype=torch.int32, device=x.device)

        def run(c):
            _launch_gemv(x[:m], w, bias, y[:m], c, one, segments=tile)
    cfg = pick_config("gemv-experts", tuning_key(x, w, tile), cands, run) if p else None
    return w, bias, y, cfg, tile


@register("triton", "dequant_matmul_experts")
def dequant_matmul_experts(x, experts, qweight, scales, zeros, bits, num_experts, bias=None, max_rows=0):
    """``qdpo::dequant_matmul_experts`` on the triton backend, one split, program axis 2 over the rows:
    one row per expert at most (``max_rows`` 1, or one row): the M = 1 GEMV, one program column per row
    of x on its expert's rows of the weights (ids read on the device; a program whose id is outside
    ``[0, num_experts)`` returns at once, its row zero, no weight read). Else the rows sorted by expert
    on the device run as :func:`dequant_matmul_segments`."""
    x = x.contiguous()
    w, bias, y, cfg, tile = _grouped(x, qweight, scales, zeros, bits, num_experts, bias, max_rows)
    if x.shape[0] == 0:
        return y
    if tile == 1:
        # int32 for the kernel; ids outside [0, num_experts) (int64 ones past int32 included) become -1
        ids = torch.where((experts >= 0) & (experts < num_experts), experts, -1).to(torch.int32)
        _launch_gemv(x, w, bias, y.zero_(), cfg, ids)
        return y
    order, offsets = expert_segments(experts, num_experts)  # ids outside last: unwritten, zeros
    ys = y.zero_()
    _launch_gemv(x[order].contiguous(), w, bias, ys, cfg, offsets, segments=tile)
    return torch.empty_like(ys).index_copy_(0, order, ys)


@register("triton", "dequant_matmul_segments")
def dequant_matmul_segments(x, offsets, qweight, scales, zeros, bits, num_experts, bias=None, max_rows=0):
    """``qdpo::dequant_matmul_segments`` on the triton backend: one program column per chunk of 16 of one
    expert's rows (the ``tl.dot`` path), found by the program from the experts' offsets (a prefix sum of
    their chunk counts; each offset clamped to 0 .. P), so each chosen expert's weights are read once
    per chunk; the grid holds as many as any routing could make (``segment_blocks``), those past the
    last chunk return at once. Rows from ``offsets[num_experts]`` on stay zero."""
    x = x.contiguous()
    w, bias, y, cfg, tile = _grouped(x, qweight, scales, zeros, bits, num_experts, bias, max_rows)
    y.zero_()
    if x.shape[0]:
        _launch_gemv(x, w, bias, y, cfg, offsets, segments=max(tile, SEGMENT_TILES[0]))
    return y


@register("triton", "dequant_matmul_dx")
def dequant_matmul_dx(dy, qweight, scales, zeros, bits):
    """``qdpo::dequant_matmul_dx`` on the triton backend: ``dy @ ŵ`` in dy's dtype."""
    return backward_dx(dy, qweight, scales, zeros, bits)
