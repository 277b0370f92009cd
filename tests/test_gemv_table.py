"""Tables of measured GEMV launches (``qdpo.kernels.gemv_table``): made from a sweep, checked, read back
and looked up; the cuda backend's use of them without a GPU (``_launch_choices``). The GPU test that a
table's launch is what runs lives in ``test_cuda_kernels.py``."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qdpo.kernels import gemv_table as gt

ROOT = Path(__file__).resolve().parents[1]
H200 = ROOT / "benchmarks/results/NVIDIA-H200-sweep_gemv.json"


def _eligible(row):
    """A forced launch a table may use: only EXACT choices (and the sweep's bookkeeping), same numerics."""
    return [r for r in row["forced"] if not r.get("scale_after") and not r.get("zero_after")
            and set(r) - {"ms", "rel_err", "plan_splits", "blocks_per_sm"} <= set(gt.EXACT)
            and r["rel_err"] < 1e-2]


@pytest.mark.parametrize("min_gain", [gt.MIN_GAIN, 1.0, 1.07])
def test_table_of_the_h200_sweep_keeps_the_fastest_launch_that_beats_auto(min_gain):
    """Against the measured rows: an entry's launch is a timed one, no eligible launch ran faster, and it
    beat auto by min_gain; a case with no launch had none that did."""
    sweep = json.loads(H200.read_text())
    table = gt.table_from_sweep(sweep, min_gain)
    assert table["device"] == "NVIDIA-H200" and table["sm_count"] == 132
    assert len(table["entries"]) == len(sweep["rows"])
    picked = 0
    for row, e in zip(sweep["rows"], table["entries"]):
        assert (e["m"], e["n"], e["k"]) == (row["M"], row["N"], row["K"])
        assert (e["bits"], e["group"]) == {"W4g128": (4, 128), "W8": (8, -1)}[row["fmt"]]
        fastest = min(r["ms"] for r in _eligible(row))
        if e["launch"] is None:
            assert row["auto_ms"] < min_gain * fastest, row["case"]
            continue
        picked += 1
        same = [r for r in _eligible(row) if all(r.get(k, gt.GEMV_DEFAULTS.get(k)) == v for k, v in e["launch"].items())]
        assert len(same) == 1 and same[0]["ms"] == fastest == e["best_ms"], row["case"]
        assert row["auto_ms"] >= min_gain * fastest
    assert picked > 0, "the H200 sweep has cases where a forced launch beat auto by 3 % and more"
    if min_gain == 1.0:
        assert picked == sum(row["auto_ms"] >= min(r["ms"] for r in _eligible(row)) for row in sweep["rows"])


def _sweep(forced, auto_ms=10.0):
    return {"meta": {"device": "NVIDIA H100 80GB HBM3", "sm_count": 132},
            "rows": [{"fmt": "W4g128", "M": 1, "N": 64, "K": 256, "auto_ms": auto_ms, "forced": forced}]}


def test_a_table_never_takes_a_launch_with_other_numerics_or_a_mismatch_or_a_choice_that_is_gone():
    fast = {"splits": 2, "warps": 4, "x_smem": False, "shared_x": False, "rel_err": 0.0}
    forced = [{**fast, "scale_after": True, "ms": 1.0},  # rounds ŵ otherwise
              {**fast, "x_smem": True, "scale_after": False, "zero_after": True, "ms": 2.0},
              {**fast, "ms": 3.0, "rel_err": 0.5},  # did not match the plan's output
              {"splits": 1, "depth": 3, "ms": 4.0, "rel_err": 0.0},  # a pipeline of an older sweep
              {**fast, "splits": 4, "ms": 8.0}, {**fast, "warps": 8, "ms": 9.0}]
    (e,) = gt.table_from_sweep(_sweep(forced))["entries"]
    assert e["launch"] == {"splits": 4, "warps": 4, "x_smem": False, "shared_x": False, "row_tiles": 0}
    assert e["best_ms"] == 8.0
    # two row tiles per warp sum the same terms: a table may take them
    (e,) = gt.table_from_sweep(_sweep(forced + [{**fast, "row_tiles": 2, "ms": 5.0}]))["entries"]
    assert e["launch"] == {"splits": 2, "warps": 4, "x_smem": False, "shared_x": False, "row_tiles": 2}
    assert gt.table_from_sweep(_sweep(forced, auto_ms=8.1))["entries"][0]["launch"] is None  # < 3 % better
    assert gt.table_from_sweep(_sweep(forced[:4]))["entries"][0]["launch"] is None  # nothing eligible
    with pytest.raises(ValueError, match="min_gain=0.9"):
        gt.table_from_sweep(_sweep(forced), 0.9)


def test_names_and_formats():
    assert gt.device_slug("NVIDIA H100 80GB HBM3") == "NVIDIA-H100-80GB-HBM3"
    assert gt.device_slug("NVIDIA-H200") == "NVIDIA-H200"
    assert gt.parse_format("W4g128") == (4, 128) and gt.parse_format("W8") == (8, -1)
    with pytest.raises(ValueError, match="W4 or W8"):
        gt.parse_format("W3g64")
    assert gt.group_of(4096, 1) == -1 and gt.group_of(4096, 32) == 128


def _table(launch=None, **entry):
    e = {"bits": 4, "group": 128, "dtype": "bfloat16", "m": 1, "n": 64, "k": 256,
         "launch": launch or {"splits": 2, "warps": 4, "x_smem": True, "shared_x": False}, **entry}
    return {"device": "NVIDIA-H100-80GB-HBM3", "sm_count": 132, "entries": [e]}


def test_lookup_is_by_the_exact_case():
    t = gt.GemvTable(_table())
    assert len(t) == 1
    # a table from before row_tiles: the plan's tiles (0)
    assert t.launch(4, 128, "bfloat16", 1, 64, 256) == {"splits": 2, "warps": 4, "x_smem": True, "shared_x": False,
                                                        "row_tiles": 0}
    for other in ((8, 128, "bfloat16", 1, 64, 256), (4, -1, "bfloat16", 1, 64, 256), (4, 128, "float16", 1, 64, 256),
                  (4, 128, "bfloat16", 2, 64, 256), (4, 128, "bfloat16", 1, 65, 256), (4, 128, "bfloat16", 1, 64, 512)):
        assert t.launch(*other) is None, other


def test_a_table_may_launch_any_block_size_the_kernel_takes():
    """1-8 warps per block (the sweep times 6 and 3 too: other grids fit one wave); shared_x: 4 or 8."""
    for w in range(1, 9):
        launch = {"splits": 0, "warps": w, "x_smem": False, "shared_x": False, "row_tiles": 2}
        assert gt.GemvTable(_table(launch)).launch(4, 128, "bfloat16", 1, 64, 256) == launch
    assert len(gt.GemvTable(_table({"splits": 0, "warps": 4, "x_smem": False, "shared_x": True}))) == 1


@pytest.mark.parametrize("bad,match", [
    ([], "a JSON object"),
    ({"entries": []}, "'device'"),
    (_table(n=None), "entry 0 lacks or mistypes"),
    ({k: v for k, v in _table().items() if k != "sm_count"}, "'sm_count'"),
    (_table(bits=3), "not a GEMV case"),
    (_table(dtype="int8"), "not a GEMV case"),
    (_table(m=0), "not a GEMV case"),
    (_table({"splits": 2, "warps": 4, "x_smem": 1, "shared_x": False}), "must set exactly"),
    (_table({"splits": 2, "warps": 4, "x_smem": False}), "must set exactly"),
    (_table({"splits": 2, "warps": 4, "x_smem": False, "shared_x": False, "scale_after": True}), "must set exactly"),
    (_table({"splits": 2, "warps": 9, "x_smem": False, "shared_x": False}), "warps 9"),
    (_table({"splits": 2, "warps": 0, "x_smem": False, "shared_x": False}), "warps 0"),
    (_table({"splits": 2, "warps": 6, "x_smem": False, "shared_x": True}), "warps 6"),
    (_table({"splits": 99, "warps": 4, "x_smem": False, "shared_x": False}), "splits 99"),
    (_table({"splits": 2, "warps": 4, "x_smem": False, "shared_x": False, "row_tiles": 3}), "row_tiles 3"),
])
def test_a_bad_table_is_refused_with_what_is_wrong_and_how_to_make_one(bad, match):
    with pytest.raises(ValueError, match=match) as err:
        gt.GemvTable(bad, "t.json")
    assert "t.json" in str(err.value) and "sweep_gemv.py" in str(err.value)


def test_a_repeated_case_is_refused():
    t = _table()
    t["entries"] *= 2
    with pytest.raises(ValueError, match="repeats the case"):
        gt.GemvTable(t)


def test_loading_follows_the_environment_and_the_device(tmp_path, monkeypatch):
    monkeypatch.setattr(gt, "TABLE_DIR", tmp_path)
    monkeypatch.delenv(gt.ENV, raising=False)
    name = "NVIDIA H100 80GB HBM3"
    assert gt.load_table(name, 132) is None  # none shipped
    (tmp_path / "NVIDIA-H100-80GB-HBM3.json").write_text(json.dumps(_table()))
    assert len(gt.load_table(name, 132)) == 1  # the shipped one for this name
    with pytest.warns(UserWarning, match="with 132 SMs, not on this .* with 114"):
        assert gt.load_table(name, 114) is None  # another SM count (MIG, the PCIe card)
    monkeypatch.setenv(gt.ENV, "off")
    assert gt.load_table(name, 132) is None
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**_table(), "device": "NVIDIA H200"}))
    monkeypatch.setenv(gt.ENV, str(other))
    with pytest.warns(UserWarning, match="measured on NVIDIA-H200"):
        assert gt.load_table(name, 132) is None
    monkeypatch.setenv(gt.ENV, str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="QDPO_GEMV_TABLE=.*missing.json: no such file.*=off"):
        gt.load_table(name, 132)
    other.write_text("{not json")
    monkeypatch.setenv(gt.ENV, str(other))
    with pytest.raises(ValueError, match="other.json: not JSON"):
        gt.load_table(name, 132)


