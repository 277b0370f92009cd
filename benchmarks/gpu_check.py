"""GPU acceptance run: the GPU tests, then the benchmarks, then one markdown summary.

Run on a GPU machine (no network needed) after
``pip install --no-deps --no-build-isolation -e .`` — ``make gpu-check`` does both::

    python benchmarks/gpu_check.py --out benchmarks/results/gpu-check
    python benchmarks/gpu_check.py --out /tmp/gc --bench-k "dequant_matmul and square-8192"

It writes into ``--out``: ``tests.log`` and ``tests.xml`` (``pytest -m gpu tests``),
``bench.log`` and the benchmark rows ``<device>.json`` / ``<device>.md``
(``pytest benchmarks --benchmark-only`` with ``QDPO_BENCH_OUT``), and
``summary.md``: device and versions, the test outcome with every failure, the
speed targets of ``bench_dequant_matmul.py`` checked against the rows, and the
full benchmark table. Exit status 0 when both stages pass, 1 otherwise.
Without a GPU it still runs (GPU tests skip, benchmarks use the interpreter).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (op, impl, row filter, metric, at least): the speed targets on an H100, per shape. triton: the
# Triton-backend targets; cuda: issue #4's targets for the hand-written kernels.
TARGETS = (
    ("dequant_matmul", "triton", {"fmt": "W4g128", "M": 1}, "speedup", 2.5),
    ("dequant_matmul", "triton", {"fmt": "W4g128", "M": 1}, "frac_copy_bw", 0.70),
    ("dequant_matmul", "triton", {"fmt": "W4g128", "M": 16}, "speedup", 2.0),
    ("dequant_matmul", "triton", {"fmt": "W8", "M": 1}, "speedup", 1.7),
    ("dequant_matmul", "triton", {"fmt": "W4g128", "M": 4096}, "speedup", 0.85),
    ("dequant_matmul", "triton", {"fmt": "W8", "M": 4096}, "speedup", 0.85),
    ("dequant_matmul", "cuda", {"fmt": "W4g128", "M": 1}, "speedup", 3.0),
    ("dequant_matmul", "cuda", {"fmt": "W4g128", "M": 1}, "frac_copy_bw", 0.80),
    ("dequant_matmul", "cuda", {"fmt": "W8", "M": 1}, "speedup", 1.8),
    ("dequant_matmul", "cuda", {"fmt": "W4g128", "M": 16}, "speedup", 2.5),
    ("dequant_matmul", "cuda", {"fmt": "W4g128", "M": 4096}, "speedup", 0.85),
    ("dequant_matmul", "cuda-gemm", {"fmt": "W4g128", "M": 4096}, "speedup", 0.85),
    ("fake_quant_fwd_bwd", "cuda", {}, "frac_copy_bw", 0.80),
    ("fake_quant_fwd_bwd", "triton", {}, "frac_copy_bw", 0.75),
)


def _run(cmd: list[str], log: Path, timeout_s: float, env: dict | None = None) -> tuple[int, float]:
    """Run ``cmd`` in the repository root, output to ``log``; return (exit status, seconds).

    At ``timeout_s`` the whole process group is killed (pytest-xdist workers too), exit status 124.
    """
    print(f"$ {' '.join(cmd)}  (log: {log})", flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            f.write(f"\n*** gpu_check: stopped after {timeout_s:.0f} s\n")
            rc = 124
    return rc, time.time() - t0


def _device() -> list[str]:
    import torch
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU (CPU interpreter)"
    lines = [f"- device: {gpu}", f"- python {sys.version.split()[0]}, torch {torch.__version__}, "
             f"triton {triton.__version__}, CUDA {torch.version.cuda}"]
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        if smi.returncode == 0:
            lines.append(f"- nvidia-smi: {smi.stdout.strip()}")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return lines


def _tests_section(xml: Path, rc: int, secs: float) -> list[str]:
    lines = [f"## GPU tests (`pytest -m gpu tests`): exit {rc}, {secs:.0f} s", ""]
    if not xml.exists():
        return lines + ["no JUnit report was written; see tests.log", ""]
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {a: int(suite.get(a, 0)) for a in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    lines.append(f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
                 f"{counts['skipped']} skipped")
    for case in suite.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            msg = (bad.get("message") or "").strip().splitlines()
            lines.append(f"- FAILED `{case.get('classname')}::{case.get('name')}`: {msg[0] if msg else ''}")
    return lines + [""]


def _targets_section(rows: list[dict]) -> list[str]:
    import torch

    note = "" if torch.cuda.is_available() else " — no GPU here: the targets are for an H100, ignore them"
    lines = [f"## Speed targets (per shape){note}", "",
             "| op | impl | rows | metric | target | case | value | met |", "|---|---|---|---|---|---|---|---|"]
    for op, impl, where, metric, target in TARGETS:
        hits = [r for r in rows if r.get("op") == op and r.get("impl") == impl and metric in r
                and all(r.get(k) == v for k, v in where.items())]
        sel = " ".join(f"{k}={v}" for k, v in where.items()) or "all"
        for r in hits:
            ok = "yes" if r[metric] >= target else "**no**"
            lines.append(f"| {op} | {impl} | {sel} | {metric} | {target} | {r['case']} | {r[metric]:.3g} | {ok} |")
        if not hits:
            lines.append(f"| {op} | {impl} | {sel} | {metric} | {target} | (no row) | | |")
    return lines + [""]


# The element-wise ops whose backend and tile the next GPU run decides (auto_if in qdpo/kernels/cuda.py,
# the tile rule in qdpo/kernels/triton/quantize.py: config), and the impls compared.
SIDE_BY_SIDE = {"dequantize": ("triton", "triton-4w", "triton-8k", "cuda", "cuda-v8"),
                "fake_quant_fwd_bwd": ("triton", "triton-4w", "triton-8k", "cuda", "cuda-v8")}


def _side_by_side_section(rows: list[dict]) -> list[str]:
    """Per element-wise op and case, the fraction of copy bandwidth of each impl and the fastest."""
    lines = ["## Element-wise impls side by side (frac_copy_bw)", ""]
    for op, impls in SIDE_BY_SIDE.items():
        cases = sorted({r["case"] for r in rows if r.get("op") == op and r.get("impl") in impls})
        if not cases:
            continue
        lines += [f"| {op} | " + " | ".join(impls) + " | fastest |", "|---" * (len(impls) + 2) + "|"]
        for case in cases:
            got = {r["impl"]: r["frac_copy_bw"] for r in rows
                   if r.get("op") == op and r.get("case") == case and "frac_copy_bw" in r}
            cells = [f"{got[i]:.3f}" if i in got else "" for i in impls]
            best = max((i for i in impls if i in got), key=got.get, default="")
            lines.append(f"| {case} | " + " | ".join(cells) + f" | {best} |")
        lines.append("")
    return lines


def _rows(out: Path) -> list[dict]:
    """The benchmark rows: ``rows.jsonl`` (appended as measured, so a stopped run keeps them), else the JSON."""
    jl = out / "rows.jsonl"
    if jl.exists():
        return [json.loads(line) for line in jl.read_text().splitlines() if line.strip()]
    reports = sorted(p for p in out.glob("*.json") if not p.name.startswith("bench-"))
    return [r for rep in reports for r in json.loads(rep.read_text()).get("rows", [])]


def _plugins(*names: str) -> set[str]:
    """Which of the pytest plugins ``names`` (import names) are installed."""
    import importlib.util

    return {n for n in names if importlib.util.find_spec(n) is not None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for logs, rows and summary.md")
    p.add_argument("--bench-k", default=None, help="pytest -k expression to run a subset of the benchmarks")
    p.add_argument("--timeout-s", type=float, default=3600, help="limit per stage, seconds")
    p.add_argument("--bench-timeout-s", type=float, default=None, help="limit of the benchmark stage (default --timeout-s)")
    p.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    p.add_argument("--skip-bench", action="store_true", help="GPU tests only")
    p.add_argument("--workers", type=int, default=0,
                   help="pytest-xdist workers for the GPU tests (Triton compiles in parallel); 0: one process")
    p.add_argument("--test-timeout-s", type=float, default=300, help="limit per GPU test (pytest-timeout)")
    args = p.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
    summary = ["# qdpo GPU check", "", f"{time.strftime('%Y-%m-%d %H:%M:%S')}", "", *_device(), ""]
    ok = True
    if not args.skip_tests:
        plugins = _plugins("xdist", "pytest_timeout")
        extra = (["-n", str(args.workers)] if args.workers and "xdist" in plugins else []) + \
            ([f"--timeout={args.test_timeout_s:.0f}"] if "pytest_timeout" in plugins else [])
        # a test module that cannot import here (another transformers, say) must not stop the kernel tests
        rc, secs = _run(py + ["-m", "gpu", "tests", "-q", "-rfEs", "--tb=short", "--continue-on-collection-errors",
                              f"--junitxml={out / 'tests.xml'}", *extra],
                        out / "tests.log", args.timeout_s)
        ok &= rc in (0, 5)  # 5: nothing selected
        summary += _tests_section(out / "tests.xml", rc, secs)
    if not args.skip_bench:
        benches = [str(b.relative_to(ROOT)) for b in sorted((ROOT / "benchmarks").glob("bench_*.py"))]
        # named explicitly: pytest's default python_files (test_*.py) would collect none of them
        cmd = py + benches + ["--benchmark-only", "-q", "-rs"] + (["-k", args.bench_k] if args.bench_k else [])
        (out / "rows.jsonl").unlink(missing_ok=True)  # rows of an earlier run
        rc, secs = _run(cmd, out / "bench.log", args.bench_timeout_s or args.timeout_s,
                        env={"QDPO_BENCH_OUT": str(out)})
        ok &= rc == 0
        summary += [f"## Benchmarks (`pytest benchmarks --benchmark-only`): exit {rc}, {secs:.0f} s", ""]
        rows = _rows(out)
        summary += _targets_section(rows) + _side_by_side_section(rows)
        if rows and not [md for md in out.glob("*.md") if md.name != "summary.md"]:
            # stopped before the session wrote its table: write it from the rows kept so far
            sys.path.insert(0, str(ROOT / "benchmarks"))
            import common

            common.ROWS[:] = rows
            common.write_results(out)
        for md in sorted(out.glob("*.md")):
            if md.name != "summary.md":
                summary += [md.read_text(), ""]
    summary.append(f"overall: {'PASS' if ok else 'FAIL'} (logs: tests.log, bench.log)")
    tmp = out / "summary.md.tmp"
    tmp.write_text("\n".join(summary) + "\n")
    tmp.replace(out / "summary.md")
    print(f"summary: {out / 'summary.md'} ({'PASS' if ok else 'FAIL'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
