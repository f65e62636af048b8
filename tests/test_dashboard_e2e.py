"""End to end: the real dashboard, started as the README says (`python -m dashboard --results DIR`,
here from a folder other than the repository), in a real headless Chromium (trial explorer, final
model, predictor, and the predictor's "Read a line" mode on a word uploaded and one written on its canvas);
and a plain
`streamlit run /path/to/dashboard/app.py --server.address 0.0.0.0`, whose page refuses to serve.

Needs Debian's chromium at /usr/bin/chromium (`apt-get install -y chromium`) and the PyPI
`playwright` package; playwright's own browser downloads are never used. With EMNIST_DATA_DIR set,
the page browses the session's real smoke search (conftest.smoke_search: configs/search/smoke.yaml,
as tests/test_search.py runs it) and the uploaded image is a real EMNIST test character; without it,
a generated glyph and the tiny experiment are used.

The search's final stage (search/final.py) must have run: the Final model page is checked against
its summary.json. UPDATE_SCREENSHOT=1 also copies the screenshots to docs/.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dashboard import final_figures
from dashboard import predictor as page
from dashboard.common import ENV_RESULTS, open_experiment
from dashboard.safety import ALLOW_REMOTE_ENV
from tests.conftest import render_char

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 90_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def _page_model(root: Path, name: str):
    """The model the Predictor page starts with: the search's final model when it delivered one, else
    the best trial's checkpoint."""
    final, problem = page.final_option(root, name)
    assert not problem, problem
    return page.load_predictor(root, final.checkpoint if final else open_experiment(root, name).best_checkpoint())


def _delivered_accuracy(root: Path, name: str) -> str:
    """The delivered model's test accuracy as the Final model page writes it, from summary.json."""
    final = json.loads((root / name / "summary.json").read_text()).get("final")
    assert isinstance(final, dict), f"{name}'s summary.json has no \"final\": the search needs its final stage"
    key = final_figures.delivered_key(final)
    result = next(r for r in final_figures.final_results(final) if r["key"] == key)
    return f"{result['accuracy']:.4f}"


def _real_character(root: Path, data_dir: Path) -> tuple[bytes, str, float]:
    """A real EMNIST test image that the page's default model classifies right with high confidence
    (checked through the page's own upload path)."""
    from training.data import load_test

    predictor = _page_model(root, "smoke")
    x, y, classes = load_test("bymerge", data_dir)
    x, y = x[:3000], y[:3000]
    probs = predictor.probabilities(x)
    conf, pred = probs.max(1)
    ok = (pred == y).nonzero().flatten()
    for i in ok[conf[ok].argsort(descending=True)][:20].tolist():
        data = _png(x[i].numpy())
        got, _ = page.predict_upload(predictor, data)
        if got is not None and got.top[0][0] == classes[int(y[i])] and got.top[0][1] >= 0.9:
            return data, classes[int(y[i])], got.top[0][1]
    pytest.fail("no real test image is classified right with >= 90 % by the page's default model")


def _generated_character(root: Path) -> tuple[bytes, str, float]:
    """The generated digit glyph the page's default model (final model, else best trial) of the tiny
    experiment is most confident about (and right)."""
    predictor = _page_model(root, "tiny")
    rng = np.random.default_rng(11)
    best = None
    for d in "0123456789" * 3:
        big = Image.fromarray(render_char(d, rng)).resize((112, 112), Image.Resampling.BICUBIC)
        data = _png(np.asarray(big))
        got, _ = page.predict_upload(predictor, data)
        if got is not None and got.top[0][0] == d and (best is None or got.top[0][1] > best[2]):
            best = (data, d, got.top[0][1])
    assert best is not None, "the tiny experiment's default model gets no generated digit right"
    return best