def test_sweep_gemv_table_from_writes_a_table_the_backend_reads(tmp_path):
    out = tmp_path / "t.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/sweep_gemv.py"), "--table-from", str(H200),
                        "--table-out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    want = gt.table_from_sweep(json.loads(H200.read_text()))
    assert json.loads(out.read_text()) == want
    t = gt.GemvTable.read(out)
    for e in want["entries"]:
        assert t.launch(e["bits"], e["group"], e["dtype"], e["m"], e["n"], e["k"]) == e["launch"]


def test_the_backend_launches_by_the_table_only_where_nothing_is_forced():
    cuda = pytest.importorskip("qdpo.kernels.cuda", reason="qdpo._C not built in this checkout")
    import torch

    t = gt.GemvTable(_table())
    saved = dict(cuda._TABLES)
    try:
        cuda.use_gemv_table(t, device="cuda:0")
        assert cuda.gemv_table_for(0) is t
        args = (0, torch.bfloat16, 1, 64, 256, 2, 4)  # device, x dtype, M, N, K, groups (G = 128), bits
        assert cuda._launch_choices(*args, cuda.UNFORCED) == (2, 4, True, None, None, False, 0)
        for forced in ((0, 8, None, None, None, None, 0), (0, 0, None, True, None, None, 0),
                       (1, 0, None, None, None, None, 0), (0, 0, None, None, None, None, 2)):
            assert cuda._launch_choices(*args, forced) == forced  # the caller's choice wins, all of it
        assert cuda._launch_choices(0, torch.float16, *args[2:], cuda.UNFORCED) == cuda.UNFORCED
        assert cuda._launch_choices(0, torch.bfloat16, 1, 64, 256, 1, 4, cuda.UNFORCED) == cuda.UNFORCED  # G = K
        cuda.use_gemv_table(None, device="cuda:0")
        assert cuda._launch_choices(*args, cuda.UNFORCED) == cuda.UNFORCED
        with pytest.raises(TypeError, match="GemvTable, a path or None"):
            cuda.use_gemv_table({"entries": []}, device="cuda:0")
    finally:
        cuda._TABLES.clear()
        cuda._TABLES.update(saved)


