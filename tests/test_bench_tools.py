"""The benchmark harness's own logic (benchmarks/common.py, benchmarks/gpu_check.py), on the CPU:
rows kept as they are measured, read back after a stopped run, checked against the targets."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import gpu_check  # noqa: E402


def test_rows_are_appended_as_each_benchmark_finishes(tmp_path, monkeypatch):
    monkeypatch.setenv("QDPO_BENCH_OUT", str(tmp_path))
    monkeypatch.setattr(common, "ROWS", [])
    monkeypatch.setattr(common, "_FLUSHED", [0])
    common.ROWS.append({"op": "a", "speedup": 1.5})
    common.flush_rows()
    common.flush_rows()  # nothing new: nothing written twice
    common.ROWS.append({"op": "b"})
    common.ROWS[-1]["speedup"] = 2.0  # fields set after bench() returns are kept
    common.flush_rows()
    lines = (tmp_path / "rows.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"op": "a", "speedup": 1.5}, {"op": "b", "speedup": 2.0}]


def test_a_partial_run_replaces_only_its_own_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "copy_bandwidth_gbs", lambda: 10.0)
    monkeypatch.setattr(common, "_commit", lambda: "aaa")
    monkeypatch.setattr(common, "ROWS", [{"op": "x", "case": "c1", "impl": "i", "median_ms": 1.0},
                                         {"op": "x", "case": "c2", "impl": "i", "median_ms": 2.0}])
    common.write_results(tmp_path)
    monkeypatch.setattr(common, "_commit", lambda: "bbb")
    monkeypatch.setattr(common, "ROWS", [{"op": "x", "case": "c2", "impl": "i", "median_ms": 3.0},
                                         {"op": "y", "case": "c1", "impl": "i", "median_ms": 4.0}])
    md = common.write_results(tmp_path).read_text()
    doc = json.loads((tmp_path / f"{common.device_name()}.json").read_text())
    got = {(r["op"], r["case"]): (r["median_ms"], r["commit"]) for r in doc["rows"]}
    assert got == {("x", "c1"): (1.0, "aaa"), ("x", "c2"): (3.0, "bbb"), ("y", "c1"): (4.0, "bbb")}
    assert doc["meta"]["commit"] == "bbb" and "commit aaa" in md and "commit bbb" in md
    assert md.count("| x |") == 2 and md.count("| y |") == 1


def test_gpu_check_reads_the_kept_rows_first_and_checks_each_target(tmp_path):
    rows = [{"op": "dequant_matmul", "impl": "cuda", "fmt": "W4g128", "M": 1, "case": "s W4g128 M=1",
             "speedup": 3.2, "frac_copy_bw": 0.5},
            {"op": "dequant_matmul", "impl": "cuda", "fmt": "W8", "M": 1, "case": "s W8 M=1", "speedup": 1.2}]
    (tmp_path / "dev.json").write_text(json.dumps({"rows": rows[:1]}))
    assert gpu_check._rows(tmp_path) == rows[:1], "without rows.jsonl, the session's JSON"
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert gpu_check._rows(tmp_path) == rows
    table = "\n".join(gpu_check._targets_section(rows))
    assert "| dequant_matmul | cuda | fmt=W4g128 M=1 | speedup | 3.0 | s W4g128 M=1 | 3.2 | yes |" in table
    assert "| dequant_matmul | cuda | fmt=W4g128 M=1 | frac_copy_bw | 0.8 | s W4g128 M=1 | 0.5 | **no** |" in table
    assert "| dequant_matmul | cuda | fmt=W8 M=1 | speedup | 1.8 | s W8 M=1 | 1.2 | **no** |" in table
    assert "| fake_quant_fwd_bwd | cuda | all | frac_copy_bw | 0.8 | (no row) | | |" in table


def test_gpu_check_sets_the_element_wise_impls_side_by_side():
    rows = [{"op": "fake_quant_fwd_bwd", "case": "sq w=bf16", "impl": i, "frac_copy_bw": v}
            for i, v in (("triton", 0.64), ("triton-8k", 0.81), ("cuda", 0.77), ("triton+lsq", 0.9))]
    rows.append({"op": "dequant_matmul", "case": "sq", "impl": "cuda", "frac_copy_bw": 0.99})
    table = "\n".join(gpu_check._side_by_side_section(rows))
    assert "| fake_quant_fwd_bwd | triton | triton-4w | triton-8k | cuda | cuda-v8 | fastest |" in table
    assert "| sq w=bf16 | 0.640 |  | 0.810 | 0.770 |  | triton-8k |" in table, "LSQ rows and other impls stay out"
    assert "dequant_matmul" not in table and "| dequantize |" not in table, "ops without rows get no table"


def test_a_stage_past_its_limit_is_stopped_and_says_so(tmp_path):
    rc, secs = gpu_check._run([sys.executable, "-c", "import subprocess, sys, time; "
                               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                               "time.sleep(60)"], tmp_path / "log", timeout_s=2)
    assert rc == 124 and "stopped after 2 s" in (tmp_path / "log").read_text()


def test_cycled_calls_in_turn_without_a_gpu():
    calls = []
    fn, eager = common.cycled([lambda: calls.append(0), lambda: calls.append(1)])
    if not eager:
        pytest.skip("a GPU captured the calls in a graph")
    for _ in range(3):
        fn()
    assert calls == [0, 1, 0]


def test_sweep_summary_pairs_each_choice_with_the_default_and_nothing_else():
    import sweep_gemv

    def run(ms, splits=1, warps=8, x_smem=False, scale_after=False):
        return {"splits": splits, "warps": warps, "x_smem": x_smem, "scale_after": scale_after, "ms": ms}

    rows = [{"fmt": "W4g128", "M": 1, "forced": [
        run(10.0), run(8.0, warps=4), run(12.5, warps=6),
        run(5.0, x_smem=True), run(4.0, x_smem=True, scale_after=True),
        run(20.0, splits=2), run(25.0, splits=2, scale_after=True),  # pairs only with splits=2's default
        run(9.0, splits=3, x_smem=True),  # no default with 3 splits: no pair
    ]}, {"fmt": "W8", "M": 16, "forced": [{"splits": 1, "warps": 4, "ms": 3.0}, {"splits": 1, "warps": 8, "ms": 6.0}]}]
    gains = sweep_gemv.option_gains(rows)
    assert gains == {
        ("warps=4", "W4g128", 1): [10 / 8],
        ("warps=6", "W4g128", 1): [10 / 12.5],  # each block size on its own line
        ("x_smem", "W4g128", 1): [10 / 5],  # x_smem with scale_after has no partner without x_smem
        ("scale_after", "W4g128", 1): [5 / 4, 20 / 25],
        ("warps=4", "W8", 16): [6 / 3],  # an older sweep's rows: missing choices are the default
    }
    text = sweep_gemv.summary(rows)
    assert "scale_after   W4g128    1    1/2" in text and "warps=4       W8       16    1/1    2.000×" in text
    # shared_x at each variant's own split rule (0) pairs with the default at 0 too
    rows = [{"fmt": "W4g128", "M": 16, "forced": [{"splits": 0, "ms": 9.0}, {"splits": 0, "shared_x": True, "ms": 6.0},
                                                 {"splits": 1, "shared_x": True, "ms": 1.0}]}]
    assert sweep_gemv.option_gains(rows) == {("shared_x", "W4g128", 16): [9 / 6]}


def test_sweep_gemv_times_every_case_at_the_plan_block_size_before_other_sizes(tmp_path, monkeypatch):
    """The sweep's main loop on a stand-in backend (CPU tensors, a clock that moves 1 s per timing): the
    first pass times every choice at the plan's block size on every case, the second the other block
    sizes until the time limit, and the JSON written holds every case once, its forced rows from both
    passes; choices the plan refuses (W8 zero_after) are left out."""
    import types

    import sweep_gemv
    import torch

    from qdpo.kernels.gemv_options import GEMV_DEFAULTS, GEMV_OPTIONS

    def plan(x, q, s, bits, **kw):
        p = {**GEMV_DEFAULTS, "kernel": "mma", "warps": 4, "splits": 1, "blocks_per_sm": 6}
        p.update({key: kw[key] for key in GEMV_OPTIONS if key in kw})
        p["zero_after"] = p["zero_after"] and bits == 4
        return {**p, "splits": kw.get("splits") or 1}

    fake = types.SimpleNamespace(gemv_plan=plan, dequant_matmul=lambda x, q, s, z, bits, **kw: x[:, :8] * 2)
    now = [0.0]

    def timed(fns):
        now[0] += 1.0
        return 1e-3 * (1 + len(fns))

    import qdpo.kernels

    monkeypatch.setattr(qdpo.kernels, "cuda", fake, raising=False)
    monkeypatch.setitem(sys.modules, "qdpo.kernels.cuda", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sweep_gemv, "DEV", "cpu")
    monkeypatch.setattr(sweep_gemv, "_ms", timed)
    monkeypatch.setattr(sweep_gemv, "_meta", lambda: {"device": "stand-in", "sm_count": 132, "date": "today"})
    monkeypatch.setattr(sweep_gemv, "time", types.SimpleNamespace(time=lambda: now[0]))
    monkeypatch.setattr(sweep_gemv.common, "SHAPES", {"a": (8, 128), "b": (8, 256)})
    w = {k: torch.zeros(8, k) for k in (128, 256)}
    monkeypatch.setattr(sweep_gemv, "_copies", lambda n, k, bits, gs: [(w[k], (None, None, None, bits))])
    # pass 1: 2 shapes × 2 formats × M in (1, 16), each 2 baselines + its choices at 4 warps
    first = {(fmt, m): len([c for c in sweep_gemv.gemv_choices(m) if c["warps"] == 4
                            and (fmt == "W4g128" or not c["zero_after"])]) for fmt in ("W4g128", "W8") for m in (1, 16)}
    pass1 = 2 * sum(2 + v for v in first.values())
    limit = pass1 + 20  # the second pass stops within its first case or two
    assert sweep_gemv.main(["--out", str(tmp_path), "--ms", "1", "16", "--splits", "0", "--more-warps",
                            "--time-limit-s", str(limit)]) == 0
    rows = json.loads((tmp_path / "sweep_gemv.json").read_text())["rows"]
    assert [r["case"] for r in rows] == [f"{s} {f} M={m}" for s in "ab" for f in ("W4g128", "W8") for m in (1, 16)]
    for r in rows:
        at4 = [c for c in r["forced"] if c["warps"] == 4]
        assert len(at4) == first[(r["fmt"], r["M"])], r["case"]
        assert not any(c["zero_after"] for c in r["forced"] if r["fmt"] == "W8")
    other = [r["case"] for r in rows if any(c["warps"] != 4 for c in r["forced"])]
    assert other and other == [r["case"] for r in rows][:len(other)] and len(other) < len(rows)


def test_gemv_choices_spell_each_rule_once():
    """The forced combinations the GPU tests and the sweep share: x_smem only at M <= 2, zero_after only
    with scale_after (both ways), shared_x never with x_smem; each combination once."""
    from qdpo.kernels.gemv_options import GEMV_DEFAULTS, GEMV_OPTIONS, gemv_choices

    for m, count in ((1, 24), (2, 24), (3, 18), (8, 18), (9, 12), (16, 12)):
        got = gemv_choices(m)
        assert len(got) == count and len({tuple(c.items()) for c in got}) == count
        assert all(set(c) == set(GEMV_OPTIONS) for c in got)
        assert all(not (c["x_smem"] and c["shared_x"]) for c in got)
        assert all(c["scale_after"] for c in got if c["zero_after"])
        assert {(c["x_smem"], c["shared_x"]) for c in got if c["zero_after"]} == (
            {(False, False), (True, False), (False, True)} if m <= 2 else {(False, False), (False, True)})
        assert any(c["x_smem"] for c in got) == (m <= 2)
        assert GEMV_DEFAULTS in got
        # the tiles per warp the plan does not take, with x in registers only
        assert {c["row_tiles"] for c in got} == {0, 2 if m <= 2 else 1} if m <= 8 else {0}
        assert all(not (c["x_smem"] or c["shared_x"]) for c in got if c["row_tiles"])
    assert gemv_choices(1, warps=(8,), x_smem=(True,), scale_after=(True,), shared_x=(False,)) == [
        {**GEMV_DEFAULTS, "x_smem": True, "scale_after": True}, {**GEMV_DEFAULTS, "x_smem": True, "scale_after": True,
                                                                "zero_after": True}]
    assert gemv_choices(16, warps=(4,), x_smem=(True,), scale_after=(False,), shared_x=(True,)) == [
        {**GEMV_DEFAULTS, "warps": 4, "shared_x": True}]
    # other block sizes: shared_x only takes 4 or 8; more_warps adds the table's exact launches only
    assert gemv_choices(16, warps=(6,), scale_after=(False,)) == [{**GEMV_DEFAULTS, "warps": 6}]
    more = gemv_choices(1, more_warps=(6, 3))
    assert len(more) == 24 + 4 and more[:24] == gemv_choices(1)
    assert gemv_choices(1, row_tiles=(0,)) == [c for c in gemv_choices(1) if not c["row_tiles"]]
    assert more[24:] == [{**GEMV_DEFAULTS, "warps": w, "x_smem": xs} for w in (6, 3) for xs in (False, True)]
    assert gemv_choices(16, more_warps=(4, 6))[12:] == [{**GEMV_DEFAULTS, "warps": 6}], "4 warps: already there"


def test_static_sass_finds_loops_and_counts_the_triton_kernels():
    """``benchmarks/static_sass.py`` (how the README's static counts are made): its SASS parsing on a
    hand-made listing, then a real run over the Triton kernels, which compile for sm_90 on the CPU."""
    import static_sass

    listing = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0020*/                   ISETP.GE.AND P0, PT, R2, 0x10, PT ;
        /*0030*/              @!P0 BRA 0x10 ;
        /*0040*/                   EXIT ;
        /*0050*/                   NOP ;"""
    ins = static_sass.instructions(listing)
    assert [a for a, _ in ins] == [0, 0x10, 0x20, 0x30, 0x40], "NOP padding is not an instruction"
    assert static_sass.loops(ins) == [3], "the loop is 0x10 .. 0x30"
    branched = static_sass.instructions("""
        /*0000*/                   REDUX.MIN.S32 UR4, R0 ;
        /*0010*/                   ISETP.NE.AND P0, PT, R1, 0x1, PT ;
        /*0020*/               @P0 BRA 0x60 ;
        /*0030*/                   FFMA R2, R2, R3, RZ ;
        /*0040*/                   FMUL R2, R2, R3 ;
        /*0050*/                   BRA 0x80 ;
        /*0060*/                   MUFU.RCP R4, R3 ;
        /*0070*/                   FMUL R2, R2, R4 ;
        /*0080*/                   STG.E [R6.64], R2 ;
        /*0090*/                   EXIT ;""")
    assert static_sass.first_branch_path(branched) == 8, "0x00 .. 0x50, then 0x80 .. 0x90"
    assert static_sass.first_branch_path(ins) is None, "no tile-wide branch"
    # the kernels compile for the GPU only outside the interpreter this test process runs: a subprocess
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, str(BENCH / "static_sass.py"), "--triton"], capture_output=True, text=True,
                         env=env, timeout=600)
    if run.returncode and ("GPUTarget" in run.stderr or "cuobjdump" in run.stderr):
        pytest.skip(f"cannot compile for sm_90 here: {run.stderr[-300:]}")
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {}
    for line in run.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and cells[1].isdigit():
            rows[cells[0]] = float(cells[2].split()[0])
    for bits in (4, 8):
        for tile in ("64x128", "128x128"):
            words = rows[f"gemv M=1 W{bits} words {tile} 4 warps"]
            per_byte = rows[f"gemv M=1 W{bits} bytes {tile} 4 warps"]
            assert words < per_byte, f"W{bits} {tile}: {words:.2f} per code on words, {per_byte:.2f} on bytes"
    assert rows["dequantize W4 words bf16 32x128 8 warps"] < rows["dequantize W4 bytes bf16 32x128 8 warps"]
    for wd in ("bf16", "fp32"):
        name = f"fake_quant forward w={wd} 32x128 8 warps"
        assert rows[name + ", reciprocal path"] < rows[name] / 2, "the reciprocal path is one of two"


