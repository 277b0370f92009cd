"""Sweep of the cuda backend's decode GEMV launch choices (GPU only).

For every weight of ``common.SHAPES``, W4 g128 and W8, M in {1, 8, 16}, times
``qdpo.kernels.cuda.dequant_matmul`` with each forced ``splits``, blocks of 8 and of 4 warps
(and of 6 and 3 with the scale in ŵ, ``--more-warps``: grids that fit one wave where 8 and 4 do not)
and, at M <= 2, x in registers and in shared memory (``x_smem``), warps that each own 16 rows and
share x in shared memory (``shared_x``, any M), each with the scale in ŵ and after the mma
(``scale_after``, where the group size allows) and, with the scale after, the zero point in a second
mma too (``zero_after``, W4, bf16 x), and with x in registers the 16-row tiles per warp the plan does
not take (``row_tiles``: 2 at M <= 2, 1 at M 3-8), next to the plan's own choice ("auto") and bf16 ``F.linear``,
all back to back in one CUDA graph over copies of the weight that overflow twice the L2 cache
(``common.graph_batch``). A split count of 0 leaves the split to the plan's rule for that variant
(shared_x has its own). Every forced variant's output is checked
against the auto plan's first. Two passes over the cases (``pass_choices``): first every variant at
the plan's own block size, then the other block sizes, so that a sweep stopped by its time limit has
timed the choices that decide the plan's defaults on every weight. The data behind the plan rules in
``csrc/dequant_matmul_gemv.cu``::

    python benchmarks/sweep_gemv.py --out benchmarks/results/gpu-check
    python benchmarks/sweep_gemv.py --summary benchmarks/results/NVIDIA-H200-sweep_gemv.json

It ends with a summary per launch choice: how often, and by how much, the alternative to the
plan's default ran faster with every other choice equal. "auto" is the plan's rules alone (the sweep
runs with ``QDPO_GEMV_TABLE=off``). Beside ``sweep_gemv.json`` it writes ``gemv_table.json``: per
case, the fastest launch that sums the same terms as the plan's, where it beat auto by 3 % or more
(``qdpo.kernels.gemv_table``). Installed as ``qdpo/kernels/gemv_tables/<device>.json``, it has the
cuda backend launch that way on that GPU model::

    python benchmarks/sweep_gemv.py --table-from /tmp/gc/sweep_gemv.json   # installs the table
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import bench_dequant_matmul as bdm  # noqa: E402
import common  # noqa: E402

from qdpo.kernels import gemv_table  # noqa: E402
from qdpo.kernels.gemv_options import GEMV_DEFAULTS, GEMV_OPTIONS, gemv_choices, plan_grants  # noqa: E402

FORMATS = bdm.FORMATS  # name → (bits, group_size)
SPLITS = (0, 1, 2, 3, 4, 6, 8, 12, 16)  # 0: the plan's rule
WARPS = (8, 4)  # warps per block (the plan's rules choose between these)
MORE_WARPS = (6, 3)  # other block sizes, for the launches a table may take: 4 / 8 blocks of 80 registers per SM
BOTH = {"both": (False, True), "off": (False,), "on": (True,)}  # --x-smem, --scale-after, --shared-x
DEV = "cuda"


def _copies(n: int, k: int, bits: int, gs: int) -> list[tuple]:
    """bench_dequant_matmul's weight and its copies past twice the L2 cache: ``[(w, packed), ...]``."""
    return bdm._copies(*bdm._weight(n, k, bits, gs))


