"""The predictor page's "Read a line" mode: a wide canvas or an upload, a word list (English, none, or the user's
own), and what the chosen model reads there (training.predict.Predictor.read): the two texts side by side, the
input with its characters' boxes, the 28x28 crops with their top-3. Streamlit glue only: what is shown comes from
dashboard/reading_view.py, the input from dashboard/inputs.py (the same safe reading and limits as one character).
Nothing here raises into Streamlit for bad input: every failure becomes a message in the page.
"""

from __future__ import annotations

from collections.abc import Callable

import streamlit as st

from dashboard.common import md_text
from dashboard.inputs import InputForm, input_widgets
from dashboard.reading_view import (
    boxes_figure,
    crop_cells,
    merged_note,
    read_image,
    sentence,
    shown_image,
    text_panels,
    user_lexicon,
    word_rows,
)
from dashboard.safety import MAX_UPLOAD_MB
from training.lexicon import ENGLISH, Lexicon, LexiconError, english
from training.predict import Predictor
from training.reading import Reading

LINE_FORM = InputForm(
    "reader", "Image of a line of writing", "Upload an image of a line of handwriting: a word or a few.",
    "Write a word or a few across the canvas, the letters as tall as it allows and apart from each other. "
    "Use the canvas toolbar to undo or clear.",
    width=700, height=160, stroke=10, preview=False)  # the figure of the boxes shows an upload
CROPS_PER_ROW = 10
OWN = "Your own word list"
LEXICONS = {"English": ENGLISH, "None (the model alone)": "none", OWN: "file"}


@st.cache_resource(show_spinner="Loading the English word list (once)…")
def _english() -> Lexicon:
    return english()


@st.cache_resource(max_entries=4, show_spinner="Indexing your word list…")
def _own_words(data: bytes, name: str) -> Lexicon:
    return user_lexicon(data, name)  # a LexiconError is not cached: the next run says it again


def _lexicon_widgets() -> tuple[str, object]:
    """The word list asked for: (ENGLISH, "none" or "file"; the uploaded file, when "file")."""
    choice = st.radio("Word list", list(LEXICONS), horizontal=True, key="reader_lexicon",
                      help="The word list corrects what the model read towards the likeliest word "
                           "(its probabilities, the word's frequency and the edits between them).")
    spec = LEXICONS[choice]
    if spec != "file":
        return spec, None
    uploaded = st.file_uploader("Word list (UTF-8 text: a word a line, optionally followed by its count)",
                                type=["txt"], key="reader_words", max_upload_size=MAX_UPLOAD_MB)
    if uploaded is None:
        st.caption("Until a word list is uploaded, the text is the model's alone.")
    return spec, uploaded


def _load_lexicon(spec: str, uploaded) -> tuple[Lexicon | None, str]:
    """(the word list, or None for the model alone; why the chosen one cannot be used, or "")."""
    try:
        if spec == ENGLISH:
            return _english(), ""
        if spec == "none" or uploaded is None:
            return None, ""
        if uploaded.size > MAX_UPLOAD_MB * 2**20:
            return None, f"The word list is larger than {MAX_UPLOAD_MB} MB. The text is the model's alone."
        return _own_words(uploaded.getvalue(), uploaded.name), ""
    except (LexiconError, OSError, ImportError) as e:
        return None, f"{sentence(str(e))} The text is the model's alone."


def render(load: Callable[[], Predictor | None]) -> None:
    """The mode, below the page's model choice; `load` gives the chosen model (or reports why it cannot)."""
    left, right = st.columns([2, 1], gap="large")
    with left:
        inp = input_widgets(LINE_FORM)
    with right:
        spec, uploaded = _lexicon_widgets()
    predictor = load()
    if predictor is None:
        return
    for note in inp.notes:
        st.info(note, icon="ℹ️")
    if inp.error:
        st.error(inp.error, icon="⚠️")
        return
    if inp.image is None:
        st.info("Upload an image of a line of writing, or write on the canvas, to see what the model reads.")
        return
    lexicon, problem = _load_lexicon(spec, uploaded)  # (only now: the English list takes ~2 s the first time)
    if problem:
        st.warning(problem, icon="⚠️")
    with st.spinner("Reading…"):
        reading, message = read_image(predictor, inp.image, lexicon)
    if reading is None:
        st.error(message, icon="⚠️")
        shown = None if hasattr(inp.image, "shape") else shown_image(inp.image)  # (an array is the canvas's)
        if shown is not None:  # an upload: the figure of the boxes would have shown it
            st.image(shown[0], caption="The uploaded image")
        return
    _show(reading, inp.image)


def _show(reading: Reading, image) -> None:
    st.subheader("What the model reads")
    for col, (title, text) in zip(st.columns(2), text_panels(reading), strict=True):
        with col:
            st.markdown(f"**{md_text(title, 80)}**")
            st.code(text, language=None, wrap_lines=True)
    note = merged_note(reading)
    if note:
        st.caption(note)
    if reading.lexicon != "none":
        st.dataframe(word_rows(reading), hide_index=True)
    fig = boxes_figure(image, reading)
    if fig is None:
        st.caption("The input cannot be drawn here; the reading above is complete.")
    else:
        st.plotly_chart(fig, key="reader_boxes", config={"displayModeBar": False})
    cells = crop_cells(reading)
    st.markdown(f"**What the model saw: {len(reading.chars)} character(s) in reading order, each with its top 3**")
    for start in range(0, len(cells), CROPS_PER_ROW):  # a grid: each crop over its own caption
        for col, cell in zip(st.columns(CROPS_PER_ROW), cells[start : start + CROPS_PER_ROW], strict=False):
            with col:
                st.image(cell.image, caption=cell.caption)
    if len(reading.chars) > len(cells):
        st.caption(f"… and {len(reading.chars) - len(cells)} more characters (their boxes are in the figure above).")
