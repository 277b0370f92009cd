"""The ``cuda`` backend: hand-written CUDA kernels from ``csrc/`` in the extension ``qdpo._C``.

Importing this module fails with ImportError when the extension was not
built (no ``nvcc`` at install time, or ``QDPO_SKIP_CUDA_BUILD=1``); the
backend registry then reports the backend unavailable and the other
backends serve every op.

Ops served (each kernel file in ``csrc/`` opens with its contract: formula,
shapes, dtypes, layouts, bytes moved):

==========================  ==========================  ===========================================
op                          kernel                      served
==========================  ==========================  ===========================================
``qparams``, ``quantize``   ``csrc/quantize.cu``        every spec the ops accept (one pass over W)
``quantize_with``           ``csrc/quantize.cu``        any scale dtype (frozen grid)
``dequantize``              ``csrc/dequantize.cu``      every spec, any output dtype
``fake_quant`` (+backward)  ``csrc/fake_quant.cu``      STE mask recomputed, LSQ sum per group
``dequant_matmul``          ``csrc/dequant_matmul_*.cu``  M <= 16 rows of x (decode GEMV); more rows:
                                                        ``dequantize`` once, then cuBLAS
``dequant_matmul_experts``  ``csrc/dequant_matmul_*.cu``  fp16/bf16 x: one GEMV launch over (row, expert)
                                                        pairs, or over each expert's rows sorted on the
                                                        device; the expert ids never read on the host
``dequant_matmul_dx``       ``dequantize`` + cuBLAS     every shape
``fake_quant_matmul``       ``fake_quant`` + cuBLAS     every shape; backward: cuBLAS for dx and
(+backward)                                             dŵ (fp32), ``fake_quant_backward`` for the STE
==========================  ==========================  ===========================================

Prefill-sized products (M > 16) take the "dequantize once, then cuBLAS"
route by default (``path="workspace"``): ŵ is written once in x's dtype (N·K
elements, the cost of one extra pass over the weight) and the tensor-core GEMM
is cuBLAS's; on an H200 it ran 0.90-0.95x of bf16 ``torch.matmul`` at M = 4096.
``path="gemm"`` runs the hand-written tensor-core GEMM instead
(``csrc/dequant_matmul_gemm.cu``: cp.async double buffering, each code
dequantized once per block into shared memory, ldmatrix + mma.sync); it has not
run on a GPU yet, so nothing chooses it unasked.

Not served (:class:`~qdpo.kernels.backends.Unsupported` under an explicit
``backend="cuda"``; ``auto`` moves on to triton): GPUs below compute
capability 8.0 (the extension is built for sm_80 and sm_90).

``auto`` (while ``qdpo.kernels.backends.CUDA_IN_AUTO`` is True) picks this backend
only for ``dequant_matmul`` with at most :data:`GEMV_MAX_M` rows of fp16/bf16 x: on an H200
the decode GEMV ran 1.5-2.2x faster than bf16 ``torch.matmul`` at M = 1 (W4 g128)
where Triton's ran 0.3-1.0x; every other op measured equal to or slower than
Triton's (README "GPU results"), so ``auto`` keeps Triton for them.

Every wrapper (1) checks devices, dtypes, sizes, (2) allocates its outputs with
torch on the tensor's device, (3) launches on the current torch stream with raw
``data_ptr()`` values. The C++ side checks its arguments again and raises
ValueError (bad argument) or RuntimeError (CUDA error).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from qdpo import _C  # ImportError: extension not built
from qdpo.kernels import gemv_table
from qdpo.kernels.backends import Unsupported, register
from qdpo.kernels.reference import expert_segments, rows_per_expert
from qdpo.kernels.gemv_options import (  # noqa: F401 (re-exported)
    GEMV_DEFAULTS, GEMV_OPTIONS, MAX_WARPS, ROW_TILES, WARPS_RULE, block_warps_ok, gemv_choices,
)

RUNTIME_VERSION = _C.runtime_version()
DTYPE_CODES = {torch.float32: _C.F32, torch.float16: _C.F16, torch.bfloat16: _C.BF16}
GEMV_MAX_M = _C.GEMV_MAX_M  # rows of x the decode GEMV serves
MIN_CAPABILITY = (8, 0)  # mma.sync bf16, cvt.rn.bf16x2: sm_80 and later
INT32_LIMIT = 2**31  # the kernels index within a row with int32


# --------------------------------------------------------------------------- checks
@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _check_device(*tensors) -> torch.device:
    """The one CUDA device of ``tensors`` (None entries skipped), with a supported capability."""
    ts = [t for t in tensors if t is not None]
    dev = ts[0].device
    if dev.type != "cuda" or any(t.device != dev for t in ts):
        raise Unsupported(f"the cuda backend needs all tensors on one CUDA device, got {[str(t.device) for t in ts]}")
    cap = _capability(dev.index)
    if cap < MIN_CAPABILITY:
        raise Unsupported(f"compute capability {cap[0]}.{cap[1]} is below 8.0; qdpo._C is built for sm_80 and sm_90")
    for t in ts:
        if t.numel() >= INT32_LIMIT:
            raise Unsupported(f"a tensor of shape {tuple(t.shape)} has 2^31 elements or more (int32 indexing)")
    return dev


def _code(dtype: torch.dtype, what: str) -> int:
    if dtype not in DTYPE_CODES:
        raise Unsupported(f"{what} has dtype {dtype}; the cuda kernels take float32, float16 or bfloat16")
    return DTYPE_CODES[dtype]


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D view whose last dimension is contiguous and whose rows do not overlap (else a copy)."""
    if t.stride(1) == 1 and t.stride(0) >= t.shape[1]:
        return t
    return t.contiguous()


