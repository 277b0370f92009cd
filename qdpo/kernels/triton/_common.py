"""Device helpers shared by qdpo's Triton kernels.

The first two exist because of what was checked on triton 3.9's CPU
interpreter (``../shared/TOOLCHAIN.md``) and must behave identically on a GPU:

* ``libdevice.rint`` is missing under the interpreter, so rounding half to
  even (``torch.round``) is built from ``tl.floor``;
* fp32 → bf16 casts truncate under the interpreter while PyTorch rounds to
  nearest even, so there bf16 outputs go through a bit-level RNE
  (``cast_out``; on a GPU the native cast, which already rounds so).

``code_f32`` turns integer codes into fp32 through the bits of 2²³, where an
integer-to-float conversion would run at a quarter of the rate of the rest
(``tests/test_triton_codegen.py`` reads the sm_90 PTX for both).

Division in the quantizers uses ``tl.math.div_rn`` (IEEE round-to-nearest)
because Triton's ``/`` on fp32 may lower to an approximate division on the
GPU, and the codes must match ``w / s`` in PyTorch bit for bit.
"""

import os

import triton
import triton.language as tl

# Read once, as the @triton.jit decorators read TRITON_INTERPRET at import time. On the GPU an
# fp32 → bf16 cast (cvt.rn.bf16.f32) already rounds to nearest even: one instruction where the
# bit-level rounding costs four, in kernels that move a few bytes per element.
BF16_BY_BITS = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def round_half_even(x):
    """``torch.round`` on fp32: nearest integer, ties to even. Exact for all finite x."""
    r = tl.floor(x)
    d = x - r  # exact: r and x share the exponent range where x has a fraction
    half_r = r * 0.5
    odd = tl.floor(half_r) != half_r
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, r + 1.0, r)


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
    if OUT_DTYPE == tl.bfloat16 and BF16_BY_BITS:
        return to_bf16_rne(x)
    else:
        return x.to(OUT_DTYPE)


@triton.jit
def code_f32(q):
    """2²³ + q as fp32 for uint32 codes q < 2²³: the bits of 2²³ with q in the low mantissa, so no
    integer-to-float conversion (a quarter-rate instruction on the GPU); subtracting 2²³ + z is then
    exact and gives q - z, the same value as ``q.to(tl.float32) - z``."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True)


TL_DTYPES = {}


def tl_dtype(torch_dtype):
    """The ``tl`` dtype for a torch float dtype (for constexpr kernel arguments)."""
    import torch

    if not TL_DTYPES:
        TL_DTYPES.update({torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16})
    return TL_DTYPES[torch_dtype]
