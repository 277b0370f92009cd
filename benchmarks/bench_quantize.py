"""Benchmarks of ``qdpo::quantize`` (scales, zeros and packed codes in one pass over W).

Conditions: bf16 weights; formats W4 g128 asymmetric (grouped path) and W8
per-channel symmetric (per-row path: one group is a whole row); on a GPU
every weight of ``common.SHAPES`` (8192², 16384², Llama layers), on the CPU
one tiny shape under the Triton interpreter (not a speed reference).
GB/s counts the bytes the op must move: W read once, packed codes, scales
and zeros written.

On a GPU the calls run back to back from one CUDA graph (``common.graph_batch``;
times are per call), cycling through copies of the problem that together
exceed twice the L2 cache, so every call reads W from HBM; rows whose impl
ends in ``-eager`` could not be captured and include Python launch overhead.

Impls: ``triton`` (the backend function), ``qdpo-op`` (``torch.ops.qdpo.quantize``:
plus dispatch and its NaN/Inf check, one more read of W), ``reference`` and
``compile(reference)`` (GPU only). Target on an H100: ``triton`` within reach
of copy bandwidth (it is one read and a quarter/half write).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import common
import pytest
import torch

from qdpo.kernels import reference as ref
from qdpo.kernels.triton import quantize as tq

GPU = torch.cuda.is_available()
DEV = common.device()
SHAPES = common.SHAPES if GPU else {"tiny": (64, 256)}
FORMATS = {"W4g128": (4, 128, False), "W8-ch-sym": (8, -1, True)}  # name → (bits, group_size, symmetric)
IMPLS = ("triton", "cuda", "qdpo-op", "reference", "compile(reference)")



TILE_VARIANTS = ("triton-4w", "triton-8k")


def variant_tile(impl: str, n: int, k: int, groups: int, device) -> "tq.Config":
    """The Triton element-wise kernels' tile for an (n, k) weight of ``groups`` groups per row, as a
    bench variant times it beside the rule (bench_dequantize, bench_fake_quant). ``triton-4w``: the
    rule's 4096-element tile with 4 warps instead of 8, twice the elements per thread (about a fifth
    fewer instructions per element, static sm_90) but fewer loads in flight per program.
    ``triton-8k``: 8192-element tiles with 8 warps, so that a program of 16-bit weights reads as many
    bytes as one of fp32 weights under the rule (the fp32 passes reached 90-98 % of copy bandwidth on
    an H200, the bf16 ones 64-78 %: a per-program cost that the bytes do not pay for)."""
    cfg = tq.config(n * groups, k // groups, torch.device(device), tile=8192 if impl == "triton-8k" else None)
    return dataclasses.replace(cfg, num_warps=4) if impl == "triton-4w" else cfg


def cold_cycle(make_fn, nbytes: int):
    """``(fn, eager)``: one callable cycling over independent problems made by ``make_fn``.

    On a GPU there are enough copies to overflow twice the L2 cache (cold reads
    every call), called back to back from one CUDA graph (``common.graph_batch``;
    times are per call); ``eager`` is True where capture failed (and always on the CPU).
    """
    if not GPU:
        return make_fn(), True
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return common.cycled([make_fn() for _ in range(max(1, math.ceil(2 * l2 / nbytes)))])


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    return torch.compile(ref.quantize, dynamic=False)


def _fn(impl: str, w: torch.Tensor, bits: int, gs: int, sym: bool):
    if impl == "triton":
        return lambda: tq.quantize(w, bits, gs, sym)
    if impl == "cuda":
        cuda = common.cuda_backend()
        return lambda: cuda.quantize(w, bits, gs, sym)
    if impl == "qdpo-op":
        return lambda: torch.ops.qdpo.quantize(w, bits, gs, sym, "triton")
    if impl == "reference":
        return lambda: ref.quantize(w, bits, gs, sym)
    f = _compiled_reference()
    return lambda: f(w, bits, gs, sym)


def _bytes(n: int, k: int, bits: int, gs: int) -> int:
    ng = 1 if gs == -1 else k // gs
    return n * k * 2 + n * k * bits // 8 + n * ng * (2 + 1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize(benchmark, shape, fmt, impl):
    if impl == "compile(reference)" and not GPU:
        pytest.skip("torch.compile baseline only on a GPU")
    n, k = SHAPES[shape]
    bits, gs, sym = FORMATS[fmt]
    nbytes = _bytes(n, k, bits, gs)

    def make():
        return _fn(impl, torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02, bits, gs, sym)

    fn, eager = cold_cycle(make, nbytes)
    name = f"{impl}-eager" if eager and GPU else impl
    common.bench(benchmark, "quantize", f"{shape} {fmt}", name, fn, nbytes=nbytes, fmt=fmt, N=n, K=k)
