"""The ``torch.ops.qdpo.*`` custom ops: schemas, input checks, fake impls, autograd.

Every op is defined once with ``torch.library.custom_op``. Its fake (meta)
implementation runs the same input checks as the real one, so a bad shape is
reported identically in eager mode, under ``torch.compile`` and by opcheck.
The real implementation dispatches to a backend (``backends.call``). Every
output is contiguous, whatever the inputs' strides (the fake implementations
say so, and ``torch.compile`` takes their word for it).

Ops (``bits`` ∈ {4, 8}; ``scales``/``zeros`` ``(N, n_groups)``; the group size is
``K // n_groups``; see ``qdpo/kernels/reference.py`` for the math and
``qdpo/quant/format.py`` for the packed layout):

=============================  ====================================================
``qparams(w, bits, group_size, symmetric)``       → ``(scales, zeros)``
``quantize(w, bits, group_size, symmetric)``      → ``(qweight, scales, zeros)``
``quantize_with(w, scales, zeros, bits)``         → ``qweight`` (frozen grid)
``pack(codes, bits)`` / ``unpack(qweight, bits)`` → ``qweight`` / ``codes``
``dequantize(qweight, scales, zeros, bits, dtype)``  → ``ŵ (N, K)``
``fake_quant(w, scales, zeros, bits, dtype)``     → ``ŵ``; STE backward
``dequant_matmul(x, qweight, scales, zeros, bits, bias)``  → ``x @ ŵᵀ + bias``; ∂x, ∂bias
``dequant_matmul_experts(x, experts, qweight, scales, zeros, bits, num_experts, bias, max_rows)``  → ``x[p] @ ŵ_{experts[p]}ᵀ``
``dequant_matmul_segments(x, offsets, qweight, scales, zeros, bits, num_experts, bias, max_rows)``  → the same, x sorted by expert
``fake_quant_matmul(x, w, scales, zeros, bits, bias)``     → ``x @ fq(w)ᵀ + bias``; ∂x, ∂w, ∂scales, ∂bias
=============================  ====================================================

Each op but ``pack``/``unpack`` takes a last ``backend`` argument: ``"auto"`` (default),
``"reference"``, ``"triton"`` or ``"cuda"``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qdpo.kernels import backends, reference
from qdpo.kernels.backends import register

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128, 256)  # -1: one group per output row


# --------------------------------------------------------------------------- checks
def _check_float(t: Tensor, name: str) -> None:
    if t.dtype not in FLOATS:
        raise TypeError(f"{name} has dtype {t.dtype}; use float16, bfloat16 or float32")


def _check_out_dtype(dtype: Optional[torch.dtype], default: str) -> None:
    if dtype is not None and dtype not in FLOATS:
        raise TypeError(f"dtype={dtype} is not supported for ŵ; use float16, bfloat16, float32 or None ({default})")


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; use one of {SUPPORTED_BITS}")


def check_shape(n: int, k: int, bits: int, group_size: int, what: str = "weight") -> None:
    """Raise ``ValueError`` unless an ``(n, k)`` weight can be quantized with these settings."""
    if n < 1 or k < 1:
        raise ValueError(f"{what} shape ({n}, {k}) is empty; N and K must be >= 1")
    if group_size != -1 and k % group_size != 0:
        fits = [g for g in SUPPORTED_GROUP_SIZES if g > 0 and k % g == 0]
        hint = f"use group_size in {fits} or -1" if fits else "use group_size=-1"
        raise ValueError(f"{what}: K={k} is not divisible by group_size={group_size}; {hint}")
    if bits == 4 and k % 2 != 0:
        raise ValueError(
            f"{what}: K={k} is odd; 4-bit codes are packed two per byte along K, "
            "so K must be even (pad in_features or use bits=8)"
        )


def _check_weight(w: Tensor, bits: int, group_size: int) -> None:
    _check_bits(bits)
    _check_float(w, "weight")
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K) like nn.Linear.weight, got shape {tuple(w.shape)}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size={group_size} is not supported; use one of {SUPPORTED_GROUP_SIZES}")
    check_shape(*w.shape, bits, group_size)


def _check_qparams(scales: Tensor, zeros: Tensor, n: int, k: int, bits: int) -> None:
    _check_float(scales, "scales")
    if zeros.dtype != torch.uint8:
        raise TypeError(f"zeros has dtype {zeros.dtype}; zero points are stored as uint8")
    if scales.dim() != 2 or scales.shape != zeros.shape or scales.shape[0] != n:
        raise ValueError(
            f"scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} must both be "
            f"(N, n_groups) with N={n}"
        )
    g = scales.shape[1]
    if g < 1 or k % g != 0 or (g > 1 and k // g not in SUPPORTED_GROUP_SIZES):
        raise ValueError(
            f"scales have {g} groups per row, which does not split K={k} into groups of "
            f"{SUPPORTED_GROUP_SIZES[1:]} or one group per row; pass scales/zeros made for this weight"
        )


def _check_qweight(qweight: Tensor, bits: int) -> tuple[int, int]:
    """Validate a packed weight; return its logical ``(N, K)``."""
    _check_bits(bits)
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise TypeError(
            f"qweight must be a 2-D uint8 tensor (see qdpo.quant.format), got "
            f"{qweight.dtype} of shape {tuple(qweight.shape)}"
        )
    n, kb = qweight.shape
    return n, kb * (8 // bits)


def _check_x(x: Tensor, k: int, name: str = "x") -> None:
    _check_float(x, name)
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)} but the weight has in_features K={k}; "
            f"{name}'s last dimension must be K"
        )


def _check_rows(dy: Tensor, x: Tensor) -> None:
    if dy.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"dy {tuple(dy.shape)} and x {tuple(x.shape)} must have the same leading dimensions")
    if dy.dtype != x.dtype:  # the op's output, and so its gradient, has x's dtype
        raise TypeError(f"dy has dtype {dy.dtype} but x has {x.dtype}; pass dy in x's dtype")


def _check_bias(bias: Optional[Tensor], n: int) -> None:
    if bias is not None:
        _check_float(bias, "bias")
        if bias.shape != (n,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({n},)")


def _check_grad(grad: Tensor, w: Tensor) -> None:
    _check_float(grad, "grad")
    if grad.shape != w.shape:
        raise ValueError(f"grad has shape {tuple(grad.shape)}; expected the weight's {tuple(w.shape)}")


def _check_same_device(*ts: Optional[Tensor]) -> None:
    devs = {t.device for t in ts if t is not None}
    if len(devs) > 1:
        raise ValueError(f"tensors are on different devices {sorted(map(str, devs))}; move them to one")


def _check_finite(w: Tensor) -> None:
    if not bool(torch.isfinite(w).all()):
        bad = (~torch.isfinite(w)).nonzero()[0].tolist()
        raise ValueError(
            f"weight contains NaN or Inf (first at index {bad}); fix or drop the layer before quantizing"
        )


def _check_finite_scales(s: Tensor) -> None:
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"weight magnitudes overflow the {s.dtype} scales; quantize a float32 copy")


def _needs(ctx, i: int) -> bool:
    """``ctx.needs_input_grad[i]``; trailing arguments left at their defaults are absent."""
    return i < len(ctx.needs_input_grad) and ctx.needs_input_grad[i]


def _first_order_only(op: str):
    """The autograd of a backward op: a clear refusal where a second derivative reaches it (torch's own
    message asks the caller to register one)."""
    def backward(ctx, *grads):
        raise RuntimeError(
            f"qdpo::{op}: second derivatives of fake_quant / fake_quant_matmul (create_graph=True and a "
            "backward through the gradient) are not supported; the straight-through gradient is first order")
    return backward


def _inference_only(op: str):
    """The autograd of a grouped (mixture of experts) op: a clear refusal where a gradient reaches it (torch's
    own message asks the caller to register a formula)."""
    def backward(ctx, *grads):
        raise RuntimeError(
            f"qdpo::{op} is inference only and has no gradient; run it under torch.no_grad(), or, for gradients "
            "to x, call qdpo::dequant_matmul on each expert's rows of the weights (QuantExpertTensor.matmul)")
    return backward


def _groups(k: int, group_size: int) -> int:
    return 1 if group_size == -1 else k // group_size


# --------------------------------------------------------------------------- quantize
@torch.library.custom_op("qdpo::qparams", mutates_args=())
def qparams(w: Tensor, bits: int, group_size: int, symmetric: bool, backend: str = "auto") -> tuple[Tensor, Tensor]:
    _check_weight(w, bits, group_size)
    _check_finite(w)
    s, z = backends.call("qparams", backend, w.device, w, bits, group_size, symmetric)
    _check_finite_scales(s)
    return s, z


@qparams.register_fake
def _(w, bits, group_size, symmetric, backend="auto"):
    _check_weight(w, bits, group_size)
    g = _groups(w.shape[1], group_size)
    return w.new_empty(w.shape[0], g), w.new_empty(w.shape[0], g, dtype=torch.uint8)


@torch.library.custom_op("qdpo::quantize_with", mutates_args=())
def quantize_with(w: Tensor, scales: Tensor, zeros: Tensor, bits: int, backend: str = "auto") -> Tensor:
    _check_weight(w, bits, -1)
    _check_qparams(scales, zeros, *w.shape, bits)
    _check_same_device(w, scales, zeros)
    return backends.call("quantize_with", backend, w.device, w, scales, zeros, bits)


@quantize_with.register_fake
def _(w, scales, zeros, bits, backend="auto"):
    _check_weight(w, bits, -1)
    _check_qparams(scales, zeros, *w.shape, bits)
    return w.new_empty(w.shape[0], w.shape[1] * bits // 8, dtype=torch.uint8)


@torch.library.custom_op("qdpo::quantize", mutates_args=())
def quantize(w: Tensor, bits: int, group_size: int, symmetric: bool, backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """Scales, zeros and packed codes in one pass over ``w``."""
    _check_weight(w, bits, group_size)
    _check_finite(w)
    q, s, z = backends.call("quantize", backend, w.device, w, bits, group_size, symmetric)
    _check_finite_scales(s)
    return q, s, z


@quantize.register_fake
def _(w, bits, group_size, symmetric, backend="auto"):
    _check_weight(w, bits, group_size)
    n, k = w.shape
    g = _groups(k, group_size)
    return w.new_empty(n, k * bits // 8, dtype=torch.uint8), w.new_empty(n, g), w.new_empty(n, g, dtype=torch.uint8)


@torch.library.custom_op("qdpo::pack", mutates_args=())
def pack(codes: Tensor, bits: int) -> Tensor:
    _check_codes(codes, bits)
    _check_code_range(codes, bits)
    return reference.pack(codes, bits).clone()  # 8-bit codes pack to themselves: an op's output may not alias its input


@pack.register_fake
def _(codes, bits):
    _check_codes(codes, bits)
    return codes.new_empty(codes.shape[0], codes.shape[1] * bits // 8)


def _check_codes(codes: Tensor, bits: int) -> None:
    _check_bits(bits)
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise TypeError(f"codes must be a 2-D uint8 tensor, got {codes.dtype} {tuple(codes.shape)}")
    if bits == 4 and codes.shape[1] % 2:
        raise ValueError(f"4-bit codes need an even K to pack two per byte, got K={codes.shape[1]}")


def _check_code_range(codes: Tensor, bits: int) -> None:
    """A 4-bit code past 15 would spill into its neighbour's nibble (values: the real op only, fake tensors have none)."""
    if bits == 4 and codes.numel() and int(codes.max()) > 15:
        bad = (codes > 15).nonzero()[0].tolist()
        raise ValueError(f"codes hold {int(codes[tuple(bad)])} at index {bad}; 4-bit codes are unsigned, in [0, 15] "
                         "(a signed code q in [-8, 7] is stored as q + 8, as symmetric specs store it)")


