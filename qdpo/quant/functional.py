"""The functional public API: spec-level wrappers around ``torch.ops.qdpo.*``.

These are the names other projects use (re-exported from ``qdpo``). Each
takes a :class:`QuantSpec` or :class:`QuantizedWeight` and an optional
``backend`` (``"auto"``, ``"reference"``, ``"triton"``, ``"cuda"``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qdpo.kernels import ops
from qdpo.quant.format import QuantizedWeight
from qdpo.quant.spec import QuantSpec


def _check_spec(spec) -> None:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a qdpo.QuantSpec, got {type(spec).__name__}")


def quantize(w: Tensor, spec: QuantSpec, backend: str = "auto") -> QuantizedWeight:
    """Round-to-nearest quantize ``w`` ``(N, K)`` into the canonical packed format."""
    _check_spec(spec)
    if not isinstance(w, Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    w = w.detach()
    qweight, scales, zeros = ops.quantize(w, spec.bits, spec.group_size, spec.symmetric, backend)
    return QuantizedWeight(qweight, scales, zeros, spec, tuple(w.shape), w.dtype)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype | None = None, backend: str = "auto") -> Tensor:
    """``ŵ`` ``(N, K)`` in ``dtype`` (default: the original weight dtype)."""
    return ops.dequantize(qw.qweight, qw.scales, qw.zeros, qw.spec.bits, dtype or qw.dtype, backend)


def dequant_matmul(x: Tensor, qw: QuantizedWeight, bias: Tensor | None = None, backend: str = "auto") -> Tensor:
    """``x @ ŵᵀ (+ bias)`` for x ``(..., K)``; differentiable in x and bias."""
    return ops.dequant_matmul(x, qw.qweight, qw.scales, qw.zeros, qw.spec.bits, bias, backend)


def _grid(w: Tensor, spec: QuantSpec, scales, zeros, backend) -> tuple[Tensor, Tensor]:
    """Given scales/zeros, or RTN ones computed from ``w`` (not differentiated)."""
    _check_spec(spec)
    if (scales is None) != (zeros is None):
        raise ValueError("pass both scales and zeros, or neither (they are then computed from w)")
    if scales is None:
        scales, zeros = ops.qparams(w.detach(), spec.bits, spec.group_size, spec.symmetric, backend)
    return scales, zeros


def fake_quant(
    w: Tensor, spec: QuantSpec, scales: Tensor | None = None, zeros: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """``dequantize(quantize(w))`` with straight-through gradients.

    Gradient w.r.t. ``w`` passes where the code was not clipped and is 0 where
    it was; when ``scales`` requires grad it receives the LSQ gradient.
    """
    scales, zeros = _grid(w, spec, scales, zeros, backend)
    return ops.fake_quant(w, scales, zeros, spec.bits, None, backend)


def fake_quant_matmul(
    x: Tensor, w: Tensor, spec: QuantSpec, scales: Tensor | None = None,
    zeros: Tensor | None = None, bias: Tensor | None = None, backend: str = "auto",
) -> Tensor:
    """``x @ fake_quant(w)ᵀ (+ bias)``, ``ŵ`` in ``x.dtype``; gradients for x, w (STE), scales (LSQ), bias."""
    scales, zeros = _grid(w, spec, scales, zeros, backend)
    return ops.fake_quant_matmul(x, w, scales, zeros, spec.bits, bias, backend)
