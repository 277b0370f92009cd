"""Plain-PyTorch ground truth for every qdpo op: the spec the kernels must meet.

Everything here is written for clarity, not speed, and runs on any device.
Tests compare every Triton and CUDA kernel against these functions;
the ``reference`` backend of ``torch.ops.qdpo.*`` calls them directly.

Conventions (see ``qdpo/quant/format.py`` for the packed layout):

* ``w`` is ``(N, K)`` like ``nn.Linear.weight``; groups of ``G`` run along K
  (``group_size=-1`` means ``G = K``); ``n_groups = K // G``.
* ``scales``: ``(N, n_groups)``, floating (the dtype of the quantized weight).
* ``zeros``: ``(N, n_groups)`` ``uint8`` integer zero points, in
  ``[0, 2**bits - 1]``. Symmetric quantization stores ``2**(bits-1)``.
* ``codes``: ``(N, K)`` ``uint8`` in ``[0, 2**bits - 1]``; ``ŵ = (q - z) · s``.
* All arithmetic is fp32; ``round`` is ``torch.round`` (half to even);
  division is a true IEEE division ``w / s`` (never ``w * (1/s)``).

Scale rule (asymmetric): ``lo = min(min(w), 0)``, ``hi = max(max(w), 0)``
(the range always contains 0, so the zero point never clips),
``s = max((hi - lo) / qmax, tiny)`` rounded *up* to the scale dtype (so the
group's range always fits in ``qmax`` steps, even with bf16 scales), then
``z = clamp(round(-lo / s), 0, qmax)``, ``q = clamp(round(w / s) + z, 0, qmax)``.
Symmetric: ``s = max(max|w| / (2**(b-1) - 1), tiny)`` rounded up likewise, ``z = 2**(b-1)``,
``q = clamp(round(w / s), -2**(b-1), 2**(b-1) - 1) + z``.
``tiny`` is ``torch.finfo(scale_dtype).tiny``: a zero-range (all-zero) group
gets that scale, codes ``q = z``, and dequantizes to exact zeros: no division
by zero and no NaN.

Straight-through estimator: ``∂L/∂w = ∂L/∂ŵ`` where ``round(w/s) + z`` lies in
``[0, qmax]`` and 0 where it was clipped. With learned scales (LSQ), the
scale gradient per element is ``round(w/s) - w/s`` where not clipped and
``q_clip - z`` where clipped, summed over the group; zero points stay frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "qparams",
    "quantize_codes",
    "quantize",
    "quantize_codes_packed",
    "pack",
    "unpack",
    "dequantize_codes",
    "dequantize",
    "fake_quant",
    "fake_quant_mask",
    "fake_quant_with_mask",
    "fake_quant_backward",
    "fake_quant_autograd",
    "dequant_matmul",
    "dequant_matmul_dx",
    "fake_quant_matmul",
    "fake_quant_matmul_backward",
]


def _grouped(t: torch.Tensor, n_groups: int) -> torch.Tensor:
    """``(N, K)`` → ``(N, n_groups, G)`` fp32 view for per-group math."""
    n, k = t.shape
    return t.float().reshape(n, n_groups, k // n_groups)


def _expand(p: torch.Tensor) -> torch.Tensor:
    """``(N, n_groups)`` group parameter → ``(N, n_groups, 1)`` fp32."""
    return p.float().unsqueeze(-1)


def to_scale_dtype(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast fp32 scales to ``dtype`` rounding *up*: the nearest value, or the next one above if that is smaller.

    Rounding a scale down would make ``(hi - lo) / s`` exceed ``qmax`` and clip
    the group's extreme weight by up to a whole step (seen with bf16 scales).
    """
    out = s.to(dtype)
    if dtype == torch.float32:
        return out
    return torch.where(out.float() < s, torch.nextafter(out, torch.full_like(out, float("inf"))), out)


