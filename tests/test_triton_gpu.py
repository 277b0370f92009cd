"""The Triton backend's element-wise kernels on a GPU (CUDA tensors), bit for bit against the CPU reference.

The shared tests (``backend`` fixture) run Triton under the interpreter, where it keeps workarounds
that GPU code replaces: floor-based ties-to-even (rint on the GPU) and bit-level bf16 rounding (the
GPU's own cast); its row-reciprocal quotient runs there through the interpreter's FMA. Here the GPU
code itself: quantize, dequantize, fake_quant and its STE / LSQ backward over weight dtypes, bits and
group sizes, and the near-tie quotients. Marked ``gpu``.
"""

import pytest
import torch

from qdpo.kernels import reference as ref
from tests.conftest import DTYPES, SHAPE_FOR, assert_exact, randn
from tests.test_dequantize import _assert_dequantize
from tests.test_fake_quant import _assert_backward, _assert_near_ties, _grid
from tests.test_quantize import _assert_quantize

pytestmark = pytest.mark.gpu
OPS = torch.ops.qdpo
B = "triton"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,gs,sym", [(4, 128, False), (8, -1, True), (4, 32, True), (8, 64, False)])
def test_elementwise_kernels_on_the_gpu(dtype, bits, gs, sym):
    w = randn(*SHAPE_FOR[gs], dtype, seed=bits + gs).cuda()
    _assert_quantize(w, bits, gs, sym, B)
    q, s, z = ref.quantize(w.cpu(), bits, gs, sym)
    for out in DTYPES:
        _assert_dequantize(q.cuda(), s.cuda(), z.cuda(), bits, out, B)
    s, z = _grid(w.cpu(), bits, gs, sym)  # shrunk: some codes clip
    for out in DTYPES:
        assert_exact(OPS.fake_quant(w, s.cuda(), z.cuda(), bits, out, B).cpu(),
                     ref.fake_quant(w.cpu(), s, z, bits, out), f"ŵ in {out}")
    _assert_backward(randn(*w.shape, dtype, seed=3).cuda(), w, s.cuda(), z.cuda(), bits, B)


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("outside", [False, True])
def test_near_ties_on_the_gpu(bits, outside):
    _assert_near_ties(bits, outside, B, device="cuda")


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
@pytest.mark.parametrize("bits", [4, 8])
def test_fused_tile_quantizer_near_ties_on_the_gpu(bits):
    """The fused QAT kernels' tile quantizer (fq_rows) on the GPU: the test of test_fake_quant_matmul,
    whose tensors go to the GPU where there is one."""
    from tests.test_fake_quant_matmul import test_near_ties_match_true_division as check

    check(bits)
