"""Triton fake-quant: ``ŵ = dequantize(quantize(w))`` on a given grid, and its STE backward.

Forward (``reference.fake_quant``), all fp32, one cast at the end:
``u = round(w / s) + z``, ``q = clamp(u, 0, qmax)``, ``ŵ = cast((q - z) · s)``.

Backward (``reference.fake_quant_backward``), the mask recomputed, never stored:
``mask = 0 <= u <= qmax``; ``∂w = cast_w(mask ? g : 0)`` (bit-exact);
LSQ, when asked: ``∂s[n, j] = Σ_{k in group j} g · (mask ? round(w/s) - w/s : q - z)``,
accumulated in fp32 per group, cast to ``scales.dtype``. Zero points get none.

Tensors (N = out_features, K = in_features, G = group size, NG = K // G):

==========  ===========  ================  ======================================
tensor      shape        dtype             layout
==========  ===========  ================  ======================================
w           (N, K)       fp32/fp16/bf16    K contiguous (copied if not), any row
                                           stride
scales      (N, NG)      fp32/fp16/bf16    any strides (copied with zeros
zeros       (N, NG)      uint8             if theirs differ)
ŵ (out)     (N, K)       ``dtype``         contiguous
grad        (N, K)       any float         contiguous (the op makes it so)
grad_w      (N, K)       w.dtype           contiguous
grad_s      (N, NG)      scales.dtype      contiguous
==========  ===========  ================  ======================================

Constraints: bits ∈ {4, 8}; NG divides K into groups of 32…256 or one per row
(the ops check).

Work decomposition: R = N·NG group rows of G elements, tiles ``[BLOCK_R,
BLOCK_G]``; the forward and the plain backward split long groups over grid
axis 1, the LSQ backward loops over a group's chunks to sum it in one program.

Bytes moved — forward: read N·K·w_size + N·NG·(s_size + 1), write N·K·out_size.
Backward: read N·K·(grad_size + w_size) + N·NG·(s_size + 1), write N·K·w_size
(+ N·NG·s_size with LSQ).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qdpo.kernels.backends import register
from qdpo.kernels.triton._common import all_in_range, cast_out, recip_quotient, round_half_even, tl_dtype
from qdpo.kernels.triton.quantize import (
    clamp_to_grid, config, contiguous_k, div_magic, group_rows, load_grid, load_tile, rounded_quotient,
    same_layout, wide_offsets,
)


@triton.jit
def _fake_quant_kernel(
    # pointers
    w_ptr, s_ptr, z_ptr, out_ptr,
    # sizes
    R, G, NG, NG_MAGIC, NG_SHIFT,
    # strides (w and out are contiguous along K)
    stride_wn, stride_sn, stride_sg, stride_on,
    # meta-parameters
    BITS: tl.constexpr, OUT_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
    WIDE: tl.constexpr = True,
):
    """Group rows ``[pid0·BLOCK_R, +BLOCK_R)``, columns ``[pid1·BLOCK_G, +BLOCK_G)`` of each group."""
    qmax: tl.constexpr = (1 << BITS) - 1
    r, rmask, row, grp = group_rows(tl.program_id(0), R, NG, NG_MAGIC, NG_SHIFT, BLOCK_R, WIDE)
    s, z = load_grid(s_ptr, z_ptr, row * stride_sn + grp * stride_sg, rmask)
    k0 = tl.program_id(1) * BLOCK_G
    w, mask = load_tile(w_ptr, row * stride_wn + grp * G, k0, G, rmask, BLOCK_G)
    # (clamp(rx + z, 0, qmax) - z)·s with one addition fewer, as (c + 0)·s: "+ 0" makes a zero c +0, as
    # q - z would. Where every scale of the tile is positive and within 2^±100 (the rows past R have
    # 1), w / s through the rows' reciprocals and c·s + 0 in one FMA, the same bits for s > 0 (a
    # nonzero product rounds once either way, and a zero c of either sign gives +0); else the division
    # (quotient's other route: a tile with a negative scale takes it too).
    sc = s[:, None]
    if all_in_range(s):
        c = clamp_to_grid(round_half_even(recip_quotient(w, sc)), z[:, None], qmax)
        w_hat = tl.fma(c, tl.broadcast_to(sc, c.shape), 0.0)
    else:
        _, rx = rounded_quotient(w, s, True)  # the IEEE division
        w_hat = (clamp_to_grid(rx, z[:, None], qmax) + 0.0) * sc
    out = out_ptr + (row * stride_on + grp * G)[:, None] + (k0 + tl.arange(0, BLOCK_G))[None, :]
    tl.store(out, cast_out(w_hat, OUT_DTYPE), mask=mask)


@triton.jit
def _fake_quant_backward_kernel(
    # pointers
    g_ptr, w_ptr, s_ptr, z_ptr, gw_ptr, gs_ptr,
    # sizes
    R, G, NG, NG_MAGIC, NG_SHIFT,
    # strides (grad, w and grad_w are contiguous along K; grad_s is contiguous)
    stride_gn, stride_wn, stride_sn, stride_sg, stride_gwn,
    # meta-parameters
    BITS: tl.constexpr, W_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, NEED_GS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, N_CHUNKS: tl.constexpr, WIDE: tl.constexpr = True,
):
    """Group rows ``[pid0·BLOCK_R, +BLOCK_R)``, chunks ``[pid1·N_CHUNKS, +N_CHUNKS)``.

    With NEED_GS the grid has one program along axis 1, which loops over every
    chunk of its groups and sums the LSQ terms in a ``[BLOCK_R, BLOCK_G]`` fp32
    accumulator (one tree reduction at the end).
    """
    qmax: tl.constexpr = (1 << BITS) - 1
    r, rmask, row, grp = group_rows(tl.program_id(0), R, NG, NG_MAGIC, NG_SHIFT, BLOCK_R, WIDE)
    p_off = row * stride_sn + grp * stride_sg
    s, z = load_grid(s_ptr, z_ptr, p_off, rmask)
    col = grp * G
    g_base, w_base, gw_base = row * stride_gn + col, row * stride_wn + col, row * stride_gwn + col
    acc = tl.zeros([BLOCK_R, BLOCK_G], tl.float32)
    for c in range(N_CHUNKS):
        k0 = (tl.program_id(1) * N_CHUNKS + c) * BLOCK_G
        g, mask = load_tile(g_ptr, g_base, k0, G, rmask, BLOCK_G)
        w, _ = load_tile(w_ptr, w_base, k0, G, rmask, BLOCK_G)
        # the LSQ term needs the IEEE quotient itself; the mask alone, a quotient only compared with the grid
        x, rx = rounded_quotient(w, s, NEED_GS, not NEED_GS)
        inside = (rx >= -z[:, None]) & (rx <= qmax - z[:, None])  # 0 <= round(x) + z <= qmax
        gw = tl.where(inside, g, 0.0)
        kk = k0 + tl.arange(0, BLOCK_G)
        tl.store(gw_ptr + gw_base[:, None] + kk[None, :], cast_out(gw, W_DTYPE), mask=mask)
        if NEED_GS:
            ds = tl.where(inside, rx - x, clamp_to_grid(rx, z[:, None], qmax))
            acc += tl.where(mask, g * ds, 0.0)
    if NEED_GS:
        # grad_s is freshly allocated and contiguous: (N, NG) row-major
        tl.store(gs_ptr + r, cast_out(tl.sum(acc, axis=1), S_DTYPE), mask=rmask)


@register("triton", "fake_quant")
def fake_quant(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, dtype: torch.dtype,
               cfg=None):
    """``ŵ`` ``(N, K)`` in ``dtype``; ``cfg`` forces a tile (tests)."""
    # (1) check: shapes and dtypes are checked by qdpo.kernels.ops
    w = contiguous_k(w)
    scales, zeros = same_layout(scales, zeros)
    (n, k), ng = w.shape, scales.shape[1]
    g, r = k // ng, n * ng
    cfg = cfg or config(r, g, w.device)
    # (2) allocate
    out = torch.empty(n, k, dtype=dtype, device=w.device)  # ŵ: [N, K] dtype
    # (3) launch
    grid = (triton.cdiv(r, cfg.block_r), triton.cdiv(g, cfg.block_g))
    _fake_quant_kernel[grid](
        w, scales, zeros, out,
        r, g, ng, *div_magic(ng),
        w.stride(0), scales.stride(0), scales.stride(1), out.stride(0),
        BITS=bits, OUT_DTYPE=tl_dtype(dtype), BLOCK_R=cfg.block_r, BLOCK_G=cfg.block_g,
        WIDE=wide_offsets(w, scales, out), num_warps=cfg.num_warps,
    )
    return out


@register("triton", "fake_quant_backward")
def fake_quant_backward(grad: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        bits: int, need_scales_grad: bool, cfg=None):
    """``(grad_w, grad_scales or None)``; ``cfg`` forces a tile (tests)."""
    # (1) check: shapes and dtypes are checked by qdpo.kernels.ops, which also
    # makes grad contiguous (a stride-0 grad from .sum() would read out of bounds)
    if grad.shape != w.shape:
        raise ValueError(f"grad has shape {tuple(grad.shape)}; expected the weight's {tuple(w.shape)}")
    grad, w = contiguous_k(grad), contiguous_k(w)
    scales, zeros = same_layout(scales, zeros)
    (n, k), ng = w.shape, scales.shape[1]
    g, r = k // ng, n * ng
    cfg = cfg or config(r, g, w.device)
    chunks = triton.cdiv(g, cfg.block_g)
    # (2) allocate
    grad_w = torch.empty(n, k, dtype=w.dtype, device=w.device)  # [N, K] w.dtype
    grad_s = torch.empty(n, ng, dtype=scales.dtype, device=w.device) if need_scales_grad else None
    # (3) launch: the LSQ sum keeps a group in one program; otherwise element-wise
    grid = (triton.cdiv(r, cfg.block_r), 1 if need_scales_grad else chunks)
    _fake_quant_backward_kernel[grid](
        grad, w, scales, zeros, grad_w, grad_w if grad_s is None else grad_s,
        r, g, ng, *div_magic(ng),
        grad.stride(0), w.stride(0), scales.stride(0), scales.stride(1), grad_w.stride(0),
        BITS=bits, W_DTYPE=tl_dtype(w.dtype), S_DTYPE=tl_dtype(scales.dtype), NEED_GS=need_scales_grad,
        BLOCK_R=cfg.block_r, BLOCK_G=cfg.block_g, N_CHUNKS=chunks if need_scales_grad else 1,
        WIDE=wide_offsets(grad, w, scales, grad_w), num_warps=cfg.num_warps,
    )
    return grad_w, grad_s