@torch.library.custom_op("qdpo::unpack", mutates_args=())
def unpack(qweight: Tensor, bits: int) -> Tensor:
    _check_qweight(qweight, bits)
    return reference.unpack(qweight, bits).clone()


@unpack.register_fake
def _(qweight, bits):
    n, k = _check_qweight(qweight, bits)
    return qweight.new_empty(n, k)


# --------------------------------------------------------------------------- dequantize
def _check_dequant(qweight, scales, zeros, bits) -> tuple[int, int]:
    n, k = _check_qweight(qweight, bits)
    _check_qparams(scales, zeros, n, k, bits)
    _check_same_device(qweight, scales, zeros)
    return n, k


@torch.library.custom_op("qdpo::dequantize", mutates_args=())
def dequantize(
    qweight: Tensor, scales: Tensor, zeros: Tensor, bits: int,
    dtype: Optional[torch.dtype] = None, backend: str = "auto",
) -> Tensor:
    _check_dequant(qweight, scales, zeros, bits)
    _check_out_dtype(dtype, "the scales' dtype")
    dtype = dtype or scales.dtype
    return backends.call("dequantize", backend, qweight.device, qweight, scales, zeros, bits, dtype)


@dequantize.register_fake
def _(qweight, scales, zeros, bits, dtype=None, backend="auto"):
    n, k = _check_dequant(qweight, scales, zeros, bits)
    _check_out_dtype(dtype, "the scales' dtype")
    return scales.new_empty(n, k, dtype=dtype or scales.dtype)


