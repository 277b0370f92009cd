"""Tiled kernels behind ``qdpo::dequant_matmul`` for M > 16, and ``qdpo::dequant_matmul_dx``.

The contract (formula, shapes, layouts, bytes moved) is in
``qdpo/kernels/triton/dequant_matmul.py``; this file holds the tile-level
device helpers both files share and three kernels:

* ``_gemm_kernel``: ``y = x @ ŵᵀ (+ bias)``, one ``[BLOCK_M, BLOCK_N]`` output
  tile per program, the weight tile dequantized in registers each K step;
* ``_dx_kernel``: ``dx = dy @ ŵ``, one ``[BLOCK_M, BLOCK_K]`` tile of dx per
  program, reading the packed weight column-slab by column-slab (transposed
  use of the row-major ``qweight``, nothing materialised);
* ``_dequant_kernel``: ``ŵ`` into an ``(N, K)`` workspace in x's dtype, for
  the very-large-M path that hands the product to ``torch.matmul``.

Every kernel takes ``BLOCK_K`` that divides the group size ``G`` or ``G = K``
(one group per row), so each weight tile has one scale and zero per row.

Host side, shared with the gemv launcher: the checked weight (``Packed``),
the tile configs, the small autotuner (``pick_config``) and the launchers.
"""

import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from qdpo.kernels.backends import Unsupported
from qdpo.kernels.triton._common import cast_out, codes_minus_z, tl_dtype


@triton.jit
def _group_params(s_ptr, z_ptr, offs_n, k0, N, G, stride_sn):
    """Scale and zero point of the group holding column ``k0``, per row: two ``[BLOCK_N, 1]`` fp32."""
    n_ok = offs_n < N
    g = k0 // G  # the tile never straddles groups (module docstring)
    s = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs_n * stride_sn + g, mask=n_ok, other=0).to(tl.float32)
    return s[:, None], z[:, None]


@triton.jit
def _packed(qw_ptr, offs_n, j0, N, row_bytes, stride_qn, BLOCK_J: tl.constexpr):
    """Bytes ``qweight[offs_n, j0 : j0 + BLOCK_J]`` as ``[BLOCK_N, BLOCK_J]`` uint8 (0 outside)."""
    offs_j = j0 + tl.arange(0, BLOCK_J)
    ok = (offs_n < N)[:, None] & (offs_j < row_bytes)[None, :]
    return tl.load(qw_ptr + offs_n[:, None] * stride_qn + offs_j[None, :], mask=ok, other=0)


@triton.jit
def _dequant_tile(qw_ptr, s_ptr, z_ptr, offs_n, k0, N, K, G, stride_qn, stride_sn,
                  BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``ŵ[offs_n, k0 : k0 + BLOCK_K]`` = ``(q - z) · s`` in fp32, ``[BLOCK_N, BLOCK_K]``.

    Rows ``>= N`` are 0; columns ``>= K`` hold ``-z · s`` (finite), so callers
    zero the matching x/dy columns or mask them on store.
    """
    s, z = _group_params(s_ptr, z_ptr, offs_n, k0, N, G, stride_sn)
    if BITS == 4:
        b = _packed(qw_ptr, offs_n, k0 // 2, N, K // 2, stride_qn, BLOCK_K // 2).to(tl.uint32)
        # byte j holds code 2j in its low nibble and 2j + 1 in its high nibble
        q = tl.join(b & 0xF, b >> 4).reshape(BLOCK_N, BLOCK_K)
    else:
        q = _packed(qw_ptr, offs_n, k0, N, K, stride_qn, BLOCK_K)
    return codes_minus_z(q, z) * s



@triton.jit
def _store_yt(y_ptr, acc, offs_m, offs_n, M, N, stride_ym, b_ptr,
              HAS_BIAS: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """Store the fp32 tile ``acc = yᵀ[offs_n, offs_m]`` (+ bias) into ``y[offs_m, offs_n]``, cast once."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
    tl.store(ptrs, cast_out(acc, OUT_DTYPE), mask=(offs_n < N)[:, None] & (offs_m < M)[None, :])


@triton.jit
def _gemm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr,  # pointers
    M, N, K, G,  # sizes
    stride_xm, stride_qn, stride_sn, stride_ym,  # strides (the last dim of each is contiguous)
    BITS: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_N]`` tile of ``y``; programs walk GROUP_M row-blocks per column sweep."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M row-blocks of x reuse each weight tile while it is in L2
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    # yᵀ tile: the dequantized weight (registers) is the dot's first operand, as
    # Hopper's wgmma wants; x streams in as the second.
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_ok[:, None] & (offs_k < K)[None, :], other=0.0)
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, offs_n, k0, N, K, G, stride_qn, stride_sn,
                          BITS, BLOCK_N, BLOCK_K)
        acc = tl.dot(w.to(DOT_DTYPE), tl.trans(x.to(DOT_DTYPE)), acc, input_precision="ieee")
    _store_yt(y_ptr, acc, offs_m, offs_n, M, N, stride_ym, b_ptr, HAS_BIAS, OUT_DTYPE)


