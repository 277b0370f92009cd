"""The cuda backend's decode GEMV launch choices, in plain Python (no extension needed).

``qdpo.kernels.cuda.dequant_matmul`` takes each as a keyword; the GPU tests force every valid
combination and ``benchmarks/sweep_gemv.py`` times them (its ``--summary`` reads old sweeps on any
machine, hence this module).
"""

from __future__ import annotations

import itertools

GEMV_OPTIONS = ("warps", "x_smem", "scale_after", "zero_after", "shared_x")
# What the plan uses unless forced (the opt-in variants stay off until a GPU has measured them).
GEMV_DEFAULTS = {"warps": 8, "x_smem": False, "scale_after": False, "zero_after": False, "shared_x": False}
MAX_WARPS = 8  # warps per GEMV block (any 1-8 may be forced; the plan's rules pick 8 or 4)
WARPS_RULE = f"1 to {MAX_WARPS} warps, with shared_x=True 4 or 8 (each warp owns 16 rows)"


def block_warps_ok(warps: int, shared_x: bool) -> bool:
    """Whether a GEMV block may take ``warps`` warps (:data:`WARPS_RULE`; the plan's ``plan_gemv`` check)."""
    return 1 <= warps <= MAX_WARPS and not (shared_x and warps % 4)


def gemv_choices(m: int, warps=(8, 4), x_smem=(False, True), scale_after=(False, True),
                 shared_x=(False, True), more_warps=()) -> list[dict]:
    """Every combination of the GEMV's launch choices (:data:`GEMV_OPTIONS`) that can be forced together
    for M = m rows of x, from the values given for each: x_smem only at M <= 2, zero_after only (and
    both ways) with scale_after, shared_x not with x_smem and only with 4 or 8 warps. Then
    ``more_warps``, other block sizes (1-8), for the launches a table of measured launches may take (the
    scale in ŵ, x in registers or x_smem; :mod:`qdpo.kernels.gemv_table`). Whether a choice then applies
    to a weight (group size, 48 KB) is the plan's to say (``qdpo.kernels.cuda.gemv_plan``)."""
    out = []
    for w, xs, sa, sx in itertools.product(warps, x_smem if m <= 2 else (False,), scale_after, shared_x):
        if not (xs and sx) and block_warps_ok(w, sx):
            out += [{"warps": w, "x_smem": xs, "scale_after": sa, "zero_after": za, "shared_x": sx}
                    for za in ((False, True) if sa else (False,))]
    for w, xs in itertools.product(more_warps, x_smem if m <= 2 else (False,)):
        choice = {**GEMV_DEFAULTS, "warps": w, "x_smem": xs}
        if choice not in out:
            out.append(choice)
    return out
