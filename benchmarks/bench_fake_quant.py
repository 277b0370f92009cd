"""Benchmarks of ``qdpo::fake_quant`` forward + STE backward (the QAT weight path).

Conditions: W4 g128 asymmetric RTN grid; two weight layouts: ``w=fp32`` (the
fp32 master weight QAT trains, ŵ and ∂ŵ in bf16, ∂w in fp32) and ``w=bf16``
(all bf16); on a GPU every weight of ``common.SHAPES``, on the CPU one tiny
shape under the Triton interpreter (not a speed reference). One timed call is
the forward and the backward given ∂ŵ. Timing as in ``bench_quantize.py``
(CUDA graphs, cold L2).

GB/s counts the bytes the pair must move — forward: w read, ŵ written;
backward: ∂ŵ and w read, ∂w written (scales/zeros and ∂scales are < 1 %).

Impls: ``triton`` and ``cuda`` (backend functions), ``triton-4w`` and ``triton-8k`` (Triton's passes
with 4-warp programs, and with 8192-element tiles: ``bench_quantize.variant_tile``), ``cuda-v8`` (the
cuda passes with 8-element chunks where they would take 16: bf16 weights and gradients; the same
as ``cuda`` for fp32 weights), ``triton+lsq`` / ``cuda+lsq``
(plus the learned-scale gradient), ``triton-fwd`` / ``triton-bwd`` / ``cuda-fwd`` /
``cuda-bwd`` (one direction, its own bytes),
``qdpo-op-autograd`` (``torch.ops.qdpo.fake_quant`` with autograd),
``reference`` and ``compile(reference)`` (GPU only).
H100 target: ``triton`` >= 75 % of measured copy bandwidth (``frac_copy_bw``).
"""

from __future__ import annotations

import functools

import common
import pytest
import torch
from bench_quantize import TILE_VARIANTS, cold_cycle, variant_tile

from qdpo.kernels import reference as ref
from qdpo.kernels.triton import fake_quant as tf

GPU = torch.cuda.is_available()
DEV = common.device()
SHAPES = common.SHAPES if GPU else {"tiny": (64, 256)}
BITS, GS = 4, 128
LAYOUTS = {"w=fp32": (torch.float32, torch.bfloat16), "w=bf16": (torch.bfloat16, torch.bfloat16)}  # (w, ŵ)
IMPLS = ("triton", *TILE_VARIANTS, "cuda", "cuda-v8", "triton+lsq", "cuda+lsq", "triton-fwd", "triton-bwd", "cuda-fwd",
         "cuda-bwd", "qdpo-op-autograd", "reference", "compile(reference)")


def _ref_step(w, s, z, grad, lsq):
    return ref.fake_quant(w, s, z, BITS, grad.dtype), ref.fake_quant_backward(grad, w, s, z, BITS, lsq)


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    return torch.compile(_ref_step, dynamic=False)


def _fn(impl: str, w, s, z, grad):
    out_dtype = grad.dtype
    if impl.startswith("cuda"):
        cuda = common.cuda_backend()
        vec = 8 if impl == "cuda-v8" else 16
        fwd = lambda: cuda.fake_quant(w, s, z, BITS, out_dtype, max_vec=vec)  # noqa: E731
        bwd = lambda: cuda.fake_quant_backward(grad, w, s, z, BITS, impl == "cuda+lsq", max_vec=vec)  # noqa: E731
        return {"cuda-fwd": fwd, "cuda-bwd": bwd}.get(impl, lambda: (fwd(), bwd()))
    if impl in ("triton", "triton+lsq"):
        lsq = impl == "triton+lsq"
        return lambda: (tf.fake_quant(w, s, z, BITS, out_dtype), tf.fake_quant_backward(grad, w, s, z, BITS, lsq))
    if impl in TILE_VARIANTS:  # the same passes with another tile (bench_quantize.variant_tile)
        cfg = variant_tile(impl, *w.shape, s.shape[1], w.device)
        return lambda: (tf.fake_quant(w, s, z, BITS, out_dtype, cfg), tf.fake_quant_backward(grad, w, s, z, BITS, False, cfg))
    if impl == "triton-fwd":
        return lambda: tf.fake_quant(w, s, z, BITS, out_dtype)
    if impl == "triton-bwd":
        return lambda: tf.fake_quant_backward(grad, w, s, z, BITS, False)
    if impl == "qdpo-op-autograd":
        wl = w.clone().requires_grad_()
        return lambda: torch.autograd.grad(torch.ops.qdpo.fake_quant(wl, s, z, BITS, out_dtype, "triton"), wl, grad)
    if impl == "reference":
        return lambda: _ref_step(w, s, z, grad, False)
    f = _compiled_reference()
    return lambda: f(w, s, z, grad, False)


def _bytes(impl: str, n: int, k: int, w_dtype, out_dtype) -> int:
    wb, ob = torch.finfo(w_dtype).bits // 8, torch.finfo(out_dtype).bits // 8
    fwd, bwd = n * k * (wb + ob), n * k * (ob + 2 * wb)
    return {"fwd": fwd, "bwd": bwd}.get(impl.rsplit("-", 1)[-1], fwd + bwd)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_fake_quant_fwd_bwd(benchmark, shape, layout, impl):
    if impl == "compile(reference)" and not GPU:
        pytest.skip("torch.compile baseline only on a GPU")
    n, k = SHAPES[shape]
    w_dtype, out_dtype = LAYOUTS[layout]
    nbytes = _bytes(impl, n, k, w_dtype, out_dtype)

    def make():
        w = (torch.randn(n, k, device=DEV) * 0.02).to(w_dtype)
        s, z = ref.qparams(w, BITS, GS, False)
        return _fn(impl, w, s, z, torch.randn(n, k, device=DEV, dtype=out_dtype))

    fn, eager = cold_cycle(make, nbytes)
    name = f"{impl}-eager" if eager and GPU else impl
    common.bench(benchmark, "fake_quant_fwd_bwd", f"{shape} {layout}", name, fn, nbytes=nbytes,
                 layout=layout, N=n, K=k)