def test_plan_grants_compares_what_was_forced_and_leaves_the_plan_its_own_choices():
    from qdpo.kernels.gemv_options import plan_grants

    plan = {"splits": 4, "warps": 8, "x_smem": False, "scale_after": True, "zero_after": False, "shared_x": False,
            "row_tiles": 1, "block_rows": 16}
    assert plan_grants(plan, {"splits": 0, "warps": 0, "row_tiles": 0, "scale_after": True})
    assert plan_grants(plan, {"splits": 4, "warps": 8, "row_tiles": 1, "x_smem": False, "block_rows": 99})
    for refused in ({"splits": 2}, {"warps": 4}, {"row_tiles": 2}, {"zero_after": True}, {"x_smem": True}):
        assert not plan_grants(plan, refused), refused


def test_arch_sweep_builds_every_architecture_and_runs_the_pipeline(tmp_path):
    """benchmarks/arch_sweep.py (README's "Models" list): every architecture it names builds and loads in
    the installed transformers, and one runs python -m qdpo.train end to end (export checked)."""
    import transformers

    import arch_sweep

    for arch in arch_sweep.ARCHS:
        if hasattr(transformers, f"{arch}Config"):
            arch_sweep.build(arch, tmp_path / arch)
            model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / arch)
            assert type(model).__name__ == arch_sweep.MODEL_CLASS.get(arch, f"{arch}ForCausalLM")
    assert arch_sweep.main(["--archs", "GPT2", "--out", str(tmp_path / "sweep")]) == 0
    results = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert results["GPT2"].startswith("rc=0") and "'reproduces_eval': True" in results["GPT2"]
