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

import torch
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
def quotient(w, s, FOR_MASK: tl.constexpr = False):
    """``w / s`` for a ``[BLOCK_R, BLOCK_G]`` tile and its rows' scales as a column ``[BLOCK_R, 1]``,
    as far as rounding it to an integer, clamping and the sign of the result can tell: the same codes,
    ŵ and straight-through mask as IEEE ``div_rn`` (``csrc/qdpo_math.cuh: quotient``). Where every
    scale of the tile lies in [2⁻¹⁰⁰, 2¹⁰⁰], one IEEE reciprocal per row, then ``q0 = w·r`` and one FMA
    correction ``q0 + r·(w - q0·s)`` (q0 itself past 2²⁴) instead of a division per element; else the
    division. Not the quotient for LSQ's ``round(x) - x``, which can differ below 1/8. ``FOR_MASK``: a
    quotient only compared with the grid (the straight-through mask), see :func:`recip_quotient`."""
    if all_in_range(tl.abs(s)):
        x = recip_quotient(w, s, FOR_MASK)
    else:
        x = tl.math.div_rn(w, tl.broadcast_to(s, w.shape))
    return x


@triton.jit
def all_in_range(a):
    """Whether every value of ``a`` (a tile's row scales, or their magnitudes) lies in [2⁻¹⁰⁰, 2¹⁰⁰]:
    one reduction, a scalar for a branch over the whole tile."""
    return tl.min(((a >= 7.888609052210118e-31) & (a <= 1.2676506002282294e30)).to(tl.int32)) == 1


@triton.jit
def recip_quotient(w, s, FOR_MASK: tl.constexpr = False):
    """:func:`quotient`'s route for scales within 2^±100: one IEEE reciprocal per row, then
    ``q0 = w·r`` and one FMA correction (q0 itself past 2²⁴). ``FOR_MASK``: the corrected value even
    past 2²⁴, two instructions fewer per element, for a quotient that is only compared with the grid:
    there it is a few ulps from q0, or NaN where q0 overflowed, and either way outside the grid, as
    the true quotient is (``csrc/qdpo_math.cuh: quotient_for_mask``)."""
    r = tl.broadcast_to(tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s), w.shape)
    q0 = w * r
    q1 = tl.fma(tl.fma(-q0, tl.broadcast_to(s, w.shape), w), r, q0)
    if not FOR_MASK:
        q1 = tl.where(tl.abs(q0) < 16777216.0, q1, q0)
    return q1


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


@triton.jit
def codes_in_place(word, MASK: tl.constexpr, UNIT: tl.constexpr, z):
    """``q - z`` in fp32 for the code held in place at the bits ``MASK`` of ``word`` (``MASK`` below bit 23;
    ``word`` already ORed with the bits of 2²³, see :func:`word_halves`): masked, they read 2²³ + q / UNIT
    exactly, and one FMA by UNIT (a power of two) minus 2²³ · UNIT + z leaves q - z, exactly. One LOP3
    with one constant and one FMA: no shift and no integer-to-float conversion."""
    v = (word & (MASK | 0x4B000000)).to(tl.float32, bitcast=True)
    return tl.fma(v, UNIT, -(8388608.0 * UNIT + z))


@triton.jit
def word_halves(words):
    """int32 words of packed codes as their low and high 16-bit halves, each ORed with the bits of 2²³,
    for :func:`codes_in_place` (the high half is one LEA on sm_90)."""
    wd = words.to(tl.uint32, bitcast=True)
    return wd | 0x4B000000, (wd >> 16) | 0x4B000000


@triton.jit
def codes_of_words(lo, hi, z, BITS: tl.constexpr):
    """``q - z`` in fp32 for every code of the words whose halves are ``lo``, ``hi`` (:func:`word_halves`,
    ``[R, W]``), in column order: ``[R, W · 32 / BITS]``. Each code is masked in place
    (:func:`codes_in_place`) and the joins put them back in order."""
    if BITS == 4:
        # [R, W, i1, i2, i3] for code j = 4 i1 + 2 i2 + i3 of each word: each join appends an axis
        even = tl.join(tl.join(codes_in_place(lo, 0xF, 1.0, z), codes_in_place(hi, 0xF, 1.0, z)),
                       tl.join(codes_in_place(lo, 0xF00, 0.00390625, z), codes_in_place(hi, 0xF00, 0.00390625, z)))
        odd = tl.join(tl.join(codes_in_place(lo, 0xF0, 0.0625, z), codes_in_place(hi, 0xF0, 0.0625, z)),
                      tl.join(codes_in_place(lo, 0xF000, 0.000244140625, z),
                              codes_in_place(hi, 0xF000, 0.000244140625, z)))
    else:
        # [R, W, i1, i2] for byte j = 2 i1 + i2
        even = tl.join(codes_in_place(lo, 0xFF, 1.0, z), codes_in_place(hi, 0xFF, 1.0, z))
        odd = tl.join(codes_in_place(lo, 0xFF00, 0.00390625, z), codes_in_place(hi, 0xFF00, 0.00390625, z))
    return tl.reshape(tl.join(even, odd), [lo.shape[0], lo.shape[1] * (32 // BITS)])


def int32_words(q):
    """A uint8 tensor of packed codes ``(rows, bytes)`` as ``(rows, bytes / 4)`` int32 words (a view, no
    copy), or None where its rows are not whole, 4-byte aligned words (the kernels then read bytes)."""
    if q.dim() != 2 or q.stride(1) != 1 or q.shape[1] % 4 or q.stride(0) % 4 or q.storage_offset() % 4 \
            or q.data_ptr() % 4:
        return None
    return q.view(torch.int32)


TL_DTYPES = {}


def tl_dtype(torch_dtype):
    """The ``tl`` dtype for a torch float dtype (for constexpr kernel arguments)."""
    if not TL_DTYPES:
        TL_DTYPES.update({torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16})
    return TL_DTYPES[torch_dtype]
