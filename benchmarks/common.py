"""Benchmark harness shared by ``benchmarks/bench_*.py``.

Each benchmark calls :func:`bench` with the pytest-benchmark fixture, a
callable, and the bytes and FLOPs the call must move/do. Rows are kept in
:data:`ROWS`; ``benchmarks/conftest.py`` writes them at the end of the session
as JSON and a markdown table under ``benchmarks/results/``, named by device,
next to the device's measured copy bandwidth (the "peak" every GB/s number is
a fraction of).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import platform
import subprocess
import time
from pathlib import Path

import torch

ROWS: list[dict] = []
RESULTS = Path(__file__).parent / "results"


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name() -> str:
    """``NVIDIA-H100-80GB-HBM3``-style name for result files; ``cpu-<model>`` on the CPU."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "-")
    return f"cpu-{platform.machine()}"


def cuda_backend():
    """The ``cuda`` backend module (``qdpo.kernels.cuda``), or ``pytest.skip`` with the reason."""
    import pytest

    if not torch.cuda.is_available():
        pytest.skip("the cuda backend needs a CUDA GPU")
    try:
        from qdpo.kernels import cuda
    except ImportError as e:
        pytest.skip(f"qdpo._C was not built: {e}")
    return cuda


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gbs() -> float:
    """Measured device-to-device copy bandwidth (read + write bytes / s) of a 1 GiB buffer (64 MiB on CPU)."""
    n = (1 << 30) if torch.cuda.is_available() else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device())
    dst = torch.empty_like(src)
    stats = time_ms(lambda: dst.copy_(src))
    return 2 * n / (stats["median_ms"] * 1e-3) / 1e9