def _launch(device: torch.device, fn, *args, **kwargs) -> None:
    """``fn(*args, stream, **kwargs)`` with ``device`` current and torch's current stream on it.

    A GPU the extension has no kernel for (CUDA error 209: built for other archs, and the driver
    cannot compile the embedded PTX) raises :class:`Unsupported`, so ``auto`` moves on to Triton.
    """
    try:
        if torch.cuda.current_device() == device.index:
            fn(*args, torch.cuda.current_stream(device).cuda_stream, **kwargs)
            return
        with torch.cuda.device(device):
            fn(*args, torch.cuda.current_stream(device).cuda_stream, **kwargs)
    except RuntimeError as e:
        if "CUDA error 209 " not in str(e):
            raise
        cap = _capability(device.index)
        raise Unsupported(f"qdpo._C has no kernel for this GPU (compute capability {cap[0]}.{cap[1]}); rebuild "
                          f"it with QDPO_CUDA_ARCHS={cap[0]}{cap[1]} pip install -e . ({e})") from None


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _grid(scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros as the kernels read them: contiguous ``(N, NG)``."""
    _code(scales.dtype, "scales")
    return scales.contiguous(), zeros.contiguous()


# --------------------------------------------------------------------------- quantize
def _quantize(w, bits, mode, group_size=-1, symmetric=False, scales=None, zeros=None):
    """Run csrc/quantize.cu; returns ``(qweight or None, scales, zeros)``."""
    dev = _check_device(w, scales, zeros)
    w_code = _code(w.dtype, "weight")
    w = _rows(w)
    n, k = w.shape
    qweight = None if mode == _C.QPARAMS else torch.empty(n, k * bits // 8, dtype=torch.uint8, device=dev)
    if scales is None:
        ng = 1 if group_size == -1 else k // group_size
        scales = torch.empty(n, ng, dtype=w.dtype, device=dev)  # [N, NG] w.dtype
        zeros = torch.empty(n, ng, dtype=torch.uint8, device=dev)  # [N, NG] uint8
    else:
        scales, zeros = _grid(scales, zeros)
    _launch(dev, _C.quantize, mode, w.data_ptr(), w_code, w.stride(0), n, k, scales.shape[1], bits, symmetric,
            _ptr(qweight), scales.data_ptr(), DTYPE_CODES[scales.dtype], zeros.data_ptr())
    return qweight, scales, zeros


@register("cuda", "qparams", auto_if=False)
def qparams(w: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """``(scales, zeros)``, each ``(N, NG)``: one read of W, no codes written."""
    _, s, z = _quantize(w, bits, _C.QPARAMS, group_size, symmetric)
    return s, z


@register("cuda", "quantize", auto_if=False)
def quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """``(qweight, scales, zeros)`` in one pass over W."""
    return _quantize(w, bits, _C.QUANTIZE, group_size, symmetric)


@register("cuda", "quantize_with", auto_if=False)
def quantize_with(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int):
    """Packed ``qweight`` on a frozen grid (scales/zeros given, any float scale dtype)."""
    return _quantize(w, bits, _C.QUANTIZE_WITH, scales=scales, zeros=zeros)[0]


# --------------------------------------------------------------------------- dequantize
def _max_vec(max_vec: int) -> int:
    """dequantize's and fake_quant's widest chunk per load: 16 elements (the kernels' own choice) or 8."""
    if max_vec not in (8, 16):
        raise ValueError(f"max_vec={max_vec!r}: the widest chunk is 16 (the kernels' own choice) or 8 elements")
    return max_vec


@register("cuda", "dequantize", auto_if=False)
def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, dtype: torch.dtype, *,
               max_vec: int = 16):
    """``ŵ`` ``(N, K)`` in ``dtype``. ``max_vec``: the widest chunk a thread loads, 16 codes (the
    kernel's choice wherever the rows allow it) or 8 (the benchmarks' ``cuda-v8``)."""
    max_vec = _max_vec(max_vec)
    dev = _check_device(qweight, scales, zeros)
    out_code = _code(dtype, "the output")
    qweight = _rows(qweight)
    scales, zeros = _grid(scales, zeros)
    n, k = qweight.shape[0], qweight.shape[1] * 8 // bits
    out = torch.empty(n, k, dtype=dtype, device=dev)  # ŵ: [N, K] dtype
    _launch(dev, _C.dequantize, qweight.data_ptr(), qweight.stride(0), n, k, scales.shape[1], bits,
            scales.data_ptr(), DTYPE_CODES[scales.dtype], zeros.data_ptr(), out.data_ptr(), out_code,
            max_vec=max_vec)
    return out


# --------------------------------------------------------------------------- fake_quant
@register("cuda", "fake_quant", auto_if=False)
def fake_quant(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, dtype: torch.dtype, *,
               max_vec: int = 16):
    """``ŵ`` ``(N, K)`` in ``dtype``. ``max_vec``: the widest chunk a thread loads, 16 elements (the
    kernel's choice: 16 for 16-bit weights) or 8 (the benchmarks' ``cuda-v8``)."""
    max_vec = _max_vec(max_vec)
    dev = _check_device(w, scales, zeros)
    w_code, out_code = _code(w.dtype, "weight"), _code(dtype, "the output")
    w = _rows(w)
    scales, zeros = _grid(scales, zeros)
    n, k = w.shape
    out = torch.empty(n, k, dtype=dtype, device=dev)  # ŵ: [N, K] dtype
    _launch(dev, _C.fake_quant, w.data_ptr(), w_code, w.stride(0), n, k, scales.shape[1], bits,
            scales.data_ptr(), DTYPE_CODES[scales.dtype], zeros.data_ptr(), out.data_ptr(), out_code,
            max_vec=max_vec)
    return out


@register("cuda", "fake_quant_backward", auto_if=False)
def fake_quant_backward(grad: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        bits: int, need_scales_grad: bool, *, max_vec: int = 16):
    """``(grad_w, grad_scales or None)``: STE mask recomputed, LSQ sums per group in fp32. ``max_vec``
    as :func:`fake_quant`'s (16 elements where w and grad are both 16-bit)."""
    max_vec = _max_vec(max_vec)
    dev = _check_device(grad, w, scales, zeros)
    g_code, w_code = _code(grad.dtype, "grad"), _code(w.dtype, "weight")
    if grad.shape != w.shape:
        raise ValueError(f"grad has shape {tuple(grad.shape)}; expected the weight's {tuple(w.shape)}")
    grad, w = grad.contiguous(), _rows(w)  # a gradient from .sum() arrives stride-0 expanded
    scales, zeros = _grid(scales, zeros)
    n, k = w.shape
    grad_w = torch.empty(n, k, dtype=w.dtype, device=dev)  # [N, K] w.dtype
    grad_s = torch.empty_like(scales) if need_scales_grad else None  # [N, NG] scales.dtype
    _launch(dev, _C.fake_quant_backward, grad.data_ptr(), g_code, w.data_ptr(), w_code, w.stride(0), n, k,
            scales.shape[1], bits, scales.data_ptr(), DTYPE_CODES[scales.dtype], zeros.data_ptr(),
            grad_w.data_ptr(), _ptr(grad_s), max_vec=max_vec)
    return grad_w, grad_s


# --------------------------------------------------------------------------- dequant_matmul
def _choice_code(flag: bool | None) -> int:
    """A C++ plan's force_* switch (force_x_smem, force_scale_after): 0 its own choice, 1 off, 2 on."""
    return 0 if flag is None else 2 if flag else 1


def _force(splits, warps, x_smem, scale_after, zero_after, shared_x, row_tiles) -> dict:
    """The C++ launcher's force_* keywords."""
    return {"force_splits": splits, "force_warps": warps, "force_x_smem": _choice_code(x_smem),
            "force_scale_after": _choice_code(scale_after), "force_zero_after": _choice_code(zero_after),
            "force_shared_x": _choice_code(shared_x), "force_row_tiles": row_tiles}


# --------------------------------------------------------------------------- measured launches
UNFORCED = (0, 0, None, None, None, None, 0)  # (splits, warps, x_smem, scale_after, zero_after, shared_x, row_tiles)
_TABLES: dict[int, gemv_table.GemvTable | None] = {}  # device index -> its table of measured launches


def use_gemv_table(table: "gemv_table.GemvTable | str | Path | None", device=None) -> None:
    """Have the GEMV on ``device`` (default: the current CUDA device) launch by ``table`` (a
    :class:`~qdpo.kernels.gemv_table.GemvTable` or the path of one; None: the plan's rules alone) instead
    of the table that ``QDPO_GEMV_TABLE`` or the package holds for it (:mod:`qdpo.kernels.gemv_table`)."""
    index = torch.device(device if device is not None else "cuda").index
    if isinstance(table, (str, Path)):
        table = gemv_table.GemvTable.read(table)
    if table is not None and not isinstance(table, gemv_table.GemvTable):
        raise TypeError(f"use_gemv_table: got {type(table).__name__}; pass a GemvTable, a path or None")
    _TABLES[index if index is not None else torch.cuda.current_device()] = table


def gemv_table_for(index: int) -> "gemv_table.GemvTable | None":
    """The table of measured launches the GEMV uses on CUDA device ``index`` (read once per process)."""
    if index not in _TABLES:
        _TABLES[index] = gemv_table.load_table(torch.cuda.get_device_name(index), _sm_count(index))
    return _TABLES[index]


def _launch_choices(index: int, dtype: torch.dtype, m: int, n: int, k: int, groups: int, bits: int,
                    force: tuple) -> tuple:
    """``force`` as given, or, where it forces nothing, the table's launch for this exact case on CUDA
    device ``index`` (the scale and zero point stay the plan's: a table never moves them)."""
    warps, shared_x = force[1], force[5]
    if not isinstance(warps, int) or warps != 0 and not block_warps_ok(warps, bool(shared_x)):
        raise ValueError(f"warps={warps!r} (shared_x={shared_x!r}): a GEMV block takes {WARPS_RULE}; "
                         f"0: the plan's choice")
    if force[6] not in ROW_TILES:
        raise ValueError(f"row_tiles={force[6]!r}: each warp computes 1 or 2 tiles of 16 rows; 0: the plan's choice")
    if force != UNFORCED:
        return force
    table = gemv_table_for(index)
    launch = table and table.launch(bits, gemv_table.group_of(k, groups), str(dtype).removeprefix("torch."), m, n, k)
    if not launch:
        return force
    return (launch["splits"], launch["warps"], launch["x_smem"], None, None, launch["shared_x"],
            launch.get("row_tiles", 0))


def gemv_plan(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int, splits: int = 0,
              warps: int = 0, x_smem: bool | None = None, scale_after: bool | None = None,
              zero_after: bool | None = None, shared_x: bool | None = None, row_tiles: int = 0) -> dict:
    """The C++ launcher's choice for ``x2 @ ŵᵀ``: kernel ("mma" | "fma"), tiles, rows per block, splits,
    workspace bytes, warps per block, the resident blocks per SM it expects, where x sits and where the
    scale and zero point are applied (``row_tiles``: the 16-row tiles each warp computes, ``rt``);
    ``splits`` / ``warps`` / ``row_tiles`` > 0 and ``x_smem`` / ``scale_after`` /
    ``zero_after`` / ``shared_x`` not None force those (benchmarks). Forcing none, the device's table
    of measured launches decides where it holds this case (:func:`gemv_table_for`), as in
    :func:`dequant_matmul`."""
    n, k = qweight.shape[0], qweight.shape[1] * 8 // bits
    force = _launch_choices(x2.device.index, x2.dtype, x2.shape[0], n, k, scales.shape[1], bits,
                            (splits, warps, x_smem, scale_after, zero_after, shared_x, row_tiles))
    plan = _plan(x2, qweight, scales, bits, n, k, force)
    return {**plan, "row_tiles": plan["rt"]}


def _plan(x2, qweight, scales, bits: int, n: int, k: int, force: tuple) -> dict:
    """The C++ plan for launch choices already resolved (:func:`_launch_choices`)."""
    return _C.dequant_matmul_plan(x2.shape[0], n, k, scales.shape[1], bits, _code(x2.dtype, "x"),
                                  _code(scales.dtype, "scales"), x2.data_ptr(), qweight.data_ptr(), qweight.stride(0),
                                  _sm_count(x2.device.index), **_force(*force))


def _decode_sized(x, *rest) -> bool:
    """What ``auto`` sends here: at most GEMV_MAX_M rows of fp16/bf16 x (the measured tensor-core GEMV)."""
    return x.dtype in (torch.float16, torch.bfloat16) and x.numel() <= GEMV_MAX_M * x.shape[-1]


PATHS = ("gemv", "workspace", "gemm")  # dequant_matmul's routes (see dequant_matmul)


@register("cuda", "dequant_matmul", auto_if=_decode_sized)
def dequant_matmul(x, qweight, scales, zeros, bits, bias=None, *, path: str = "", splits: int = 0,
                   warps: int = 0, x_smem: bool | None = None, scale_after: bool | None = None,
                   zero_after: bool | None = None, shared_x: bool | None = None, row_tiles: int = 0):
    """``x @ ŵᵀ (+ bias)`` in x's dtype.

    ``path``: "gemv" (the decode kernel, at most :data:`GEMV_MAX_M` rows of x; the default there),
    "workspace" (ŵ once, then cuBLAS; the default above), "gemm" (the hand-written tensor-core GEMM,
    any M; fp16/bf16 x, K % 64 == 0, G % 32 == 0, 16-byte aligned x and weight rows).
    ``splits`` (> 0) overrides the GEMV's split-K count and ``warps`` (1-8; 4 or 8 with ``shared_x``) its
    warps per block (the plan's rules pick 8 or 4; the other counts fit other grids into one wave);
    ``x_smem=True`` has it copy x to shared memory first (M <= 2, where the copy fits 48 KB; not yet
    measured on a GPU, so the plan keeps x in registers unless asked). ``scale_after=True`` has the
    tensor cores sum the integers q - z and multiplies each 128-code step's fp32 sums by the scale
    (group size a multiple of 128, or one group per row; not yet measured either): ŵ is then never
    rounded to x.dtype, so y is closer to the exact product than the reference's x.dtype result.
    ``zero_after=True`` (W4, bf16 x, with ``scale_after``; any place of x) has the tensor cores take the codes
    as they are (bias + q) and add the zero point's -(bias + z) times x in a second mma per 16 codes, which
    drops a subtraction per two weights. ``shared_x=True`` (any M,
    not with ``x_smem``) gives each warp 16 rows of its own and has the block stage x in shared memory,
    512 codes at a time, for all of them (not yet measured either). ``row_tiles`` (1 or 2; M <= 8, not
    with ``x_smem`` or ``shared_x``) sets the 16-row tiles each warp computes: the plan takes 1 at M <= 2
    and 2 above; 2 at M <= 2 shares x and the step's arithmetic between two tiles, in half the blocks at
    128 registers (not yet measured either).
    ``benchmarks/sweep_gemv.py`` sweeps them. With 16-bit x, scales of another dtype are rounded to
    x.dtype first (the tensor-core kernels read them so): ŵ then differs from the reference's, which
    rounds only (q - z) · s, by at most half an ulp of s; scales in x.dtype give its ŵ bit for bit. 0 / None lets the plan choose: where the caller forces
    none of them, a table of launches measured on this GPU model decides for the exact shapes it holds
    (:mod:`qdpo.kernels.gemv_table`; ``QDPO_GEMV_TABLE=off``: the plan's rules alone).
    """
    dev = _check_device(x, qweight, scales, zeros, bias)
    x_code = _code(x.dtype, "x")
    n, k = qweight.shape[0], qweight.shape[1] * 8 // bits
    x2 = x.reshape(-1, k).contiguous()  # [M, K]
    m = x2.shape[0]
    path = path or ("gemv" if m <= GEMV_MAX_M else "workspace")
    if path not in PATHS or (path == "gemv" and m > GEMV_MAX_M):
        raise ValueError(f"path={path!r} cannot serve M={m}; use one of {PATHS} (gemv: M <= {GEMV_MAX_M})")
    if path == "workspace":  # prefill: ŵ once, then cuBLAS
        w_hat = dequantize(qweight, scales, zeros, bits, x.dtype)  # [N, K] x.dtype
        return F.linear(x, w_hat, None if bias is None else bias.to(x.dtype))
    y = torch.empty(m, n, dtype=x.dtype, device=dev)  # [M, N]
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    qweight = _rows(qweight)
    scales, zeros = _grid(scales, zeros)
    if x.dtype != torch.float32 and scales.dtype != x.dtype:
        # the tensor-core paths read 16-bit scales in x.dtype: s is rounded to x.dtype before the
        # product (the reference rounds only the product), which moves a group's ŵ together by up to
        # half an ulp of s; scales in x.dtype (as qdpo quantizes a 16-bit model) give the reference's ŵ
        scales = scales.to(x.dtype)
    if bias is not None:
        bias = bias.contiguous()
        _code(bias.dtype, "bias")
    b_code = DTYPE_CODES[bias.dtype] if bias is not None else 0
    if path == "gemm":
        s_code = DTYPE_CODES[scales.dtype]
        if not _C.dequant_gemm_supported(k, scales.shape[1], x_code, s_code, x2.data_ptr(), qweight.data_ptr(),
                                         qweight.stride(0)):
            raise Unsupported(f"path='gemm' needs fp16/bf16 x, K % 64 == 0, a group size that is a multiple of "
                              f"32 and 16-byte aligned x and weight rows; got x {x.dtype}, K={k}, "
                              f"{scales.shape[1]} groups per row; use path='workspace'")
        _launch(dev, _C.dequant_gemm, x2.data_ptr(), x_code, m, n, k, scales.shape[1], bits, qweight.data_ptr(),
                qweight.stride(0), scales.data_ptr(), s_code, zeros.data_ptr(), _ptr(bias), b_code, y.data_ptr())
        return y.reshape(*x.shape[:-1], n)
    force = _launch_choices(dev.index, x.dtype, m, n, k, scales.shape[1], bits,
                            (splits, warps, x_smem, scale_after, zero_after, shared_x, row_tiles))
    plan = _plan(x2, qweight, scales, bits, n, k, force)  # resolved once, table included
    ws = plan["workspace_bytes"]
    workspace = torch.empty(ws // 4, dtype=torch.float32, device=dev) if ws else None  # [splits, M, N] fp32
    _launch(dev, _C.dequant_matmul, x2.data_ptr(), x_code, m, n, k, scales.shape[1], bits, qweight.data_ptr(),
            qweight.stride(0), scales.data_ptr(), DTYPE_CODES[scales.dtype], zeros.data_ptr(), _ptr(bias),
            b_code, y.data_ptr(), _ptr(workspace), ws,
            _sm_count(dev.index), **_force(*force))
    return y.reshape(*x.shape[:-1], n)


def experts_plan(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int, num_experts: int,
                 max_rows: int = 0, segments: bool = False) -> dict:
    """The grouped GEMV's plan for :func:`dequant_matmul_experts` (as :func:`gemv_plan`'s; scales in
    x.dtype), unsplit, with ``segment_rows``: 0 where each row of x runs as its own pair (the M = 1 plan,
    its warps per block chosen by the blocks of all rows), else the most rows one expert is expected to
    take (x sorted by expert; the plan of that M, whose tile of 8 or 16 rows is a block's chunk of one
    expert's rows). ``segments``: x comes sorted (:func:`dequant_matmul_segments`), never pairs."""
    n, k = qweight.shape[0] // num_experts, qweight.shape[1] * 8 // bits
    p = x.shape[0]
    seg = rows_per_expert(p, max_rows)
    seg = max(seg, 1) if segments else seg if seg > 1 else 0
    plan = _C.dequant_matmul_experts_plan(p, n, k, scales.shape[1], bits, _code(x.dtype, "x"),
                                          _code(scales.dtype, "scales"), x.data_ptr(), qweight.data_ptr(),
                                          qweight.stride(0), _sm_count(x.device.index), seg_rows=seg)
    return {**plan, "segment_rows": seg}


def _grouped(x, index, qweight, scales, zeros, bits, num_experts, bias, max_rows, segments):
    """What both grouped ops share: the checks (Unsupported where the grouped GEMV cannot serve), the plan
    and the launch. Returns ``(seg, launch)``: ``launch(x, index, y)`` runs the grouped GEMV (``index``:
    the rows' int32 expert ids for pairs, the experts' offsets for segments) into y, allocated by the
    caller, and ``seg`` is the plan's ``segment_rows`` (0: pairs)."""
    dev = _check_device(x, index, qweight, scales, zeros, bias)
    x_code = _code(x.dtype, "x")
    if x.dtype == torch.float32:
        raise Unsupported("the grouped GEMV serves fp16 and bf16 x (its tensor cores); got float32")
    p, k = x.shape
    rows = qweight.shape[0]
    n = rows // num_experts
    if p > _C.MAX_GROUPED_PAIRS:
        raise Unsupported(f"{p} rows of x: one launch takes at most {_C.MAX_GROUPED_PAIRS}")
    qweight = _rows(qweight)
    scales, zeros = _grid(scales, zeros)
    if scales.dtype != x.dtype:  # as dequant_matmul: the tensor cores read scales in x.dtype
        scales = scales.to(x.dtype)
    plan = experts_plan(x, qweight, scales, bits, num_experts, max_rows, segments)
    if plan["kernel"] != "mma":
        raise Unsupported(f"the grouped GEMV needs K and the group size multiples of 32 and 16-byte aligned x and "
                          f"weight rows; got K={k}, {scales.shape[1]} groups per row")
    if rows * qweight.stride(0) >= INT32_LIMIT:
        raise Unsupported(f"the experts' packed weights hold {rows * qweight.stride(0)} bytes; the grouped GEMV "
                          f"indexes them with int32 (below 2^31)")
    if bias is not None:
        bias = bias.contiguous()
        _code(bias.dtype, "bias")
    seg = plan["segment_rows"]

    def launch(xs: torch.Tensor, index: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if p:
            _launch(dev, _C.dequant_matmul_experts, xs.data_ptr(), x_code, p, index.data_ptr(), num_experts, n, k,
                    scales.shape[1], bits, qweight.data_ptr(), qweight.stride(0), scales.data_ptr(),
                    DTYPE_CODES[scales.dtype], zeros.data_ptr(), _ptr(bias),
                    DTYPE_CODES[bias.dtype] if bias is not None else 0, y.data_ptr(), _sm_count(dev.index),
                    seg_rows=seg)
        return y

    return seg, launch


@register("cuda", "dequant_matmul_experts")
def dequant_matmul_experts(x, experts, qweight, scales, zeros, bits, num_experts, bias=None, max_rows=0):
    """``y[p] = x[p] @ ŵ_{experts[p]}ᵀ (+ bias[experts[p]])`` in one launch of the decode GEMV, unsplit.
    One row per expert at most (``max_rows`` 1, or one row of x): the grid's z axis over the P rows, each
    block reading its expert id on the device (the M = 1 plan). Else the rows are sorted by expert on
    the device and run as :func:`dequant_matmul_segments`. Serves fp16/bf16 x where the GEMV takes
    tensor cores (K and the group a multiple of 32, 16-byte aligned x and weight rows) and up to 65535
    rows."""
    seg, launch = _grouped(x, experts, qweight, scales, zeros, bits, num_experts, bias, max_rows, False)
    n = qweight.shape[0] // num_experts
    if not seg:
        # int32 for the kernel; ids outside [0, num_experts) (int64 ones past int32 included) become -1
        ids = torch.where((experts >= 0) & (experts < num_experts), experts, -1).to(torch.int32)
        return launch(x, ids, torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device))
    order, offsets = expert_segments(experts, num_experts)  # ids outside last: unwritten, zeros
    ys = launch(x[order].contiguous(), offsets, torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device).zero_())
    return torch.empty_like(ys).index_copy_(0, order, ys)


@register("cuda", "dequant_matmul_segments")
def dequant_matmul_segments(x, offsets, qweight, scales, zeros, bits, num_experts, bias=None, max_rows=0):
    """``y[p] = x[p] @ ŵ_eᵀ (+ bias[e])`` for expert e's rows ``offsets[e] .. offsets[e + 1]`` of x (sorted by
    expert), in one launch: each block along z takes one chunk of 8 or 16 of one expert's rows, found by
    the block from the offsets (``find_segment``, each offset clamped to 0 .. P), so each chosen expert's
    weights are read once per chunk (once, when its rows fit the tile ``max_rows`` picks); the grid holds
    one block per chunk that any routing could make (``segment_blocks``), not one per expert. Rows from
    ``offsets[num_experts]`` on stay zero. What :func:`dequant_matmul_experts` serves."""
    _, launch = _grouped(x, offsets, qweight, scales, zeros, bits, num_experts, bias, max_rows, True)
    n = qweight.shape[0] // num_experts
    return launch(x, offsets, torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device).zero_())


