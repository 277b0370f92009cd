"""Plots for the run report (PNG, matplotlib's Agg canvas; no display and no global backend switch).

* :func:`flip_vs_margin`: how often each model flips the FP top-1 token, as a
  function of how sure the FP model was (its top-1 − top-2 logit margin).
  Quantization flips near-ties first; a method that helps should lower the
  curve at small margins most.
* :func:`training_curves`: loss, DPO reward margin and validation flip rate
  per optimizer step, one line per method.

Each function writes its figure to a temporary name and renames it, and returns the path.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from qdpo.eval.report import LABELS  # the report's names of the models (QDPO, KD, FP), so legend and table agree

BINS = 12  # quantile bins of the FP margin: ~8 % of positions each, enough points for a curve


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, path)
    return path


def _bin_edges(pooled: np.ndarray, bins: int) -> np.ndarray:
    """Quantile edges of the pooled margins; duplicate edges (ties, e.g. many zero margins) merged."""
    edges = np.unique(np.quantile(pooled, np.linspace(0.0, 1.0, bins + 1)))
    if edges.size < 2:  # every margin equal: one bin
        edges = np.array([edges[0], edges[0]])
    return edges


def _bin_of(margins: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index of each margin: ``[lo, hi)``, the last bin closed."""
    return np.clip(np.searchsorted(edges, margins, side="right") - 1, 0, len(edges) - 2)


def flip_vs_margin(curves: dict[str, tuple[torch.Tensor, torch.Tensor]], path, bins: int = BINS) -> Path:
    """Flip probability vs FP top-1/top-2 logit margin, one line per model.

    ``curves[name] = (margins [P] float, flipped [P] bool)`` as returned by
    ``teacher_forced`` (``margins`` / ``flipped``). Bins are quantiles of the
    margins pooled over all models, so every model is measured on the same
    bins; each point sits at its bin's pooled median margin, with a ±1
    standard-error band. The x axis is logarithmic when all medians are
    positive and span more than a decade.
    """
    if not curves:
        raise ValueError("flip_vs_margin: no curves to plot; pass {model name: (margins, flipped)}")
    data = {k: (m.detach().float().cpu().numpy().ravel(), f.detach().float().cpu().numpy().ravel())
            for k, (m, f) in curves.items()}
    for name, (m, f) in data.items():
        if m.shape != f.shape or m.size == 0:
            raise ValueError(f"flip_vs_margin: {name!r} has {m.size} margins and {f.size} flip flags; "
                             "need the same non-zero number")
    pooled = np.concatenate([m for m, _ in data.values()])
    edges = _bin_edges(pooled, bins)
    where = _bin_of(pooled, edges)  # the medians of the very positions each bin counts (ties at an edge: one bin)
    centers = np.array([np.median(pooled[where == b]) if (where == b).any() else np.nan
                        for b in range(len(edges) - 1)])
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for name, (m, f) in data.items():
        which = _bin_of(m, edges)
        count = np.bincount(which, minlength=len(centers))
        rate = np.bincount(which, weights=f, minlength=len(centers)) / np.maximum(count, 1)
        ok = count > 0
        err = np.sqrt(rate * (1 - rate) / np.maximum(count, 1))
        line, = ax.plot(centers[ok], rate[ok], marker="o", label=f"{LABELS.get(name, name)} ({f.mean():.2%} overall)")
        ax.fill_between(centers[ok], (rate - err)[ok], (rate + err)[ok], alpha=0.15, color=line.get_color())
    if np.nanmin(centers) > 0 and np.nanmax(centers) / np.nanmin(centers) > 10:
        ax.set_xscale("log")
    ax.set_xlabel("FP top-1 − top-2 logit margin (bin median)")
    ax.set_ylabel("P(quantized top-1 ≠ FP top-1)")
    ax.set_title("Token flips vs FP confidence (teacher-forced, test answers)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _series(history: list[dict], key: str) -> tuple[list, list]:
    pts = [(h.get("step", i), h[key]) for i, h in enumerate(history) if h.get(key) is not None]
    return [s for s, _ in pts], [float(v) for _, v in pts]


def training_curves(histories: dict[str, list[dict]], path) -> Path:
    """Per-step ``loss``, ``rewards/margins`` and ``val/flip_rate``, one line per method.

    ``histories[method]`` is a list of per-step dicts with ``step`` and any of
    those keys (a key may be missing on some steps, e.g. validation only every
    few steps); a panel no method has data for says so.
    """
    if not histories:
        raise ValueError("training_curves: no histories to plot; pass {method: [per-step dicts]}")
    panels = (("loss", "training loss"), ("rewards/margins", "reward margin (chosen − rejected)"),
              ("val/flip_rate", "validation flip rate"))
    fig = Figure(figsize=(13, 4), layout="constrained")
    axes = fig.subplots(1, len(panels))
    colors = {m: f"C{i}" for i, m in enumerate(histories)}  # one color per method in every panel
    for ax, (key, title) in zip(axes, panels):
        drawn = False
        for method, history in histories.items():
            steps, values = _series(history, key)
            if steps:
                ax.plot(steps, values, marker="o" if key.startswith("val/") else None, markersize=3, label=LABELS.get(method, method),
                        color=colors[method])
                drawn = True
        if drawn:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    fig.suptitle("Training curves")
    return _save(fig, path)
