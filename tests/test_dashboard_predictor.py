"""Predictor page: the pure input/prediction functions for every bad input, and the page itself
through Streamlit's AppTest (real app.py, real tiny experiment, uploads via the file_uploader)."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from streamlit.testing.v1 import AppTest

from dashboard import prediction_view
from dashboard import predictor as page
from dashboard.common import ENV_RESULTS, UnsafePath, open_experiment
from dashboard.safety import MAX_UPLOAD_MB
from tests.conftest import render_char
from training.checkpoint import CheckpointError
from training.predict import Predictor

# every test here: the page serves on loopback (see tests/conftest.py)
pytestmark = pytest.mark.usefixtures("loopback_server")

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "dashboard" / "app.py")


# --- Inputs ---------------------------------------------------------------------------------


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _glyph(ch: str = "7", seed: int = 0, size: int = 112) -> np.ndarray:
    """A generated digit glyph, upscaled like a user's image (white on black, uint8)."""
    g = render_char(ch, np.random.default_rng(seed))
    return np.asarray(Image.fromarray(g).resize((size, size), Image.Resampling.BICUBIC))


def _glyph_png(ch: str = "7", seed: int = 0) -> bytes:
    return _encode(Image.fromarray(_glyph(ch, seed)))


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit PNG of width x height pixels, all black: ~50 kB that decode to 400 Mpx."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row * 1000) for _ in range(height // 1000)) + z.compress(row * (height % 1000))
    body += z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def gif_bytes(frames: list[np.ndarray]) -> bytes:
    imgs = [Image.fromarray(f).convert("P") for f in frames]
    return _encode(imgs[0], "GIF", save_all=True, append_images=imgs[1:], duration=100, loop=0)


def rgba_bytes(glyph: np.ndarray) -> bytes:
    """Black strokes on a transparent background, transparent pixels stored as (0,0,0,0) like canvas apps."""
    rgba = np.zeros(glyph.shape + (4,), np.uint8)
    rgba[..., 3] = glyph
    return _encode(Image.fromarray(rgba, "RGBA"))


def png16_bytes(glyph: np.ndarray) -> bytes:
    img = Image.fromarray(glyph.astype(np.uint16) * 257)
    assert img.mode.startswith("I;16")
    return _encode(img)


def cmyk_jpeg_bytes(glyph: np.ndarray) -> bytes:
    # Black ink on white paper, as a print workflow would produce it.
    img = Image.fromarray(255 - glyph).convert("RGB").convert("CMYK")
    return _encode(img, "JPEG", quality=95)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(float).ravel(), b.astype(float).ravel())[0, 1])


@pytest.fixture(scope="module")
def exp(tiny_experiment):
    return open_experiment(tiny_experiment, "tiny")


@pytest.fixture(scope="module")
def best_predictor(tiny_experiment, exp) -> Predictor:
    return page.load_predictor(tiny_experiment, exp.best_checkpoint())


# The tests here are about the trials: they run on copies without the final stage's folder (the
# final model, offered first when there is one, is tests/test_dashboard_final.py's).
NO_FINAL = shutil.ignore_patterns("final")


@pytest.fixture(scope="module")
def trials_root(tiny_experiment, tmp_path_factory) -> Path:
    """The tiny experiment without its final model, shared by the tests that do not change it."""
    root = tmp_path_factory.mktemp("trials") / "results"
    shutil.copytree(tiny_experiment / "tiny", root / "tiny", ignore=NO_FINAL)
    return root


@pytest.fixture
def exp_copy(tiny_experiment, tmp_path) -> Path:
    """A private copy of the tiny experiment to break (the session fixture is shared)."""
    root = tmp_path / "results"
    shutil.copytree(tiny_experiment / "tiny", root / "tiny", ignore=NO_FINAL)
    return root


# --- Trials and checkpoints -----------------------------------------------------------------


def test_trial_options_best_first(exp):
    available, unavailable = page.trial_options(exp)
    assert [o.trial_id for o in available][0] == exp.best_trial
    assert {o.trial_id for o in available} == set(exp.trials["trial_id"]) and not unavailable
    assert all(o.checkpoint is not None and o.checkpoint.is_file() for o in available)
    accs = [o.val_acc for o in available[1:]]
    assert accs == sorted(accs, reverse=True)


def test_trial_without_checkpoint_is_unavailable(exp_copy):
    exp = open_experiment(exp_copy, "tiny")
    victim = sorted(exp.trials["trial_id"])[0]
    for d in (exp_copy / "tiny" / f"trial_{victim}").glob("checkpoint_*"):
        shutil.rmtree(d)
    available, unavailable = page.trial_options(open_experiment(exp_copy, "tiny"))
    assert victim not in [o.trial_id for o in available]
    assert [o.trial_id for o in unavailable] == [victim]
    assert unavailable[0].checkpoint is None and "checkpoint" in unavailable[0].reason


