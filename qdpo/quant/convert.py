"""Converters between qdpo's canonical packed format and the packings other tools load.

Every function here is pure (tensors in, tensors out, nothing read or
written) and works on one weight. The canonical side is always a
:class:`qdpo.quant.format.QuantizedWeight` (``qweight`` uint8 ``(N, K·b/8)``,
``scales`` ``(N, K/G)`` float, ``zeros`` ``(N, K/G)`` uint8, ŵ = (q − z)·s).
``N`` is out_features, ``K`` in_features, ``G`` the group size (``K`` for
per-channel, ``group_size=-1``), ``b`` the bits, and "word" an int32 whose
bit pattern is what matters (values ≥ 2³¹ are stored negative).

================================  =============================================  ==========================
format                            tensors of one Linear ``<name>.``               what qdpo's q, z, s become
================================  =============================================  ==========================
compressed-tensors                ``weight_packed`` int32 ``[N, ⌈K·b/32⌉]``:      q as stored (CT's signed
``pack-quantized`` (W4, W8)       code ``k`` in bits ``b·(k mod 32/b)`` of word   q − 2^(b−1) plus its
                                  ``k // (32/b)``, lowest first, zero padded;     offset 2^(b−1));
                                  ``weight_scale`` ``[N, K/G]`` (scales' dtype);  s unchanged (any float);
                                  ``weight_zero_point`` int32 ``[⌈N·b/32⌉, K/G]``  z packed along **N**
                                  (asymmetric only, packed along N);              (asymmetric); symmetric
                                  ``weight_shape`` int64 ``[2]`` = ``(N, K)``.    stores no zero point.
GPTQ v1 (W4, W8)                  ``qweight`` int32 ``[K/(32/b), N]`` packed      q; z − 1 (mod 2^b);
                                  along K (code ``k`` in bits ``b·(k mod 32/b)``  s as float16.
                                  of row ``k // (32/b)``); ``qzeros`` int32
                                  ``[K/G, N/(32/b)]`` packed along N, storing
                                  ``z − 1``; ``scales`` fp16 ``[K/G, N]``;
                                  ``g_idx`` int32 ``[K]`` = ``k // G``.
AWQ GEMM (W4)                     ``qweight`` int32 ``[K, N/8]``: column ``8j +   q; z; s as float16.
                                  ORDER[i]`` in bits ``4i`` of word ``j``, with
                                  ``ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``;
                                  ``qzeros`` int32 ``[K/G, N/8]`` same order,
                                  storing ``z``; ``scales`` fp16 ``[K/G, N]``.
================================  =============================================  ==========================

Exactness: the round trip qdpo → format → qdpo returns the same codes, zero
points and scales bit for bit. Where a format cannot hold a weight exactly
the converter raises :class:`FormatError` instead of writing something that
dequantizes differently:

* GPTQ and AWQ store **float16** scales. A float32 or bfloat16 scale that
  float16 cannot represent exactly (most float32 scales, bfloat16 scales
  outside float16's range or precision, the ``finfo.tiny`` scale of an
  all-zero group) raises unless ``allow_inexact_scales=True``, which rounds
  to the nearest float16 (the exported model then differs from qdpo's by that
  rounding: ≤ 2⁻¹¹ relative per scale). A scale that overflows float16 always
  raises. Scales that are float16 already are exact.
* GPTQ v1 stores ``z − 1``: a zero point of 0 becomes 2^b − 1, which loaders
  that convert v1 to v2 by adding 1 to every packed field (gptqmodel) carry
  into the neighbouring field. ``to_gptq`` raises for ``z = 0`` (use
  compressed-tensors or AWQ, which store ``z`` itself).
* GPTQ packs along K in words of ``32/b`` codes and its zero points along N:
  it needs ``K`` and ``N`` divisible by ``32/b`` (8 for W4, 4 for W8). AWQ
  needs ``N`` divisible by 8 and 4 bits. compressed-tensors pads and takes
  any shape qdpo takes.
* AWQ GEMM has no symmetric variant: a symmetric weight is written with its
  constant zero point ``2^(b−1)``, which dequantizes identically; reading it
  back with a symmetric spec checks that every zero point is that constant.

Reading (``from_*``) takes the per-module tensors (names without the module
prefix) and the :class:`QuantSpec` the checkpoint's config declares, checks
every shape and dtype, and returns a ``QuantizedWeight`` whose scales keep
the file's dtype. Act-order checkpoints (a ``g_idx`` that is not
``k // G``) are not supported and raise.

Example: a GPTQ layer on qdpo's kernels::

    from qdpo.quant.convert import from_gptq
    qw = from_gptq({"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx},
                   QuantSpec(bits=4, group_size=128, symmetric=True))
    y = torch.ops.qdpo.dequant_matmul(x, qw.qweight, qw.scales, qw.zeros, 4, None, "auto")
"""

