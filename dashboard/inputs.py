"""What the predictor page is given, read safely: an uploaded image or a drawing on the canvas. Both of its
modes (one character, a line of writing) take their input through `input_widgets`, each with its own form
(canvas size, pen width, widget keys).

`read_upload` and `read_canvas` are pure and never raise for bad input: every failure becomes a PageInput
with an error to show. Uploads are decoded by `training.ink.load_image` (pixel-count limit checked before
decoding, truncated/corrupt files rejected) and limited to safety.MAX_UPLOAD_MB (the widget, the server
option that safety.enforce sets, and a size check here).
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from dashboard.prediction_view import HIGH_DEPTH_MODES, preview
from dashboard.safety import MAX_UPLOAD_MB
from training.ink import ImageError, load_image

log = logging.getLogger(__name__)

UPLOAD_TYPES = ["png", "jpg", "jpeg", "bmp", "webp", "gif"]
INK = {"White on black": ("#FFFFFF", "#000000"), "Black on white": ("#000000", "#FFFFFF")}


@dataclass
class PageInput:
    """What the user gave the page, ready for the model (or why there is nothing)."""

    image: Any = None  # PIL image or RGBA array
    notes: list[str] = field(default_factory=list)  # how the input was interpreted (shown as info)
    error: str = ""  # why there is nothing to predict (shown as an error)

    @property
    def ok(self) -> bool:
        return self.image is not None and not self.error


def _probe(data: bytes) -> tuple[str, int]:
    """(file format, frames) of an upload; (\"image\", 1) if unknown. Called only after load_image
    accepted the file, so the size is already checked; frames are counted without decoding them."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                frames = int(getattr(img, "n_frames", 1)) if getattr(img, "is_animated", False) else 1
                return img.format or "image", frames
    except Exception:  # informative only; the first frame is already decoded
        return "image", 1


def describe_image(img: Image.Image, frames: int = 1, fmt: str = "image") -> list[str]:
    """Notes on how an unusual image is read (animation, transparency, bit depth, colour space)."""
    notes = []
    if frames > 1:
        notes.append(f"Animated {fmt} with {frames} frames: only the first frame is used.")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        notes.append("Transparent image: the drawing is taken from the opaque pixels "
                     "(flattened onto a background that contrasts with the strokes).")
    if img.mode in HIGH_DEPTH_MODES:
        notes.append("16-bit image: read at full depth and scaled to 8 bits, like EMNIST.")
    elif img.mode == "F":
        notes.append("Floating-point image: intensities scaled to 8 bits.")
    if img.mode == "CMYK":
        notes.append("CMYK image: converted to RGB, then to grey.")
    return notes


def read_upload(data: bytes) -> PageInput:
    """Decode uploaded bytes safely (see load_image). Never raises for bad input."""
    if not data:
        return PageInput(error="The file is empty.")
    try:
        img = load_image(data)
    except ImageError as e:
        return PageInput(error=f"This file cannot be used: {e}.")
    except Exception as e:  # belt and braces: a decoder bug must not take the page down
        log.warning("unexpected error decoding an upload", exc_info=True)
        return PageInput(error=f"This file cannot be used: could not decode it ({type(e).__name__}).")
    fmt, frames = _probe(data)
    return PageInput(image=img, notes=describe_image(img, frames, fmt))


def read_canvas(image_data: np.ndarray | None) -> PageInput:
    """The canvas's RGBA pixels (None until the user has drawn something)."""
    if image_data is None:
        return PageInput(error="")  # nothing drawn yet: not an error, the page asks to draw
    arr = np.asarray(image_data)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.size == 0:
        return PageInput(error=f"The canvas sent an unexpected image of shape {arr.shape}.")
    return PageInput(image=arr.astype(np.uint8, copy=False))


# --- The widgets ------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputForm:
    """How one mode of the page asks for its input."""

    key: str  # prefix of the widget keys ("predictor": predictor_source, predictor_upload, ...)
    upload_label: str
    upload_hint: str  # shown until something is uploaded
    draw_hint: str  # shown until something is drawn
    width: int  # the canvas, in pixels
    height: int
    stroke: int  # pen width on the canvas
    preview: bool = True  # show the uploaded image (the line mode shows it with its boxes instead)


def input_widgets(form: InputForm) -> PageInput:
    """Upload or draw (radio), then the uploader or the canvas; what they gave, read safely."""
    import streamlit as st

    source = st.radio("Input", ["Upload an image", "Draw"], horizontal=True, key=f"{form.key}_source")
    if source == "Upload an image":
        uploaded = st.file_uploader(form.upload_label, type=UPLOAD_TYPES, key=f"{form.key}_upload",
                                    max_upload_size=MAX_UPLOAD_MB,
                                    help="PNG, JPEG, BMP, WebP or GIF; any size, colour or polarity.")
        if uploaded is None:
            st.caption(form.upload_hint)
            return PageInput()
        if uploaded.size > MAX_UPLOAD_MB * 2**20:
            return PageInput(error=f"The file is larger than {MAX_UPLOAD_MB} MB; characters are small images.")
        inp = read_upload(uploaded.getvalue())
        if inp.image is not None and form.preview:
            shown = preview(inp.image, form.width)  # as large as the drawing canvas
            if shown is not None:
                st.image(shown, caption=f"Uploaded: {uploaded.name}")
        return inp

    ink = st.radio("Ink", list(INK), horizontal=True, key=f"{form.key}_ink")
    stroke, background = INK[ink]
    st.space("small")  # room for the canvas toolbar, which floats above the canvas
    try:
        from streamlit_drawable_canvas import st_canvas

        result = st_canvas(stroke_width=form.stroke, stroke_color=stroke, background_color=background,
                           width=form.width, height=form.height, drawing_mode="freedraw",
                           return_image_data=True, update_streamlit=True, key=f"{form.key}_canvas_{ink}")
        image_data = result.image_data
    except Exception as e:
        log.warning("drawing canvas unavailable", exc_info=True)
        st.error(f"The drawing canvas is not available here ({type(e).__name__}); upload an image instead.",
                 icon="⚠️")
        return PageInput()
    if image_data is None:
        st.caption(form.draw_hint)
    return read_canvas(image_data)