def test_predictor_is_cached_and_reloaded_when_the_file_changes(exp_copy):
    exp = open_experiment(exp_copy, "tiny")
    ckpt = exp.best_checkpoint()
    a, b = page.load_predictor(exp_copy, ckpt), page.load_predictor(exp_copy, str(ckpt))
    assert a is b
    st_ = ckpt.stat()
    os.utime(ckpt, ns=(st_.st_atime_ns, st_.st_mtime_ns + 10**9))
    assert page.load_predictor(exp_copy, ckpt) is not a


@pytest.mark.parametrize("kind", ["garbage", "truncated", "pickled", "missing"])
def test_unreadable_checkpoint_raises_checkpoint_error(exp_copy, kind):
    ckpt = open_experiment(exp_copy, "tiny").best_checkpoint()
    if kind == "garbage":
        ckpt.write_bytes(b"not a checkpoint at all")
    elif kind == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    elif kind == "pickled":
        torch.save({"model": {}, "config": {}, "classes": [], "epoch": 0, "evil": Path("/etc/passwd")}, ckpt)
    else:
        ckpt.unlink()
    with pytest.raises(CheckpointError):
        page.load_predictor(exp_copy, ckpt)


def test_checkpoint_outside_root_is_refused(exp_copy, tiny_experiment):
    outside = open_experiment(tiny_experiment, "tiny").best_checkpoint()  # a real checkpoint, other root
    with pytest.raises(UnsafePath):
        page.load_predictor(exp_copy, outside)


# --- Predictions for good and bad inputs ------------------------------------------------------


def test_best_trial_gives_sensible_top5_for_generated_digits(best_predictor):
    rng = np.random.default_rng(7)
    labels = [str(d) for d in range(10) for _ in range(5)]
    top1 = top5 = 0
    for ch in labels:
        data = _encode(Image.fromarray(render_char(ch, rng)).resize((112, 112), Image.Resampling.BICUBIC))
        pred, message = page.predict_upload(best_predictor, data)
        assert pred is not None and message == ""
        chars = [c for c, _ in pred.top]
        probs = [p for _, p in pred.top]
        assert len(chars) == 5 and len(set(chars)) == 5 and set(chars) <= set("0123456789")
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
        assert pred.image.shape == (28, 28) and pred.image.dtype == np.uint8 and pred.image.max() == 255
        top1 += chars[0] == ch
        top5 += ch in chars
    # 2 epochs on 600 generated glyphs: far from perfect, but far above chance (10 % / 50 %).
    assert top1 / len(labels) >= 0.35, top1
    assert top5 / len(labels) >= 0.7, top5


def test_plain_upload_has_no_notes(best_predictor):
    pred, message = page.predict_upload(best_predictor, _glyph_png())
    assert pred is not None and message == ""


