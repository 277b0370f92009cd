"""Fake-quant matmul, the QAT training hot path: forward and backward (STE + LSQ).

Formula (``qdpo/kernels/reference.py`` is the spec; ``b`` = bits, ``qmax = 2^b - 1``)::

    ŵ  = ((clamp(round(w / s) + z, 0, qmax) - z) · s)   in fp32, cast once to x.dtype
    y  = x @ ŵᵀ (+ bias.to(x.dtype))                       fp32 accumulation, y in x.dtype
    dx = dy @ ŵ                                             fp32 accumulation, dx in x.dtype
    dŵ = dyᵀ @ x                                            fp32 accumulation, never stored
    dw = dŵ ⊙ [0 <= round(w/s) + z <= qmax]                 w.dtype; exact zeros where clipped
    ds[n, g] = Σ_{k in g} dŵ[n, k] · (round(w/s) - w/s  if unclipped else clamp(q) - z)   (LSQ)

``round`` is half-to-even and ``w / s`` an IEEE division, so codes and the
clip mask match PyTorch bit for bit. ``dbias`` is summed by ``ops.py``.

Tensors (``M`` = product of x's leading dimensions, ``G = K // n_groups``):

=========  =====================  =====================  ==========================
name       shape                  dtype                  layout
=========  =====================  =====================  ==========================
x          ``(..., K)``           fp16 / bf16 / fp32     contiguous
w          ``(N, K)``             fp32 / bf16 / fp16     any strides (latent weight)
scales     ``(N, n_groups)``      fp16 / bf16 / fp32     any strides
zeros      ``(N, n_groups)``      uint8                  any strides
bias       ``(N,)`` or None       float                  cast to x.dtype first
y, dy      ``(..., N)``           x.dtype                contiguous
dx         like x                 x.dtype
dw         ``(N, K)``             w.dtype                contiguous
dscales    ``(N, n_groups)``      scales.dtype           only when asked for
=========  =====================  =====================  ==========================

Constraints: ``bits`` 4 or 8; ``G`` in {32, 64, 128, 256} or one group per row
(``ops.py`` checks these); ``dy`` has x's dtype and rows; bf16 needs sm_80+.
Anything the kernels cannot serve raises ``Unsupported``.

Two paths, exact to the same spec, for the two GEMMs with ŵ as an operand:

* ``"fused"``: ``fwd_kernel``/``dx_kernel`` fake-quantize each W tile in
  registers as it is loaded; ŵ never exists in memory. Each W tile is re-read
  (L2) and re-quantized once per ``BLOCK_M`` rows of x: ``N·K·⌈M/BLOCK_M⌉``
  elements at ~16 instructions each (the IEEE division is ~10) against
  ``2·BLOCK_M`` tensor-core FLOPs per element. An H100 SM issues ~128 fp32
  instructions but ~4096 bf16 FLOPs per cycle, so the fq work is
  ≈ 250/BLOCK_M of the MMA time: it dominates at ``BLOCK_M <= 128`` and
  still matches it at 256, unless perfectly overlapped.
* ``"workspace"``: ``fq_workspace_kernel`` writes ŵ ``(N, K)`` in x.dtype
  once (memory-bound: ``N·K·(b_w + b_x)`` bytes, ~35 µs for 4096×4096 fp32 w
  at 3 TB/s), then cuBLAS runs at full speed. The workspace is transient (freed
  after each GEMM, recomputed in backward rather than saved), so peak memory
  grows by one ``N·K·b_x`` buffer of the current layer only.

``dw`` always uses ``dw_kernel``: its mainloop is a plain GEMM and the mask (and
LSQ sums) cost one epilogue pass, so it writes ``dw`` in w.dtype directly
instead of an fp32 ``dŵ`` round trip (``2·N·K·4`` bytes) plus a masking kernel.

Default (``WORKSPACE_MIN_M``): workspace + cuBLAS when ``M >= 1024`` (training
batches: one fq pass amortized over all rows, and cuBLAS is the fastest GEMM),
fused below (one M tile does the same fq work as the workspace pass and saves
its write and read). By the estimate above the two cross near M ≈ 500-1000 for
4096×4096; this is a model-based choice, not yet measured:
``benchmarks/bench_fake_quant_matmul.py`` times both paths to set it.

Bytes moved (``b_x``, ``b_w``, ``b_s`` element sizes): forward
``M·K·b_x + N·K·b_w + M·N·b_x + N·n_groups·(b_s+1)`` (workspace path: plus
``2·N·K·b_x``); backward ``dx``: ``M·N·b_x + N·K·b_w + M·K·b_x``, ``dw``:
``M·N·b_x + M·K·b_x + 2·N·K·b_w``. FLOPs: ``2·M·N·K`` forward, ``4·M·N·K`` backward.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton

from qdpo.kernels.backends import Unsupported, register
from qdpo.kernels.triton import fake_quant_matmul_kernels as kern

# Decided once, like the @triton.jit decorators, which read it at import time.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

PATHS = ("fused", "workspace")
# Rows of x from which the workspace + cuBLAS path serves fwd and dx (module docstring).
WORKSPACE_MIN_M = 1024
# A group "size" that no K reaches: one group per row, every tile in group 0.
_ONE_GROUP = 1 << 30


def _configs(names, rows):
    """``triton.Config`` per row ``(*values, num_warps, num_stages)``."""
    return [triton.Config(dict(zip(names, r[:-2])), num_warps=r[-2], num_stages=r[-1]) for r in rows]


# H100 tiles: 128-wide wgmma tiles for training M, thin ones for small M (fused path).
_FWD_TUNED = triton.autotune(
    _configs(("BLOCK_M", "BLOCK_N", "GROUP_M"), [(128, 128, 8, 8, 3), (128, 256, 8, 8, 3),
                                                 (64, 128, 8, 4, 4), (32, 128, 8, 4, 4), (16, 128, 8, 4, 5)]),
    key=["M_BUCKET", "N", "K", "GROUP_K"],
)(kern.fwd_kernel)
_DX_TUNED = triton.autotune(
    _configs(("BLOCK_M", "BLOCK_N", "GROUP_M"), [(128, 64, 8, 8, 3), (64, 64, 8, 4, 4),
                                                 (32, 64, 8, 4, 4), (16, 128, 8, 4, 4)]),
    key=["M_BUCKET", "N", "K", "GROUP_K"],
)(kern.dx_kernel)
# dw tiles hold acc and the epilogue's w/s/z tiles in registers: at most 64 fp32 acc regs per thread.
_DW_TUNED = triton.autotune(
    _configs(("BLOCK_N", "BLOCK_K", "BLOCK_M", "GROUP_N"), [(128, 128, 64, 8, 8, 3), (128, 128, 32, 8, 8, 4),
                                                             (64, 128, 64, 8, 4, 4), (128, 64, 64, 8, 4, 4)]),
    key=["M_BUCKET", "N", "K", "GROUP_K", "NEED_DS"],
)(kern.dw_kernel)


def _launch(kernel, tuned, grid, m: int, *args, **meta) -> None:
    """Autotuned launch on the GPU; fixed tiles under the interpreter."""
    if not _INTERPRET:
        tuned[grid](*args, **meta)
        return
    # The interpreter's speed is set by the number of programs and loop steps: one
    # M tile for test-sized M, and wide N/K tiles.
    block_m = min(max(triton.next_power_of_2(m), 16), 256)
    tiles = dict(BLOCK_N=128, BLOCK_K=128, BLOCK_M=block_m, GROUP_N=8) if kernel is kern.dw_kernel \
        else dict(BLOCK_M=block_m, BLOCK_N=128, GROUP_M=8)
    kernel[grid](*args, **meta, **tiles)


def _check_device(x: torch.Tensor) -> None:
    if x.device.type == "cuda":
        if x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) < (8, 0):
            raise Unsupported("bf16 tensor-core matmuls need an sm_80+ GPU; use float16 activations")
    elif not (x.device.type == "cpu" and _INTERPRET):
        raise Unsupported(f"Triton kernels need CUDA tensors (or CPU ones with TRITON_INTERPRET=1), got {x.device}")


def _group(k: int, n_groups: int) -> int:
    return _ONE_GROUP if n_groups == 1 else k // n_groups


def _block_k(group_k: int, cap: int) -> int:
    """A K tile that never straddles two groups (group sizes are powers of two >= 32)."""
    return cap if group_k == _ONE_GROUP else min(cap, group_k)


def _bucket(m: int) -> int:
    """Autotune key for M: a power of two, so varying sequence lengths reuse tunings."""
    return min(triton.next_power_of_2(max(m, 1)), 8192)


def _qargs(w, scales, zeros) -> tuple:
    return (w.stride(0), w.stride(1), scales.stride(0), scales.stride(1), zeros.stride(0), zeros.stride(1))


def _choose(path: str | None, m: int) -> str:
    if path is None:
        return "workspace" if m >= WORKSPACE_MIN_M else "fused"
    if path not in PATHS:
        raise ValueError(f"path={path!r} is not known; use one of {PATHS} or None (automatic)")
    return path


def fake_quant_workspace(w, scales, zeros, bits: int, dtype: torch.dtype, use_rint: bool | None = None):
    """``reference.fake_quant(w, scales, zeros, bits, dtype)`` in one Triton pass: ``(N, K)`` contiguous.

    ``use_rint`` (default: on the GPU) rounds with ``libdevice.rint`` instead of
    the floor-based helper; both must give the same codes.
    """
    use_rint = (not _INTERPRET) if use_rint is None else use_rint
    if use_rint and _INTERPRET:
        raise Unsupported("libdevice.rint does not run under TRITON_INTERPRET=1; pass use_rint=False")
    n, k = w.shape
    out = torch.empty((n, k), dtype=dtype, device=w.device)
    group_k = _group(k, scales.shape[1])
    block_n, block_k = 32, _block_k(group_k, 128)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    kern.fq_workspace_kernel[grid](
        w, scales, zeros, out, n, k, *_qargs(w, scales, zeros), out.stride(0),
        GROUP_K=group_k, QMAX=(1 << bits) - 1, USE_RINT=use_rint, INTERPRET=_INTERPRET,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return out


def _fused_forward(x2, w, scales, zeros, bits, bias):
    (m, k), n = x2.shape, w.shape[0]
    y = x2.new_empty(m, n)
    if m == 0:
        return y
    group_k = _group(k, scales.shape[1])
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _launch(
        kern.fwd_kernel, _FWD_TUNED, grid, m,
        x2, w, scales, zeros, y if bias is None else bias, y, m, n, k, _bucket(m),
        x2.stride(0), *_qargs(w, scales, zeros), y.stride(0),
        GROUP_K=group_k, QMAX=(1 << bits) - 1, HAS_BIAS=bias is not None,
        IEEE=x2.dtype == torch.float32, INTERPRET=_INTERPRET, BLOCK_K=_block_k(group_k, 128 if _INTERPRET else 64),
    )
    return y


def _fused_dx(dy2, w, scales, zeros, bits):
    (m, n), k = dy2.shape, w.shape[1]
    dx = dy2.new_empty(m, k)
    if m == 0:
        return dx
    group_k = _group(k, scales.shape[1])
    block_k = _block_k(group_k, 128)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, block_k),)  # noqa: E731
    _launch(
        kern.dx_kernel, _DX_TUNED, grid, m,
        dy2, w, scales, zeros, dx, m, n, k, _bucket(m),
        dy2.stride(0), *_qargs(w, scales, zeros), dx.stride(0),
        GROUP_K=group_k, QMAX=(1 << bits) - 1, IEEE=dy2.dtype == torch.float32,
        INTERPRET=_INTERPRET, BLOCK_K=block_k,
    )
    return dx


def _dw(dy2, x2, w, scales, zeros, bits, need_scales_grad):
    """``(dw, dscales or None)`` from one GEMM with the STE epilogue."""
    (m, k), n, n_groups = x2.shape, w.shape[0], scales.shape[1]
    dw = torch.empty((n, k), dtype=w.dtype, device=w.device)
    part_k = kern.PART_K.value
    # partial LSQ sums per 32-wide K block, reduced per group below (deterministic, no atomics)
    part = torch.empty((n, triton.cdiv(k, part_k)), dtype=torch.float32, device=w.device) if need_scales_grad else dw
    group_k = _group(k, n_groups)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(k, meta["BLOCK_K"]),)  # noqa: E731
    _launch(
        kern.dw_kernel, _DW_TUNED, grid, m,
        dy2, x2, w, scales, zeros, dw, part, m, n, k, _bucket(m),
        dy2.stride(0), x2.stride(0), *_qargs(w, scales, zeros), dw.stride(0), part.stride(0),
        GROUP_K=group_k, QMAX=(1 << bits) - 1, NEED_DS=need_scales_grad,
        IEEE=x2.dtype == torch.float32, INTERPRET=_INTERPRET,
    )
    if not need_scales_grad:
        return dw, None
    ds = part.sum(1, keepdim=True) if n_groups == 1 else part.view(n, n_groups, -1).sum(-1)
    return dw, ds.to(scales.dtype)


@register("triton", "fake_quant_matmul")
def fake_quant_matmul(x, w, scales, zeros, bits: int, bias=None, path: str | None = None):
    """``y = x @ fq(w)ᵀ (+ bias)``: x ``(..., K)`` → y ``(..., N)`` in x.dtype (module docstring)."""
    n, k = w.shape
    x2 = x.reshape(-1, k).contiguous()
    _check_device(x2)
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    if _choose(path, x2.shape[0]) == "workspace":
        y = F.linear(x2, fake_quant_workspace(w, scales, zeros, bits, x.dtype), bias)
    else:
        y = _fused_forward(x2, w, scales, zeros, bits, bias)
    return y.reshape(*x.shape[:-1], n)


@register("triton", "fake_quant_matmul_backward")
def fake_quant_matmul_backward(dy, x, w, scales, zeros, bits: int, need_scales_grad: bool,
                               path: str | None = None):
    """``(dx, dw, dscales or None)`` of :func:`fake_quant_matmul` (module docstring)."""
    n, k = w.shape
    if dy.dtype != x.dtype:
        raise Unsupported(f"dy has dtype {dy.dtype} but x has {x.dtype}; pass dy in x's dtype")
    x2, dy2 = x.reshape(-1, k).contiguous(), dy.reshape(-1, n).contiguous()
    if dy2.shape[0] != x2.shape[0]:
        raise Unsupported(f"dy {tuple(dy.shape)} and x {tuple(x.shape)} have different numbers of rows")
    _check_device(x2)
    if _choose(path, x2.shape[0]) == "workspace":
        dx = dy2 @ fake_quant_workspace(w, scales, zeros, bits, x.dtype)  # workspace freed before dw
    else:
        dx = _fused_dx(dy2, w, scales, zeros, bits)
    dw, ds = _dw(dy2, x2, w, scales, zeros, bits, need_scales_grad)
    return dx.reshape(x.shape), dw, ds
