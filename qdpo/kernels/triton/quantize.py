"""Triton quantize: per-group scales/zeros and packed codes in one pass over W.

Formula (``qdpo/kernels/reference.py`` is the spec, same fp32 operation order):

* asymmetric: ``lo = min(min(w), 0)``, ``hi = max(max(w), 0)``,
  ``s = cast_up(max((hi - lo) / qmax, tiny))``, ``z = clamp(round(-lo / s), 0, qmax)``;
* symmetric: ``s = cast_up(max(max|w| / (2**(b-1) - 1), tiny))``, ``z = 2**(b-1)``;
* codes: ``q = clamp(round(w / s) + z, 0, qmax)``, packed per ``qdpo/quant/format.py``.

``cast_up`` rounds to ``w.dtype`` to nearest (bf16 by bit-level RNE), then one
step up if that fell below the fp32 value (``reference.to_scale_dtype``: the
group's range must fit in ``qmax`` steps), *before* ``z`` and ``q`` use ``s``.
``tiny = finfo(w.dtype).tiny``; ``round`` is half to even; ``/`` is IEEE
``div_rn`` so codes match ``torch`` bit for bit on GPU and interpreter (for the
codes ``w / s``: one reciprocal per group row and an FMA correction, which
gives the same codes; ``_common.quotient``).

Tensors (N = out_features, K = in_features, G = group size, NG = K // G):

=========  ====================  ================  ==============================
tensor     shape                 dtype             layout
=========  ====================  ================  ==============================
w          (N, K)                fp32/fp16/bf16    K contiguous (copied if not),
                                                   any row stride
qweight    (N, K·bits/8)         uint8             contiguous; 4 bits: code 2j in
                                                   the low nibble of byte j
scales     (N, NG)               w.dtype (or any   any strides (copied
                                 float, frozen)    with zeros if theirs
zeros      (N, NG)               uint8             differ)
=========  ====================  ================  ==============================

Constraints: bits ∈ {4, 8}; K % G == 0; K even for 4 bits (the ops check all
of this). No backward: quantization is not differentiated.

Work decomposition: W is viewed as R = N·NG "group rows" of G contiguous
elements. A program owns BLOCK_R group rows and walks a group in chunks of
BLOCK_G columns (one chunk unless G = K is large, per-row mode, where a
second pass re-reads the row — from L2 on a GPU — to write codes).

Bytes moved: read N·K·w.element_size(), write N·K·bits/8 + N·NG·(s_size + 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qdpo.kernels.backends import register
from qdpo.kernels.triton._common import cast_out, quotient, round_half_even, tl_dtype

GPU_TILE = 4096  # elements per program on a GPU: 8-16 KB of fp16/fp32 in flight, bandwidth-bound
INTERPRET_TILE = 1 << 17  # the interpreter's cost is per program: few, large tiles


@dataclass(frozen=True)
class Config:
    block_r: int  # group rows per program
    block_g: int  # columns of a group per chunk (power of two)
    num_warps: int  # 8 for a full 4096-element tile, else 4


def config(r: int, g: int, device: torch.device, tile: int | None = None) -> Config:
    """Tile for ``r`` group rows of ``g`` elements: a whole group per chunk up to ``tile`` elements."""
    tile = tile or (INTERPRET_TILE if device.type == "cpu" else GPU_TILE)
    block_g = min(triton.next_power_of_2(g), tile)
    block_r = min(max(1, tile // block_g), triton.next_power_of_2(r))
    return Config(block_r, block_g, 8 if block_r * block_g >= 4096 else 4)


# --------------------------------------------------------------------------- device helpers
def div_magic(d: int) -> tuple[int, int]:
    """``(m, l)`` such that ``umulhi(2n, m) >> l == n // d`` for every ``0 <= n < 2³¹`` (``group_rows``):
    ``l = ⌈log2 d⌉`` and ``m = ⌈2^(31+l) / d⌉``, which lies in [2³¹, 2³²) for every ``1 <= d < 2³¹``
    (Granlund & Montgomery, "Division by invariant integers using multiplication", 1994, thm. 4.2 with N = 31: ``m·d``
    exceeds ``2^(31+l)`` by less than ``d <= 2^l``). The multiplier is that of the cuda team kernels
    (``csrc/qdpo_math.cuh: div_magic``), taken as a high multiply of 2n where Triton has no 64-bit
    product to shift. A division by a runtime value costs about 12 integer instructions per element on
    the GPU; this costs two."""
    if not 1 <= d < 2**31:
        raise ValueError(f"divisor {d} outside [1, 2^31)")
    l = (d - 1).bit_length()
    return -(-(1 << (31 + l)) // d), l


def wide_offsets(*tensors) -> bool:
    """Whether an element offset into one of these 2-D tensors (None: skipped), up to one row past the
    end (the masked rows of a last tile), reaches 2³¹: the kernels' ``WIDE`` (int64 offsets; int32
    otherwise, which saves a few instructions per row of a tile)."""
    return any(t is not None and t.shape[0] * t.stride(0) + t.shape[1] * t.stride(1) >= 2**31 for t in tensors)


@triton.jit
def group_rows(pid, R, NG, NG_MAGIC, NG_SHIFT, BLOCK_R: tl.constexpr, WIDE: tl.constexpr):
    """Group-row ids of program ``pid``, their mask, matrix row and group index (int64 with WIDE, else
    int32: the offsets computed from them). ``NG_MAGIC``, ``NG_SHIFT``: :func:`div_magic` of NG, so
    ``r // NG`` is one high multiply and a shift."""
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < R
    row = (tl.umulhi(r.to(tl.uint32) * 2, NG_MAGIC.to(tl.uint32)) >> NG_SHIFT.to(tl.uint32)).to(tl.int32)
    grp = r - row * NG
    if WIDE:
        return r, rmask, row.to(tl.int64), grp.to(tl.int64)
    else:
        return r, rmask, row, grp


