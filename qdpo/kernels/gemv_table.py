"""Measured decode-GEMV launches: per GPU model, the fastest launch a sweep found for each weight it timed.

The cuda backend's GEMV plan (``csrc/dequant_matmul_gemv.cu``) picks its split-K count and block size
by rules, and keeps its opt-in variants (``x_smem``, ``shared_x``) off. ``benchmarks/sweep_gemv.py``
times every valid launch on a GPU. :func:`table_from_sweep` keeps, for each weight and M it timed, the
fastest launch that sums the same terms as the plan's own (:data:`EXACT`: split count, block size,
where x is staged, row tiles per warp; only the order of the fp32 sums changes), wherever it beat the plan's own launch by
at least ``min_gain``. Launches that round ŵ differently (``scale_after``, ``zero_after``) never enter a
table.

``dequant_matmul(backend="cuda")`` then launches a table's choice whenever the caller forces none and
the table holds the exact (bits, group size, x dtype, M, N, K); everything else keeps the plan's rules.
The table for a GPU is ``qdpo/kernels/gemv_tables/<device name>.json`` (shipped with the package), or
the file named by ``QDPO_GEMV_TABLE``; ``QDPO_GEMV_TABLE=off`` uses none. A table made on another GPU
model, or on the same one with another SM count (MIG), is ignored with a warning.

This module is plain Python, so tables are made and checked on any machine.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

from qdpo.kernels.gemv_options import GEMV_DEFAULTS, ROW_TILES, WARPS_RULE, block_warps_ok

ENV = "QDPO_GEMV_TABLE"
OFF = ("off", "none", "0")
TABLE_DIR = Path(__file__).parent / "gemv_tables"
# The launch choices a table may set: each sums the same products q·x as the plan's launch, in
# another order. splits 0 is the plan's split rule for that launch.
EXACT = ("splits", "warps", "x_smem", "shared_x", "row_tiles")
MIN_GAIN = 1.03  # auto / best: smaller gains are within a sweep's run-to-run spread
_FORCED_KEYS = set(EXACT) | {"scale_after", "zero_after", "ms", "rel_err", "plan_splits", "blocks_per_sm"}
_TYPES = {"splits": int, "warps": int, "x_smem": bool, "shared_x": bool, "row_tiles": int}
DTYPES = ("float16", "bfloat16", "float32")


def device_slug(name: str) -> str:
    """A GPU's name as a file name: ``NVIDIA H100 80GB HBM3`` -> ``NVIDIA-H100-80GB-HBM3``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def parse_format(fmt: str) -> tuple[int, int]:
    """A sweep's format name -> (bits, group size; -1 for one group per row): ``W4g128`` -> (4, 128)."""
    m = re.fullmatch(r"W(4|8)(?:g(\d+))?", fmt)
    if m is None:
        raise ValueError(f"format {fmt!r}: expected W4 or W8, with gNNN for a group size (W4g128)")
    return int(m.group(1)), int(m.group(2)) if m.group(2) else -1


def group_of(k: int, groups: int) -> int:
    """The table's group size of a weight with ``groups`` scales per row of K codes."""
    return -1 if groups == 1 else k // groups


def table_from_sweep(sweep: dict, min_gain: float = MIN_GAIN) -> dict:
    """The table of one ``sweep_gemv.json`` (``{"meta": ..., "rows": ...}``): one entry per timed case.

    An entry's ``launch`` is the fastest forced launch of :data:`EXACT` choices alone whose output
    matched the plan's (relative error below 1e-2), where the plan's own launch took at least
    ``min_gain`` times as long; otherwise None (the plan's rules stand). Forced launches of choices
    that no longer exist (older sweeps) are passed over.
    """
    if min_gain < 1:
        raise ValueError(f"min_gain={min_gain}: a table must never pick a slower launch; use >= 1")
    meta = sweep["meta"]
    entries = []
    for row in sweep["rows"]:
        bits, group = parse_format(row["fmt"])
        exact = [r for r in row["forced"] if set(r) <= _FORCED_KEYS and not r.get("scale_after")
                 and not r.get("zero_after") and r.get("rel_err", 0.0) < 1e-2]
        best = min(exact, key=lambda r: r["ms"], default=None)
        launch = None
        if best is not None and row["auto_ms"] >= min_gain * best["ms"]:
            launch = {key: best.get(key, GEMV_DEFAULTS.get(key, 0)) for key in EXACT}
        entries.append({"bits": bits, "group": group, "dtype": row.get("dtype", "bfloat16"), "m": row["M"],
                        "n": row["N"], "k": row["K"], "launch": launch, "auto_ms": row["auto_ms"],
                        "best_ms": None if best is None else best["ms"]})
    return {"device": device_slug(meta["device"]), "sm_count": meta["sm_count"], "swept": meta.get("date", ""),
            "min_gain": min_gain, "entries": entries}


