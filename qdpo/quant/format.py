"""The canonical packed format of qdpo: the one place it is specified.

A weight ``W`` of shape ``(N, K)`` (``nn.Linear.weight``: out_features ×
in_features) quantized with ``QuantSpec(bits, group_size, symmetric)`` is
stored as three tensors, all row-major and contiguous:

==========  ==============================  =======  ==========================================
tensor      shape                           dtype    meaning
==========  ==============================  =======  ==========================================
qweight     ``(N, K // 2)`` for 4 bits,     uint8    unsigned codes ``q ∈ [0, 2**bits - 1]``.
            ``(N, K)`` for 8 bits                    4 bits: byte ``j`` of row ``n`` holds code
                                                     ``k = 2j`` in bits 0–3 (low nibble) and
                                                     code ``k = 2j + 1`` in bits 4–7 (high nibble).
scales      ``(N, K // G)``                 float    one scale per group; the dtype of the
                                            16/32    weight that was quantized.
zeros       ``(N, K // G)``                 uint8    integer zero point per group, in the same
                                                     code space as ``q``; symmetric specs store
                                                     the constant ``2**(bits-1)``.
==========  ==============================  =======  ==========================================

``G`` is the group size (``K`` when ``group_size == -1``); group ``g`` of row
``n`` covers ``k ∈ [g·G, (g+1)·G)``. The dequantized weight is
``ŵ[n, k] = (q[n, k] - zeros[n, k // G]) · scales[n, k // G]``, computed in
fp32 and cast once to the output dtype.

Because the zero point is stored for symmetric specs too, every consumer
(dequantize, the matmuls, fake-quant) handles both with one code path; only
the choice of scales and zeros differs (``qdpo/kernels/reference.py``).

A kernel that wants another layout (interleaved, transposed, int32 words)
derives it from this one with its own tested re-layout function, once, at
load time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qdpo.kernels import reference
from qdpo.quant.spec import QuantSpec

pack = reference.pack
unpack = reference.unpack


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight in the canonical packed format (see the module docstring).

    Attributes:
        qweight: ``(N, K // 2)`` (4 bits) or ``(N, K)`` (8 bits) uint8 codes.
        scales: ``(N, n_groups)`` float scales.
        zeros: ``(N, n_groups)`` uint8 zero points.
        spec: the :class:`QuantSpec` used.
        shape: the original ``(N, K)``.
        dtype: the original weight dtype (the default dequantization dtype).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    spec: QuantSpec
    shape: tuple[int, int]
    dtype: torch.dtype

    def __post_init__(self) -> None:
        n, k = self.shape
        per_byte = 8 // self.spec.bits
        g = 1 if self.spec.group_size == -1 else k // self.spec.group_size
        expect = {"qweight": (n, k // per_byte), "scales": (n, g), "zeros": (n, g)}
        for name, shp in expect.items():
            got = tuple(getattr(self, name).shape)
            if got != shp:
                raise ValueError(
                    f"QuantizedWeight.{name} has shape {got}, expected {shp} for a "
                    f"({n}, {k}) weight with {self.spec}"
                )

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(
            self.qweight.to(device), self.scales.to(device), self.zeros.to(device),
            self.spec, self.shape, self.dtype,
        )

    @property
    def nbytes(self) -> int:
        """Bytes held by the three tensors."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))
