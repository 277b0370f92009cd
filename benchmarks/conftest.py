"""Benchmarks session: Triton interpreter switch on the CPU, results written at the end."""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))

import common  # noqa: E402


def pytest_runtest_teardown(item):
    common.flush_rows()


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get("QDPO_BENCH_OUT")
    md = common.write_results(Path(out) if out else common.RESULTS)
    if md is not None:
        print(f"\nbenchmark results: {md}")
