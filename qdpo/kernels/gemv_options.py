"""The cuda backend's decode GEMV launch choices, in plain Python (no extension needed).

``qdpo.kernels.cuda.dequant_matmul`` takes each as a keyword; the GPU tests force every valid
combination and ``benchmarks/sweep_gemv.py`` times them (its ``--summary`` reads old sweeps on any
machine, hence this module).
"""

from __future__ import annotations

import itertools

GEMV_OPTIONS = ("warps", "x_smem", "scale_after", "zero_after", "shared_x", "row_tiles")
# What the plan uses unless forced (the opt-in variants stay off until a GPU has measured them);
# row_tiles 0: the plan's tiles per warp (1 at M <= 2, 2 above).
GEMV_DEFAULTS = {"warps": 8, "x_smem": False, "scale_after": False, "zero_after": False, "shared_x": False,
                 "row_tiles": 0}
MAX_WARPS = 8  # warps per GEMV block (any 1-8 may be forced; the plan's rules pick 8 or 4)
WARPS_RULE = f"1 to {MAX_WARPS} warps, with shared_x=True 4 or 8 (each warp owns 16 rows)"
ROW_TILES = (0, 1, 2)  # 16-row tiles per warp: 0 the plan's, 1 or 2 where x fits one tile (M <= 8)


def other_row_tiles(m: int) -> int:
    """The tiles per warp the plan does not take at M = m (1 <-> 2), or 0 where there is no other (M > 8)."""
    return 0 if m > 8 else 2 if m <= 2 else 1


def block_warps_ok(warps: int, shared_x: bool) -> bool:
    """Whether a GEMV block may take ``warps`` warps (:data:`WARPS_RULE`; the plan's ``plan_gemv`` check)."""
    return 1 <= warps <= MAX_WARPS and not (shared_x and warps % 4)


def gemv_choices(m: int, warps=(8, 4), x_smem=(False, True), scale_after=(False, True),
                 shared_x=(False, True), more_warps=(), row_tiles=(0, 1, 2)) -> list[dict]:
    """Every combination of the GEMV's launch choices (:data:`GEMV_OPTIONS`) that can be forced together
    for M = m rows of x, from the values given for each: x_smem only at M <= 2, zero_after only (and
    both ways) with scale_after, shared_x not with x_smem and only with 4 or 8 warps, the tiles per warp
    the plan does not take (:func:`other_row_tiles`, where ``row_tiles`` holds it) only with x in
    registers. Then ``more_warps``, other block sizes (1-8), for the launches a table of measured
    launches may take (the scale in ŵ, x in registers or x_smem; :mod:`qdpo.kernels.gemv_table`).
    Whether a choice then applies to a weight (group size, 48 KB) is the plan's to say
    (``qdpo.kernels.cuda.gemv_plan``)."""
    other = other_row_tiles(m)
    tiles = (0,) + ((other,) if other and other in row_tiles else ())
    out = []
    for w, xs, sa, sx, rt in itertools.product(warps, x_smem if m <= 2 else (False,), scale_after, shared_x, tiles):
        if not (xs and sx) and not (rt and (xs or sx)) and block_warps_ok(w, sx):
            out += [{"warps": w, "x_smem": xs, "scale_after": sa, "zero_after": za, "shared_x": sx, "row_tiles": rt}
                    for za in ((False, True) if sa else (False,))]
    for w, xs in itertools.product(more_warps, x_smem if m <= 2 else (False,)):
        choice = {**GEMV_DEFAULTS, "warps": w, "x_smem": xs}
        if choice not in out:
            out.append(choice)
    return out


def plan_grants(plan: dict, forced: dict) -> bool:
    """Whether a GEMV plan (``qdpo.kernels.cuda.gemv_plan``) launches as ``forced`` asks (the keywords
    given to it): every choice of :data:`GEMV_OPTIONS` as given, and ``splits`` / ``warps`` /
    ``row_tiles`` where forced (> 0; 0 is the plan's own). A plan refuses what does not apply to the
    weight (group size, 48 KB, W8 zero_after)."""
    return all(plan[key] == value for key, value in forced.items()
               if key in GEMV_OPTIONS + ("splits",) and (value or key not in ("splits", "warps", "row_tiles")))