@triton.jit
def _dx_kernel(
    dy_ptr, qw_ptr, s_ptr, z_ptr, dx_ptr,  # pointers
    M, N, K, G,  # sizes
    stride_dym, stride_qn, stride_sn, stride_dxm,  # strides
    BITS: tl.constexpr, OUT_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_K]`` tile of ``dx = dy @ ŵ``, reducing over N."""
    pid_m = tl.program_id(0)  # fastest: neighbouring programs share one weight column slab
    pid_k = tl.program_id(1)
    k0 = pid_k * BLOCK_K
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :],
                     mask=m_ok[:, None] & (offs_n < N)[None, :], other=0.0)
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, offs_n, k0, N, K, G, stride_qn, stride_sn,
                          BITS, BLOCK_N, BLOCK_K)
        acc = tl.dot(dy.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision="ieee")
    ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :]
    tl.store(ptrs, cast_out(acc, OUT_DTYPE), mask=m_ok[:, None] & (offs_k < K)[None, :])


@triton.jit
def _dequant_kernel(
    qw_ptr, s_ptr, z_ptr, w_ptr, N, K, G, stride_qn, stride_sn, stride_wn,
    BITS: tl.constexpr, OUT_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``ŵ`` tile into an ``(N, K)`` workspace: computed in fp32, cast once (as the reference)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    w = _dequant_tile(qw_ptr, s_ptr, z_ptr, offs_n, k0, N, K, G, stride_qn, stride_sn,
                      BITS, BLOCK_N, BLOCK_K)
    ok = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    tl.store(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], cast_out(w, OUT_DTYPE), mask=ok)


# --------------------------------------------------------------------------- host side
log = logging.getLogger("qdpo.kernels")
INT32_LIMIT = 2**31  # kernels index with int32 offsets; larger operands are refused


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int  # clamped to the group size by Packed.block_k
    group_m: int  # row-blocks per L2 sweep (_gemm_kernel); unused by _dx_kernel
    num_warps: int
    num_stages: int


# One fixed config per kernel under the interpreter (tests): big tiles, few programs.
GEMM_CPU = GemmConfig(128, 128, 128, 4, 4, 1)
DX_CPU = GemmConfig(128, 128, 128, 1, 4, 1)
# GPU candidates, timed once per tuning key. BLOCK_N >= 64 keeps the weight a
# full wgmma M-dimension on Hopper in the gemm (it is the dot's first operand).
GEMM_GPU = (  # (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages)
    GemmConfig(32, 128, 128, 8, 4, 4), GemmConfig(64, 128, 64, 8, 4, 4),
    GemmConfig(64, 128, 128, 8, 4, 3), GemmConfig(128, 128, 64, 8, 8, 3),
    GemmConfig(128, 256, 64, 8, 8, 3), GemmConfig(64, 256, 64, 8, 8, 3),
    GemmConfig(128, 64, 64, 8, 4, 4),
)
DX_GPU = (  # (BLOCK_M, BLOCK_N = reduction, BLOCK_K = dx columns, -, warps, stages)
    GemmConfig(16, 128, 64, 1, 4, 4), GemmConfig(32, 64, 128, 1, 4, 4),
    GemmConfig(64, 64, 128, 1, 4, 3), GemmConfig(64, 128, 64, 1, 4, 3),
    GemmConfig(128, 64, 128, 1, 8, 3), GemmConfig(128, 128, 64, 1, 8, 3),
)

_BEST: dict[tuple, tuple] = {}  # tuning cache: (kernel, key) → fastest config on this GPU
TUNE_ROUNDS = 3  # every candidate is timed this many times, in turn, and ranked by its median
TUNE_GRAPH_MS = 1.0  # about this much kernel time per timed graph (2 to 16 calls)


class ColdGraphTimer:
    """Milliseconds per call of ``fn`` as a decode step runs it: many calls captured in one CUDA graph,
    so no host launch time enters (for a 10 µs kernel it can be most of an eager timing), each call
    after a write over twice the L2 cache, so every call reads its weight from memory; the flush's own
    time (a graph of flushes alone) is taken off."""

    def __init__(self):
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        l2 = getattr(props, "L2_cache_size", 0) or 64 << 20
        self._flush = torch.empty(2 * l2 // 4, dtype=torch.int32, device="cuda")
        self._flush_ms: dict[int, float] = {}

    def _replay_ms(self, fn, calls: int) -> float:
        """One timed replay of a graph of ``calls`` (flush, ``fn``) pairs, after one untimed replay."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                self._flush.zero_()
                fn()
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls

    def __call__(self, fn) -> float:
        """ms per call of ``fn`` (compiled already: it is run once eagerly to size the graph)."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        calls = max(2, min(16, int(TUNE_GRAPH_MS / max(start.elapsed_time(end), 1e-3))))
        if calls not in self._flush_ms:
            self._flush_ms[calls] = min(self._replay_ms(lambda: None, calls) for _ in range(3))
        return max(self._replay_ms(fn, calls) - self._flush_ms[calls], 0.0)


def pick_config(kernel: str, key: tuple, candidates, run, timer=None):
    """The fastest of ``candidates`` for ``key``, timed with ``run(config)`` on first use, then cached.

    Each candidate runs once (compiling it; one that fails to compile or launch is passed over), then
    all are timed ``TUNE_ROUNDS`` times in turn by ``timer(fn)`` → ms per call (default
    :class:`ColdGraphTimer`: graph replays, cold L2) and ranked by their medians; a tie goes to the
    earlier candidate. Timing synchronises the device: make the first call for a shape before capturing
    a CUDA graph. A first call inside a capture cannot time anything: it gets the first candidate,
    uncached, and a warning.
    """
    if len(candidates) == 1:
        return candidates[0]
    best = _BEST.get((kernel, key))
    if best is not None:
        return best
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        log.warning("qdpo %s: first call for %s inside a CUDA graph capture; the untimed first config %s "
                    "runs (call once before capturing to have the fastest timed)", kernel, key, candidates[0])
        return candidates[0]
    ok = []
    for cfg in candidates:
        try:
            run(cfg)
            ok.append(cfg)
        except Exception as e:  # a config this GPU cannot compile (registers, shared memory)
            log.debug("qdpo %s: config %s skipped (%s)", kernel, cfg, e)
    if not ok:
        raise RuntimeError(f"qdpo {kernel}: no candidate config compiled for {key}")
    timer = timer or ColdGraphTimer()
    times: dict = {cfg: [] for cfg in ok}
    for _ in range(TUNE_ROUNDS):
        for cfg in ok:
            try:
                times[cfg].append(timer(lambda: run(cfg)))
            except Exception as e:  # it ran eagerly but not in a graph: rank it last
                log.debug("qdpo %s: config %s not timed (%s)", kernel, cfg, e)
                times[cfg].append(float("inf"))
    median = {cfg: sorted(t)[len(t) // 2] for cfg, t in times.items()}
    best = _BEST[(kernel, key)] = min(ok, key=median.get)
    log.debug("qdpo %s: %s -> %s (median ms %s)", kernel, key, best, {str(c): round(t, 5) for c, t in median.items()})
    return best


def tuning_key(x: torch.Tensor, w: "Packed", m: int) -> tuple:
    """Bucketed tuning key: dtype, format, and M, N, K rounded up to powers of two."""
    p2 = triton.next_power_of_2
    return (x.dtype, w.bits, w.g if w.g != w.k else -1, p2(m), p2(w.n), p2(w.k))


@dataclass(frozen=True)
class Packed:
    """A packed weight in the canonical format (``qdpo/quant/format.py``), checked, with its sizes."""

    qweight: torch.Tensor  # [N, K // 2] uint8 (4 bits) or [N, K] uint8 (8 bits)
    scales: torch.Tensor  # [N, K // G] float
    zeros: torch.Tensor  # [N, K // G] uint8
    bits: int
    n: int
    k: int
    g: int  # group size; K when there is one group per row

    @classmethod
    def of(cls, qweight, scales, zeros, bits) -> "Packed":
        """Validate and make contiguous, or raise ``Unsupported`` naming what the kernels cannot serve."""
        if bits not in (4, 8):
            raise Unsupported(f"bits={bits}; the kernels handle 4 and 8")
        if qweight.dtype != torch.uint8 or qweight.dim() != 2 or zeros.dtype != torch.uint8:
            raise Unsupported(f"qweight {qweight.dtype} {tuple(qweight.shape)} / zeros {zeros.dtype}: "
                              "expected the uint8 packed format of qdpo.quant.format")
        n, k = qweight.shape[0], qweight.shape[1] * (8 // bits)
        groups = scales.shape[1] if scales.dim() == 2 else 0
        if scales.shape != (n, groups) or zeros.shape != scales.shape or groups < 1 or k % groups:
            raise Unsupported(f"scales {tuple(scales.shape)} / zeros {tuple(zeros.shape)} do not fit "
                              f"a ({n}, {k}) weight")
        g = k // groups
        if groups > 1 and (g < 16 or g & (g - 1)):
            raise Unsupported(f"group size {g} is not a power of two >= 16 (nor one group per row)")
        if max(qweight.numel(), scales.numel()) >= INT32_LIMIT:
            raise Unsupported(f"a ({n}, {k}) weight exceeds the kernels' int32 indexing")
        return cls(qweight.contiguous(), scales.contiguous(), zeros.contiguous(), bits, n, k, g)

    def block_k(self, want: int) -> int:
        """``want`` clamped so that a K tile never straddles two groups."""
        if self.g == self.k:  # one group per row: any tile works; don't overshoot a short K
            return min(want, max(32, triton.next_power_of_2(self.k)))
        return min(want, self.g)


def dot_dtype(x: torch.Tensor):
    """Dot operand dtype: x's on a GPU (tensor cores); fp32 for fp32 x and in the interpreter,
    whose bf16 ``tl.dot`` is wrong (``shared/TOOLCHAIN.md``)."""
    if x.device.type == "cpu" or x.dtype == torch.float32:
        return tl.float32
    return tl_dtype(x.dtype)


def launch_gemm(x2, w: Packed, bias, y, cfg: GemmConfig) -> None:
    """``y[M, N] = x2[M, K] @ ŵᵀ (+ bias)`` with ``_gemm_kernel``."""
    m = x2.shape[0]
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(w.n, cfg.block_n),)
    _gemm_kernel[grid](
        x2, w.qweight, w.scales, w.zeros, y if bias is None else bias, y,
        m, w.n, w.k, w.g, x2.stride(0), w.qweight.stride(0), w.scales.stride(0), y.stride(0),
        BITS=w.bits, HAS_BIAS=bias is not None, OUT_DTYPE=tl_dtype(y.dtype), DOT_DTYPE=dot_dtype(x2),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=w.block_k(cfg.block_k), GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def launch_dx(dy2, w: Packed, dx, cfg: GemmConfig) -> None:
    """``dx[M, K] = dy2[M, N] @ ŵ`` with ``_dx_kernel``."""
    m = dy2.shape[0]
    bk = w.block_k(cfg.block_k)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(w.k, bk))
    _dx_kernel[grid](
        dy2, w.qweight, w.scales, w.zeros, dx,
        m, w.n, w.k, w.g, dy2.stride(0), w.qweight.stride(0), w.scales.stride(0), dx.stride(0),
        BITS=w.bits, OUT_DTYPE=tl_dtype(dx.dtype), DOT_DTYPE=dot_dtype(dy2),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=bk,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def dequantize_workspace(w: Packed, dtype: torch.dtype) -> torch.Tensor:
    """``ŵ`` ``[N, K]`` in ``dtype`` (fp32 math, one cast), for the large-M cuBLAS path."""
    if w.n * w.k >= INT32_LIMIT:
        raise Unsupported(f"a ({w.n}, {w.k}) workspace exceeds the kernels' int32 indexing")
    out = torch.empty(w.n, w.k, dtype=dtype, device=w.qweight.device)  # [N, K]
    block_n, block_k = 64, w.block_k(128 if w.qweight.is_cuda else 512)
    grid = (triton.cdiv(w.n, block_n), triton.cdiv(w.k, block_k))
    _dequant_kernel[grid](
        w.qweight, w.scales, w.zeros, out, w.n, w.k, w.g,
        w.qweight.stride(0), w.scales.stride(0), out.stride(0),
        BITS=w.bits, OUT_DTYPE=tl_dtype(dtype), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return out
