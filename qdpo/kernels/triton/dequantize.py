"""Triton dequantize: packed codes → ``ŵ = (q - z) · s``.

Formula (``reference.dequantize``): ``ŵ[n, k] = (q[n, k] - z[n, g]) · s[n, g]``
with ``g = k // G``, computed in fp32 and cast once to ``dtype`` (bf16
rounded to nearest even, as ``Tensor.to``). Bit-exact vs reference.

Tensors (N = out_features, K = in_features, G = group size, NG = K // G):

=========  ====================  ================  ==============================
tensor     shape                 dtype             layout
=========  ====================  ================  ==============================
qweight    (N, K·bits/8)         uint8             K contiguous (copied if not),
                                                   any row stride; 4 bits: code
                                                   2j in the low nibble of byte j
scales     (N, NG)               fp32/fp16/bf16    any strides (copied
zeros      (N, NG)               uint8             with zeros if theirs
                                                   differ)
ŵ (out)    (N, K)                ``dtype``         contiguous
=========  ====================  ================  ==============================

Constraints: bits ∈ {4, 8}; NG divides K (the ops check). No backward: the
ops differentiate ``dequant_matmul`` w.r.t. x only; codes are integers.

Work decomposition: R = N·NG group rows of G elements; a program writes a
``[BLOCK_R, BLOCK_G]`` tile (BLOCK_G ≤ G chunk of one group, grid axis 1 runs
over chunks). Purely element-wise.

Bytes moved: read N·K·bits/8 + N·NG·(s_size + 1), write N·K·out_size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qdpo.kernels.backends import register
from qdpo.kernels.triton._common import cast_out, codes_minus_z, codes_of_words, int32_words, tl_dtype, word_halves
from qdpo.kernels.triton.quantize import (
    config, contiguous_k, div_magic, group_rows, load_grid, same_layout, wide_offsets,
)


@triton.jit
def _dequantize_kernel(
    # pointers
    q_ptr, s_ptr, z_ptr, out_ptr,
    # sizes
    R, G, NG, NG_MAGIC, NG_SHIFT,
    # strides (qweight and out are contiguous along K; stride_qg = bytes per group)
    stride_qn, stride_qg, stride_sn, stride_sg, stride_on,
    # meta-parameters
    BITS: tl.constexpr, OUT_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
    WORDS: tl.constexpr = False, WIDE: tl.constexpr = True,
):
    """Group rows ``[pid0·BLOCK_R, +BLOCK_R)``, columns ``[pid1·BLOCK_G, +BLOCK_G)`` of each group. WORDS:
    ``q_ptr`` holds int32 words, and ``stride_qn``, ``stride_qg`` count words."""
    r, rmask, row, grp = group_rows(tl.program_id(0), R, NG, NG_MAGIC, NG_SHIFT, BLOCK_R, WIDE)
    s, z = load_grid(s_ptr, z_ptr, row * stride_sn + grp * stride_sg, rmask)
    k0 = tl.program_id(1) * BLOCK_G
    kk = k0 + tl.arange(0, BLOCK_G)
    mask = rmask[:, None] & (kk < G)[None, :]
    q_base = row * stride_qn + grp * stride_qg
    if WORDS:
        # whole words per group: every code masked in place under the bits of 2^23, no shifts
        CPW: tl.constexpr = 32 // BITS
        ww = k0 // CPW + tl.arange(0, BLOCK_G // CPW)
        wmask = rmask[:, None] & (ww < G // CPW)[None, :]
        lo, hi = word_halves(tl.load(q_ptr + q_base[:, None] + ww[None, :], mask=wmask, other=0))
        w_hat = codes_of_words(lo, hi, z[:, None], BITS) * s[:, None]
    elif BITS == 8:
        q = tl.load(q_ptr + q_base[:, None] + kk[None, :], mask=mask, other=0)
        w_hat = codes_minus_z(q, z[:, None]) * s[:, None]
    else:
        # byte j holds codes 2j (low nibble) and 2j+1 (high nibble)
        jj = k0 // 2 + tl.arange(0, BLOCK_G // 2)
        jmask = rmask[:, None] & (jj < G // 2)[None, :]
        b = tl.load(q_ptr + q_base[:, None] + jj[None, :], mask=jmask, other=0).to(tl.uint32)
        q = tl.interleave(b & 0xF, b >> 4)
        w_hat = codes_minus_z(q, z[:, None]) * s[:, None]
    out_base = row * stride_on + grp * G
    tl.store(out_ptr + out_base[:, None] + kk[None, :], cast_out(w_hat, OUT_DTYPE), mask=mask)


def launch(qweight, scales, zeros, bits, dtype, cfg=None):
    """Run the kernel; ``cfg`` forces a tile (tests)."""
    # (1) check: shapes and dtypes are checked by qdpo.kernels.ops
    qweight = contiguous_k(qweight)
    scales, zeros = same_layout(scales, zeros)
    n, k = qweight.shape[0], qweight.shape[1] * 8 // bits
    ng = scales.shape[1]
    g, r = k // ng, n * ng
    cfg = cfg or config(r, g, qweight.device)
    # (2) allocate
    out = torch.empty(n, k, dtype=dtype, device=qweight.device)  # ŵ: [N, K] dtype
    # (3) launch
    grid = (triton.cdiv(r, cfg.block_r), triton.cdiv(g, cfg.block_g))
    # W4 groups of whole words: codes masked in place (fewer instructions per element, static sm_90:
    # benchmarks/static_sass.py); W8 gains nothing that way and reads bytes
    words = int32_words(qweight) if bits == 4 and g % 8 == 0 else None
    q, unit = (qweight, 1) if words is None else (words, 4)
    _dequantize_kernel[grid](
        q, scales, zeros, out,
        r, g, ng, *div_magic(ng),
        q.stride(0), g * bits // 8 // unit, scales.stride(0), scales.stride(1), out.stride(0),
        BITS=bits, OUT_DTYPE=tl_dtype(dtype), BLOCK_R=cfg.block_r, BLOCK_G=cfg.block_g, WORDS=words is not None,
        WIDE=wide_offsets(q, scales, out), num_warps=cfg.num_warps,
    )
    return out


@register("triton", "dequantize")
def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, dtype: torch.dtype):
    """``ŵ`` ``(N, K)`` in ``dtype``."""
    return launch(qweight, scales, zeros, bits, dtype)
