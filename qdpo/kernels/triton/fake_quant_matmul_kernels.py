"""Device code of the fake-quant matmul; the contract is in ``fake_quant_matmul.py``.

Four kernels share one device helper, :func:`fq_rows`:

* :func:`fq_workspace_kernel` writes ``ŵ`` ``(N, K)`` in the activation dtype
  (the "workspace + cuBLAS" path);
* :func:`fwd_kernel`: ``y = x @ fq(w)ᵀ (+ bias)``, W tiles fake-quantized as loaded;
* :func:`dx_kernel`: ``dx = dy @ fq(w)``, the same trick;
* :func:`dw_kernel`: ``dŵ = dyᵀ @ x`` in fp32, the STE mask (and the LSQ partial
  sums) recomputed in the epilogue, so neither ``ŵ`` nor ``dŵ`` touches memory.

Every W tile that :func:`fq_rows` sees lies inside one quantization group (the
host picks ``BLOCK_K <= G`` with ``G % BLOCK_K == 0``, or there is one group per
row), so each step loads one scale and zero per tile row, not per element.

``INTERPRET`` is true under ``TRITON_INTERPRET=1``; it selects the interpreter's
fp32 tiles into ``tl.dot`` (its bf16 dot is wrong). Its other workarounds of
``shared/TOOLCHAIN.md`` (bit-level bf16 rounding, ``floor``-based rounding) come
with the shared helpers ``cast_out`` and ``round_half_even``; ``fq_rows`` can
still be asked for the floor-based rounding on a GPU (``USE_RINT=False``), so a
GPU test compares the two.
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice

from qdpo.kernels.triton._common import (
    all_in_range, cast_out, quotient, recip_quotient, round_half_even, round_half_even_floor,
)

# LSQ partial sums are kept per 32-wide K block: every supported group size is
# a multiple of 32, so such a block never straddles two groups.
PART_K = tl.constexpr(32)


@triton.jit
def _swizzle(pid, n_rows, n_cols, GROUP: tl.constexpr):
    # GROUP consecutive row tiles walk the column tiles together, so operands stay in L2
    width = GROUP * n_cols
    first = (pid // width) * GROUP
    size = tl.minimum(n_rows - first, GROUP)
    return first + (pid % width) % size, (pid % width) // size


@triton.jit
def fq_rows(w, s_ptrs, z_ptrs, row_ok, QMAX: tl.constexpr, USE_RINT: tl.constexpr,
            SIGNED_ZERO: tl.constexpr = False):
    """fp32 ``ŵ`` of a ``(R, C)`` tile whose row ``i`` uses the scale/zero at ``s_ptrs[i]``/``z_ptrs[i]``.

    ``clamp(round(w/s), -z, qmax - z)·s`` equals the spec's
    ``(clamp(round(w/s) + z, 0, qmax) - z)·s``: the integer sums are exact, and
    beyond 2^24 both clamp to the same bound. A zero may carry the other sign,
    which no product with it can show; ``SIGNED_ZERO`` (a stored ŵ) makes it +0 as ``q - z`` does:
    then bit for bit, as ``c·s + 0`` in one FMA where every scale of the tile is positive (and within
    2^±100: the reciprocal route; the same bits as ``(c + 0)·s`` for s > 0), else as ``(c + 0)·s``
    after the division. ``w/s`` through each row's reciprocal (``_common.quotient``: the same rounded
    value), since every program along M quantizes the tile again.
    """
    s = tl.load(s_ptrs, mask=row_ok, other=1.0).to(tl.float32)[:, None]
    z = tl.load(z_ptrs, mask=row_ok, other=0).to(tl.float32)[:, None]
    wf = w.to(tl.float32)
    if SIGNED_ZERO:
        if all_in_range(s):
            c = _on_grid(recip_quotient(wf, s), z, QMAX, USE_RINT)
            w_hat = tl.fma(c, tl.broadcast_to(s, c.shape), 0.0)
        else:
            c = _on_grid(tl.math.div_rn(wf, tl.broadcast_to(s, wf.shape)), z, QMAX, USE_RINT)
            w_hat = (c + 0.0) * s
    else:
        w_hat = _on_grid(quotient(wf, s), z, QMAX, USE_RINT) * s
    return w_hat


@triton.jit
def _on_grid(x, z, QMAX: tl.constexpr, USE_RINT: tl.constexpr):
    """``clamp(round(x), -z, qmax - z)`` of quotients ``x`` (ties to even)."""
    if USE_RINT:  # one instruction on the GPU, missing under the interpreter
        r = libdevice.rint(x)
    else:
        r = round_half_even_floor(x)
    r = tl.maximum(r, -z, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(r, QMAX - z, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def fq_workspace_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr,
    N, K,
    stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg, stride_on,
    GROUP_K: tl.constexpr, QMAX: tl.constexpr, USE_RINT: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    ok = n_ok[:, None] & (offs_k < K)[None, :]
    rows = offs_n[:, None].to(tl.int64)
    w = tl.load(w_ptr + rows * stride_wn + offs_k[None, :] * stride_wk, mask=ok, other=0.0)
    g = k0 // GROUP_K
    w_hat = fq_rows(w, s_ptr + offs_n * stride_sn + g * stride_sg, z_ptr + offs_n * stride_zn + g * stride_zg,
                    n_ok, QMAX, USE_RINT, SIGNED_ZERO=True)
    w_hat = cast_out(w_hat, out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows * stride_on + offs_k[None, :], w_hat, mask=ok)


@triton.jit
def fwd_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K, M_BUCKET,  # M_BUCKET: autotune key only
    stride_xm, stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg, stride_ym,
    GROUP_K: tl.constexpr, QMAX: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok, n_ok = offs_m < M, offs_n < N
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk
    s_ptrs = s_ptr + offs_n * stride_sn
    z_ptrs = z_ptr + offs_n * stride_zn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (offs_k < K - k0)[None, :]
        xt = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok, other=0.0)
        wt = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok, other=0.0)
        g = k0 // GROUP_K
        w_hat = fq_rows(wt, s_ptrs + g * stride_sg, z_ptrs + g * stride_zg, n_ok, QMAX, not INTERPRET)
        w_hat = cast_out(w_hat, x_ptr.dtype.element_ty)
        if INTERPRET:  # bf16 tl.dot is wrong under the interpreter: fp32 tiles give exact products
            acc = tl.dot(xt.to(tl.float32), tl.trans(w_hat.to(tl.float32)), acc, input_precision="ieee")
        elif IEEE:  # fp32 activations: full fp32 products like torch, not tf32
            acc = tl.dot(xt, tl.trans(w_hat), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, tl.trans(w_hat), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:  # bias arrives already cast to x.dtype, like F.linear's
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = cast_out(acc, y_ptr.dtype.element_ty)
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, y, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def dx_kernel(
    dy_ptr, w_ptr, s_ptr, z_ptr, dx_ptr,
    M, N, K, M_BUCKET,  # M_BUCKET: autotune key only
    stride_dym, stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg, stride_dxm,
    GROUP_K: tl.constexpr, QMAX: tl.constexpr, IEEE: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_k = _swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok, k_ok = offs_m < M, offs_k < K
    g = (pid_k * BLOCK_K) // GROUP_K  # the whole output tile lies in one group
    dy_ptrs = dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym + offs_n[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk
    s_ptrs = s_ptr + offs_n * stride_sn + g * stride_sg
    z_ptrs = z_ptr + offs_n * stride_zn + g * stride_zg
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n_ok = offs_n < N - n0
        dyt = tl.load(dy_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        w_hat = fq_rows(wt, s_ptrs, z_ptrs, n_ok, QMAX, not INTERPRET)
        w_hat = cast_out(w_hat, dy_ptr.dtype.element_ty)
        if INTERPRET:  # bf16 tl.dot is wrong under the interpreter: fp32 tiles give exact products
            acc = tl.dot(dyt.to(tl.float32), w_hat.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:  # fp32 activations: full fp32 products like torch, not tf32
            acc = tl.dot(dyt, w_hat, acc, input_precision="ieee")
        else:
            acc = tl.dot(dyt, w_hat, acc)
        dy_ptrs += BLOCK_N
        w_ptrs += BLOCK_N * stride_wn
        s_ptrs += BLOCK_N * stride_sn
        z_ptrs += BLOCK_N * stride_zn
    dx = cast_out(acc, dx_ptr.dtype.element_ty)
    dx_ptrs = dx_ptr + offs_m[:, None].to(tl.int64) * stride_dxm + offs_k[None, :]
    tl.store(dx_ptrs, dx, mask=m_ok[:, None] & k_ok[None, :])


@triton.jit
def dw_kernel(
    dy_ptr, x_ptr, w_ptr, s_ptr, z_ptr, dw_ptr, part_ptr,
    M, N, K, M_BUCKET,  # M_BUCKET: autotune key only
    stride_dym, stride_xm, stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
    stride_dwn, stride_pn,
    GROUP_K: tl.constexpr, QMAX: tl.constexpr, NEED_DS: tl.constexpr, IEEE: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_N: tl.constexpr,
):
    pid_n, pid_k = _swizzle(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    n_ok, k_ok = offs_n < N, offs_k < K
    dy_ptrs = dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym + offs_n[None, :]
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        m_ok = (offs_m < M - m0)[:, None]
        dyt = tl.load(dy_ptrs, mask=m_ok & n_ok[None, :], other=0.0)
        xt = tl.load(x_ptrs, mask=m_ok & k_ok[None, :], other=0.0)
        if INTERPRET:  # bf16 tl.dot is wrong under the interpreter: fp32 tiles give exact products
            acc = tl.dot(tl.trans(dyt.to(tl.float32)), xt.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:  # fp32 activations: full fp32 products like torch, not tf32
            acc = tl.dot(tl.trans(dyt), xt, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(dyt), xt, acc)
        dy_ptrs += BLOCK_M * stride_dym
        x_ptrs += BLOCK_M * stride_xm

    # epilogue: recompute round(w/s) for this tile, mask, and (LSQ) the scale terms
    ok = n_ok[:, None] & k_ok[None, :]
    rows = offs_n[:, None].to(tl.int64)
    w = tl.load(w_ptr + rows * stride_wn + offs_k[None, :] * stride_wk, mask=ok, other=0.0).to(tl.float32)
    g = (offs_k // GROUP_K)[None, :]
    s = tl.load(s_ptr + offs_n[:, None] * stride_sn + g * stride_sg, mask=ok, other=1.0).to(tl.float32)
    z = tl.load(z_ptr + offs_n[:, None] * stride_zn + g * stride_zg, mask=ok, other=0).to(tl.float32)
    r = tl.math.div_rn(w, s)
    rr = round_half_even(r)
    keep = (rr >= -z) & (rr <= QMAX - z)  # ⟺ 0 <= round(w/s) + z <= qmax
    dw = cast_out(tl.where(keep, acc, 0.0), dw_ptr.dtype.element_ty)
    tl.store(dw_ptr + rows * stride_dwn + offs_k[None, :], dw, mask=ok)
    if NEED_DS:
        # per element: round(w/s) - w/s inside the grid, clamp(q) - z where clipped
        clipped = tl.minimum(tl.maximum(rr, -z), QMAX - z)
        contrib = tl.where(ok, acc * tl.where(keep, rr - r, clipped), 0.0)
        part = tl.sum(tl.reshape(contrib, (BLOCK_N, BLOCK_K // PART_K, PART_K)), axis=2)
        cols = pid_k * (BLOCK_K // PART_K) + tl.arange(0, BLOCK_K // PART_K)
        p_ok = n_ok[:, None] & (cols < tl.cdiv(K, PART_K))[None, :]
        tl.store(part_ptr + offs_n[:, None] * stride_pn + cols[None, :], part, mask=p_ok)
