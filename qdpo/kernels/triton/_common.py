"""Device helpers shared by qdpo's Triton kernels.

The first two exist because of what was checked on triton 3.9's CPU
interpreter (``../shared/TOOLCHAIN.md``) and must behave identically on a GPU:

* ``libdevice.rint`` is missing under the interpreter, so rounding half to
  even (``torch.round``) is built from ``tl.floor``;
* fp32 → bf16 casts truncate under the interpreter while PyTorch rounds to
  nearest even, so there bf16 outputs go through a bit-level RNE
  (``cast_out``; on a GPU the native cast, which already rounds so).

``codes_minus_z`` turns integer codes into fp32 through the bits of 2²³, where an
integer-to-float conversion would run at a quarter of the rate of the rest
(``tests/test_triton_codegen.py`` reads the sm_90 PTX for both).

Division in the quantizers uses ``tl.math.div_rn`` (IEEE round-to-nearest)
because Triton's ``/`` on fp32 may lower to an approximate division on the
GPU, and the codes must match ``w / s`` in PyTorch bit for bit.
"""

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

# Read once, as the @triton.jit decorators read TRITON_INTERPRET at import time: the interpreter's
# workarounds below. On a GPU an fp32 → bf16 cast (cvt.rn.bf16.f32) already rounds to nearest even,
# and rint is one instruction: where the workarounds cost four to seven, in kernels that move a few
# bytes per element.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def round_half_even_floor(x):
    """``torch.round`` on fp32 built from ``tl.floor`` (the interpreter lacks rint): nearest integer,
    ties to even. Exact for all finite x."""
    r = tl.floor(x)
    d = x - r  # exact: r and x share the exponent range where x has a fraction
    half_r = r * 0.5
    odd = tl.floor(half_r) != half_r
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, r + 1.0, r)


@triton.jit
def round_half_even(x):
    """``torch.round`` on fp32: the GPU's rint, :func:`round_half_even_floor` under the interpreter."""
    if INTERPRETED:
        return round_half_even_floor(x)
    else:
        return libdevice.rint(x)


@triton.jit
def quotient(w, s):
    """``w / s`` for a ``[BLOCK_R, BLOCK_G]`` tile and its rows' scales as a column ``[BLOCK_R, 1]``,
    as far as rounding it to an integer, clamping and the sign of the result can tell: the same codes,
    ŵ and straight-through mask as IEEE ``div_rn`` (``csrc/qdpo_math.cuh: quotient``). Where every
    scale of the tile lies in [2⁻¹⁰⁰, 2¹⁰⁰], one IEEE reciprocal per row, then ``q0 = w·r`` and one FMA
    correction ``q0 + r·(w - q0·s)`` (q0 itself past 2²⁴) instead of a division per element; else the
    division. Not the quotient for LSQ's ``round(x) - x``, which can differ below 1/8."""
    a = tl.abs(s)
    if tl.min(((a >= 7.888609052210118e-31) & (a <= 1.2676506002282294e30)).to(tl.int32)) == 1:  # 2^-100, 2^100
        r = tl.broadcast_to(tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s), w.shape)
        q0 = w * r
        q1 = tl.fma(tl.fma(-q0, tl.broadcast_to(s, w.shape), w), r, q0)
        x = tl.where(tl.abs(q0) < 16777216.0, q1, q0)
    else:
        x = tl.math.div_rn(w, tl.broadcast_to(s, w.shape))
    return x


@triton.jit
def to_bf16_rne(x):
    """fp32 → bf16 rounding to nearest even (PyTorch's cast), also under the interpreter."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + (0x7FFF + ((bits >> 16) & 1))
    bits = bits & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def cast_out(x, OUT_DTYPE: tl.constexpr):
    """Cast fp32 ``x`` to ``OUT_DTYPE`` exactly as ``Tensor.to`` would (bf16: bit-level rounding under
    the interpreter, the GPU's own round-to-nearest-even cast on a GPU)."""
    if OUT_DTYPE == tl.bfloat16 and INTERPRETED:
        return to_bf16_rne(x)
    else:
        return x.to(OUT_DTYPE)


@triton.jit
def codes_minus_z(q, z):
    """``q - z`` in fp32 for integer codes ``q < 2²³`` and zero points ``z`` (broadcast): the bits of
    2²³ with q in the low mantissa, minus 2²³ + z, both exact, so the same value as
    ``q.to(tl.float32) - z`` without an integer-to-float conversion (a quarter-rate instruction on
    the GPU)."""
    return (q.to(tl.uint32) | 0x4B000000).to(tl.float32, bitcast=True) - (z + 8388608.0)


TL_DTYPES = {}


def tl_dtype(torch_dtype):
    """The ``tl`` dtype for a torch float dtype (for constexpr kernel arguments)."""
    import torch

    if not TL_DTYPES:
        TL_DTYPES.update({torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16})
    return TL_DTYPES[torch_dtype]
