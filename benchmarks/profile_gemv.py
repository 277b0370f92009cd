"""One launch of each decode GEMV variant, of the prefill GEMM and of bf16 ``F.linear``, for Nsight Compute.

Run under ``ncu`` with a kernel filter (preparing the weights launches other kernels); every launch
is preceded by a line naming it, and ncu reports the kernels in launch order::

    ncu -k regex:"gemv|gemm|nvjet" --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        --section MemoryWorkloadAnalysis python benchmarks/profile_gemv.py

Each case is a weight of ``common.SHAPES`` (default square-8192), a format of
``bench_dequant_matmul.FORMATS``, M, and the launch choices that ``qdpo.kernels.cuda`` forces
(warps per block, x in shared memory, x shared by row warps, the scale after the mma, row tiles per
warp; the GPU tests check each against the reference).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import bench_dequant_matmul as bdm  # noqa: E402
import common  # noqa: E402

LINEAR, GEMM = "bf16 F.linear", "prefill GEMM"
CASES = (  # (format, M, what): bf16 F.linear, the prefill GEMM (path="gemm"), or the GEMV's forced choices
    ("W4g128", 1, LINEAR), ("W4g128", 1, {"warps": 8}), ("W4g128", 1, {"warps": 4}),
    ("W4g128", 1, {"warps": 8, "x_smem": True}), ("W4g128", 1, {"warps": 8, "scale_after": True}),
    ("W4g128", 1, {"warps": 8, "x_smem": True, "scale_after": True}),
    ("W4g128", 1, {"warps": 8, "x_smem": True, "scale_after": True, "zero_after": True}),
    ("W4g128", 1, {"warps": 8, "scale_after": True, "zero_after": True}),
    ("W8", 1, {"warps": 8}), ("W8", 1, {"warps": 4}), ("W8", 1, {"warps": 8, "x_smem": True, "scale_after": True}),
    ("W4g128", 16, {"warps": 8}), ("W4g128", 16, {"warps": 8, "scale_after": True}),
    ("W4g128", 16, {"warps": 8, "shared_x": True}), ("W4g128", 16, {"warps": 8, "shared_x": True, "scale_after": True}),
    ("W4g128", 16, {"warps": 8, "scale_after": True, "zero_after": True}),
    ("W4g128", 1, {"warps": 8, "shared_x": True}), ("W8", 16, {"warps": 8, "shared_x": True}),
    ("W4g128", 1, {"warps": 8, "row_tiles": 2}),
    ("W4g128", 1, {"warps": 8, "row_tiles": 2, "scale_after": True, "zero_after": True}),
    ("W4g128", 4096, LINEAR), ("W4g128", 4096, GEMM),
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="square-8192", choices=sorted(common.SHAPES))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_gemv: needs a CUDA GPU")
        return 0
    from qdpo.kernels import cuda

    n, k = common.SHAPES[args.shape]
    for fmt, m, what in CASES:
        w, packed = bdm._weight(n, k, *bdm.FORMATS[fmt])
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        if what == LINEAR:
            print(f"== launch: {args.shape} bf16 F.linear M={m}", flush=True)
            F.linear(x, w)
        elif what == GEMM:
            print(f"== launch: {args.shape} {fmt} M={m} prefill GEMM", flush=True)
            cuda.dequant_matmul(x, *packed, path="gemm")
        else:
            print(f"== launch: {args.shape} {fmt} M={m} {what} "
                  f"{cuda.gemv_plan(x, packed[0], packed[1], packed[3], **what)}", flush=True)
            cuda.dequant_matmul(x, *packed, **what)
        torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
