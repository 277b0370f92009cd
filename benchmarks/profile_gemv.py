"""One launch of each decode GEMV variant, of the prefill GEMM and of bf16 ``F.linear``, for Nsight Compute.

Run under ``ncu`` with a kernel filter (preparing the weights launches other kernels); every launch
is preceded by a line naming it, and ncu reports the kernels in launch order::

    ncu -k regex:"gemv|gemm|nvjet" --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        --section MemoryWorkloadAnalysis python benchmarks/profile_gemv.py

Each case is a weight of ``common.SHAPES`` (default square-8192), a format of
``bench_dequant_matmul.FORMATS``, M, and the warps per block that ``qdpo.kernels.cuda`` forces
(the GPU tests check each against the reference).
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

CASES = (  # (format, M, warps per block); 0 warps: bf16 F.linear, "gemm": the prefill GEMM (path="gemm")
    ("W4g128", 1, 0), ("W4g128", 1, 8), ("W4g128", 1, 4), ("W8", 1, 8), ("W8", 1, 4), ("W4g128", 16, 8),
    ("W4g128", 4096, 0), ("W4g128", 4096, "gemm"),
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
    for fmt, m, warps in CASES:
        w, packed = bdm._weight(n, k, *bdm.FORMATS[fmt])
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        if not warps:
            print(f"== launch: {args.shape} bf16 F.linear M={m}", flush=True)
            F.linear(x, w)
        elif warps == "gemm":
            print(f"== launch: {args.shape} {fmt} M={m} prefill GEMM", flush=True)
            cuda.dequant_matmul(x, *packed, path="gemm")
        else:
            print(f"== launch: {args.shape} {fmt} M={m} warps={warps} "
                  f"{cuda.gemv_plan(x, packed[0], packed[1], packed[3], 0, warps)}", flush=True)
            cuda.dequant_matmul(x, *packed, warps=warps)
        torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