@pytest.mark.parametrize("data, expected", [
    (b"", "empty"),
    (b"this is plain text, not an image\n" * 20, "not an image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "cannot be used"),  # PNG signature, garbage after it
])
def test_non_images_are_refused(best_predictor, data, expected):
    pred, message = page.predict_upload(best_predictor, data)
    assert pred is None and expected in message.lower()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_refused(best_predictor, fmt):
    data = _encode(Image.fromarray(_glyph(size=200)).convert("RGB"), fmt)
    pred, message = page.predict_upload(best_predictor, data[: len(data) // 2])
    assert pred is None
    assert "truncated" in message.lower() or "corrupt" in message.lower(), message


def test_decompression_bomb_is_refused(best_predictor):
    data = bomb_png()
    assert len(data) < 200_000  # small upload, huge image: the point of a bomb
    pred, message = page.predict_upload(best_predictor, data)
    assert pred is None and "too large" in message.lower(), message


def test_animated_gif_uses_first_frame_and_says_so(best_predictor):
    glyph, blank = _glyph("3"), np.zeros((112, 112), np.uint8)
    pred, message = page.predict_upload(best_predictor, gif_bytes([glyph, blank, _glyph("8")]))
    assert pred is not None and "Animated GIF with 3 frames: only the first frame is used" in message, message
    still = page.predict_upload(best_predictor, _encode(Image.fromarray(glyph).convert("P"), "GIF"))[0]
    assert np.array_equal(pred.image, still.image)
    # The first frame is blank: nothing is found, even though frame 2 holds a character.
    pred, message = page.predict_upload(best_predictor, gif_bytes([blank, glyph]))
    assert pred is None and "no character found" in message.lower() and "first frame" in message


def test_transparent_image(best_predictor):
    glyph = _glyph("4")
    plain = page.predict_upload(best_predictor, _encode(Image.fromarray(glyph)))[0]
    pred, message = page.predict_upload(best_predictor, rgba_bytes(glyph))
    assert pred is not None and "transparent" in message.lower()
    assert _corr(pred.image, plain.image) > 0.95
    # Fully transparent: nothing drawn.
    empty = _encode(Image.new("RGBA", (64, 64), (0, 0, 0, 0)))
    pred, message = page.predict_upload(best_predictor, empty)
    assert pred is None and "no character found" in message.lower()


def test_16bit_image(best_predictor):
    glyph = _glyph("5")
    plain = page.predict_upload(best_predictor, _encode(Image.fromarray(glyph)))[0]
    pred, message = page.predict_upload(best_predictor, png16_bytes(glyph))
    assert pred is not None and "16-bit" in message
    assert _corr(pred.image, plain.image) > 0.99
    assert pred.top[0][0] == plain.top[0][0]


def test_cmyk_image(best_predictor):
    glyph = _glyph("2")
    plain = page.predict_upload(best_predictor, _encode(Image.fromarray(glyph)))[0]
    pred, message = page.predict_upload(best_predictor, cmyk_jpeg_bytes(glyph))
    assert pred is not None and "CMYK" in message
    assert _corr(pred.image, plain.image) > 0.95


@pytest.mark.parametrize("colour", [0, 255, 128])
def test_blank_image_no_character_found(best_predictor, colour):
    data = _encode(Image.new("L", (200, 150), colour))
    pred, message = page.predict_upload(best_predictor, data)
    assert pred is None and message.startswith("No character found"), message


def _canvas(strokes: bool, ink: str) -> np.ndarray:
    """What st_canvas returns: RGBA, opaque background, 280x280, strokes 20 px wide."""
    fg, bg = page.INK[ink]
    img = Image.new("RGBA", (page.CANVAS_SIZE, page.CANVAS_SIZE), bg)
    if strokes:  # a "7"
        d = ImageDraw.Draw(img)
        d.line([(70, 60), (210, 60), (120, 230)], fill=fg, width=page.STROKE_WIDTH, joint="curve")
    return np.asarray(img)


def test_canvas_inputs(best_predictor):
    assert not page.read_canvas(None).ok and page.read_canvas(None).error == ""  # nothing drawn yet
    pred, message = page.predict_input(best_predictor, page.read_canvas(None))
    assert pred is None and "upload an image or draw" in message.lower()
    views = []
    for ink in page.INK:
        pred, message = page.predict_input(best_predictor, page.read_canvas(_canvas(True, ink)))
        assert pred is not None and message == "" and len(pred.top) == 5
        views.append(pred.image)
        pred, message = page.predict_input(best_predictor, page.read_canvas(_canvas(False, ink)))
        assert pred is None and message.startswith("No character found"), message
    assert _corr(*views) > 0.98  # polarity does not matter
    # Transparent blank canvas (no background colour) and a malformed array.
    pred, message = page.predict_input(best_predictor, page.read_canvas(np.zeros((280, 280, 4), np.uint8)))
    assert pred is None and message.startswith("No character found")
    assert "unexpected" in page.read_canvas(np.zeros((5,), np.uint8)).error


def test_model_view_and_figure():
    img = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    view = prediction_view.model_view(img)
    assert view.size == (224, 224)
    assert np.array_equal(np.asarray(view)[::8, ::8], img)  # nearest neighbour: pixels kept exactly
    fig = prediction_view.top_k_figure([("1", 0.6), ("7", 0.3), ("I", 0.05)])
    assert fig.layout.yaxis.type == "category" and list(fig.data[0].y) == ["'1'", "'7'", "'I'"]


# --- The page through AppTest ---------------------------------------------------------------


def _app(monkeypatch, root: Path) -> AppTest:
    monkeypatch.setenv(ENV_RESULTS, str(root))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    at.sidebar.radio[0].set_value("Predictor").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _texts(elements) -> list[str]:
    return [str(e.value) for e in elements]


def _upload(at: AppTest, name: str, data: bytes, mime: str = "image/png") -> AppTest:
    at.file_uploader(key="predictor_upload").set_value((name, data, mime)).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_page_defaults_to_best_trial(monkeypatch, trials_root, exp):
    at = _app(monkeypatch, trials_root)
    assert [h.value for h in at.header] == ["Predictor"]
    trial = at.selectbox(key="predictor_trial:tiny")
    assert trial.value == exp.best_trial and len(trial.options) == len(exp.trials)
    assert any("upload an image or draw" in t.lower() for t in _texts(at.info))
    assert not at.error and not at.get("plotly_chart")


def test_page_predicts_an_upload_and_compares_trials(monkeypatch, trials_root, best_predictor):
    at = _app(monkeypatch, trials_root)
    data = _glyph_png("1", seed=3)
    expected = page.predict_upload(best_predictor, data)[0].top[0]
    _upload(at, "one.png", data)
    assert not at.error, _texts(at.error)
    heading = [t for t in _texts(at.markdown) if t.startswith("### Prediction:")]
    assert heading == [f"### Prediction: `{expected[0]}` ({expected[1]:.1%})"]
    captions = [c for img in at.get("image") for c in img.captions]
    assert captions == ["Uploaded: one.png", "What the model sees (28×28)"]
    compare = at.multiselect(key="predictor_compare:tiny")
    assert len(compare.value) == 3
    assert len(at.get("plotly_chart")) == 1 + 3  # the top-5 chart and one per compared trial
    assert sum(t.startswith("Top-1:") for t in _texts(at.markdown)) == 3
    # A different trial, fewer to compare: the page follows.
    other = compare.value[1]
    at.selectbox(key="predictor_trial:tiny").set_value(other)
    at.multiselect(key="predictor_compare:tiny").set_value([other]).run()
    assert not at.exception and not at.error
    assert len(at.get("plotly_chart")) == 2


def test_page_bad_uploads_show_messages_and_the_app_keeps_working(monkeypatch, trials_root):
    at = _app(monkeypatch, trials_root)
    good = _glyph_png("8", seed=1)
    bad = [
        ("notes.png", b"just some text\n" * 50, "not an image"),
        ("cut.png", good[: len(good) // 2], "truncated"),
        ("bomb.png", bomb_png(), "too large"),
        ("blank.png", _encode(Image.new("L", (100, 100), 255)), "no character found"),
    ]
    for name, data, expected in bad:
        _upload(at, name, data)
        errors = _texts(at.error)
        assert len(errors) == 1 and expected in errors[0].lower(), (name, errors)
        assert not at.get("plotly_chart")
    _upload(at, "good.png", good)
    assert not at.error and any(t.startswith("### Prediction:") for t in _texts(at.markdown))


def test_page_notes_for_animated_gif(monkeypatch, trials_root):
    at = _app(monkeypatch, trials_root)
    g = _glyph("6")
    _upload(at, "anim.gif", gif_bytes([g, np.zeros_like(g)]), "image/gif")
    assert not at.error
    assert any("first frame" in t for t in _texts(at.info))
    assert any(t.startswith("### Prediction:") for t in _texts(at.markdown))


def test_page_trial_without_checkpoint_listed_as_unavailable(monkeypatch, exp_copy):
    exp = open_experiment(exp_copy, "tiny")
    victim = [t for t in exp.trials["trial_id"] if t != exp.best_trial][0]
    for d in (exp_copy / "tiny" / f"trial_{victim}").glob("checkpoint_*"):
        shutil.rmtree(d)
    at = _app(monkeypatch, exp_copy)
    assert not any(o.startswith(victim) for o in at.selectbox(key="predictor_trial:tiny").options)
    assert any(e.label.startswith("1 trial(s) unavailable") for e in at.expander)
    assert any(victim in t and "no checkpoint" in t for t in _texts(at.markdown))
    assert not at.error


def test_page_no_trial_has_a_checkpoint(monkeypatch, exp_copy):
    for d in (exp_copy / "tiny").glob("trial_*/checkpoint_*"):
        shutil.rmtree(d)
    at = _app(monkeypatch, exp_copy)
    assert "predictor_trial:tiny" not in [s.key for s in at.selectbox]
    errors = _texts(at.error)
    assert len(errors) == 1 and "has a checkpoint" in errors[0]
    assert len(at.expander) == 1


def test_page_unreadable_checkpoint(monkeypatch, exp_copy):
    from training.checkpoint import load_checkpoint, save_checkpoint

    exp = open_experiment(exp_copy, "tiny")
    # A checkpoint that reads but cannot become a model (its config names no registered model).
    # (Damaged files never get this far: the experiment listing skips them for an older readable one.)
    path = exp.best_checkpoint()
    ckpt = load_checkpoint(path)
    ckpt["config"]["model"] = "no_such_model"
    save_checkpoint(path, ckpt)
    at = _app(monkeypatch, exp_copy)
    assert at.selectbox(key="predictor_trial:tiny").value == exp.best_trial
    errors = _texts(at.error)
    assert errors and all(exp.best_trial in e and "could not be loaded" in e for e in errors), errors
    assert not any(str(exp_copy) in e for e in errors)  # no server paths in the page
    # The rest of the page still works: another trial predicts an upload.
    other = [t for t in exp.trials["trial_id"] if t != exp.best_trial][0]
    at.selectbox(key="predictor_trial:tiny").set_value(other).run()
    at.multiselect(key="predictor_compare:tiny").set_value([other]).run()
    _upload(at, "two.png", _glyph_png("2"))
    assert not at.error and any(t.startswith("### Prediction:") for t in _texts(at.markdown))


def test_page_empty_results_root(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_RESULTS, str(tmp_path))
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.sidebar.radio[0].set_value("Predictor").run()
    assert not at.exception
    assert any("No experiments" in t for t in _texts(at.info))


def test_page_keeps_the_server_defaults(monkeypatch, trials_root):
    """The upload limit is 5 MB (the widget's and the server's: dashboard/safety.py), only image types
    are offered, and the page has no way around the safe defaults (raw HTML, option changes, tracebacks)."""
    from streamlit import config

    at = _app(monkeypatch, trials_root)
    uploader = at.file_uploader(key="predictor_upload")
    assert uploader.proto.max_upload_size_mb == MAX_UPLOAD_MB == config.get_option("server.maxUploadSize") == 5
    assert sorted(t.lstrip(".") for t in uploader.proto.type) == sorted(page.UPLOAD_TYPES)
    for module in ("predictor.py", "final.py", "inputs.py", "line_reader.py", "reading_view.py"):
        source = (REPO / "dashboard" / module).read_text()
        for forbidden in ("unsafe_allow_html", "set_option", "st.exception", "st.html",
                          "components.v1.html", "traceback.", "exc_info=e"):
            assert forbidden not in source, (module, forbidden)
    toml = (REPO / ".streamlit" / "config.toml").read_text()
    assert 'address = "127.0.0.1"' in toml and "maxUploadSize = 5" in toml and 'showErrorDetails = "none"' in toml


def test_page_refuses_an_upload_over_the_limit(monkeypatch, trials_root):
    """Also when the server took it (a server started with a larger limit than the widget's)."""
    at = _app(monkeypatch, trials_root)
    big = _glyph_png("3") + b"\0" * (MAX_UPLOAD_MB * 2**20)
    _upload(at, "big.png", big)
    errors = _texts(at.error)
    assert len(errors) == 1 and f"larger than {MAX_UPLOAD_MB} MB" in errors[0]
    assert not any(t.startswith("### Prediction:") for t in _texts(at.markdown))


def test_page_trial_folder_outside_the_root_is_not_offered(monkeypatch, exp_copy, tmp_path):
    """A trial folder that is a symlink out of the results root: neither its settings nor its
    checkpoint are read, the page says so."""
    exp = open_experiment(exp_copy, "tiny")
    outside = tmp_path / "outside" / "trial_leak"
    shutil.copytree(exp_copy / "tiny" / f"trial_{exp.best_trial}", outside)
    rows = [json.loads(x) for x in (outside / "result.json").read_text().splitlines()]
    (outside / "result.json").write_text("".join(json.dumps({**r, "val_acc": 0.999}) + "\n" for r in rows))
    (exp_copy / "tiny" / "trial_leak").symlink_to(outside, target_is_directory=True)
    at = _app(monkeypatch, exp_copy)
    trial = at.selectbox(key="predictor_trial:tiny")
    assert trial.value == exp.best_trial and "leak" not in trial.options
    assert not [o for o in at.multiselect(key="predictor_compare:tiny").options if "leak" in o]
    warnings = _texts(at.warning)
    assert len(warnings) == 1 and "outside the results root" in warnings[0] and "leak" in warnings[0]
    assert not at.error


def test_page_switching_experiments(monkeypatch, tiny_experiment, tmp_path):
    """Each experiment gets its own trial choice and comparison defaults (no stale trial ids)."""
    root = tmp_path / "results"
    shutil.copytree(tiny_experiment / "tiny", root / "tiny", ignore=NO_FINAL)
    shutil.copytree(tiny_experiment / "tiny", root / "other", ignore=NO_FINAL)
    at = _app(monkeypatch, root)
    for name in ("tiny", "other", "tiny"):
        at.sidebar.selectbox(key="experiment").set_value(name).run()
        assert not at.exception and not at.error
        best = open_experiment(root, name).best_trial
        assert at.selectbox(key=f"predictor_trial:{name}").value == best
        assert len(at.multiselect(key=f"predictor_compare:{name}").value) == 3