def qparams(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest scales and zero points of ``w``.

    Returns ``scales`` ``(N, n_groups)`` in ``w.dtype`` and ``zeros``
    ``(N, n_groups)`` ``uint8``.
    """
    n, k = w.shape
    g = k if group_size == -1 else group_size
    wg = _grouped(w, k // g)  # [N, n_groups, G] fp32
    tiny = torch.finfo(w.dtype).tiny
    if symmetric:
        half = 1 << (bits - 1)
        s = to_scale_dtype((wg.abs().amax(-1) / (half - 1)).clamp_min(tiny), w.dtype)
        z = torch.full_like(s, half, dtype=torch.uint8)
        return s, z
    qmax = (1 << bits) - 1
    lo = wg.amin(-1).clamp_max(0.0)
    hi = wg.amax(-1).clamp_min(0.0)
    s = to_scale_dtype(((hi - lo) / qmax).clamp_min(tiny), w.dtype)
    z = torch.round(-lo / s.float()).clamp(0, qmax).to(torch.uint8)
    return s, z


def _unclipped(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """``round(w / s) + z`` in fp32, grouped ``(N, n_groups, G)``, before clamping."""
    wg = _grouped(w, scales.shape[1])
    return torch.round(wg / _expand(scales)) + _expand(zeros)


def quantize_codes(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int
) -> torch.Tensor:
    """Integer codes ``q = clamp(round(w / s) + z, 0, qmax)``: ``(N, K)`` uint8."""
    qmax = (1 << bits) - 1
    q = _unclipped(w, scales, zeros).clamp(0, qmax)
    return q.reshape(w.shape).to(torch.uint8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``(N, K)`` uint8 codes → ``qweight``: ``(N, K)`` for 8 bits, ``(N, K/2)`` for 4.

    4-bit: byte ``j`` of a row holds code ``2j`` in its low nibble and code
    ``2j + 1`` in its high nibble.
    """
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    lo, hi = codes[:, 0::2], codes[:, 1::2]
    return (lo | (hi << 4)).contiguous()


def unpack(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``qweight`` → ``(N, K)`` uint8 codes."""
    if bits == 8:
        return qweight.contiguous()
    lo, hi = qweight & 0xF, qweight >> 4
    return torch.stack([lo, hi], dim=-1).reshape(qweight.shape[0], -1)


def quantize(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    scales: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize and pack ``w``: returns ``(qweight, scales, zeros)``.

    When ``scales`` and ``zeros`` are given they are used as they are
    (frozen grid); otherwise :func:`qparams` computes them.
    """
    if scales is None or zeros is None:
        scales, zeros = qparams(w, bits, group_size, symmetric)
    return pack(quantize_codes(w, scales, zeros, bits), bits), scales, zeros


def quantize_codes_packed(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int
) -> torch.Tensor:
    """:func:`quantize_codes` then :func:`pack`: the packed ``qweight`` on a frozen grid."""
    return pack(quantize_codes(w, scales, zeros, bits), bits)


def dequantize_codes(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``ŵ = (q - z) · s`` in fp32, cast once to ``dtype``: ``(N, K)``."""
    qg = _grouped(codes, scales.shape[1])
    return ((qg - _expand(zeros)) * _expand(scales)).reshape(codes.shape).to(dtype)


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Packed weight → ``(N, K)`` ``ŵ`` in ``dtype`` (default: the scales' dtype)."""
    return dequantize_codes(unpack(qweight, bits), scales, zeros, dtype or scales.dtype)


def fake_quant(
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(w))`` without packing: ``(N, K)`` in ``dtype`` (default ``w.dtype``)."""
    return dequantize_codes(quantize_codes(w, scales, zeros, bits), scales, zeros, dtype or w.dtype)


def fake_quant_with_mask(
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fake_quant` and :func:`fake_quant_mask` in one pass, with in-place fp32 math.

    The same operations in the same order as the two functions (so the same
    bits), on one ``(N, K)`` fp32 buffer: the CPU training path uses it to
    compute ŵ and the straight-through mask once per optimizer step.
    """
    n_groups = scales.shape[1]
    s, z = _expand(scales), _expand(zeros)
    u = _grouped(w, n_groups) / s  # new fp32 buffer [N, n_groups, G]
    u.round_().add_(z)
    qmax = (1 << bits) - 1
    mask = (u >= 0) & (u <= qmax)
    u.clamp_(0, qmax).sub_(z).mul_(s)
    return u.reshape(w.shape).to(dtype or w.dtype), mask.reshape(w.shape)


def fake_quant_mask(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int
) -> torch.Tensor:
    """Straight-through mask ``(N, K)`` bool: ``True`` where ``round(w/s)+z`` was not clipped."""
    u = _unclipped(w, scales, zeros)
    return ((u >= 0) & (u <= (1 << bits) - 1)).reshape(w.shape)


def fake_quant_backward(
    grad: torch.Tensor,
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    need_scales_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """STE backward of :func:`fake_quant`: ``(grad_w, grad_scales or None)``.

    ``grad_w = grad ⊙ mask`` in ``w.dtype``. ``grad_scales`` (LSQ) is
    ``Σ_group grad · (round(w/s) - w/s)`` over unclipped elements plus
    ``Σ_group grad · (clamp(q) - z)`` over clipped ones, in ``scales.dtype``.
    """
    n_groups = scales.shape[1]
    mask = fake_quant_mask(w, scales, zeros, bits)
    gf = grad.float()
    grad_w = torch.where(mask, gf, 0.0).to(w.dtype)
    if not need_scales_grad:
        return grad_w, None
    s, z = _expand(scales), _expand(zeros)
    wg = _grouped(w, n_groups)
    u = torch.round(wg / s) + z
    inside = torch.round(wg / s) - wg / s
    clipped = u.clamp(0, (1 << bits) - 1) - z
    ds = torch.where(mask.reshape(u.shape), inside, clipped)
    grad_s = (_grouped(gf, n_groups) * ds).sum(-1)
    return grad_w, grad_s.to(scales.dtype)


def fake_quant_autograd(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int
) -> torch.Tensor:
    """The fake-quant formula written for autograd (``round`` with identity gradient).

    Differentiable in ``w`` and ``scales``; an independent statement of the
    gradients :func:`fake_quant_backward` computes by hand.
    """
    n_groups = scales.shape[1]
    wg = w.float().reshape(w.shape[0], n_groups, -1)
    s, z = scales.float().unsqueeze(-1), zeros.float().unsqueeze(-1)
    r = wg / s
    r = r + (torch.round(r) - r).detach()  # round with straight-through gradient
    q = torch.clamp(r + z, 0, (1 << bits) - 1)
    return ((q - z) * s).reshape(w.shape).to(w.dtype)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``(..., C)`` → ``(M, C)``."""
    return t.reshape(-1, t.shape[-1])


def dequant_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ ŵᵀ (+ bias)``: x ``(..., K)`` → y ``(..., N)`` in ``x.dtype``."""
    return dequant_matmul_rows(x, dequantize(qweight, scales, zeros, bits, x.dtype), bias)


def dequant_matmul_experts(
    x: torch.Tensor,
    experts: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    num_experts: int,
    bias: torch.Tensor | None = None,
    max_rows: int = 0,
) -> torch.Tensor:
    """``y[p] = x[p] @ ŵ_eᵀ (+ bias[e])`` with ``e = experts[p]``: x ``(P, K)``, ``experts`` ``(P,)``
    integer ids, the weights ``num_experts`` slices of ``N`` rows each (expert e: rows ``e·N .. (e+1)·N``),
    bias ``(num_experts, N)`` or None → y ``(P, N)`` in ``x.dtype``; an id outside ``[0, num_experts)``
    gives a row of zeros (``max_rows``, the rows one expert is expected to get, sizes other backends'
    tiles; unused here). Each row as :func:`dequant_matmul` computes it on its expert's rows, without
    reading ids on the host: row by row, its expert's codes are gathered on the device and dequantized
    (one expert's ŵ at a time)."""
    n, p = qweight.shape[0] // num_experts, x.shape[0]
    if p == 0:
        return x.new_empty(0, n)
    valid = (experts >= 0) & (experts < num_experts)
    e = torch.where(valid, experts, torch.zeros_like(experts)).long()
    qweight, scales, zeros = (t.view(num_experts, n, -1) for t in (qweight, scales, zeros))
    rows = []
    for i in range(p):
        ei = e[i:i + 1]  # a device tensor: indexing with it gathers, nothing reads it on the host
        w_hat = dequantize(qweight[ei][0], scales[ei][0], zeros[ei][0], bits, x.dtype)  # [N, K]
        rows.append(dequant_matmul_rows(x[i:i + 1], w_hat, None if bias is None else bias[ei][0]))
    y = torch.cat(rows)
    return torch.where(valid[:, None], y, torch.zeros_like(y))


def dequant_matmul_segments(
    x: torch.Tensor,
    offsets: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    num_experts: int,
    bias: torch.Tensor | None = None,
    max_rows: int = 0,
) -> torch.Tensor:
    """:func:`dequant_matmul_experts` on rows sorted by expert: row p of x belongs to expert e where
    ``offsets[e] <= p < offsets[e + 1]`` (``offsets`` ``(num_experts + 1,)``, as :func:`expert_segments`
    gives them); rows from ``offsets[num_experts]`` on give zeros. Each row's expert is found on the
    device (how many experts' rows end at or before it), nothing is read on the host."""
    p = torch.arange(x.shape[0], device=x.device, dtype=offsets.dtype)
    experts = torch.searchsorted(offsets[1:].contiguous(), p, right=True)  # num_experts: past the last range
    return dequant_matmul_experts(x, experts, qweight, scales, zeros, bits, num_experts, bias, max_rows)


def rows_per_expert(p: int, max_rows: int) -> int:
    """The most of P rows one expert may get under ``dequant_matmul_experts``' ``max_rows`` (0: any)."""
    return min(max_rows or p, p)


def segment_blocks(p: int, num_experts: int, rows: int) -> int:
    """The most chunks of ``rows`` rows that P rows sorted among ``num_experts`` experts can make (an
    expert with c > 0 rows makes ceil(c / rows) <= (c + rows - 1) / rows of them, and at most
    min(experts, P) experts have rows): the grid of the grouped kernels' segments, one block per chunk,
    whatever the routing (never more than P)."""
    return (p + min(num_experts, p) * (rows - 1)) // rows


def expert_segments(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows sorted by expert on the device, for the grouped kernels: ``(order, offsets)``, ``order``
    the rows in expert order (stable; ids outside ``[0, num_experts)`` last) and ``offsets``
    ``(num_experts + 1,)`` int32, expert e's rows at ``offsets[e] .. offsets[e + 1]`` of that order.
    Nothing is read on the host."""
    valid = (experts >= 0) & (experts < num_experts)
    key, order = torch.sort(torch.where(valid, experts, num_experts), stable=True)
    ends = torch.arange(num_experts + 1, device=experts.device, dtype=key.dtype)
    return order, torch.searchsorted(key, ends).to(torch.int32)


def dequant_matmul_rows(x: torch.Tensor, w_hat: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`dequant_matmul`'s product on a ŵ already in ``x.dtype``."""
    return F.linear(x, w_hat, None if bias is None else bias.to(x.dtype))


def dequant_matmul_dx(
    dy: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int
) -> torch.Tensor:
    """Backward of :func:`dequant_matmul` w.r.t. x: ``dx = dy @ ŵ``, ``(..., K)``."""
    return dy @ dequantize(qweight, scales, zeros, bits, dy.dtype)


def fake_quant_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ fake_quant(w)ᵀ (+ bias)`` with ``ŵ`` cast to ``x.dtype``."""
    w_hat = fake_quant(w, scales, zeros, bits, x.dtype)
    return F.linear(x, w_hat, None if bias is None else bias.to(x.dtype))


def fake_quant_matmul_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    need_scales_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Backward of :func:`fake_quant_matmul`: ``(dx, dw, dscales or None)``.

    ``dx = dy @ ŵ`` (x.dtype); ``dŵ = dyᵀ @ x`` accumulated in fp32, then the
    STE of :func:`fake_quant_backward` gives ``dw`` (w.dtype) and ``dscales``.
    """
    w_hat = fake_quant(w, scales, zeros, bits, x.dtype)
    dx = dy @ w_hat
    dw_hat = _rows(dy).float().t() @ _rows(x).float()  # [N, K] fp32
    dw, ds = fake_quant_backward(dw_hat, w, scales, zeros, bits, need_scales_grad)
    return dx, dw, ds