def _ms(fns) -> float:
    batch = common.graph_batch(fns)
    return common.time_ms(batch)["median_ms"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="folder for sweep_gemv.json (a GPU run)")
    p.add_argument("--summary", type=Path, metavar="JSON",
                   help="only print the summary of an earlier sweep's JSON (no GPU needed)")
    p.add_argument("--ms", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--splits", type=int, nargs="+", default=list(SPLITS), help="split-K counts to time")
    p.add_argument("--x-smem", choices=sorted(BOTH), default="both", help="x_smem in the forced M <= 2 variants")
    p.add_argument("--scale-after", choices=sorted(BOTH), default="both",
                   help="the scale in ŵ (off) or after the mma (on) in the forced variants")
    p.add_argument("--shared-x", choices=sorted(BOTH), default="both", help="shared_x in the forced variants")
    p.add_argument("--row-tiles", choices=("both", "off"), default="both",
                   help="the 16-row tiles per warp the plan does not take (2 at M <= 2, 1 at M 3-8), x in registers")
    p.add_argument("--more-warps", type=int, nargs="*", default=list(MORE_WARPS),
                   help="other warps per block (1-8) to time with the scale in ŵ (x in registers, x_smem)")
    p.add_argument("--time-limit-s", type=float, default=600, help="stop starting new cases after this")
    p.add_argument("--table-from", type=Path, metavar="JSON",
                   help="only make the table of measured launches from an earlier sweep's JSON (no GPU needed)")
    p.add_argument("--table-out", type=Path, metavar="JSON",
                   help="where --table-from writes (default: qdpo/kernels/gemv_tables/<device>.json, installed)")
    p.add_argument("--min-gain", type=float, default=gemv_table.MIN_GAIN,
                   help="a table entry needs auto_ms / best_ms of at least this")
    args = p.parse_args(argv)
    if args.summary:
        print(summary(json.loads(args.summary.read_text())["rows"]))
        return 0
    if args.table_from:
        table = gemv_table.table_from_sweep(json.loads(args.table_from.read_text()), args.min_gain)
        out = args.table_out or gemv_table.TABLE_DIR / f"{table['device']}.json"
        print(f"wrote {_write_table(out, table)}")
        return 0
    if args.out is None:
        p.error("--out is required for a sweep")
    if not torch.cuda.is_available():
        print("sweep_gemv: needs a CUDA GPU")
        return 0
    if os.environ.get(gemv_table.ENV, "off").lower() not in gemv_table.OFF:
        print(f"sweep_gemv: {gemv_table.ENV}={os.environ[gemv_table.ENV]} ignored: auto is the plan's rules alone")
    os.environ[gemv_table.ENV] = "off"
    from qdpo.kernels import cuda

    args.out.mkdir(parents=True, exist_ok=True)
    rows, t0 = {}, time.time()  # case → row, in the order first met
    values = {"warps": WARPS, "x_smem": BOTH[args.x_smem], "scale_after": BOTH[args.scale_after],
              "shared_x": BOTH[args.shared_x], "more_warps": tuple(args.more_warps),
              "row_tiles": (0, 1, 2) if args.row_tiles == "both" else (0,)}
    print(f"{'case':40s} {'bf16 µs':>8s} {'auto µs':>8s} (splits, warps)   "
          f"best forced µs (splits, {', '.join(OPTIONS)})")
    for first in (True, False):  # PASSES: every case at the plan's block size, then the other sizes
        for shape, (n, k) in common.SHAPES.items():
            for fmt, (bits, gs) in FORMATS.items():
                if time.time() - t0 > args.time_limit_s:
                    break
                copies = _copies(n, k, bits, gs)
                for m in args.ms:
                    if time.time() - t0 > args.time_limit_s:
                        break
                    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
                    case = f"{shape} {fmt} M={m}"
                    if case not in rows:
                        auto_plan = cuda.gemv_plan(x, copies[0][1][0], copies[0][1][1], bits)
                        rows[case] = {"case": case, "N": n, "K": k, "fmt": fmt, "M": m,
                                      "dtype": str(x.dtype).removeprefix("torch."),
                                      "bf16_ms": _ms([(lambda w=w: F.linear(x, w)) for w, _ in copies]),
                                      "auto_ms": _ms([(lambda pk=pk: cuda.dequant_matmul(x, *pk)) for _, pk in copies]),
                                      "auto_plan": auto_plan, "forced": []}
                    row = rows[case]
                    want = cuda.dequant_matmul(x, *copies[0][1])
                    todo = pass_choices(gemv_choices(m, **values), row["auto_plan"]["warps"], first)
                    for choice, sp in itertools.product(todo, args.splits):
                        kw = {"splits": sp, **choice}
                        plan = cuda.gemv_plan(x, copies[0][1][0], copies[0][1][1], bits, **kw)
                        if not plan_grants(plan, kw):
                            continue  # uneven K ranges, x past 48 KB, G < 128 or W8 (zero_after): the plan says so
                        got = cuda.dequant_matmul(x, *copies[0][1], **kw)
                        err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
                        ms = _ms([(lambda pk=pk: cuda.dequant_matmul(x, *pk, **kw)) for _, pk in copies])
                        row["forced"].append({**kw, "plan_splits": plan["splits"],
                                              "blocks_per_sm": plan["blocks_per_sm"], "ms": ms, "rel_err": err})
                    if not row["forced"]:
                        continue
                    best = min(row["forced"], key=lambda r: r["ms"])
                    how = ", ".join(str(best[key]) for key in ("splits", *OPTIONS))
                    base, auto = row["bf16_ms"], row["auto_ms"]
                    print(f"{case:40s} {base * 1e3:8.2f} {auto * 1e3:8.2f} ({row['auto_plan']['splits']}, "
                          f"{row['auto_plan']['warps']})   {best['ms'] * 1e3:8.2f} ({how})"
                          f"  speed-up vs bf16: auto {base / auto:.2f}×, best {base / best['ms']:.2f}×"
                          f"{'' if first else '  (other block sizes)'}", flush=True)
                    bad = [r for r in row["forced"] if not r["rel_err"] < 1e-2]
                    if bad:
                        print(f"  !! forced plans differ from auto: {bad}")
                    _write(args.out, list(rows.values()), args.min_gain)  # after every case: a stopped sweep keeps it
                del copies
                bdm._weight.cache_clear()
                torch.cuda.empty_cache()
    rows = list(rows.values())
    print(f"wrote {_write(args.out, rows, args.min_gain)} and gemv_table.json: "
          f"{len(gemv_table.GemvTable.read(args.out / 'gemv_table.json'))} of {len(rows)} cases launch otherwise "
          f"than the plan's rules (install: --table-from {args.out / 'sweep_gemv.json'})")
    print(summary(rows))
    return 0


OPTIONS = GEMV_OPTIONS  # the launch choices the summary compares


def pass_choices(choices: list[dict], plan_warps: int, first: bool) -> list[dict]:
    """The forced choices of one pass over the cases (PASSES): the first takes those at the plan's own
    block size (every place of x, of the scale and of the zero point: the open choices of the plan), the
    second the other block sizes. A session's short sweep then times those first choices on every
    weight before it spends its time on block sizes."""
    return [c for c in choices if (c["warps"] == plan_warps) == first]


def option_gains(rows: list) -> dict:
    """For each launch choice, the speed-up of its alternative over the plan's present default (8 warps,
    x in registers, the scale and zero point in ŵ) with every other choice equal, the split count
    included (0: each variant's own rule): ``{(option, fmt, M): [ms_default / ms_alternative, ...]}``, one
    ratio per matching pair of forced variants. Rows of older sweeps lack some keys: those count as the
    default."""
    default = GEMV_DEFAULTS
    gains: dict = {}
    for row in rows:
        runs = [{**default, **r} for r in row["forced"]]
        index = {tuple(r.get(k) for k in ("splits", *OPTIONS)): r["ms"] for r in runs}
        for r in runs:
            for opt in OPTIONS:
                if r[opt] == default[opt]:
                    continue
                base = {**r, opt: default[opt]}
                ms = index.get(tuple(base.get(k) for k in ("splits", *OPTIONS)))
                if ms is not None:
                    label = f"warps={r['warps']}" if opt == "warps" else opt  # each block size on its own
                    gains.setdefault((label, row["fmt"], row["M"]), []).append(ms / r["ms"])
    return gains


def summary(rows: list) -> str:
    """One line per (option, format, M): how often the alternative ran faster and by how much."""
    lines = ["option        fmt      M   faster   median speed-up (min..max)"]
    for (opt, fmt, m), ratios in sorted(option_gains(rows).items()):
        r = sorted(ratios)
        faster = sum(x > 1 for x in r)
        lines.append(f"{opt:12s}  {fmt:7s} {m:3d}  {faster:3d}/{len(r):<3d}  {r[len(r) // 2]:.3f}× "
                     f"({r[0]:.3f}..{r[-1]:.3f})")
    return "\n".join(lines)


def _meta() -> dict:
    return {"device": common.device_name(), "torch": torch.__version__, "sm_count":
            torch.cuda.get_device_properties(0).multi_processor_count, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def _write(out: Path, rows: list, min_gain: float) -> Path:
    """sweep_gemv.json, and the table of measured launches made from it (gemv_table.json)."""
    sweep = {"meta": _meta(), "rows": rows}
    path = out / "sweep_gemv.json"
    path.write_text(json.dumps(sweep, indent=1))
    _write_table(out / "gemv_table.json", gemv_table.table_from_sweep(sweep, min_gain))
    return path


def _write_table(path: Path, table: dict) -> Path:
    gemv_table.GemvTable(table, str(path))  # what the backend will read back
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ",\n".join(json.dumps(e) for e in table["entries"])  # one entry per line: readable diffs
    head = json.dumps({k: v for k, v in table.items() if k != "entries"})[:-1]
    path.write_text(f'{head}, "entries": [\n{lines}\n]}}\n')
    return path


if __name__ == "__main__":
    sys.exit(main())
