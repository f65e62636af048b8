"""Predictor: checkpoint -> top-k characters for images of any size, mode and polarity."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import render_char
from training.data import load_test
from training.inference import evaluate
from training.predict import Predictor

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits_predictor(digits_model):
    return digits_model


@pytest.fixture(scope="module")
def glyphs():
    rng = np.random.default_rng(123)
    return [(str(d), render_char(str(d), rng)) for d in range(10) for _ in range(3)]


def _top1(predictor, images):
    return [p.top[0][0] for p in predictor.predict(images)]


def test_topk_structure(digits_predictor, glyphs):
    pred, _ = digits_predictor
    p = pred.predict(glyphs[0][1], k=5)[0]
    assert p.found and len(p.top) == 5 and p.image.shape == (28, 28) and p.image.dtype == np.uint8
    probs = [q for _, q in p.top]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert len(pred.predict(glyphs[0][1], k=50)[0].top) == 10  # k capped at the class count


def test_correct_on_clean_glyphs(digits_predictor, glyphs):
    pred, _ = digits_predictor
    labels = [c for c, _ in glyphs]
    got = _top1(pred, [g for _, g in glyphs])
    assert np.mean([a == b for a, b in zip(got, labels, strict=True)]) >= 0.8


def _variants(g: np.ndarray) -> dict[str, object]:
    """The same character presented the ways users present it."""
    big = Image.fromarray(g).resize((280, 280), Image.BICUBIC)
    canvas = np.zeros((120, 200), np.uint8)
    canvas[70:98, 150:178] = g  # off-centre, small, on a large canvas
    rgba = np.zeros((140, 140, 4), np.uint8)
    rgba[..., 3] = np.asarray(Image.fromarray(g).resize((140, 140), Image.BICUBIC))  # ink only in alpha
    return {
        "inverted": Image.fromarray(255 - g),  # dark ink on white paper
        "off_centre": canvas,
        "scaled": big,
        "rgba_transparent": Image.fromarray(rgba, "RGBA"),
        "rgb_dark_on_light": Image.fromarray(np.stack([255 - g] * 3, -1)),
    }


@pytest.mark.parametrize("variant", ["inverted", "off_centre", "scaled", "rgba_transparent", "rgb_dark_on_light"])
def test_presentations_give_the_same_answer(digits_predictor, glyphs, variant):
    pred, _ = digits_predictor
    plain = _top1(pred, [g for _, g in glyphs])
    varied = _top1(pred, [_variants(g)[variant] for _, g in glyphs])
    agree = np.mean([a == b for a, b in zip(plain, varied, strict=True)])
    assert agree >= 0.9, f"{variant}: only {agree:.0%} of predictions unchanged"


def test_blank_inputs_are_not_guessed(digits_predictor, glyphs):
    pred, _ = digits_predictor
    blank_rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    results = pred.predict([np.zeros((28, 28), np.uint8), Image.new("L", (50, 80), 255), blank_rgba, glyphs[0][1]])
    for r in results[:3]:
        assert not r.found and "no character found" in r.message
    assert results[3].found  # a batch with blanks still predicts the rest


def test_cli(digits_predictor, glyphs, tmp_path):
    _, ckpt = digits_predictor
    Image.fromarray(255 - glyphs[0][1]).save(tmp_path / "char.png")
    Image.new("L", (40, 40), 255).save(tmp_path / "blank.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    cmd = [sys.executable, str(REPO / "training" / "predict.py"), str(ckpt), str(tmp_path / "char.png")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{tmp_path / 'char.png'}: ") and len(r.stdout.split()) == 1 + 2 * 5
    r = subprocess.run(cmd[:-1] + [str(tmp_path / "blank.png"), str(tmp_path / "junk.png"), "--json"],
                       capture_output=True, text=True, timeout=120)
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert r.returncode == 1 and "no character found" in lines[0]["message"] and lines[1]["message"].startswith("error")
    r = subprocess.run(cmd[:2] + [str(tmp_path / "junk.png"), str(tmp_path / "char.png")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "error:" in r.stderr


@pytest.mark.slow
def test_predictor_matches_raw_evaluation_on_real_test_images(real_run, real_data_dir):
    """EMNIST images must pass through the predictor's preprocessing essentially unchanged."""
    _, result = real_run
    pred = Predictor.from_checkpoint(result.checkpoint)
    x, y, classes = load_test("bymerge", real_data_dir)
    rng = np.random.default_rng(0)
    idx = rng.choice(len(x), 3000, replace=False)
    x, y = x[idx], y[idx]
    _, raw_acc, _ = evaluate(pred.model, x, y, precision="fp32")
    got = _top1(pred, list(x.numpy()))
    via_predictor = np.mean([g == classes[t] for g, t in zip(got, y.tolist(), strict=True)])
    assert abs(via_predictor - raw_acc) <= 0.02, (via_predictor, raw_acc)


def as_a_user_would(image: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """An EMNIST test image the way a user draws or uploads one: dark ink on a white page, several
    times larger (smoothly resampled), somewhere off-centre on a bigger canvas."""
    scale = int(rng.integers(3, 7))
    glyph = Image.fromarray(255 - image).resize((28 * scale, 28 * scale), Image.BICUBIC)
    page = Image.new("L", (28 * scale + int(rng.integers(40, 200)), 28 * scale + int(rng.integers(40, 200))), 255)
    left, top = rng.integers(0, page.width - glyph.width), rng.integers(0, page.height - glyph.height)
    page.paste(glyph, (int(left), int(top)))
    return page


@pytest.mark.slow
def test_user_style_images_stay_close_to_raw_test_accuracy(real_run, real_data_dir):
    """Dark ink on white, larger, off-centre: the predictor's preparation brings such images back to
    what the model learnt from, within 2 points of its accuracy on the raw test images."""
    _, result = real_run
    pred = Predictor.from_checkpoint(result.checkpoint)
    x, y, classes = load_test("bymerge", real_data_dir)
    rng = np.random.default_rng(1)
    idx = rng.choice(len(x), 1500, replace=False)
    x, y = x[idx], y[idx]
    _, raw_acc, _ = evaluate(pred.model, x, y, precision="fp32")
    got = _top1(pred, [as_a_user_would(im, rng) for im in x.numpy()])
    user_acc = np.mean([g == classes[t] for g, t in zip(got, y.tolist(), strict=True)])
    assert abs(user_acc - raw_acc) <= 0.02, (user_acc, raw_acc)