def test_the_backend_refuses_a_block_size_the_kernel_cannot_take():
    """Forced warps: 0 (the plan's) or 1-8, 4 or 8 with shared_x; row tiles 0, 1 or 2; anything else one
    ValueError saying so."""
    cuda = pytest.importorskip("qdpo.kernels.cuda", reason="qdpo._C not built in this checkout")
    import torch

    args = (0, torch.bfloat16, 1, 64, 256, 2, 4)
    for ok in ((0, 3, None, None, None, None, 0), (0, 6, True, None, None, None, 0), (0, 0, None, None, None, True, 0),
               (0, 4, None, None, None, True, 0), (0, 0, None, None, None, None, 2)):
        assert cuda._launch_choices(*args, ok) == ok
    for bad in ((0, 9, None, None, None, None, 0), (0, -1, None, None, None, None, 0),
                (0, 6, None, None, None, True, 0), (0, "8", None, None, None, None, 0)):
        with pytest.raises(ValueError, match=r"a GEMV block takes 1 to 8 warps, with shared_x=True 4 or 8"):
            cuda._launch_choices(*args, bad)
    for bad in (3, -1, "2", None):
        with pytest.raises(ValueError, match=r"row_tiles=.*1 or 2 tiles of 16 rows; 0: the plan's"):
            cuda._launch_choices(*args, (0, 0, None, None, None, None, bad))