class GemvTable:
    """A table, checked, indexed by (bits, group, dtype, M, N, K)."""

    def __init__(self, data: dict, source: str = "table"):
        def bad(what: str):
            return ValueError(f"GEMV table {source}: {what}; make tables with benchmarks/sweep_gemv.py "
                              f"(--table-from sweep_gemv.json)")

        if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
            raise bad("expected a JSON object with a list 'entries'")
        if not isinstance(data.get("device"), str) or not isinstance(data.get("sm_count"), int):
            raise bad("'device' (a name) and 'sm_count' (an integer) are required")
        self.device, self.sm_count, self.source = device_slug(data["device"]), data["sm_count"], source
        self._index: dict[tuple, dict | None] = {}
        for i, e in enumerate(data["entries"]):
            try:
                key = (int(e["bits"]), int(e["group"]), str(e["dtype"]), int(e["m"]), int(e["n"]), int(e["k"]))
                launch = e["launch"]
            except (KeyError, TypeError, ValueError) as err:
                raise bad(f"entry {i} lacks or mistypes {err}") from None
            if key[0] not in (4, 8) or key[2] not in DTYPES or min(key[3:]) < 1:
                raise bad(f"entry {i}: bits {key[0]}, dtype {key[2]!r}, M/N/K {key[3:]} are not a GEMV case")
            if isinstance(launch, dict) and "row_tiles" not in launch:
                launch = {**launch, "row_tiles": 0}  # a table from before row_tiles: the plan's tiles
            if launch is not None:
                if not isinstance(launch, dict) or set(launch) != set(EXACT) or any(
                        type(launch[k]) is not t for k, t in _TYPES.items()):
                    raise bad(f"entry {i}: launch {launch!r} must set exactly {EXACT} "
                              f"({', '.join(t.__name__ for t in _TYPES.values())})")
                if not block_warps_ok(launch["warps"], launch["shared_x"]) or not 0 <= launch["splits"] <= 16 \
                        or launch["row_tiles"] not in ROW_TILES:
                    raise bad(f"entry {i}: warps {launch['warps']} ({WARPS_RULE}), "
                              f"splits {launch['splits']} (0-16), row_tiles {launch['row_tiles']} {ROW_TILES}")
            if key in self._index:
                raise bad(f"entry {i} repeats the case {key}")
            self._index[key] = launch

    @classmethod
    def read(cls, path: str | Path) -> "GemvTable":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"GEMV table {path}: not JSON ({err})") from None
        return cls(data, str(path))

    def __len__(self) -> int:
        return sum(v is not None for v in self._index.values())

    def launch(self, bits: int, group: int, dtype: str, m: int, n: int, k: int) -> dict | None:
        """The measured launch for this exact case, or None (not timed, or the plan's own was fastest)."""
        return self._index.get((bits, group, dtype, m, n, k))


def load_table(device_name: str, sm_count: int) -> GemvTable | None:
    """The table for this GPU: ``$QDPO_GEMV_TABLE`` if set (``off``: none), else the shipped one for its
    name, else None. A table measured on another GPU (name or SM count) is ignored with a warning."""
    want = os.environ.get(ENV, "").strip()
    if want.lower() in OFF:
        return None
    path = Path(want) if want else TABLE_DIR / f"{device_slug(device_name)}.json"
    if not path.is_file():
        if want:
            raise FileNotFoundError(f"{ENV}={want}: no such file; name a table made by benchmarks/sweep_gemv.py, "
                                    f"or set {ENV}=off")
        return None
    table = GemvTable.read(path)
    if table.device != device_slug(device_name) or table.sm_count != sm_count:
        warnings.warn(f"GEMV table {path} was measured on {table.device} with {table.sm_count} SMs, not on this "
                      f"{device_name} with {sm_count}: ignored (the plan's rules decide)", stacklevel=2)
        return None
    return table
