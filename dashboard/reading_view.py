"""How the predictor page's "Read a line" mode shows a reading (training.reading.Reading): the input with a box
around each character it read, the 28x28 crops the model saw in reading order with their top-3, the model's own
text beside the corrected one, and which characters are merged classes (EMNIST Balanced's c/C, o/O, ...: their
case comes from the rest of the word or from the word list). Also reading an input and a user's word list, with
every failure turned into a message. Pure functions (no Streamlit), so they are tested directly.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from PIL import Image

from dashboard.common import md_text
from dashboard.prediction_view import model_view, preview
from training.lexicon import ENGLISH, Lexicon, LexiconError, read_word_list
from training.reading import CharReading, Reading

log = logging.getLogger(__name__)

MAX_SHOWN = 1400  # the input is drawn at most this many pixels wide (and high); its boxes are scaled with it
LABEL_HEIGHT = 28  # screen pixels kept above each box for its label
FIGURE_WIDTH = 1000  # the width the figure's height is planned for (Streamlit stretches it to the column)
CROP_SCALE = 3  # a crop is shown at 28x3 = 84 pixels, nearest neighbour
MAX_CROPS = 120  # crops shown; a longer line's others are counted (its text and boxes are all shown)
MAX_USER_WORDS = 100_000  # a user's word list: more words take seconds and hundreds of MB to index
WORD_COLOURS = ("#ff7f0e", "#17becf")  # alternate words, so where one ends is visible
MERGED_COLOUR = "#d62728"  # the label of a character whose class holds both cases


# --- Reading ----------------------------------------------------------------------------------


def sentence(message: str) -> str:
    """A message from the reader as a sentence: capital first, full stop last."""
    message = " ".join(str(message).split()) or "no writing found"
    message = message[0].upper() + message[1:]
    return message if message.endswith(".") else message + "."


def read_image(predictor: Any, image: Any, lexicon: Lexicon | None = None, k: int = 3) -> tuple[Reading | None, str]:
    """(reading, "") or (None, why there is none, as a sentence). Never raises for bad input:
    Predictor.read gives a blank or unreadable image back as a Reading with a message."""
    if image is None:
        return None, "No input yet: upload an image or write on the canvas."
    try:
        reading = predictor.read(image, lexicon=lexicon, k=k)
    except LexiconError as e:
        return None, f"The word list cannot be used: {e}."
    except Exception as e:  # a reader bug must not take the page down; the server log has the traceback
        log.warning("reading a line failed", exc_info=True)
        return None, f"The model could not read this input ({type(e).__name__}: {e})."
    if not reading.found:
        return None, sentence(reading.message)
    return reading, ""


def user_lexicon(data: bytes, name: str) -> Lexicon:
    """A word list uploaded to the page (training.lexicon's format: `word` or `word count` a line), at most
    MAX_USER_WORDS words. LexiconError, naming the upload (never a server path), for anything else."""
    name = Path(str(name)).name[:60] or "words.txt"
    with tempfile.TemporaryDirectory(prefix="emnist-words-") as folder:
        path = Path(folder) / "words.txt"
        path.write_bytes(data)
        try:
            counts, forms = read_word_list(path)
        except LexiconError as e:
            raise LexiconError(str(e).replace(str(path), name)) from None
    if len(counts) > MAX_USER_WORDS:
        raise LexiconError(f"word list {name} has {len(counts):,} words: at most {MAX_USER_WORDS:,} are read here")
    return Lexicon(counts, forms, name)


# --- Text ---------------------------------------------------------------------------------------


def lexicon_label(name: str) -> str:
    """How the page names the word list a reading was corrected with."""
    if name == "none":
        return "no word list"
    if name == ENGLISH:
        return "the English word list"
    return f"word list {name}"


def text_panels(reading: Reading) -> list[tuple[str, str]]:
    """The two texts side by side: (title, text) for the model alone, then after the word list."""
    corrected = ("Corrected (no word list: the model alone)" if reading.lexicon == "none"
                 else f"Corrected with {lexicon_label(reading.lexicon)}")
    return [("Model alone", reading.raw), (corrected, reading.text)]


def merged_note(reading: Reading) -> str:
    """Which characters are merged classes (both cases in one class), or "" when none is."""
    merged = [(i, c.char) for i, c in enumerate(reading.chars, 1) if c.merged]
    if not merged:
        return ""
    shown = ", ".join(f"{i} ({ch})" for i, ch in merged[:20]) + (", …" if len(merged) > 20 else "")
    return (f"Either case: the model has one class for both cases of these characters, so their case is taken "
            f"from the rest of the word or the word list: character {shown}.")


def word_rows(reading: Reading) -> list[dict[str, str]]:
    """One row a word: what the model read, what the word list made of it, whether the word is in the list."""
    rows = []
    for i, w in enumerate(reading.words, 1):
        in_list = "—" if reading.lexicon == "none" else ("yes" if w.in_lexicon else "no")
        rows.append({"word": str(i), "model alone": w.raw, "corrected": w.text,
                     "changed": "yes" if w.raw != w.text else "", "in the word list": in_list})
    return rows


def top3_text(top: list[tuple[str, float]], k: int = 3) -> str:
    return " · ".join(f"{c} {p:.0%}" for c, p in top[:k])


# --- The crops ----------------------------------------------------------------------------------


@dataclass
class CropCell:
    index: int  # 1-based, in reading order
    char: str
    image: Image.Image  # the 28x28 the model saw, enlarged
    caption: str
    merged: bool


def crop_cells(reading: Reading, limit: int = MAX_CROPS, scale: int = CROP_SCALE) -> list[CropCell]:
    """The characters' 28x28 images in reading order, each captioned with what was read and its top-3."""
    cells = []
    for i, c in enumerate(reading.chars[:limit], 1):
        either = " (either case)" if c.merged else ""
        lines = [f"{i}: **{md_text(c.char, 8)}**{either}"] + [md_text(f"{t} {p:.0%}", 20) for t, p in c.top[:3]]
        caption = "  \n".join(lines)  # (markdown: a line each)
        cells.append(CropCell(i, c.char, model_view(c.image, scale), caption, c.merged))
    return cells


# --- The input with its boxes ----------------------------------------------------------------------------------


def shown_image(image: Any, size: int = MAX_SHOWN) -> tuple[Image.Image, float] | None:
    """An RGB copy of the input to draw on, at most size pixels wide and high, and its scale (shown pixels per
    input pixel); None when it cannot be shown. Transparency is flattened onto a background that contrasts with
    the strokes (as the reader does)."""
    try:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
        if not isinstance(image, Image.Image) or image.width < 1 or image.height < 1:
            return None
        im = preview(image, size)
        if im is None:
            return None
        scale = im.width / image.width
        if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
            rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
            alpha = rgba[..., 3:] / 255
            opaque = alpha[..., 0] > 0.5
            strokes = rgba[..., :3][opaque].mean() if opaque.any() else 0.0
            background = 255.0 if strokes < 128 else 0.0
            rgb = rgba[..., :3] * alpha + background * (1 - alpha)
            im = Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), "RGB")
        return im.convert("RGB"), scale
    except Exception:  # shown only: a picture the reader read but Pillow cannot redraw costs the figure, no more
        log.warning("cannot show the input image", exc_info=True)
        return None