# --------------------------------------------------------------------------- fake_quant
def _check_fq(w, scales, zeros, bits) -> None:
    _check_weight(w, bits, -1)
    _check_qparams(scales, zeros, *w.shape, bits)
    _check_same_device(w, scales, zeros)


@torch.library.custom_op("qdpo::fake_quant", mutates_args=())
def fake_quant(
    w: Tensor, scales: Tensor, zeros: Tensor, bits: int,
    dtype: Optional[torch.dtype] = None, backend: str = "auto",
) -> Tensor:
    _check_fq(w, scales, zeros, bits)
    _check_out_dtype(dtype, "the weight's dtype")
    return backends.call("fake_quant", backend, w.device, w, scales, zeros, bits, dtype or w.dtype)


@fake_quant.register_fake
def _(w, scales, zeros, bits, dtype=None, backend="auto"):
    _check_fq(w, scales, zeros, bits)
    _check_out_dtype(dtype, "the weight's dtype")
    return w.new_empty(w.shape, dtype=dtype or w.dtype)


@torch.library.custom_op("qdpo::fake_quant_backward", mutates_args=())
def fake_quant_backward(
    grad: Tensor, w: Tensor, scales: Tensor, zeros: Tensor, bits: int,
    need_scales_grad: bool, backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Returns ``(grad_w, grad_scales)``; ``grad_scales`` is empty ``(0,)`` unless asked for."""
    _check_fq(w, scales, zeros, bits)
    _check_grad(grad, w)
    gw, gs = backends.call(
        "fake_quant_backward", backend, w.device, grad.contiguous(), w, scales, zeros, bits, need_scales_grad
    )
    return gw, gs if gs is not None else scales.new_empty(0)


@fake_quant_backward.register_fake
def _(grad, w, scales, zeros, bits, need_scales_grad, backend="auto"):
    _check_fq(w, scales, zeros, bits)
    _check_grad(grad, w)
    return w.new_empty(w.shape), (scales.new_empty(scales.shape) if need_scales_grad else scales.new_empty(0))


def _fq_setup(ctx, inputs, output):
    w, scales, zeros, bits, _dtype, backend = inputs
    ctx.save_for_backward(w, scales, zeros)
    ctx.bits, ctx.backend = bits, backend


def _fq_backward(ctx, grad):
    w, scales, zeros = ctx.saved_tensors
    need_s = _needs(ctx, 1)
    gw, gs = fake_quant_backward(grad, w, scales, zeros, ctx.bits, need_s, ctx.backend)
    return gw, (gs if need_s else None), None, None, None, None


fake_quant.register_autograd(_fq_backward, setup_context=_fq_setup)
fake_quant_backward.register_autograd(_first_order_only("fake_quant_backward"))


# --------------------------------------------------------------------------- dequant_matmul
def _check_dqmm(x, qweight, scales, zeros, bits, bias) -> tuple[int, int]:
    n, k = _check_dequant(qweight, scales, zeros, bits)
    _check_x(x, k)
    _check_bias(bias, n)
    _check_same_device(x, qweight, bias)
    return n, k


@torch.library.custom_op("qdpo::dequant_matmul", mutates_args=())
def dequant_matmul(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bits: int,
    bias: Optional[Tensor] = None, backend: str = "auto",
) -> Tensor:
    _check_dqmm(x, qweight, scales, zeros, bits, bias)
    return backends.call("dequant_matmul", backend, x.device, x.contiguous(), qweight, scales, zeros, bits, bias)


@dequant_matmul.register_fake
def _(x, qweight, scales, zeros, bits, bias=None, backend="auto"):
    n, _ = _check_dqmm(x, qweight, scales, zeros, bits, bias)
    return x.new_empty(*x.shape[:-1], n)


@torch.library.custom_op("qdpo::dequant_matmul_dx", mutates_args=())
def dequant_matmul_dx(
    dy: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bits: int, backend: str = "auto"
) -> Tensor:
    """``dx = dy @ ŵ``: the backward of :func:`dequant_matmul` w.r.t. x."""
    n, _ = _check_dequant(qweight, scales, zeros, bits)
    _check_x(dy, n, "dy")
    return backends.call("dequant_matmul_dx", backend, dy.device, dy.contiguous(), qweight, scales, zeros, bits)


@dequant_matmul_dx.register_fake
def _(dy, qweight, scales, zeros, bits, backend="auto"):
    n, k = _check_dequant(qweight, scales, zeros, bits)
    _check_x(dy, n, "dy")
    return dy.new_empty(*dy.shape[:-1], k)


def _dqmm_setup(ctx, inputs, output):
    x, qweight, scales, zeros, bits, bias, backend = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.bits, ctx.backend = bits, backend
    ctx.bias_dtype = None if bias is None else bias.dtype


def _bias_grad(dy: Tensor, dtype) -> Tensor:
    return dy.reshape(-1, dy.shape[-1]).float().sum(0).to(dtype)


def _dqmm_backward(ctx, dy):
    qweight, scales, zeros = ctx.saved_tensors
    dx = dequant_matmul_dx(dy, qweight, scales, zeros, ctx.bits, ctx.backend) if _needs(ctx, 0) else None
    db = _bias_grad(dy, ctx.bias_dtype) if _needs(ctx, 5) else None
    return dx, None, None, None, None, db, None


dequant_matmul.register_autograd(_dqmm_backward, setup_context=_dqmm_setup)


def _dx_setup(ctx, inputs, output):
    _dy, qweight, scales, zeros, bits, backend = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.bits, ctx.backend = bits, backend


def _dx_backward(ctx, g):
    """``dx = dy @ ŵ`` is linear in dy: its gradient is ``g @ ŵᵀ`` (second derivatives of dequant_matmul)."""
    qweight, scales, zeros = ctx.saved_tensors
    ddy = dequant_matmul(g, qweight, scales, zeros, ctx.bits, None, ctx.backend) if _needs(ctx, 0) else None
    return ddy, None, None, None, None, None


dequant_matmul_dx.register_autograd(_dx_backward, setup_context=_dx_setup)


# --------------------------------------------------------------------------- dequant_matmul_experts
INT_IDS = (torch.int32, torch.int64)


def _check_grouped(x, qweight, scales, zeros, bits, num_experts, bias, max_rows) -> tuple[int, int]:
    """The checks dequant_matmul_experts and dequant_matmul_segments share; returns (N, K) of one expert."""
    rows, k = _check_dequant(qweight, scales, zeros, bits)
    if max_rows < 0:
        raise ValueError(f"max_rows={max_rows}; pass the rows of x one expert is expected to take (it sizes the "
                         f"kernels' tiles), or 0 for up to all of them")
    if num_experts < 1 or rows % num_experts:
        raise ValueError(f"num_experts={num_experts} does not split the weight's {rows} rows into equal slices; "
                         f"pass the number of experts the weight holds")
    _check_x(x, k)
    if x.dim() != 2:
        raise ValueError(f"x has shape {tuple(x.shape)}; pass one row per (token, expert) pair: (P, K)")
    n = rows // num_experts
    if bias is not None:
        _check_float(bias, "bias")
        if bias.shape != (num_experts, n):
            raise ValueError(f"bias has shape {tuple(bias.shape)}; expected one row per expert: ({num_experts}, {n})")
    _check_same_device(x, qweight, bias)
    return n, k


def _check_dqmm_experts(x, experts, qweight, scales, zeros, bits, num_experts, bias, max_rows) -> tuple[int, int]:
    n, k = _check_grouped(x, qweight, scales, zeros, bits, num_experts, bias, max_rows)
    if experts.dtype not in INT_IDS or experts.shape != (x.shape[0],):
        raise ValueError(f"experts has dtype {experts.dtype} and shape {tuple(experts.shape)}; pass one int32 or "
                         f"int64 expert id per row of x: ({x.shape[0]},)")
    _check_same_device(x, experts)
    return n, k


def _check_dqmm_segments(x, offsets, qweight, scales, zeros, bits, num_experts, bias, max_rows) -> tuple[int, int]:
    n, k = _check_grouped(x, qweight, scales, zeros, bits, num_experts, bias, max_rows)
    if offsets.dtype != torch.int32 or offsets.shape != (num_experts + 1,):
        raise ValueError(f"offsets has dtype {offsets.dtype} and shape {tuple(offsets.shape)}; pass the experts' "
                         f"int32 row offsets into x: ({num_experts + 1},), as qdpo.kernels.reference."
                         f"expert_segments gives them")
    _check_same_device(x, offsets)
    return n, k


@torch.library.custom_op("qdpo::dequant_matmul_experts", mutates_args=())
def dequant_matmul_experts(
    x: Tensor, experts: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bits: int, num_experts: int,
    bias: Optional[Tensor] = None, max_rows: int = 0, backend: str = "auto",
) -> Tensor:
    """``y[p] = x[p] @ ŵ_eᵀ (+ bias[e])``, ``e = experts[p]``, for the P rows of x (a mixture of experts'
    routed tokens): one launch, the ids never read on the host. The weights hold ``num_experts`` slices
    of N rows (a :class:`~qdpo.quant.experts.QuantExpertTensor`), bias one row per expert; an id outside
    ``[0, num_experts)`` gives a row of zeros. ``max_rows``: how many rows one expert is expected to take
    (the tokens, when each picks distinct experts; 0: up to all of them), which sizes the kernels' tiles
    (1: one block per row); an expert given more still gets every row right. Inference only (no
    autograd)."""
    _check_dqmm_experts(x, experts, qweight, scales, zeros, bits, num_experts, bias, max_rows)
    return backends.call("dequant_matmul_experts", backend, x.device, x.contiguous(), experts.contiguous(), qweight,
                         scales, zeros, bits, num_experts, None if bias is None else bias.contiguous(), max_rows)


@dequant_matmul_experts.register_fake
def _(x, experts, qweight, scales, zeros, bits, num_experts, bias=None, max_rows=0, backend="auto"):
    n, _ = _check_dqmm_experts(x, experts, qweight, scales, zeros, bits, num_experts, bias, max_rows)
    return x.new_empty(x.shape[0], n)


@torch.library.custom_op("qdpo::dequant_matmul_segments", mutates_args=())
def dequant_matmul_segments(
    x: Tensor, offsets: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, bits: int, num_experts: int,
    bias: Optional[Tensor] = None, max_rows: int = 0, backend: str = "auto",
) -> Tensor:
    """:func:`dequant_matmul_experts` on rows already sorted by expert: ``y[p] = x[p] @ ŵ_eᵀ (+ bias[e])``
    for expert e's rows ``offsets[e] .. offsets[e + 1]`` of x, ``offsets`` ``(num_experts + 1,)`` int32,
    non-decreasing from 0 (``qdpo.kernels.reference.expert_segments(ids, num_experts)`` gives the order
    and the offsets); rows from ``offsets[num_experts]`` on give zeros. y keeps x's order, so a mixture
    of experts' two products run back to back on one sort. The offsets are read on the device only;
    each is clamped to ``0 .. P`` there, so offsets that are not such ranges give wrong rows but never
    a read or write outside x and y. ``max_rows`` as for :func:`dequant_matmul_experts`. Inference
    only (no autograd)."""
    _check_dqmm_segments(x, offsets, qweight, scales, zeros, bits, num_experts, bias, max_rows)
    return backends.call("dequant_matmul_segments", backend, x.device, x.contiguous(), offsets.contiguous(), qweight,
                         scales, zeros, bits, num_experts, None if bias is None else bias.contiguous(), max_rows)


@dequant_matmul_segments.register_fake
def _(x, offsets, qweight, scales, zeros, bits, num_experts, bias=None, max_rows=0, backend="auto"):
    n, _ = _check_dqmm_segments(x, offsets, qweight, scales, zeros, bits, num_experts, bias, max_rows)
    return x.new_empty(x.shape[0], n)


dequant_matmul_experts.register_autograd(_inference_only("dequant_matmul_experts"))
dequant_matmul_segments.register_autograd(_inference_only("dequant_matmul_segments"))


# --------------------------------------------------------------------------- fake_quant_matmul
def _check_fqmm(x, w, scales, zeros, bits, bias) -> None:
    _check_fq(w, scales, zeros, bits)
    _check_x(x, w.shape[1])
    _check_bias(bias, w.shape[0])
    _check_same_device(x, w, bias)


@torch.library.custom_op("qdpo::fake_quant_matmul", mutates_args=())
def fake_quant_matmul(
    x: Tensor, w: Tensor, scales: Tensor, zeros: Tensor, bits: int,
    bias: Optional[Tensor] = None, backend: str = "auto",
) -> Tensor:
    _check_fqmm(x, w, scales, zeros, bits, bias)
    return backends.call("fake_quant_matmul", backend, x.device, x.contiguous(), w, scales, zeros, bits, bias)


@fake_quant_matmul.register_fake
def _(x, w, scales, zeros, bits, bias=None, backend="auto"):
    _check_fqmm(x, w, scales, zeros, bits, bias)
    return x.new_empty(*x.shape[:-1], w.shape[0])


@torch.library.custom_op("qdpo::fake_quant_matmul_backward", mutates_args=())
def fake_quant_matmul_backward(
    dy: Tensor, x: Tensor, w: Tensor, scales: Tensor, zeros: Tensor, bits: int,
    need_scales_grad: bool, backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(dx, dw, dscales)``; ``dscales`` is empty ``(0,)`` unless asked for."""
    _check_fqmm(x, w, scales, zeros, bits, None)
    _check_x(dy, w.shape[0], "dy")
    _check_rows(dy, x)
    dx, dw, ds = backends.call(
        "fake_quant_matmul_backward", backend, x.device,
        dy.contiguous(), x.contiguous(), w, scales, zeros, bits, need_scales_grad,
    )
    return dx, dw, ds if ds is not None else scales.new_empty(0)


@fake_quant_matmul_backward.register_fake
def _(dy, x, w, scales, zeros, bits, need_scales_grad, backend="auto"):
    _check_fqmm(x, w, scales, zeros, bits, None)
    _check_x(dy, w.shape[0], "dy")
    _check_rows(dy, x)
    ds = scales.new_empty(scales.shape) if need_scales_grad else scales.new_empty(0)
    return x.new_empty(x.shape), w.new_empty(w.shape), ds


def _fqmm_setup(ctx, inputs, output):
    x, w, scales, zeros, bits, bias, backend = inputs
    ctx.save_for_backward(x, w, scales, zeros)
    ctx.bits, ctx.backend = bits, backend
    ctx.bias_dtype = None if bias is None else bias.dtype


def _fqmm_backward(ctx, dy):
    x, w, scales, zeros = ctx.saved_tensors
    need_s = _needs(ctx, 2)
    dx, dw, ds = fake_quant_matmul_backward(dy, x, w, scales, zeros, ctx.bits, need_s, ctx.backend)
    db = _bias_grad(dy, ctx.bias_dtype) if _needs(ctx, 5) else None
    return (
        dx if _needs(ctx, 0) else None,
        dw if _needs(ctx, 1) else None,
        ds if need_s else None,
        None, None, db, None,
    )


fake_quant_matmul.register_autograd(_fqmm_backward, setup_context=_fqmm_setup)
fake_quant_matmul_backward.register_autograd(_first_order_only("fake_quant_matmul_backward"))


# --------------------------------------------------------------------------- reference backend
register("reference", "qparams")(reference.qparams)
register("reference", "quantize")(reference.quantize)
register("reference", "quantize_with")(reference.quantize_codes_packed)
register("reference", "dequantize")(reference.dequantize)
register("reference", "fake_quant")(reference.fake_quant)
register("reference", "fake_quant_backward")(reference.fake_quant_backward)
register("reference", "dequant_matmul")(reference.dequant_matmul)
register("reference", "dequant_matmul_dx")(reference.dequant_matmul_dx)
register("reference", "dequant_matmul_experts")(reference.dequant_matmul_experts)
register("reference", "dequant_matmul_segments")(reference.dequant_matmul_segments)
register("reference", "fake_quant_matmul")(reference.fake_quant_matmul)
register("reference", "fake_quant_matmul_backward")(reference.fake_quant_matmul_backward)