def time_ms(fn, warmup: int = 5, rep: int = 30) -> dict:
    """Median and 20/80 % quantiles of ``fn``'s wall time in ms (CUDA events on a GPU), per op call
    (a :class:`Batched` ``fn`` makes ``fn.calls`` of them)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(rep):
        if torch.cuda.is_available():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    t = torch.tensor(times) / getattr(fn, "calls", 1)
    return {"median_ms": t.median().item(), "p20_ms": t.quantile(0.2).item(), "p80_ms": t.quantile(0.8).item()}


def bench(benchmark, op: str, case: str, impl: str, fn, nbytes: float = 0.0, flops: float = 0.0, **extra) -> dict:
    """Time ``fn`` (via pytest-benchmark when given, for its report) and record a row."""
    if benchmark is not None:
        benchmark.pedantic(lambda: (fn(), sync()), rounds=5, iterations=1, warmup_rounds=2)
    stats = time_ms(fn)
    sec = stats["median_ms"] * 1e-3
    row = {"op": op, "case": case, "impl": impl, **stats, "device": device_name(), **extra}
    if nbytes:
        row["GB/s"] = nbytes / sec / 1e9
        row["frac_copy_bw"] = row["GB/s"] / copy_bandwidth_gbs()
    if flops:
        row["TFLOP/s"] = flops / sec / 1e12
    ROWS.append(row)
    return row


_FLUSHED = [0]  # rows of ROWS already appended to rows.jsonl


def flush_rows() -> None:
    """Append the rows measured since the last call to ``$QDPO_BENCH_OUT/rows.jsonl``.

    Called after each benchmark (its fields complete), so a session stopped by a time
    limit keeps every row it finished.
    """
    import os

    out = os.environ.get("QDPO_BENCH_OUT")
    if out and len(ROWS) > _FLUSHED[0]:
        Path(out).mkdir(parents=True, exist_ok=True)
        with open(Path(out) / "rows.jsonl", "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in ROWS[_FLUSHED[0]:])
    _FLUSHED[0] = len(ROWS)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "unknown"


def _key(row: dict) -> tuple:
    return row.get("op"), row.get("case"), row.get("impl")


def write_results(outdir: Path = RESULTS) -> Path | None:
    """Write :data:`ROWS` into ``<device>.json`` and ``<device>.md``; return the markdown path.

    Rows of an earlier run in the same files that this run did not measure again (another subset of
    the benchmarks, ``-k``) are kept, each with the commit and date of its run: a partial run replaces
    only its own rows."""
    if not ROWS:
        return None
    outdir.mkdir(parents=True, exist_ok=True)
    import triton

    meta = {"device": device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "commit": _commit(), "copy_bw_GBs": copy_bandwidth_gbs(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = outdir / f"{meta['device']}.json"
    new = [{**r, "commit": r.get("commit", meta["commit"]), "date": r.get("date", meta["date"])} for r in ROWS]
    try:
        old = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        old = {}
    old_meta, measured = old.get("meta", {}), {_key(r) for r in new}
    kept = [{**r, "commit": r.get("commit", old_meta.get("commit", "?")), "date": r.get("date", old_meta.get("date", "?"))}
            for r in old.get("rows", []) if _key(r) not in measured]
    rows = kept + new
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    cols = ["op", "case", "impl", "median_ms", "p20_ms", "p80_ms", "GB/s", "frac_copy_bw", "TFLOP/s", "speedup"]
    runs = sorted({(r["date"], r["commit"]) for r in rows})
    lines = [f"# benchmarks on {meta['device']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}; rows from "
             + ", ".join(f"commit {c} ({d})" for d, c in runs) + "; "
             f"measured copy bandwidth {meta['copy_bw_GBs']:.0f} GB/s (read + write). "
             "Times are medians of 30 runs after 5 warm-ups"
             + (" (CUDA events)." if torch.cuda.is_available() else " on the CPU (wall clock)."), "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    md = outdir / f"{meta['device']}.md"
    md.write_text("\n".join(lines) + "\n")
    return md


# (N, K) weight shapes shared by the matmul benchmarks: two squares plus the real
# layer shapes the tests use (tests/conftest.py LLAMA_SHAPES), deduplicated by shape.
def _shapes() -> dict[str, tuple[int, int]]:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.conftest import LLAMA_SHAPES

    table = {"square-8192": (8192, 8192), "square-16384": (16384, 16384)}
    for name, nk in LLAMA_SHAPES.items():
        if nk not in table.values():
            table[name] = nk
    return table


SHAPES = _shapes()


class Batched:
    """A CUDA-graph replay that makes ``calls`` calls of the op: :func:`time_ms` reports per call."""

    def __init__(self, replay, calls: int):
        self.replay, self.calls = replay, calls

    def __call__(self):
        self.replay()


def cycled(fns: list, eager: bool = False):
    """``(fn, eager)``: one callable running ``fns`` in turn: back to back in one CUDA graph
    (:func:`graph_batch`, per-call times) unless ``eager`` is asked for or capture fails
    (always on the CPU); then plain calls cycling through ``fns``, and ``eager`` is True."""
    batch = None if eager else graph_batch(fns)
    if batch is not None:
        return batch, False
    it = itertools.cycle(fns)
    return (lambda: next(it)()), True


def graph_batch(fns: list, min_calls: int = 48, budget_ms: float = 100.0) -> Batched | None:
    """One CUDA graph calling ``fns`` in turn, several rounds (>= ``min_calls`` calls where one
    replay stays within ``budget_ms``); ``None`` where capture fails or there is no GPU.

    Back-to-back calls in one graph are what a CUDA-graphed decode loop runs: the
    per-call time then excludes Python, the graph launch and the event round trip
    (about 5-10 µs, as long as a whole decode-sized kernel). ``fns`` work on
    different copies of their data, so each call reads cold from HBM.
    """
    if not torch.cuda.is_available():
        return None
    for f in fns:  # compile, autotune and allocate outside the capture
        f()
    sync()
    one = time_ms(fns[0], warmup=1, rep=3)["median_ms"]  # eager: an over-estimate
    rounds = max(1, min(math.ceil(min_calls / len(fns)), int(budget_ms / max(one * len(fns), 1e-3))))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fns[0]()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(rounds):
                for f in fns:
                    f()
    except Exception:  # noqa: BLE001 - any capture failure means "not graphable"
        torch.cuda.synchronize()
        return None
    return Batched(graph.replay, rounds * len(fns))