def _label(c: CharReading) -> str:
    return f"{c.char} (either case)<br>{top3_text(c.top)}" if c.merged else f"{c.char}<br>{top3_text(c.top)}"


def boxes_figure(image: Any, reading: Reading) -> go.Figure | None:
    """The input with a box around each character read (alternating colours by word) and the character above
    it (red when its case comes from the word: a merged class); hovering a label gives its top-3. None when the
    image cannot be shown."""
    shown = shown_image(image)
    if shown is None:
        return None
    im, s = shown
    w, h = im.size
    label = LABEL_HEIGHT * w / FIGURE_WIDTH  # a label's height in shown pixels
    highest = min((c.box[1] * s for c in reading.chars), default=h)
    room = max(0.0, label - highest)  # room above the image for the labels of the highest boxes
    fig = go.Figure(go.Image(z=np.asarray(im), hoverinfo="skip"))
    xs, ys, texts, hovers, colours = [], [], [], [], []
    for n, word in enumerate(reading.words):
        colour = WORD_COLOURS[n % len(WORD_COLOURS)]
        for c in word.chars:
            left, top, right, bottom = (v * s - 0.5 for v in c.box)  # box edges -> centres of the shown pixels
            fig.add_shape(type="rect", x0=left, y0=top, x1=right, y1=bottom, line={"color": colour, "width": 2})
            xs.append((left + right) / 2)
            ys.append(top)  # the label is drawn above this point
            texts.append(c.char)
            hovers.append(_label(c))
            colours.append(MERGED_COLOUR if c.merged else colour)
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="text", text=texts, textposition="top center", hovertext=hovers,
                             hoverinfo="text", textfont={"size": 18, "color": colours}, cliponaxis=False,
                             showlegend=False))
    height = int(np.clip(FIGURE_WIDTH * (h + room) / w, 120, 600)) + 20
    fig.update_layout(height=height, margin={"l": 0, "r": 0, "t": 10, "b": 10}, showlegend=False,
                      dragmode=False)
    fig.update_xaxes(visible=False, range=[-0.5, w - 0.5])
    fig.update_yaxes(visible=False, range=[h - 0.5, -0.5 - room], scaleanchor="x", constrain="domain",
                     constraintoward="top")
    return fig
