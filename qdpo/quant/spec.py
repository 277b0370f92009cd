"""QuantSpec: what a weight quantization is (bits, group size, symmetry).

A spec is a frozen value object; it validates itself on construction and
knows how to check a weight shape against itself. Everything else in qdpo
takes a spec (Python API) or its three fields (``torch.ops.qdpo.*``).
"""

from __future__ import annotations

from dataclasses import dataclass

from qdpo.kernels.ops import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, check_shape


@dataclass(frozen=True)
class QuantSpec:
    """Weight-only integer quantization with one scale (and zero) per group.

    Args:
        bits: 4 or 8 bits per weight code.
        group_size: weights per group along K (in_features); -1 means one
            group per output row (per-channel).
        symmetric: ``False`` (default): asymmetric, integer zero point per
            group. ``True``: zero point fixed at ``2**(bits-1)``.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        if type(self.bits) is not int or self.bits not in SUPPORTED_BITS:
            raise ValueError(
                f"bits={self.bits!r} is not supported; use one of {SUPPORTED_BITS}"
            )
        if type(self.group_size) is not int or self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(
                f"group_size={self.group_size!r} is not supported; use one of "
                f"{SUPPORTED_GROUP_SIZES} (-1 = one group per output row)"
            )
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric={self.symmetric!r} must be a bool")

    @property
    def qmax(self) -> int:
        """Largest stored code, ``2**bits - 1``."""
        return (1 << self.bits) - 1

    @property
    def name(self) -> str:
        """Short name, e.g. ``W4A16-g128-asym``."""
        g = "ch" if self.group_size == -1 else f"g{self.group_size}"
        return f"W{self.bits}A16-{g}-{'sym' if self.symmetric else 'asym'}"

    def group_size_for(self, k: int) -> int:
        """The effective group size for a row of ``k`` weights."""
        return k if self.group_size == -1 else self.group_size

    def check_shape(self, n: int, k: int, what: str = "weight") -> None:
        """Raise ``ValueError`` if an ``(n, k)`` weight cannot use this spec."""
        check_shape(n, k, self.bits, self.group_size, what)

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        missing = {"bits", "group_size", "symmetric"} - set(d)
        if missing:
            raise ValueError(f"quantization config is missing {sorted(missing)}; got {d}")
        return cls(bits=d["bits"], group_size=d["group_size"], symmetric=d["symmetric"])
