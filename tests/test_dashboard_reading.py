"""The predictor page's "Read a line" mode: dashboard/reading_view.py's pure functions on hand-made readings,
reading real and hostile inputs with a tiny experiment's model, and the mode itself through Streamlit's AppTest
(real app.py, uploads through the file_uploader). The browser test is tests/test_dashboard_e2e.py's."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from streamlit.testing.v1 import AppTest

from dashboard import inputs, line_reader, reading_view
from dashboard import predictor as page
from dashboard.common import ENV_RESULTS, open_experiment
from tests.conftest import render_char
from tests.test_dashboard_predictor import bomb_png, png16_bytes, rgba_bytes
from training.lexicon import Lexicon, LexiconError
from training.reading import CharReading, Reading, WordReading

pytestmark = pytest.mark.usefixtures("loopback_server")  # the page serves on loopback (tests/conftest.py)

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "dashboard" / "app.py")


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def word_image(chars: str = "3141", seed: int = 0, size: int = 84, gap: int = 8) -> np.ndarray:
    """Generated glyphs side by side (white on black, uint8): a 'word' of separate characters."""
    rng = np.random.default_rng(seed)
    tiles = [np.asarray(Image.fromarray(render_char(c, rng)).resize((size, size), Image.Resampling.BICUBIC))
             for c in chars]
    return np.pad(np.concatenate([t[:, size // 6: -size // 6] for t in tiles], axis=1), ((10, 10), (gap, gap)))


def _char(ch: str, box=(0, 0, 10, 20), merged: bool = False, top=None) -> CharReading:
    top = top or [(ch.upper() if merged else ch, 0.7), ("x", 0.2), ("y", 0.05)]
    return CharReading(ch, box, np.full((28, 28), 7, np.uint8), top, merged)


def _reading(lexicon: str = "english") -> Reading:
    """'cat' read as 'cot' (c and o merged classes), then '42' unchanged, in a 400x100 image."""
    cat = WordReading("cat", "cot", [_char("c", (10, 20, 40, 80), True), _char("a", (45, 30, 70, 80)),
                                     _char("t", (75, 10, 100, 80))], in_lexicon=True)
    num = WordReading("42", "42", [_char("4", (200, 15, 240, 85)), _char("2", (250, 15, 290, 85))])
    return Reading("cat 42", "cot 42", [cat, num], lexicon, (400, 100))


# --- Pure functions ------------------------------------------------------------------------------


def test_texts_side_by_side_and_the_merged_characters():
    r = _reading()
    assert reading_view.text_panels(r) == [("Model alone", "cot 42"),
                                           ("Corrected with the English word list", "cat 42")]
    none = _reading("none")
    assert reading_view.text_panels(none)[1][0] == "Corrected (no word list: the model alone)"
    assert reading_view.lexicon_label("mine.txt") == "word list mine.txt"
    note = reading_view.merged_note(r)
    assert note.startswith("Either case") and note.endswith("character 1 (c).")
    r.words[0].chars[0].merged = False
    assert reading_view.merged_note(r) == ""
    rows = reading_view.word_rows(_reading())
    assert [(w["model alone"], w["corrected"], w["changed"], w["in the word list"]) for w in rows] == [
        ("cot", "cat", "yes", "yes"), ("42", "42", "", "no")]
    assert {w["in the word list"] for w in reading_view.word_rows(none)} == {"—"}


def test_crops_in_reading_order_with_their_top3():
    cells = reading_view.crop_cells(_reading())
    assert [c.char for c in cells] == list("cat42") and [c.index for c in cells] == [1, 2, 3, 4, 5]
    # captions are markdown, a line each: what was read, then its top 3
    assert cells[0].caption == "1: **c** (either case)  \nC 70%  \nx 20%  \ny 5%" and cells[0].merged
    assert cells[1].caption == "2: **a**  \na 70%  \nx 20%  \ny 5%"
    odd = Reading("*", "*", [WordReading("*", "*", [_char("*", top=[("*", 0.9), ("[x](y)", 0.1)])])])
    assert reading_view.crop_cells(odd)[0].caption == "1: **\\***  \n\\* 90%  \n\\[x\\]\\(y\\) 10%"
    assert all(c.image.size == (28 * reading_view.CROP_SCALE,) * 2 for c in cells)
    assert len(reading_view.crop_cells(_reading(), limit=2)) == 2


def test_boxes_figure_draws_each_box_on_the_image():
    image = Image.new("L", (400, 100), 0)
    fig = reading_view.boxes_figure(image, _reading())
    shapes = fig.layout.shapes
    assert fig.data[0].type == "image" and len(shapes) == 5
    shown, scale = reading_view.shown_image(image)
    assert shown.mode == "RGB" and shown.size == (400, 100) and scale == 1
    assert np.asarray(fig.data[0].z).shape == (100, 400, 3)
    assert (shapes[0].x0, shapes[0].y0) == pytest.approx((10 * scale - 0.5, 20 * scale - 0.5))
    assert (shapes[0].x1, shapes[0].y1) == pytest.approx((40 * scale - 0.5, 80 * scale - 0.5))
    assert shapes[0].line.color == shapes[2].line.color != shapes[3].line.color  # words alternate colours
    labels = fig.data[1]
    assert list(labels.text) == list("cat42")
    assert labels.textfont.color[0] == reading_view.MERGED_COLOUR != labels.textfont.color[1]
    assert "C 70%" in labels.hovertext[0]
    # a small image is enlarged (prediction_view.preview: to half of MAX_SHOWN, whole pixels) and its boxes with it
    fig = reading_view.boxes_figure(Image.new("L", (100, 25), 0), _reading())
    assert np.asarray(fig.data[0].z).shape == (175, 700, 3) and fig.layout.shapes[0].x1 == 40 * 7 - 0.5


def test_a_large_input_is_shown_smaller_with_its_boxes():
    big = Image.new("L", (4000, 1000), 0)
    r = _reading()
    r.size = big.size
    fig = reading_view.boxes_figure(big, r)
    z = np.asarray(fig.data[0].z)
    assert z.shape == (350, reading_view.MAX_SHOWN, 3)
    assert fig.layout.shapes[4].x1 == pytest.approx(290 * 1400 / 4000 - 0.5)
    assert 120 <= fig.layout.height <= 640


@pytest.mark.parametrize("kind", ["dark on transparent", "light on transparent", "16-bit", "canvas", "P", "bad"])
def test_shown_image_of_any_input(kind):
    glyph = word_image("1", size=56)
    if kind == "dark on transparent":
        img = Image.open(io.BytesIO(rgba_bytes(glyph)))  # black strokes, alpha = ink
    elif kind == "light on transparent":
        rgba = np.zeros(glyph.shape + (4,), np.uint8)
        rgba[..., :3], rgba[..., 3] = 255, glyph
        img = Image.fromarray(rgba, "RGBA")
    elif kind == "16-bit":
        img = Image.open(io.BytesIO(png16_bytes(glyph)))
    elif kind == "canvas":
        img = np.dstack([glyph] * 3 + [np.full_like(glyph, 255)])
    elif kind == "P":
        img = Image.fromarray(glyph).convert("P")
    else:
        assert reading_view.shown_image("not an image") is None
        assert reading_view.shown_image(np.zeros((0, 5), np.uint8)) is None
        return
    shown, scale = reading_view.shown_image(img)
    a = np.asarray(shown, dtype=float).mean(2)
    assert shown.mode == "RGB" and scale > 0
    ink = np.asarray(Image.fromarray(glyph).resize(shown.size)) > 128
    assert abs(a[ink].mean() - a[~ink].mean()) > 100, kind  # the strokes stand out from the background


def test_read_image_turns_every_failure_into_a_message():
    class Fake:
        def __init__(self, result):
            self.result = result

        def read(self, image, lexicon=None, k=3):
            if isinstance(self.result, Exception):
                raise self.result
            return self.result

    assert reading_view.read_image(Fake(None), None)[1].startswith("No input yet")
    blank = Reading("", "", message="no writing found: the image is blank")
    assert reading_view.read_image(Fake(blank), "img") == (None, "No writing found: the image is blank.")
    assert reading_view.read_image(Fake(Reading("", "")), "img") == (None, "No writing found.")
    none, message = reading_view.read_image(Fake(LexiconError("word list x.txt holds no words")), "img")
    assert none is None and message == "The word list cannot be used: word list x.txt holds no words."
    none, message = reading_view.read_image(Fake(IndexError("boom")), "img")
    assert none is None and message == "The model could not read this input (IndexError: boom)."
    r = _reading()
    assert reading_view.read_image(Fake(r), "img") == (r, "")


def test_user_word_lists():
    lex = reading_view.user_lexicon(b"# mine\nhello 10\nWorld\n\n", "../../etc/my words.txt")
    assert isinstance(lex, Lexicon) and lex.name == "my words.txt" and "hello" in lex and lex.form("world") == "World"
    bad = [(b"", "holds no words"), (b"\xff\xfe\x00bad", "not UTF-8"), (b"a\x00b\n", "NUL"),
           (b"one two three\n", "line 1")]
    for data, expected in bad:
        with pytest.raises(LexiconError, match=expected) as e:
            reading_view.user_lexicon(data, "w.txt")
        assert "emnist-words-" not in str(e.value) and "w.txt" in str(e.value)  # the upload's name, no server path


def test_user_word_list_size_limit(monkeypatch):
    monkeypatch.setattr(reading_view, "MAX_USER_WORDS", 3)
    with pytest.raises(LexiconError, match="4 words: at most 3"):
        reading_view.user_lexicon(b"a\nb\nc\nd\n", "w.txt")


# --- Reading with a tiny experiment's model --------------------------------------------------------------------


# The tests here are about the trials: on a copy without the final stage's folder, the page starts with the
# best trial (tests/test_dashboard_predictor.py does the same).
@pytest.fixture(scope="module")
def trials_root(tiny_experiment, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reading") / "results"
    shutil.copytree(tiny_experiment / "tiny", root / "tiny", ignore=shutil.ignore_patterns("final"))
    return root


@pytest.fixture(scope="module")
def best_predictor(trials_root):
    return page.load_predictor(trials_root, open_experiment(trials_root, "tiny").best_checkpoint())


def _read_upload(predictor, data: bytes, lexicon=None):
    inp = inputs.read_upload(data)
    if inp.error:
        return None, inp.error, inp.notes
    return (*reading_view.read_image(predictor, inp.image, lexicon), inp.notes)


def test_reading_a_word_and_hostile_uploads(best_predictor):
    word = word_image("3141")
    r, message, notes = _read_upload(best_predictor, _encode(Image.fromarray(word)))
    assert message == "" and not notes and len(r.chars) == 4 and r.size == (word.shape[1], word.shape[0])
    assert all(set(c.char) <= set("0123456789") and len(c.top) == 3 for c in r.chars)
    lefts = [c.box[0] for c in r.chars]
    assert lefts == sorted(lefts)  # reading order
    fig = reading_view.boxes_figure(Image.fromarray(word), r)
    assert len(fig.layout.shapes) == 4
    # Transparent and 16-bit words read as the plain one; blank, non-images and bombs get messages.
    for data, note in [(rgba_bytes(word), "Transparent"), (png16_bytes(word), "16-bit")]:
        other, message, notes = _read_upload(best_predictor, data)
        assert message == "" and other.raw == r.raw and note in " ".join(notes)
    cases = [(_encode(Image.new("L", (700, 160), 255)), "No writing found"),
             (_encode(Image.new("RGBA", (300, 80), (0, 0, 0, 0))), "No writing found"),
             (b"just text\n" * 30, "not an image"), (bomb_png(), "too large"), (b"", "empty")]
    for data, expected in cases:
        none, message, _ = _read_upload(best_predictor, data)
        assert none is None and expected in message, (expected, message)


@pytest.mark.parametrize("ink", list(inputs.INK))
def test_reading_the_canvas(best_predictor, ink):
    fg, bg = inputs.INK[ink]
    form = line_reader.LINE_FORM
    img = Image.new("RGBA", (form.width, form.height), bg)
    r, message = reading_view.read_image(best_predictor, inputs.read_canvas(np.asarray(img)).image)
    assert r is None and message.startswith("No writing found"), message  # a blank canvas
    d = ImageDraw.Draw(img)
    for x in (60, 200, 340):  # three strokes: a "1", a "7", a "1"
        d.line([(x, 30), (x, 130)] if x != 200 else [(170, 30), (240, 30), (195, 130)], fill=fg, width=form.stroke)
    r, message = reading_view.read_image(best_predictor, inputs.read_canvas(np.asarray(img)).image)
    assert message == "" and len(r.chars) == 3, (message, r and r.raw)


# --- The mode in the page (AppTest) ------------------------------------------------------------------------


def _texts(elements) -> list[str]:
    return [str(e.value) for e in elements]


def _line_mode(monkeypatch, root: Path) -> AppTest:
    monkeypatch.setenv(ENV_RESULTS, str(root))
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.sidebar.radio[0].set_value("Predictor").run()
    at.radio(key="predictor_mode").set_value(page.READ_LINE).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _upload(at: AppTest, name: str, data: bytes, mime: str = "image/png") -> AppTest:
    at.file_uploader(key="reader_upload").set_value((name, data, mime)).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_page_reads_an_uploaded_word(monkeypatch, trials_root, best_predictor):
    at = _line_mode(monkeypatch, trials_root)
    assert any("see what the model reads" in t for t in _texts(at.info)) and not at.error
    assert not [u for u in at.file_uploader if u.key == "predictor_upload"]
    data = _encode(Image.fromarray(word_image("3141")))
    expected, _ = reading_view.read_image(best_predictor, inputs.read_upload(data).image,
                                          line_reader._english())
    _upload(at, "word.png", data)
    assert not at.error and not at.warning, _texts(at.error) + _texts(at.warning)
    assert _texts(at.code) == [expected.raw, expected.text]
    titles = [t for t in _texts(at.markdown) if t.startswith("**Model alone") or t.startswith("**Corrected")]
    assert titles == ["**Model alone**", "**Corrected with the English word list**"]
    assert len(at.get("plotly_chart")) == 1  # the boxes figure
    captions = [c for img in at.get("image") for c in img.captions]
    assert captions == [c.caption for c in reading_view.crop_cells(expected)] and len(captions) == len(expected.chars)
    assert len(at.dataframe) == 1
    # The model alone: the same characters, no table; back to one character: today's page.
    at.radio(key="reader_lexicon").set_value("None (the model alone)").run()
    assert _texts(at.code) == [expected.raw, expected.raw] and not at.dataframe and not at.error
    at.radio(key="predictor_mode").set_value(page.ONE_CHARACTER).run()
    assert not at.exception and not at.code and at.file_uploader(key="predictor_upload")


def test_page_bad_inputs_get_messages(monkeypatch, trials_root):
    at = _line_mode(monkeypatch, trials_root)
    at.radio(key="reader_lexicon").set_value("None (the model alone)").run()
    bad = [("blank.png", _encode(Image.new("L", (700, 160), 0)), "no writing found"),
           ("clear.png", _encode(Image.new("RGBA", (700, 160), (0, 0, 0, 0))), "no writing found"),
           ("notes.png", b"just some text\n" * 50, "not an image"),
           ("bomb.png", bomb_png(), "too large")]
    for name, data, expected in bad:
        _upload(at, name, data)
        errors = _texts(at.error)
        assert len(errors) == 1 and expected in errors[0].lower(), (name, errors)
        assert not at.get("plotly_chart") and not at.code
    # the app keeps working: a word after them
    _upload(at, "word.png", _encode(Image.fromarray(word_image("77"))))
    assert not at.error and len(at.code) == 2 and len(at.get("plotly_chart")) == 1
    # the canvas in AppTest (no browser): the page says so or waits for a drawing, never a traceback
    at.radio(key="reader_source").set_value("Draw").run()
    assert not at.exception and not at.code


def test_page_reads_with_a_users_word_list(monkeypatch, trials_root, best_predictor):
    at = _line_mode(monkeypatch, trials_root)
    at.radio(key="reader_lexicon").set_value(line_reader.OWN).run()
    assert any("model's alone" in t for t in _texts(at.caption))
    at.file_uploader(key="reader_words").set_value(("digits.txt", b"\xff\xfe\x00 not text", "text/plain")).run()
    _upload(at, "word.png", _encode(Image.fromarray(word_image("3141"))))
    warnings = _texts(at.warning)
    assert len(warnings) == 1 and "not UTF-8" in warnings[0] and "model's alone" in warnings[0], warnings
    assert len(at.code) == 2 and not at.error
    at.file_uploader(key="reader_words").set_value(("digits.txt", b"3141 100\n7 5\n", "text/plain")).run()
    assert not at.exception and not at.warning and not at.error
    assert "**Corrected with word list digits\\.txt**" in _texts(at.markdown)  # (markdown-escaped: common.md_text)
