"""Training curves from a metrics JSONL file (one JSON object per line, with a ``step`` key).

Every numeric key other than the x key (``step``) gets its own panel (loss terms such as ``loss``,
``lm``, ``kd``, ``attn`` differ in scale, and throughput / lr / grad-norm keys are plotted too;
``--keys`` picks a subset); lines without a key simply do not contribute to its
panel, and non-finite values leave gaps.
"""

from __future__ import annotations

import json
import math
import os
from numbers import Real
from pathlib import Path
from typing import Sequence


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Parse a metrics JSONL file; errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"metrics file {str(p)!r} does not exist")
    rows = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{i}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise ValueError(f"{p}:{i}: each line must be a JSON object")
        rows.append(row)
    if not rows:
        raise ValueError(f"{p}: no metrics lines")
    return rows


def _numeric(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


# Bookkeeping fields of the training log that are numbers but not metrics.
NOT_METRICS = ("stage",)


def metric_series(rows: Sequence[dict], keys: Sequence[str] | None = None, x: str = "step") -> dict[str, tuple[list, list]]:
    """{key: (xs, ys)} for every numeric key but `NOT_METRICS` (or the given `keys`), in first-seen order."""
    for i, r in enumerate(rows):
        if not _numeric(r.get(x)):
            raise ValueError(f"metrics line {i + 1} has no numeric {x!r} (keys: {sorted(r)})")
    if keys is None:
        keys = []
        for r in rows:
            keys.extend(k for k, v in r.items() if k != x and k not in keys and k not in NOT_METRICS and _numeric(v))
    series = {}
    for k in keys:
        pts = [(r[x], float(r[k])) for r in rows if _numeric(r.get(k))]
        if not pts:
            raise ValueError(f"no numeric values for metric {k!r}")
        series[k] = ([p[0] for p in pts], [p[1] if math.isfinite(p[1]) else float("nan") for p in pts])
    if not series:
        raise ValueError(f"no numeric metrics besides {x!r} to plot")
    return series


def plot_curves(metrics: str | os.PathLike | Sequence[dict], out: str | os.PathLike, *,
                keys: Sequence[str] | None = None, x: str = "step", width_inches: float = 8.0,
                panel_inches: float = 2.5, dpi: int = 100) -> Path:
    """Write a PNG with one panel per metric over `x`.

    Up to 4 metrics stack in one column; more fill a 2-column grid (row-major, in series order).
    Returns the path; the image is exactly (C * width_inches * dpi, R * panel_inches * dpi) pixels
    for C columns and R = ceil(K / C) rows of K plotted metrics.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics) if isinstance(metrics, (str, os.PathLike)) else list(metrics)
    series = metric_series(rows, keys, x)
    ncols = 1 if len(series) <= 4 else 2
    nrows = math.ceil(len(series) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width_inches * ncols, panel_inches * nrows), dpi=dpi,
                             squeeze=False)
    flat = axes.flatten()
    for ax, (k, (xs, ys)) in zip(flat, series.items()):
        ax.plot(xs, ys, marker="." if len(xs) < 50 else None, linewidth=1.2)
        ax.set_ylabel(k)
        ax.grid(alpha=0.3)
        ax.set_xlabel(x)
    for ax in flat[len(series):]:
        ax.set_visible(False)
    return save_figure(fig, out, dpi)


def save_figure(fig, out: str | os.PathLike, dpi: int) -> Path:
    """Lay out, write ``fig`` as PNG to ``out`` (parents created), close it; return the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format="png")
    plt.close(fig)
    return out
