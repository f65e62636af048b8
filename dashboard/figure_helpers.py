"""What the figure modules share: a blank figure that says why there is nothing to draw, and the
number rules for values read from JSON on disk (summary.json, a checkpoint's metrics), which may be
partial, old or damaged.
"""

from __future__ import annotations

import math

import plotly.graph_objects as go

from search.layout import as_number


def empty_figure(message: str, title: str | None = None) -> go.Figure:
    """A blank figure with a sentence in the middle (nothing to draw yet)."""
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font={"size": 14})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(title=title, height=300)
    return fig


def finite_number(v) -> float | None:
    """A JSON number (search.layout.as_number: bool excluded, within float range) that is finite, as a
    float; else None. NaN and inf are left out: a figure cannot place them and a table would show them
    as if they were results."""
    f = as_number(v)
    return f if f is not None and math.isfinite(f) else None


def as_count(v) -> int | None:
    """A whole number from JSON (a count, an epoch, k; also a JSON object's key, which is text), or None."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return int(f) if math.isfinite(f) else None