class Server:
    """The dashboard's launcher (`python -m dashboard`) run in `cwd`, or the given streamlit flags."""

    def __init__(self, root: Path, log: Path, cwd: Path, streamlit_flags: list[str] | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {k: v for k, v in os.environ.items() if k not in (ENV_RESULTS, ALLOW_REMOTE_ENV)}
        env.update(PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
        if streamlit_flags is None:
            cmd = [sys.executable, "-m", "dashboard", "--results", str(root), "--port", str(self.port)]
        else:
            cmd = [sys.executable, "-m", "streamlit", "run", str(REPO / "dashboard" / "app.py"), "--server.port",
                   str(self.port), *streamlit_flags, "--", "--results", str(root)]
        self._log_file = open(log, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self._log_file, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"streamlit exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"streamlit did not come up in {timeout:.0f} s:\n{self.output()}")

    def output(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log_file.close()


def _wait_for_any(pw_page, texts: list[str], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        html = pw_page.content()
        found = [t for t in texts if t in html]
        if found:
            return found[0]
        time.sleep(0.5)
    raise AssertionError(f"none of {texts} appeared in the page within {timeout_s:.0f} s")


def _wait_idle(pw_page) -> None:
    """Until Streamlit has finished the script run (its 'Running…' status widget is gone)."""
    pw_page.wait_for_function("!document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=TIMEOUT_MS)


@pytest.mark.slow
def test_dashboard_in_chromium(request, tiny_experiment, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium); the browser test needs it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the PyPI playwright package is not installed")

    try:
        data_dir = request.getfixturevalue("real_data_dir")
    except pytest.skip.Exception as e:
        data_dir = None
        warnings.warn(f"real-character part skipped ({e.msg}); using a generated glyph instead", stacklevel=1)
    if data_dir is not None:
        root, search = request.getfixturevalue("smoke_search")
        assert search.returncode == 0, search.stdout[-2000:] + search.stderr[-2000:]
        image, label, prob = _real_character(root, data_dir)
        name = "smoke"
    else:
        root = tiny_experiment
        image, label, prob = _generated_character(root)
        name = "tiny"
    upload = tmp_path / f"character-{label}.png"
    upload.write_bytes(image)
    trial_ids = [str(t) for t in open_experiment(root, name).trials["trial_id"]]
    accuracy = _delivered_accuracy(root, name)

    elsewhere = tmp_path / "elsewhere"  # not the repository: no .streamlit/config.toml here
    elsewhere.mkdir()
    server = Server(root, tmp_path / "streamlit.log", cwd=elsewhere)
    shot = tmp_path / "dashboard.png"
    try:
        server.wait()
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            try:
                pw = browser.new_page(viewport={"width": 1400, "height": 1000})
                pw.set_default_timeout(TIMEOUT_MS)
                pw.goto(server.url, wait_until="domcontentloaded")
                # Trial explorer (the default page) lists the experiment's trials.
                _wait_for_any(pw, trial_ids, timeout_s=90)
                _wait_idle(pw)
                pw.locator(".js-plotly-plot").first.wait_for()
                pw.wait_for_timeout(800)  # let the charts draw
                pw.screenshot(path=str(tmp_path / "explorer.png"), full_page=False)

                # Final model page: its heading and the delivered model's test accuracy.
                pw.locator('[data-testid="stSidebar"]').get_by_text("Final model", exact=True).click()
                pw.locator("h2", has_text=f"Final model · {name}").wait_for()
                _wait_idle(pw)
                pw.locator('[data-testid="stMetricValue"]', has_text=accuracy).first.wait_for()
                pw.locator(".js-plotly-plot").first.wait_for()
                assert pw.locator('[data-testid="stException"]').count() == 0
                pw.wait_for_timeout(800)  # let the charts draw
                pw.screenshot(path=str(tmp_path / "final.png"), full_page=False)

                # Predictor page: the best trial is preselected; upload the character.
                pw.locator('[data-testid="stSidebar"]').get_by_text("Predictor", exact=True).click()
                pw.get_by_text("Image of one character").wait_for()
                _wait_idle(pw)
                pw.locator('input[type="file"]').set_input_files(str(upload))
                pw.locator("h3", has_text="Prediction:").wait_for()
                pw.get_by_text("What the model sees").wait_for()
                pw.locator(".js-plotly-plot").first.wait_for()
                _wait_idle(pw)
                heading = pw.locator("h3", has_text="Prediction:").inner_text()
                assert heading.startswith(f"Prediction: {label} ("), heading
                assert abs(float(heading.rsplit("(", 1)[1].rstrip("%) ")) / 100 - prob) < 0.0015, (heading, prob)
                # Top-5 chart + one per compared trial, no error boxes, no tracebacks.
                assert pw.locator(".js-plotly-plot").count() >= 2
                assert pw.locator('[data-testid="stException"]').count() == 0
                assert "Traceback" not in pw.content()
                # Streamlit scrolls inside its main container, not the document: grow the viewport
                # to the content so the screenshot shows the whole page (compare section included).
                height = pw.evaluate("Math.max(...[...document.querySelectorAll('[data-testid=\"stMain\"], "
                                     "[data-testid=\"stMainBlockContainer\"]')].map(e => e.scrollHeight), 1000)")
                pw.set_viewport_size({"width": 1400, "height": min(int(height) + 40, 4000)})
                pw.wait_for_timeout(800)  # let the charts redraw at the new size
                pw.screenshot(path=str(shot), full_page=True)
                # The drawing canvas works in a real browser too: draw a 7, get a prediction.
                pw.locator('[data-testid="stMain"]').get_by_text("Draw", exact=True).click()
                canvas = pw.locator("canvas").first
                canvas.wait_for()
                _wait_idle(pw)
                pw.get_by_text("Draw one character").wait_for()
                assert pw.locator("h3", has_text="Prediction:").count() == 0  # nothing drawn yet
                box = canvas.bounding_box()
                assert box and round(box["width"]) == page.CANVAS_SIZE, box
                pw.mouse.move(box["x"] + 70, box["y"] + 60)
                pw.mouse.down()
                for x, y in [(140, 60), (210, 60), (165, 145), (120, 230)]:
                    pw.mouse.move(box["x"] + x, box["y"] + y, steps=8)
                pw.mouse.up()
                pw.locator("h3", has_text="Prediction:").wait_for()
                _wait_idle(pw)
                assert pw.locator('[data-testid="stException"]').count() == 0
            finally:
                browser.close()
    except BaseException:
        print(server.output())
        raise
    finally:
        server.stop()

    assert shot.stat().st_size > 10_000
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, REPO / "docs" / "dashboard.png")
        shutil.copyfile(tmp_path / "explorer.png", REPO / "docs" / "explorer.png")
        shutil.copyfile(tmp_path / "final.png", REPO / "docs" / "final.png")


@pytest.mark.slow
def test_plain_streamlit_run_on_every_interface_refuses_in_chromium(tiny_experiment, tmp_path):
    """`streamlit run /abs/dashboard/app.py --server.address 0.0.0.0` without --allow-remote: the page
    explains and shows no experiment."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium); the browser test needs it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the PyPI playwright package is not installed")
    trial_ids = [str(t) for t in open_experiment(tiny_experiment, "tiny").trials["trial_id"]]
    server = Server(tiny_experiment, tmp_path / "streamlit.log", cwd=tmp_path,
                    streamlit_flags=["--server.address", "0.0.0.0", "--server.headless", "true",
                                     "--browser.gatherUsageStats", "false"])
    try:
        server.wait()
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            try:
                pw = browser.new_page()
                pw.set_default_timeout(TIMEOUT_MS)
                pw.goto(server.url, wait_until="domcontentloaded")
                _wait_for_any(pw, ["not served here"], timeout_s=90)
                _wait_idle(pw)
                html = pw.content()
                assert "python -m dashboard" in html and "--allow-remote" in html
                assert not [t for t in trial_ids if t in html]
                assert pw.locator('[data-testid="stException"]').count() == 0
            finally:
                browser.close()
    except BaseException:
        print(server.output())
        raise
    finally:
        server.stop()


@pytest.mark.slow
def test_read_a_line_in_chromium(tiny_experiment, tmp_path):
    """The predictor's "Read a line" mode in a real browser: upload a word, then write one on the wide canvas;
    each time the two texts, the boxes figure (one box per character) and the crops appear. The tiny
    experiment's models know generated digits only, so what they read is not checked, only what is shown."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium); the browser test needs it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the PyPI playwright package is not installed")
    from dashboard.line_reader import LINE_FORM
    from tests.test_dashboard_reading import word_image

    upload = tmp_path / "word.png"
    upload.write_bytes(_png(word_image("3141")))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    server = Server(tiny_experiment, tmp_path / "streamlit.log", cwd=elsewhere)

    def reading_shown(pw) -> tuple[list[str], int, int]:
        """(the two texts, boxes in the figure, captioned crops) once the reading is on the page."""
        pw.get_by_text("Model alone", exact=True).wait_for()
        pw.locator(".js-plotly-plot").first.wait_for()
        _wait_idle(pw)
        assert pw.locator('[data-testid="stException"]').count() == 0 and "Traceback" not in pw.content()
        assert pw.locator('[data-testid="stAlertContentError"]').count() == 0
        texts = [t.strip() for t in pw.locator('[data-testid="stCode"] code').all_inner_texts()]
        boxes = pw.evaluate("document.querySelector('.js-plotly-plot').layout.shapes.length")
        crops = pw.locator('[data-testid="stImageCaption"]').count()
        return texts, boxes, crops

    try:
        server.wait()
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            try:
                pw = browser.new_page(viewport={"width": 1400, "height": 1400})
                pw.set_default_timeout(TIMEOUT_MS)
                pw.goto(server.url, wait_until="domcontentloaded")
                pw.locator('[data-testid="stSidebar"]').get_by_text("Predictor", exact=True).wait_for()
                _wait_idle(pw)
                pw.locator('[data-testid="stSidebar"]').get_by_text("Predictor", exact=True).click()
                pw.get_by_text("Image of one character").wait_for()
                _wait_idle(pw)
                pw.locator('[data-testid="stMain"]').get_by_text("Read a line", exact=True).click()
                pw.get_by_text("Image of a line of writing", exact=True).wait_for()
                _wait_idle(pw)

                # An uploaded word: its texts, a box per character, the crops in order.
                pw.locator('input[type="file"]').set_input_files(str(upload))
                texts, boxes, crops = reading_shown(pw)
                assert len(texts) == 2 and all(texts), texts
                assert boxes == crops >= 1, (boxes, crops)
                pw.screenshot(path=str(tmp_path / "line-upload.png"), full_page=True)

                # Written on the wide canvas: three strokes, three characters apart from each other.
                pw.locator('[data-testid="stMain"]').get_by_text("Draw", exact=True).click()
                pw.get_by_text("Write a word or a few").wait_for()
                _wait_idle(pw)
                pw.get_by_text("Model alone", exact=True).wait_for(state="detached")  # nothing written yet
                canvas = pw.locator("canvas").first
                box = canvas.bounding_box()
                assert box and round(box["width"]) == LINE_FORM.width, box
                for stroke in ([(60, 30), (60, 130)], [(170, 30), (240, 30), (195, 130)], [(340, 30), (340, 130)]):
                    pw.mouse.move(box["x"] + stroke[0][0], box["y"] + stroke[0][1])
                    pw.mouse.down()
                    for x, y in stroke[1:]:
                        pw.mouse.move(box["x"] + x, box["y"] + y, steps=8)
                    pw.mouse.up()
                # Each stroke reruns the page; the last one's reading has the three strokes, each far from the
                # others: three characters, whatever the model makes of them.
                pw.wait_for_function("document.querySelector('.js-plotly-plot')?.layout?.shapes?.length === 3",
                                     timeout=TIMEOUT_MS)
                texts, boxes, crops = reading_shown(pw)
                assert len(texts) == 2 and all(texts), texts
                assert boxes == crops == 3, (boxes, crops)
                pw.screenshot(path=str(tmp_path / "line-draw.png"), full_page=True)
            finally:
                browser.close()
    except BaseException:
        print(server.output())
        raise
    finally:
        server.stop()
