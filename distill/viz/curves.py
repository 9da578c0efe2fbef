"""Training curves from a metrics JSONL file (one JSON object per line, with a ``step`` key).

Every numeric key other than the x key (``step``) gets its own panel (loss terms such as ``loss``,
``lm``, ``kd``, ``attn`` differ in scale); lines without a key simply do not contribute to its
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
            raise ValueError(f"{p}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{p}:{i}: each line must be a JSON object")
        rows.append(row)
    if not rows:
        raise ValueError(f"{p}: no metrics lines")
    return rows


def _numeric(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def metric_series(rows: Sequence[dict], keys: Sequence[str] | None = None, x: str = "step") -> dict[str, tuple[list, list]]:
    """{key: (xs, ys)} for every numeric key (or the given `keys`), in first-seen order."""
    for i, r in enumerate(rows):
        if not _numeric(r.get(x)):
            raise ValueError(f"metrics line {i + 1} has no numeric {x!r} (keys: {sorted(r)})")
    if keys is None:
        keys = []
        for r in rows:
            keys.extend(k for k, v in r.items() if k != x and k not in keys and _numeric(v))
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

    Returns the path; the image is exactly (width_inches * dpi, K * panel_inches * dpi) pixels
    for K plotted metrics.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics) if isinstance(metrics, (str, os.PathLike)) else list(metrics)
    series = metric_series(rows, keys, x)
    fig, axes = plt.subplots(len(series), 1, figsize=(width_inches, panel_inches * len(series)), dpi=dpi,
                             sharex=True, squeeze=False)
    for ax, (k, (xs, ys)) in zip(axes[:, 0], series.items()):
        ax.plot(xs, ys, marker="." if len(xs) < 50 else None, linewidth=1.2)
        ax.set_ylabel(k)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel(x)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format="png")
    plt.close(fig)
    return out