@triton.jit
def load_tile(ptr, base, k0, G, rmask, BLOCK_G: tl.constexpr):
    """``[BLOCK_R, BLOCK_G]`` fp32 tile of columns ``k0 + j`` of each group row; 0 outside."""
    kk = k0 + tl.arange(0, BLOCK_G)
    mask = rmask[:, None] & (kk < G)[None, :]
    x = tl.load(ptr + base[:, None] + kk[None, :], mask=mask, other=0.0)
    return x.to(tl.float32), mask


def same_layout(scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros that share one pair of strides, as :func:`load_grid` reads both at one offset:
    the two as they are where their strides agree (any layout), else both copied contiguous."""
    if scales.stride() == zeros.stride():
        return scales, zeros
    return scales.contiguous(), zeros.contiguous()


@triton.jit
def load_grid(s_ptr, z_ptr, p_off, rmask):
    """Frozen per-group scale and zero point as fp32 (scale 1 off the edge: no 0/0), both read at
    ``p_off``: scales and zeros must share their strides (:func:`same_layout`)."""
    s = tl.load(s_ptr + p_off, mask=rmask, other=1.0).to(tl.float32)
    z = tl.load(z_ptr + p_off, mask=rmask, other=0).to(tl.float32)
    return s, z


@triton.jit
def clamp_to_grid(rx, z, QMAX: tl.constexpr):
    """``clamp(rx + z, 0, qmax) - z`` for rounded quotients ``rx`` and zero points ``z`` (a column) as
    ``clamp(rx, -z, qmax - z)``: one addition fewer (see :func:`rounded_quotient`)."""
    return tl.minimum(tl.maximum(rx, -z), QMAX - z)


@triton.jit
def rounded_quotient(w, s, EXACT: tl.constexpr = False, FOR_MASK: tl.constexpr = False):
    """``(w / s, round(w / s))`` in fp32: the rounded quotient as the reference's exact operations give
    it; ``x`` the IEEE quotient itself with ``EXACT`` (LSQ), else as far as the rounding can tell
    (``quotient``). The code is ``clamp(round + z, 0, qmax)``: callers clamp the rounded quotient to
    ``[-z, qmax - z]`` instead, which gives the same ``q - z`` (but for the sign of a zero, which
    ``+ 0`` restores) and the same straight-through mask with fewer additions per element
    (``round + z`` is exact below 2²⁴; above it both clamp to the same end). ``FOR_MASK``: the
    rounded quotient is only compared with the grid (``_common.recip_quotient``)."""
    if EXACT:
        x = tl.math.div_rn(w, tl.broadcast_to(s[:, None], w.shape))
    else:
        x = quotient(w, s[:, None], FOR_MASK)
    return x, round_half_even(x)


@triton.jit
def cast_up(s, S_DTYPE: tl.constexpr):
    """``reference.to_scale_dtype``: positive fp32 ``s`` to ``S_DTYPE``, nearest or else next above."""
    out = cast_out(s, S_DTYPE).to(tl.float32)
    if S_DTYPE != tl.float32:
        # the next 16-bit value above a positive normal one, in fp32 bits: one unit of the
        # last kept mantissa bit (bf16 keeps 7 of fp32's 23 bits, fp16 10); 32-bit integer
        # math only, so no 16-bit bitcast or scalar-promotion subtleties
        STEP: tl.constexpr = (1 << 16) if S_DTYPE == tl.bfloat16 else (1 << 13)
        up = (out.to(tl.uint32, bitcast=True) + STEP).to(tl.float32, bitcast=True)
        out = tl.where(out < s, up, out)
    return cast_out(out, S_DTYPE)  # exact: out is an S_DTYPE value (or overflows to inf like nextafter)


@triton.jit
def _params(lo, hi, tiny, BITS: tl.constexpr, SYMMETRIC: tl.constexpr, S_DTYPE: tl.constexpr):
    """Scale (rounded to ``S_DTYPE``, returned both ways) and fp32 zero point from a group's min/max."""
    lo = tl.minimum(lo, 0.0)  # the range always contains 0
    hi = tl.maximum(hi, 0.0)
    one = tl.full(lo.shape, 1.0, tl.float32)
    if SYMMETRIC:
        half: tl.constexpr = 1 << (BITS - 1)
        s = tl.maximum(tl.math.div_rn(tl.maximum(-lo, hi), one * (half - 1)), tiny)
        s_out = cast_up(s, S_DTYPE)
        z = one * half
    else:
        qmax: tl.constexpr = (1 << BITS) - 1
        s = tl.maximum(tl.math.div_rn(hi - lo, one * qmax), tiny)
        s_out = cast_up(s, S_DTYPE)
        z = round_half_even(tl.math.div_rn(-lo, s_out.to(tl.float32)))
        z = tl.minimum(tl.maximum(z, 0.0), qmax)
    return s_out, s_out.to(tl.float32), z


@triton.jit
def _store_codes(q_ptr, q_base, w, s, z, k0, G, rmask,
                 BITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr):
    """Quantize a ``[BLOCK_R, BLOCK_G]`` fp32 tile and store its packed bytes."""
    qmax: tl.constexpr = (1 << BITS) - 1
    _, rx = rounded_quotient(w, s)
    q = (clamp_to_grid(rx, z[:, None], qmax) + z[:, None]).to(tl.int32).to(tl.uint8)
    if BITS == 8:
        kk = k0 + tl.arange(0, BLOCK_G)
        tl.store(q_ptr + q_base[:, None] + kk[None, :], q, mask=rmask[:, None] & (kk < G)[None, :])
    else:
        # codes 2j, 2j+1 → byte j: low and high nibble
        even, odd = tl.split(tl.reshape(q, [BLOCK_R, BLOCK_G // 2, 2]))
        jj = k0 // 2 + tl.arange(0, BLOCK_G // 2)
        mask = rmask[:, None] & (jj < G // 2)[None, :]
        tl.store(q_ptr + q_base[:, None] + jj[None, :], even | (odd << 4), mask=mask)


# --------------------------------------------------------------------------- kernel
@triton.jit
def _quantize_kernel(
    # pointers
    w_ptr, q_ptr, s_ptr, z_ptr,
    # sizes
    R, G, NG, NG_MAGIC, NG_SHIFT, tiny,
    # strides (w and qweight are contiguous along K; stride_qg = bytes per group)
    stride_wn, stride_qn, stride_qg, stride_sn, stride_sg,
    # meta-parameters
    BITS: tl.constexpr, SYMMETRIC: tl.constexpr, FROZEN: tl.constexpr, STORE_CODES: tl.constexpr,
    S_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, N_CHUNKS: tl.constexpr,
    WIDE: tl.constexpr = True,
):
    """Group rows ``[pid0·BLOCK_R, +BLOCK_R)``; chunks ``[pid1·N_CHUNKS, +N_CHUNKS)`` of BLOCK_G columns.

    FROZEN: read scales/zeros and only write codes (element-wise, any chunk split).
    Otherwise the program owns whole groups (pid1 == 0): it reduces the range over
    all chunks, writes scales/zeros and, if STORE_CODES, the codes.
    """
    r, rmask, row, grp = group_rows(tl.program_id(0), R, NG, NG_MAGIC, NG_SHIFT, BLOCK_R, WIDE)
    w_base = row * stride_wn + grp * G
    q_base = row * stride_qn + grp * stride_qg
    p_off = row * stride_sn + grp * stride_sg
    c0 = tl.program_id(1) * N_CHUNKS
    if N_CHUNKS == 1 and not FROZEN:
        # the whole group is one tile: a single read of W
        w, _ = load_tile(w_ptr, w_base, 0, G, rmask, BLOCK_G)
        s_out, s, z = _params(tl.min(w, axis=1), tl.max(w, axis=1), tiny, BITS, SYMMETRIC, S_DTYPE)
        tl.store(s_ptr + p_off, s_out, mask=rmask)
        tl.store(z_ptr + p_off, z.to(tl.int32).to(tl.uint8), mask=rmask)
        if STORE_CODES:
            _store_codes(q_ptr, q_base, w, s, z, 0, G, rmask, BITS, BLOCK_R, BLOCK_G)
    else:
        if FROZEN:
            s, z = load_grid(s_ptr, z_ptr, p_off, rmask)
        else:
            # per-row mode with a long row: reduce over chunks, then a second pass for codes
            lo = tl.zeros([BLOCK_R], tl.float32)
            hi = tl.zeros([BLOCK_R], tl.float32)
            for c in range(N_CHUNKS):
                w, _ = load_tile(w_ptr, w_base, c * BLOCK_G, G, rmask, BLOCK_G)
                lo = tl.minimum(lo, tl.min(w, axis=1))
                hi = tl.maximum(hi, tl.max(w, axis=1))
            s_out, s, z = _params(lo, hi, tiny, BITS, SYMMETRIC, S_DTYPE)
            tl.store(s_ptr + p_off, s_out, mask=rmask)
            tl.store(z_ptr + p_off, z.to(tl.int32).to(tl.uint8), mask=rmask)
        if STORE_CODES:
            for c in range(N_CHUNKS):
                k0 = (c0 + c) * BLOCK_G
                w, _ = load_tile(w_ptr, w_base, k0, G, rmask, BLOCK_G)
                _store_codes(q_ptr, q_base, w, s, z, k0, G, rmask, BITS, BLOCK_R, BLOCK_G)


# --------------------------------------------------------------------------- wrappers
def contiguous_k(t: torch.Tensor) -> torch.Tensor:
    """The kernels index K with unit stride; other layouts are copied once."""
    return t if t.stride(1) == 1 else t.contiguous()


def launch(w, bits, group_size, symmetric, scales=None, zeros=None, store_codes=True, cfg=None):
    """Run the kernel; returns ``(qweight or None, scales, zeros)``. ``cfg`` forces a tile (tests)."""
    # (1) check: shapes, dtypes and finiteness are checked by qdpo.kernels.ops
    w = contiguous_k(w)
    n, k = w.shape
    frozen = scales is not None
    if frozen:
        scales, zeros = same_layout(scales, zeros)
    ng = scales.shape[1] if frozen else (1 if group_size == -1 else k // group_size)
    g, r = k // ng, n * ng
    cfg = cfg or config(r, g, w.device)
    chunks = triton.cdiv(g, cfg.block_g)
    # (2) allocate
    qweight = torch.empty(n, k * bits // 8, dtype=torch.uint8, device=w.device) if store_codes else w
    if not frozen:
        scales = torch.empty(n, ng, dtype=w.dtype, device=w.device)  # [N, NG] w.dtype
        zeros = torch.empty(n, ng, dtype=torch.uint8, device=w.device)  # [N, NG] uint8
    # (3) launch: element-wise (frozen) splits a group over programs, reductions loop over it
    grid = (triton.cdiv(r, cfg.block_r), chunks if frozen else 1)
    _quantize_kernel[grid](
        w, qweight, scales, zeros,
        r, g, ng, *div_magic(ng), torch.finfo(w.dtype).tiny,
        w.stride(0), qweight.stride(0) if store_codes else 0, g * bits // 8, scales.stride(0), scales.stride(1),
        BITS=bits, SYMMETRIC=symmetric, FROZEN=frozen, STORE_CODES=store_codes,
        S_DTYPE=tl_dtype(scales.dtype), BLOCK_R=cfg.block_r, BLOCK_G=cfg.block_g,
        N_CHUNKS=1 if frozen else chunks, WIDE=wide_offsets(w, qweight if store_codes else None, scales),
        num_warps=cfg.num_warps,
    )
    return (qweight if store_codes else None), scales, zeros


@register("triton", "qparams")
def qparams(w: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """``(scales, zeros)``, each ``(N, NG)``: one read of W, no codes written."""
    _, s, z = launch(w, bits, group_size, symmetric, store_codes=False)
    return s, z


@register("triton", "quantize")
def quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """``(qweight, scales, zeros)`` in one pass over W."""
    return launch(w, bits, group_size, symmetric)


@register("triton", "quantize_with")
def quantize_with(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int):
    """Packed ``qweight`` on a frozen grid (scales/zeros given)."""
    return launch(w, bits, -1, False, scales, zeros)[0]
