"""How the predictor page shows a prediction and its input: the 28x28 image the model actually sees,
a displayable copy of an upload, the top-k characters as bars. Pure functions (no Streamlit), so they
are tested directly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go
from PIL import Image

MODEL_VIEW_SCALE = 8  # 28 px -> 224 px, nearest neighbour
# PIL modes of 16- and 32-bit integer images: training.preprocess reads them at full depth, the page
# says so (predictor.describe_image) and scales them to 8 bits to show them (preview)
HIGH_DEPTH_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def model_view(image: np.ndarray, scale: int = MODEL_VIEW_SCALE) -> Image.Image:
    """The 28x28 model input, enlarged with nearest neighbour so its pixels stay visible."""
    img = Image.fromarray(np.asarray(image, dtype=np.uint8), mode="L")
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)


def preview(img: Any, size: int) -> Image.Image | None:
    """A displayable copy of an uploaded image, at most size x size (None if it cannot be shown)."""
    try:
        if not isinstance(img, Image.Image):
            return None
        if img.mode in HIGH_DEPTH_MODES or img.mode == "F":
            a = np.asarray(img, dtype=np.float64)
            top = a.max() or 1.0
            im = Image.fromarray(np.clip(a / top * 255, 0, 255).astype(np.uint8), mode="L")
        elif img.mode in ("RGB", "RGBA", "L", "LA"):
            im = img.copy()
        else:
            has_alpha = img.mode in ("PA",) or "transparency" in img.info
            im = img.convert("RGBA" if has_alpha else "RGB")
        if max(im.size) < size // 2:  # a tiny image (e.g. 28x28): enlarge, keeping its pixels
            f = (size // 2) // max(im.size)
            im = im.resize((im.width * f, im.height * f), Image.Resampling.NEAREST)
        im.thumbnail((size, size))
        return im
    except Exception:
        return None


def top_k_figure(top: list[tuple[str, float]], height: int = 260, title: str | None = None) -> go.Figure:
    """Horizontal bars, most likely character on top, probabilities in %."""
    chars = [f"'{c}'" for c, _ in top]  # quoted: keeps '1' a category, never a number
    probs = [p for _, p in top]
    fig = go.Figure(go.Bar(
        x=probs, y=chars, orientation="h", text=[f"{p:.1%}" for p in probs], textposition="auto",
        marker_color=["#1f77b4"] + ["#9ecae1"] * (len(top) - 1),
        hovertemplate="%{y}: %{x:.2%}<extra></extra>",
    ))
    fig.update_layout(height=height, margin={"l": 10, "r": 10, "t": 30 if title else 10, "b": 10},
                      title=title, showlegend=False)
    fig.update_xaxes(range=[0, 1.02], tickvals=[0, 0.25, 0.5, 0.75, 1], tickformat=".0%", title=None)
    fig.update_yaxes(type="category", autorange="reversed", title=None)
    return fig