@register("cuda", "dequant_matmul_dx", auto_if=False)
def dequant_matmul_dx(dy, qweight, scales, zeros, bits):
    """``dx = dy @ ŵ`` ``(..., K)`` in dy's dtype: ŵ from ``csrc/dequantize.cu``, the product from cuBLAS."""
    _check_device(dy, qweight, scales, zeros)
    return dy @ dequantize(qweight, scales, zeros, bits, dy.dtype)


# --------------------------------------------------------------------------- fake_quant_matmul
@register("cuda", "fake_quant_matmul", auto_if=False)
def fake_quant_matmul(x, w, scales, zeros, bits: int, bias=None):
    """``x @ fq(w)ᵀ (+ bias)`` in x's dtype: ŵ from ``csrc/fake_quant.cu``, the product from cuBLAS."""
    _check_device(x, w, scales, zeros, bias)
    w_hat = fake_quant(w, scales, zeros, bits, x.dtype)  # [N, K] x.dtype
    return F.linear(x, w_hat, None if bias is None else bias.to(x.dtype))


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` accumulated and returned in fp32.

    16-bit operands go to the tensor cores with an fp32 output (``torch.mm(..., out_dtype=)``):
    their products are exact in fp32, so this is the fp32 product up to summation order, without
    the upcast copies or the fp32 GEMM (on an H200 the upcast route made the backward 3.6x slower
    than Triton's at M = 4096). Where that overload is missing (older torch), the upcast route.
    """
    if a.dtype in (torch.float16, torch.bfloat16) and a.dtype == b.dtype:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    return a.float() @ b.float()


@register("cuda", "fake_quant_matmul_backward", auto_if=False)
def fake_quant_matmul_backward(dy, x, w, scales, zeros, bits: int, need_scales_grad: bool):
    """``(dx, dw, dscales or None)``: dx = dy @ ŵ and dŵ = dyᵀ x (fp32) by cuBLAS, then the STE kernel."""
    _check_device(dy, x, w, scales, zeros)
    n, k = w.shape
    if dy.dtype != x.dtype:
        raise Unsupported(f"dy has dtype {dy.dtype} but x has {x.dtype}; pass dy in x's dtype")
    x2, dy2 = x.reshape(-1, k), dy.reshape(-1, n)
    if dy2.shape[0] != x2.shape[0]:
        raise Unsupported(f"dy {tuple(dy.shape)} and x {tuple(x.shape)} have different numbers of rows")
    dx = dy2 @ fake_quant(w, scales, zeros, bits, x.dtype)  # ŵ freed before dŵ is made
    dw_hat = _mm_fp32(dy2.t(), x2)  # [N, K] fp32, as the reference accumulates
    dw, ds = fake_quant_backward(dw_hat, w, scales, zeros, bits, need_scales_grad)
    return dx.reshape(x.shape), dw, ds
