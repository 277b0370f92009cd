"""Device helpers shared by qdpo's Triton kernels.

Both exist because of what was checked on triton 3.9's CPU interpreter
(``../shared/TOOLCHAIN.md``) and must behave identically on a GPU:

* ``libdevice.rint`` is missing under the interpreter, so rounding half to
  even (``torch.round``) is built from ``tl.floor``;
* fp32 → bf16 casts truncate under the interpreter while PyTorch rounds to
  nearest even, so bf16 outputs go through a bit-level RNE.

Division in the quantizers uses ``tl.math.div_rn`` (IEEE round-to-nearest)
because Triton's ``/`` on fp32 may lower to an approximate division on the
GPU, and the codes must match ``w / s`` in PyTorch bit for bit.
"""

import triton
import triton.language as tl


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
    """Cast fp32 ``x`` to ``OUT_DTYPE`` exactly as ``Tensor.to`` would."""
    if OUT_DTYPE == tl.bfloat16:
        return to_bf16_rne(x)
    else:
        return x.to(OUT_DTYPE)


TL_DTYPES = {}


def tl_dtype(torch_dtype):
    """The ``tl`` dtype for a torch float dtype (for constexpr kernel arguments)."""
    import torch

    if not TL_DTYPES:
        TL_DTYPES.update({torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16})
    return TL_DTYPES[torch_dtype]
