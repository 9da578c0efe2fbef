"""Visualisation: teacher vs student visual-attention heat maps, training curves.

CLI: ``python -m distill.viz {attention,curves}`` (see ``--help``).
Library: `attention_maps`, `render_attention`, `attention_figure`, `capture_visual_attention`,
`visual_attention_profile`, `plot_curves`, `read_metrics`.
"""

from distill.viz.attention_maps import (
    attention_figure,
    attention_maps,
    capture_visual_attention,
    grid_shape,
    render_attention,
    visual_attention_profile,
)
from distill.viz.curves import metric_series, plot_curves, read_metrics

__all__ = [
    "attention_figure", "attention_maps", "capture_visual_attention", "grid_shape", "render_attention",
    "visual_attention_profile", "metric_series", "plot_curves", "read_metrics",
]