from __future__ import annotations

import torch
from torch import Tensor

from qdpo.quant.format import QuantizedWeight, pack, unpack
from qdpo.quant.spec import QuantSpec

__all__ = [
    "FormatError", "FORMATS", "AWQ_ORDER",
    "to_compressed_tensors", "from_compressed_tensors",
    "to_gptq", "from_gptq", "to_awq", "from_awq",
    "check_exportable", "cast_scales",
]

FORMATS = ("compressed-tensors", "gptq", "awq")
# AWQ GEMM's interleave: bits 4i of a word hold column ORDER[i] of its 8 (the kernel's dequant order).
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_WORD = 32  # bits per packed word in every external format


class FormatError(ValueError):
    """A weight cannot be written to, or read from, a format exactly as asked."""


# ----------------------------------------------------------------------------- int32 words
def _pack_words(codes: Tensor, bits: int, order: tuple[int, ...] | None = None) -> Tensor:
    """``[R, C]`` unsigned codes → ``[R, ⌈C·b/32⌉]`` int32, packed along the last dim.

    Field ``i`` (bits ``b·i``) of word ``w`` holds element ``w·(32/b) + order[i]``
    (``order`` defaults to the identity); a short last word is zero padded.
    """
    per = _WORD // bits
    r, c = codes.shape
    pad = (-c) % per
    v = torch.nn.functional.pad(codes.to(torch.int64), (0, pad)).reshape(r, -1, per)  # [R, W, per]
    if order is not None:
        v = v[..., list(order)]
    shifts = torch.arange(per, dtype=torch.int64, device=codes.device) * bits
    words = (v << shifts).sum(-1)  # fields are disjoint: the sum is a bitwise or
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def _unpack_words(words: Tensor, bits: int, count: int, order: tuple[int, ...] | None = None) -> Tensor:
    """Inverse of :func:`_pack_words`: ``[R, W]`` int32 → ``[R, count]`` uint8 codes."""
    per = _WORD // bits
    shifts = torch.arange(per, dtype=torch.int64, device=words.device) * bits
    fields = (words.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [R, W, per]
    if order is not None:
        inverse = sorted(range(per), key=lambda i: order[i])  # field holding element j
        fields = fields[..., inverse]
    return fields.reshape(words.shape[0], -1)[:, :count].to(torch.uint8).contiguous()


# ----------------------------------------------------------------------------- checks
def _n_groups(spec: QuantSpec, k: int) -> int:
    return k // spec.group_size_for(k)


def _codes(qw: QuantizedWeight) -> Tensor:
    return unpack(qw.qweight, qw.spec.bits)  # [N, K] uint8


def _check_symmetric_zeros(zeros: Tensor, spec: QuantSpec, where: str) -> None:
    if spec.symmetric and not bool((zeros == (1 << (spec.bits - 1))).all()):
        raise FormatError(f"{where}: the spec is symmetric but the zero points are not all "
                          f"{1 << (spec.bits - 1)}; read it with symmetric=False")


def cast_scales(scales: Tensor, dtype: torch.dtype, fmt: str, allow_inexact: bool = False) -> Tensor:
    """``scales`` in ``dtype``, raising :class:`FormatError` where the cast is not exact.

    With ``allow_inexact=True`` the scales are rounded to the nearest value of
    ``dtype`` instead; a scale that overflows to ±inf always raises.
    """
    out = scales.to(dtype)
    if out.dtype == scales.dtype:
        return out.contiguous()
    if not bool(torch.isfinite(out).all()):
        big = scales.float().abs().max().item()
        raise FormatError(f"{fmt} stores {dtype} scales and a scale of {big:.3g} overflows {dtype}")
    bad = out.to(scales.dtype) != scales
    if bool(bad.any()) and not allow_inexact:
        raise FormatError(
            f"{int(bad.sum())} of {bad.numel()} {scales.dtype} scales are not exactly representable in "
            f"{dtype}, which {fmt} stores; quantize with {dtype} scales (a {dtype} model), export as "
            f"compressed-tensors (keeps {scales.dtype}), or allow inexact scales (allow_inexact_scales=True, "
            f"--allow-inexact-scales: rounded to the nearest {dtype})")
    return out.contiguous()


def check_exportable(spec: QuantSpec, n: int, k: int, fmt: str) -> None:
    """Raise :class:`FormatError` if an ``(n, k)`` weight with ``spec`` has no ``fmt`` layout.

    This checks the spec and shape only; the values (fp16 scales, GPTQ's
    zero point 0) are checked by the converter itself.
    """
    if fmt not in FORMATS:
        raise FormatError(f"format {fmt!r} is not known; use one of {FORMATS}")
    if fmt == "compressed-tensors":
        return
    if fmt == "awq" and spec.bits != 4:
        raise FormatError(f"AWQ GEMM is 4-bit only; this model is {spec.name}: export W8 as "
                          "compressed-tensors or gptq")
    per = _WORD // spec.bits
    dims = (("N (out_features)", n),) if fmt == "awq" else (("K (in_features)", k), ("N (out_features)", n))
    for what, v in dims:
        if v % per:
            raise FormatError(f"{fmt} packs {per} {spec.bits}-bit codes per int32 and needs {what}={v} "
                              f"divisible by {per}; export as compressed-tensors, which pads")


# ----------------------------------------------------------------------------- compressed-tensors
def to_compressed_tensors(qw: QuantizedWeight) -> dict[str, Tensor]:
    """One weight in compressed-tensors ``pack-quantized`` layout (see the module table).

    Returns ``weight_packed`` int32 ``[N, ⌈K·b/32⌉]``, ``weight_scale``
    ``[N, K/G]`` (``qw.scales``' dtype, exact), ``weight_shape`` int64 ``[2]``
    and, for asymmetric specs, ``weight_zero_point`` int32 ``[⌈N·b/32⌉, K/G]``.
    Per-channel (``group_size=-1``) is compressed-tensors' ``"channel"``
    strategy, with ``[N, 1]`` scales.
    """
    b = qw.spec.bits
    _check_symmetric_zeros(qw.zeros, qw.spec, "to_compressed_tensors")
    out = {
        "weight_packed": _pack_words(_codes(qw), b),  # [N, ceil(K*b/32)] int32
        "weight_scale": qw.scales.detach().clone().contiguous(),  # [N, K/G]
        "weight_shape": torch.tensor(qw.shape, dtype=torch.int64, device=qw.qweight.device),  # [2]
    }
    if not qw.spec.symmetric:
        out["weight_zero_point"] = _pack_words(qw.zeros.t(), b).t().contiguous()  # [ceil(N*b/32), K/G]
    return out


def from_compressed_tensors(tensors: dict[str, Tensor], spec: QuantSpec) -> QuantizedWeight:
    """Read one compressed-tensors ``pack-quantized`` weight (keys as :func:`to_compressed_tensors` writes).

    ``spec`` comes from the checkpoint's config group. Asymmetric zero points
    may also be unpacked (``[N, K/G]`` signed ``z − 2^(b−1)``, as older
    compressed-tensors releases stored them). A ``weight_g_idx`` that is not
    ``k // G`` (activation ordering) raises.
    """
    _require(tensors, ("weight_packed", "weight_scale", "weight_shape")
             + (() if spec.symmetric else ("weight_zero_point",)), "compressed-tensors")
    shape = tensors["weight_shape"].reshape(-1).tolist()
    if len(shape) != 2:
        raise FormatError(f"compressed-tensors weight_shape {shape} is not 2-D (N, K)")
    n, k = (int(v) for v in shape)
    _check_spec_shape(spec, n, k)
    b, g = spec.bits, _n_groups(spec, k)
    per = _WORD // b
    packed = _check_tensor(tensors, "weight_packed", (n, -(-k // per)), torch.int32, "compressed-tensors")
    scale = _check_float(tensors, "weight_scale", (n, g), "compressed-tensors")
    _check_g_idx(tensors.get("weight_g_idx"), spec, k, "compressed-tensors weight_g_idx")
    if spec.symmetric:
        _check_ct_symmetric_zero_point(tensors.get("weight_zero_point"), b, n, g)
        zeros = torch.full((n, g), 1 << (b - 1), dtype=torch.uint8, device=packed.device)
    else:
        zeros = _ct_zero_points(tensors["weight_zero_point"], b, n, g)  # [N, K/G]
    codes = _unpack_words(packed, b, k)  # [N, K]
    return QuantizedWeight(pack(codes, b), scale.contiguous(), zeros, spec, (n, k), scale.dtype)


def _ct_zero_points(zp: Tensor, bits: int, n: int, g: int) -> Tensor:
    """An asymmetric weight's zero points as qdpo's ``[N, K/G]`` uint8: packed along N (int32
    ``[⌈N·b/32⌉, K/G]``), or unpacked as older compressed-tensors releases stored them (one signed
    integer ``z − 2^(b−1)`` per group, ``[N, K/G]``; an int32 tensor of both shapes is read as packed)."""
    per = _WORD // bits
    packed = (-(-n // per), g)
    if zp.dtype == torch.int32 and tuple(zp.shape) == packed:
        return _unpack_words(zp.t(), bits, n).t().contiguous()
    if tuple(zp.shape) != (n, g) or zp.is_floating_point() or zp.dtype == torch.bool:
        raise FormatError(f"compressed-tensors weight_zero_point has shape {tuple(zp.shape)} and dtype {zp.dtype}, "
                          f"expected int32 {packed} (packed along N) or integers {(n, g)} (unpacked, older "
                          "compressed-tensors)")
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    z = zp.to(torch.int64)
    if z.numel() and not bool(((z >= lo) & (z <= hi)).all()):
        raise FormatError(f"compressed-tensors weight_zero_point is unpacked {(n, g)} but holds "
                          f"{int(z[(z < lo) | (z > hi)][0])}, outside the signed {bits}-bit range [{lo}, {hi}]; "
                          "the file is damaged or its config's num_bits does not match it")
    return (z - lo).to(torch.uint8).contiguous()


def _check_ct_symmetric_zero_point(zp: Tensor | None, bits: int, n: int, g: int) -> None:
    """A symmetric weight may carry a ``weight_zero_point`` (older writers stored one): it must then be the
    symmetric zero point, packed (each field ``2^(b−1)``) or unpacked (CT's signed 0), never another grid."""
    if zp is None:
        return
    per = _WORD // bits
    if zp.dtype == torch.int32 and tuple(zp.shape) == (-(-n // per), g):
        ok = bool((_unpack_words(zp.t(), bits, n) == 1 << (bits - 1)).all())
    else:
        ok = tuple(zp.shape) == (n, g) and not zp.is_floating_point() and not bool(zp.any())
    if not ok:
        raise FormatError("compressed-tensors: the config says symmetric but weight_zero_point holds other zero "
                          "points (an asymmetric weight); the config's 'symmetric' does not match the file")


# ----------------------------------------------------------------------------- GPTQ v1
def to_gptq(qw: QuantizedWeight, allow_inexact_scales: bool = False, v2: bool = False) -> dict[str, Tensor]:
    """One weight in GPTQ layout (v1 by default; ``v2=True`` stores ``z`` instead of ``z − 1``).

    Returns ``qweight`` int32 ``[K/(32/b), N]`` (packed along K), ``qzeros``
    int32 ``[K/G, N/(32/b)]`` (packed along N), ``scales`` float16 ``[K/G, N]``
    and ``g_idx`` int32 ``[K]`` = ``k // G``. Raises :class:`FormatError` for
    shapes GPTQ cannot pack, a v1 zero point of 0, and inexact float16 scales
    (see the module docstring).
    """
    n, k = qw.shape
    b = qw.spec.bits
    check_exportable(qw.spec, n, k, "gptq")
    _check_symmetric_zeros(qw.zeros, qw.spec, "to_gptq")
    if not v2 and bool((qw.zeros == 0).any()):
        raise FormatError(
            f"{int((qw.zeros == 0).sum())} zero points are 0, which GPTQ v1 stores as z - 1 = -1 and "
            "v1→v2 loaders carry into the next field; export as compressed-tensors or awq")
    zeros = qw.zeros.to(torch.int64) - (0 if v2 else 1)
    gs = qw.spec.group_size_for(k)
    return {
        "qweight": _pack_words(_codes(qw), b).t().contiguous(),  # [N, K/(32/b)] → [K/(32/b), N]
        "qzeros": _pack_words((zeros & ((1 << b) - 1)).t(), b),  # [K/G, N/(32/b)]
        "scales": cast_scales(qw.scales.t(), torch.float16, "GPTQ", allow_inexact_scales),  # [K/G, N]
        "g_idx": (torch.arange(k, dtype=torch.int32, device=qw.qweight.device) // gs).contiguous(),  # [K]
    }


def from_gptq(tensors: dict[str, Tensor], spec: QuantSpec, v2: bool = False) -> QuantizedWeight:
    """Read one GPTQ weight (``qweight``, ``qzeros``, ``scales``, optional ``g_idx``).

    ``N`` and ``K`` come from ``qweight``; ``spec`` from the checkpoint's
    ``quantize_config`` (``bits``, ``group_size``, ``sym``). v1 zero points are
    ``stored + 1 (mod 2^b)``, v2 ``stored``. An act-order ``g_idx`` (not
    ``k // G``) raises.
    """
    _require(tensors, ("qweight", "qzeros", "scales"), "GPTQ")
    b = spec.bits
    per = _WORD // b
    qweight = tensors["qweight"]
    if qweight.dim() != 2:
        raise FormatError(f"GPTQ qweight has shape {tuple(qweight.shape)}; expected [K/{per}, N]")
    k, n = qweight.shape[0] * per, qweight.shape[1]
    _check_spec_shape(spec, n, k)
    g = _n_groups(spec, k)
    _check_tensor(tensors, "qweight", (k // per, n), torch.int32, "GPTQ")
    if n % per:
        raise FormatError(f"GPTQ N={n} is not divisible by {per}: its qzeros cannot hold {n} zero points")
    scales = _check_float(tensors, "scales", (g, n), "GPTQ")
    qzeros = _check_tensor(tensors, "qzeros", (g, n // per), torch.int32, "GPTQ")
    _check_g_idx(tensors.get("g_idx"), spec, k, "GPTQ g_idx")
    codes = _unpack_words(qweight.t(), b, k)  # [N, K]
    stored = _unpack_words(qzeros, b, n).t().to(torch.int64)  # [N, K/G]
    zeros = ((stored + (0 if v2 else 1)) & ((1 << b) - 1)).to(torch.uint8)
    _check_gptq_symmetric_zeros(zeros, spec, v2)
    s = scales.t().contiguous()
    return QuantizedWeight(pack(codes, b), s, zeros.contiguous(), spec, (n, k), s.dtype)


def _check_gptq_symmetric_zeros(zeros: Tensor, spec: QuantSpec, v2: bool) -> None:
    """A symmetric GPTQ weight's zero points, read as ``v2`` says, are all ``2^(b−1)``; else say which of the two
    causes the file shows: the other checkpoint format (every zero point off by one), or an asymmetric weight."""
    off = 1 << (spec.bits - 1)
    if not spec.symmetric or bool((zeros == off).all()):
        return
    fmt, other, stored = ("gptq_v2", "gptq", "z − 1") if v2 else ("gptq", "gptq_v2", "z")
    if bool((zeros == off + (-1 if v2 else 1)).all()):
        raise FormatError(f"GPTQ (sym=true): read as checkpoint_format {fmt!r} every zero point is "
                          f"{off + (-1 if v2 else 1)}, not {off}: the file stores {stored} ({other} layout) and its "
                          f"config names the wrong format; set the config's checkpoint_format to {other!r}")
    raise FormatError(f"GPTQ (sym=true): the zero points are not all {off}: either the weight is asymmetric (set "
                      f"sym to false) or the checkpoint_format ({fmt!r}; gptq stores z − 1, gptq_v2 z) does not "
                      "match the file")


# ----------------------------------------------------------------------------- AWQ GEMM
def to_awq(qw: QuantizedWeight, allow_inexact_scales: bool = False) -> dict[str, Tensor]:
    """One 4-bit weight in AWQ GEMM layout.

    Returns ``qweight`` int32 ``[K, N/8]`` and ``qzeros`` int32 ``[K/G, N/8]``
    (both packed along N in :data:`AWQ_ORDER`; zeros stored as ``z``) and
    ``scales`` float16 ``[K/G, N]``. A symmetric weight is written with its
    constant zero point 8. Raises :class:`FormatError` for 8 bits, ``N`` not
    divisible by 8, and inexact float16 scales.
    """
    n, k = qw.shape
    check_exportable(qw.spec, n, k, "awq")
    _check_symmetric_zeros(qw.zeros, qw.spec, "to_awq")
    return {
        "qweight": _pack_words(_codes(qw).t(), 4, AWQ_ORDER),  # [K, N/8]
        "qzeros": _pack_words(qw.zeros.t(), 4, AWQ_ORDER),  # [K/G, N/8]
        "scales": cast_scales(qw.scales.t(), torch.float16, "AWQ", allow_inexact_scales),  # [K/G, N]
    }


def from_awq(tensors: dict[str, Tensor], spec: QuantSpec) -> QuantizedWeight:
    """Read one AWQ GEMM weight (``qweight``, ``qzeros``, ``scales``); ``spec.bits`` must be 4."""
    if spec.bits != 4:
        raise FormatError(f"AWQ GEMM is 4-bit only; the config says {spec.bits} bits")
    _require(tensors, ("qweight", "qzeros", "scales"), "AWQ")
    qweight = tensors["qweight"]
    if qweight.dim() != 2:
        raise FormatError(f"AWQ qweight has shape {tuple(qweight.shape)}; expected [K, N/8]")
    k, n = qweight.shape[0], qweight.shape[1] * 8
    _check_spec_shape(spec, n, k)
    g = _n_groups(spec, k)
    _check_tensor(tensors, "qweight", (k, n // 8), torch.int32, "AWQ")
    scales = _check_float(tensors, "scales", (g, n), "AWQ")
    qzeros = _check_tensor(tensors, "qzeros", (g, n // 8), torch.int32, "AWQ")
    codes = _unpack_words(qweight, 4, n, AWQ_ORDER).t()  # [N, K]
    zeros = _unpack_words(qzeros, 4, n, AWQ_ORDER).t().contiguous()  # [N, K/G]
    _check_symmetric_zeros(zeros, spec, "AWQ")
    s = scales.t().contiguous()
    return QuantizedWeight(pack(codes.contiguous(), 4), s, zeros, spec, (n, k), s.dtype)


# ----------------------------------------------------------------------------- reading helpers
def _require(tensors: dict, names: tuple[str, ...], fmt: str) -> None:
    missing = [x for x in names if x not in tensors]
    if missing:
        raise FormatError(f"{fmt} weight is missing tensor(s) {missing}; the checkpoint is incomplete")


def _check_spec_shape(spec: QuantSpec, n: int, k: int) -> None:
    if spec.group_size != -1 and k % spec.group_size:  # the checkpoint's groups are given: no other size to pick
        raise FormatError(f"K={k} is not divisible by the checkpoint's group_size={spec.group_size} (its last group "
                          "is partial), which qdpo's format cannot hold; use a checkpoint quantized with a group size "
                          "that divides every layer's in_features (or per-channel, -1)")
    try:
        spec.check_shape(n, k)
    except ValueError as e:
        raise FormatError(str(e)) from None


def _check_tensor(tensors: dict, name: str, shape: tuple[int, int], dtype: torch.dtype, fmt: str) -> Tensor:
    t = tensors[name]
    if tuple(t.shape) != tuple(shape):
        raise FormatError(f"{fmt} {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype != dtype:
        raise FormatError(f"{fmt} {name} has dtype {t.dtype}, expected {dtype}")
    return t


def _check_float(tensors: dict, name: str, shape: tuple[int, int], fmt: str) -> Tensor:
    t = tensors[name]
    if tuple(t.shape) != tuple(shape):
        raise FormatError(f"{fmt} {name} has shape {tuple(t.shape)}, expected {tuple(shape)} "
                          "(does the config's group_size match the file?)")
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise FormatError(f"{fmt} {name} has dtype {t.dtype}; expected float16, bfloat16 or float32")
    return t


def _check_g_idx(g_idx: Tensor | None, spec: QuantSpec, k: int, what: str) -> None:
    if g_idx is None:
        return
    # built on g_idx's device (not the default one, which torch.device / set_default_device may change)
    expect = torch.arange(k, dtype=torch.int64, device=g_idx.device) // spec.group_size_for(k)
    if tuple(g_idx.shape) != (k,) or not torch.equal(g_idx.to(torch.int64), expect):
        raise FormatError(f"{what} is not k // group_size: act-order (desc_act) checkpoints, whose groups "
                          "follow a permutation of K, are not supported by qdpo")
