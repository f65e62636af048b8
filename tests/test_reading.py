"""Reading a line (training/reading.py, training/lexicon.py, Predictor.read, predict.py --read): the decoder on
hand-made probability tables with a known answer, the word lists, the Reading record, and the whole path on
generated lines with a model trained on generated digits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import render_char
from training.data import BUILTIN_CLASSES
from training.decoder import decode, decode_line, merged_classes
from training.lexicon import Lexicon, LexiconError, english, load_lexicon, read_word_list
from training.predict import main as predict_main
from training.reading import Reading, ReadingError

REPO = Path(__file__).resolve().parents[1]
BALANCED = list(BUILTIN_CLASSES["balanced"])


def table(*rows: dict[str, float]) -> np.ndarray:
    """Probability rows over the Balanced classes: the given ones, the rest shared evenly."""
    out = []
    for row in rows:
        p = np.zeros(len(BALANCED))
        for ch, v in row.items():
            p[BALANCED.index(ch)] = v
        rest = [i for i, c in enumerate(BALANCED) if c not in row]
        p[rest] = (1 - sum(row.values())) / len(rest)
        out.append(p)
    return np.stack(out)


def word(spans: list[tuple[int, int]], rows: list[dict[str, float]]):
    """One word over pieces 0..n: its spans and their probabilities."""
    probs = dict(zip(spans, table(*rows), strict=True))
    return [(0, max(j for _, j in spans), spans)], probs


def small_lexicon(tmp_path: Path, text: str, name: str = "words.txt") -> Lexicon:
    path = tmp_path / name
    path.write_text(text)
    return load_lexicon(path)


def test_merged_classes_are_the_letters_without_their_other_case():
    merged = merged_classes(BALANCED)
    assert merged == set("CIJKLMOPSUVWXYZ")
    assert not merged_classes([str(d) for d in range(10)])


def test_the_beam_chooses_the_segmentation_with_the_best_product():
    # pieces 0, 1, 2: "r" + "n" one by one, or "m" as one span, then "e". Each of r and n is the likeliest
    # character of its own piece, but m over both is far likelier than r times n.
    spans = [(0, 1), (1, 2), (0, 2), (2, 3), (1, 3)]
    words, probs = word(spans, [{"r": 0.6}, {"n": 0.5}, {"M": 0.95}, {"e": 0.9}, {"X": 0.3}])
    (d,) = decode(words, probs, BALANCED)
    assert d.raw == "me" and d.text == "me" and d.spans == ((0, 2), (2, 3)) and not d.in_lexicon


def test_a_wide_span_loses_to_two_confident_characters():
    spans = [(0, 1), (1, 2), (0, 2)]
    words, probs = word(spans, [{"t": 0.97}, {"O": 0.96}, {"M": 0.4}])
    (d,) = decode(words, probs, BALANCED)
    assert d.raw == "to" and d.spans == ((0, 1), (1, 2))


def test_a_word_no_span_covers_gives_none_and_the_others_read():
    probs = dict(zip([(0, 1), (2, 3)], table({"7": 0.9}, {"4": 0.9}), strict=True))
    out = decode([(0, 2, [(0, 1)]), (2, 3, [(2, 3)])], probs, BALANCED)
    assert out[0] is None and out[1].text == "4"


HELLO = [{"h": 0.9}, {"e": 0.9}, {"L": 0.9}, {"L": 0.9}, {"C": 0.6, "O": 0.3}]


def test_the_lexicon_corrects_a_word_the_model_misread(tmp_path):
    spans = [(i, i + 1) for i in range(5)]
    words, probs = word(spans, HELLO)
    assert decode(words, probs, BALANCED)[0].raw == "hellc"
    lex = small_lexicon(tmp_path, "hello 100\nhelp 5000\nworld 300\n")
    (d,) = decode(words, probs, BALANCED, lex)
    assert d.text == "hello" and d.raw == "hellc" and d.in_lexicon and len(d.spans) == 5


def test_words_are_letters_or_numbers():
    # the model alone prefers 1 and 0 in "hello" and O in "2024", a little: the word's other characters decide
    words, probs = word([(i, i + 1) for i in range(5)],
                        [{"h": 0.9}, {"e": 0.9}, {"1": 0.55, "L": 0.4}, {"L": 0.9}, {"0": 0.5, "O": 0.45}])
    assert decode(words, probs, BALANCED)[0].raw == "hello"
    words, probs = word([(i, i + 1) for i in range(4)], [{"2": 0.9}, {"O": 0.5, "0": 0.4}, {"2": 0.9}, {"4": 0.9}])
    assert decode(words, probs, BALANCED)[0].raw == "2024"
    # a sure digit stays one: "b4" is what was written
    words, probs = word([(0, 1), (1, 2)], [{"b": 0.9}, {"4": 0.98}])
    assert decode(words, probs, BALANCED)[0].raw == "b4"


def test_the_english_list_corrects_and_ranks_by_frequency():
    lex = english()
    assert len(lex) > 80_000 and "hello" in lex and "HeLLo" in lex
    assert lex.log_frequency("the") == 0.0 and lex.log_frequency("hello") < lex.log_frequency("help") < 0
    words, probs = word([(i, i + 1) for i in range(5)], HELLO)
    assert decode(words, probs, BALANCED, lex)[0].text == "hello"


def test_the_lexicon_keeps_a_confident_reading_that_is_no_word(tmp_path):
    words, probs = word([(i, i + 1) for i in range(4)], [{"X": 0.99}, {"q": 0.99}, {"7": 0.99}, {"Z": 0.99}])
    # two letters the model is sure are not there: no lexicon word is worth that
    (d,) = decode(words, probs, BALANCED, small_lexicon(tmp_path, "xatz\nhello\n"))
    assert d.text.lower() == "xq7z" and not d.in_lexicon


def test_the_lexicon_may_choose_another_segmentation(tmp_path):
    # pieces 0..2: the model alone reads "rne" (r and n confident, m over both a little less likely)
    spans = [(0, 1), (1, 2), (0, 2), (2, 3)]
    words, probs = word(spans, [{"r": 0.8}, {"n": 0.8}, {"M": 0.5}, {"e": 0.9}])
    assert decode(words, probs, BALANCED)[0].raw == "rne"
    (d,) = decode(words, probs, BALANCED, small_lexicon(tmp_path, "me 1000\n"))
    assert d.text == "me" and d.spans == ((0, 2), (2, 3))


def test_the_lexicon_chooses_where_the_words_of_a_line_end(tmp_path):
    # six pieces, one letter each, read confidently; the line's two ways into words: at the gap after piece 2
    # (two words) or none (one word). The lexicon takes whichever makes its words, against the ink's choice.
    spans = [(i, i + 1) for i in range(6)]

    def line(letters: str):
        probs = dict(zip(spans, table(*[{c: 0.9} for c in letters]), strict=True))
        return [(0, 3, spans[:3]), (3, 6, spans[3:])], [(0, 6, spans)], probs

    lex = small_lexicon(tmp_path, "mapped 100\nmap 5000\n")
    two, one, probs = line("MaPPed")
    assert [d.text for d in decode(two, probs, BALANCED, lex)] == ["map", "ped"]  # one split, as before
    assert [d.text for d in decode_line([two, one], probs, BALANCED, lex)] == ["mapped"]  # "ped" is no word
    two, one, probs = line("redhat")
    lex = small_lexicon(tmp_path, "red 100\nhat 100\n", "b.txt")
    assert [d.text for d in decode_line([one, two], probs, BALANCED, lex)] == ["red", "hat"]
    # without a lexicon nothing tells them apart but the ink: its choice, the first
    assert [d.text for d in decode_line([one, two], probs, BALANCED)] == ["redhat"]
    # a number is no word the list lacks: its digits stay one number, though each digit alone is in the list
    two, one, probs = line("201984")
    lex = small_lexicon(tmp_path, "2 100\n0 100\n1 100\n9 100\n8 100\n4 100\n20 100\n1984 100\n", "c.txt")
    assert [d.text for d in decode_line([one, two], probs, BALANCED, lex)] == ["201984"]


def test_all_words_aligned_at_once_score_as_one_at_a_time():
    # _align_scores (hundreds of lexicon words in arrays) must give _align's score for every word, -inf where a
    # word has no segmentation into that many characters or a letter the classes lack
    from training.decoder import _align, _align_scores, _Table

    rng = np.random.default_rng(3)
    spans = [(i, j) for i in range(2, 9) for j in range(i + 1, min(i + 4, 9) + 1) if rng.random() < 0.8]
    spans += [(i, i + 1) for i in range(2, 9) if (i, i + 1) not in spans]
    probs = rng.dirichlet(np.full(len(BALANCED), 0.3), len(spans))
    row = {s: k for k, s in enumerate(spans)}
    prior = {s: -float(rng.random()) for s in spans if rng.random() < 0.5}
    tab = _Table(probs, BALANCED)
    terms = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz0123"), n)) for n in rng.integers(1, 10, 300)]
    terms += ["a", "", "ab\u00e9c", "ABcd"]
    got = _align_scores(terms, spans, row, tab, 2, 9, prior)
    for t, g in zip(terms, got, strict=True):
        one = _align(t, spans, row, tab, 2, 9, prior) if t else None
        assert (g == -np.inf) if one is None else g == pytest.approx(one[0], abs=1e-9), t
    assert np.isfinite(got).sum() > 100  # (most words of 2..7 letters do fit)


def test_case_of_merged_letters_follows_the_word_and_the_line(tmp_path):
    # "HELLO": H and E are told capitals (Balanced has h and e), so the merged L and O are capitals too
    caps = [{"H": 0.9}, {"E": 0.9}, {"L": 0.9}, {"L": 0.9}, {"O": 0.9}]
    words, probs = word([(i, i + 1) for i in range(5)], caps)
    assert decode(words, probs, BALANCED)[0].text == "HELLO"
    assert decode(words, probs, BALANCED, small_lexicon(tmp_path, "hello\n"))[0].text == "HELLO"
    # "Hello": a capital first, the rest lowercase
    first = [{"H": 0.9}, {"e": 0.9}, {"L": 0.9}, {"L": 0.9}, {"O": 0.9}]
    words, probs = word([(i, i + 1) for i in range(5)], first)
    assert decode(words, probs, BALANCED)[0].text == "Hello"
    assert decode(words, probs, BALANCED, small_lexicon(tmp_path, "hello\n", "b.txt"))[0].text == "Hello"
    # "so" alone has only merged letters: the line's other word decides (lowercase "bad" -> "so")
    probs = dict(zip([(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)],
                     table({"S": 0.9}, {"O": 0.9}, {"b": 0.9}, {"a": 0.9}, {"d": 0.9}), strict=True))
    so, bad = decode([(0, 2, [(0, 1), (1, 2)]), (2, 5, [(2, 3), (3, 4), (4, 5)])], probs, BALANCED)
    assert so.text == "so" and bad.text == "bad"


def test_a_name_in_a_users_list_keeps_its_own_capitals(tmp_path):
    letters = [{"M": 0.9}, {"C": 0.9}, {"D": 0.9}, {"O": 0.9}, {"n": 0.9}, {"a": 0.9}, {"L": 0.9}, {"d": 0.9}]
    words, probs = word([(i, i + 1) for i in range(8)], letters)
    (d,) = decode(words, probs, BALANCED, small_lexicon(tmp_path, "McDonald\n"))
    assert d.text == "McDonald" and d.in_lexicon


def test_word_list_files(tmp_path):
    (tmp_path / "ok.txt").write_text("# a comment\n\nApple 3\napple 2\nPear\n")
    counts, forms = read_word_list(tmp_path / "ok.txt")
    assert counts == {"apple": 5, "pear": 1} and forms["apple"] == "Apple"
    cases = {
        "missing.txt": None,
        "empty.txt": "",
        "comments.txt": "# only\n",
        "binary.txt": b"\xff\xfe\x00a",
        "latin1.txt": "caf\xe9\n".encode("latin-1"),
        "three.txt": "a b c\n",
        "count.txt": "word many\n",
        "zero.txt": "word 0\n",
    }
    for name, content in cases.items():
        if isinstance(content, bytes):
            (tmp_path / name).write_bytes(content)
        elif content is not None:
            (tmp_path / name).write_text(content)
        with pytest.raises(LexiconError) as e:
            load_lexicon(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(LexiconError, match="folder"):
        load_lexicon(tmp_path)
    assert load_lexicon(None) is None and load_lexicon("none") is None and load_lexicon("English") is english()


# -- the whole path, on generated digits ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_reader(digits_model):
    return digits_model


def digit_line(text: str, seed: int = 0, scale: int = 3, gap: int = 12, space: int = 60):
    """Dark-on-white digits drawn by render_char, cut to their ink and put `gap` pixels apart, words `space` pixels
    apart: (image, box of each digit)."""
    rng = np.random.default_rng(seed)
    glyphs = []
    for c in text.replace(" ", ""):
        g = np.asarray(Image.fromarray(render_char(c, rng)).resize((28 * scale, 28 * scale), Image.BICUBIC))
        ys, xs = np.nonzero(g > 128)
        glyphs.append(Image.fromarray(g[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]))
    width = sum(g.width + gap for g in glyphs) + space * text.count(" ") + 40
    canvas = Image.new("L", (width, max(g.height for g in glyphs) + 60), 0)
    x, k, boxes = 20, 0, []
    for c in text:
        if c == " ":
            x += space
            continue
        g = glyphs[k]
        canvas.paste(g, (x, 30))
        boxes.append((x, 30, x + g.width, 30 + g.height))
        x += g.width + gap
        k += 1
    return Image.fromarray(255 - np.asarray(canvas)), boxes


def test_read_finds_the_words_the_boxes_and_the_images(digits_reader):
    pred, _ = digits_reader
    image, boxes = digit_line("2024 17 93")
    r = pred.read(image)
    assert r.found and r.lexicon == "none" and r.size == image.size
    assert [len(w.chars) for w in r.words] == [4, 2, 2]
    assert len(r.text) == 10 and r.text.count(" ") == 2
    right = sum(a == b for a, b in zip(r.text.replace(" ", ""), "20241793", strict=True))
    assert right >= 6  # the digits model reads >= 80 % of its glyphs one at a time
    for c, (x0, y0, x1, y1) in zip(r.chars, boxes, strict=True):
        bx0, by0, bx1, by1 = c.box
        inter = max(0, min(x1, bx1) - max(x0, bx0)) * max(0, min(y1, by1) - max(y0, by0))
        union = (x1 - x0) * (y1 - y0) + (bx1 - bx0) * (by1 - by0) - inter
        assert inter / union > 0.6, (c.box, (x0, y0, x1, y1))
        assert c.image.shape == (28, 28) and c.image.dtype == np.uint8 and len(c.top) == 3 and not c.merged
        assert c.top[0][1] >= c.top[1][1] >= c.top[2][1]
    # the characters are prepared exactly as one character is: the same 28x28 image and top-3 as predict()
    for c, (x0, y0, x1, y1) in zip(r.chars, boxes, strict=True):
        alone = Image.new("L", (x1 - x0 + 40, y1 - y0 + 40), 255)
        alone.paste(image.crop((x0, y0, x1, y1)), (20, 20))
        one = pred.predict(alone, k=3)[0]
        assert np.abs(one.image.astype(int) - c.image.astype(int)).mean() < 8
        assert one.top[0][0] == c.top[0][0]


@pytest.mark.parametrize("kind", ["tta", "ensemble", "single"])
def test_a_line_is_screened_with_one_pass_and_what_is_read_is_scored_in_full(digits_reader, kind):
    # the line's candidates go through one pass (the identity view / the first member; for one model, the model
    # in bf16 where the CPU has it natively, else no screen); every character read carries the full model's fp32
    # probabilities, and fewer images than candidates went through the full model
    from training.ensemble import Ensemble, TestTimeAugment
    from training.inference import use_bf16
    from training.predict import Predictor

    pred, _ = digits_reader
    model = {"tta": lambda: TestTimeAugment(pred.model, 5), "ensemble": lambda: Ensemble([pred.model, pred.model]),
             "single": lambda: pred.model}[kind]()
    full = Predictor(model, pred.classes, pred.config, pred.device)
    seen = {"screen": 0, "full": 0}
    probabilities = full.probabilities

    def counted(images, model=None, precision="fp32"):
        seen["full" if precision == "fp32" else "screen"] += len(images)
        return probabilities(images, model, precision)

    full.probabilities = counted
    image, _ = digit_line("2024 17 93", seed=4)
    r = full.read(image)
    assert r.found and len(r.chars) == 8
    if kind == "single" and not use_bf16(full.device, "auto", full.model):
        assert seen["screen"] == 0 and seen["full"] >= 8  # (every candidate once, in fp32)
    else:
        assert 8 <= seen["full"] < seen["screen"]  # (the screen saw every candidate, the full model a few)
    alone = probabilities(np.stack([c.image for c in r.chars])).numpy()
    for c, p in zip(r.chars, alone, strict=True):
        order = np.argsort(-p)[:3]
        assert [s for s, _ in c.top] == [pred.classes[k] for k in order]
        assert [v for _, v in c.top] == pytest.approx(p[order].tolist(), abs=1e-6)


def test_reading_round_trips_and_a_damaged_one_is_refused(digits_reader):
    pred, _ = digits_reader
    r = pred.read(digit_line("31 4")[0])
    back = Reading.from_json(json.loads(json.dumps(r.to_json())))
    assert back.text == r.text and back.raw == r.raw and back.size == r.size and len(back.chars) == 3
    for a, b in zip(back.chars, r.chars, strict=True):
        assert a.box == b.box and a.char == b.char and np.array_equal(a.image, b.image) and a.top == b.top
    saved = r.to_json()
    for damage, field in [(lambda d: d.pop("raw"), "raw"), (lambda d: d.update(size="wide"), "size"),
                          (lambda d: d["words"][0]["chars"][0].update(image=[[1, 2]]), "words"),
                          (lambda d: d.update(text=7), "text")]:
        d = json.loads(json.dumps(saved))
        damage(d)
        with pytest.raises(ReadingError, match=f"line.json: field '{field}'"):
            Reading.from_json(d, where="line.json")


def test_hostile_images_give_messages(digits_reader):
    pred, _ = digits_reader
    blank = pred.read(Image.new("L", (300, 80), 255))
    assert not blank.found and blank.message.startswith("no writing found")
    assert pred.read(Image.new("RGBA", (300, 80), (0, 0, 0, 0))).message.startswith("no writing found")
    noise = np.random.default_rng(0).integers(0, 256, (600, 800), dtype=np.uint8)
    r = pred.read(Image.fromarray(noise))
    assert r.found or r.message  # a result or a sentence, never a traceback
    single, _ = digit_line("7")
    one = pred.read(single)
    assert len(one.words) == 1 and len(one.chars) == 1
    deep = Image.fromarray(np.asarray(digit_line("52")[0], np.uint16) * 257).convert("I;16")
    assert len(pred.read(deep).chars) == 2


def test_cli_reads_a_line(digits_reader, tmp_path, cli, capsys):
    _, ckpt = digits_reader
    digit_line("2024 17")[0].save(tmp_path / "line.png")
    Image.new("L", (200, 60), 255).save(tmp_path / "blank.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    # as the user runs it
    r = subprocess.run([sys.executable, str(REPO / "training" / "predict.py"), str(ckpt), "--read",
                        str(tmp_path / "line.png"), "--lexicon", "none"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines[0].split()) == 2 and len(lines[0]) == 7
    assert len([x for x in lines if x.startswith("  ")]) == 6  # one line per character: its top-3
    assert all(len(x.split()) == 7 for x in lines if x.startswith("  "))  # "c: a p b q c r"
    # the rest through main() in this process
    r = cli(predict_main, ckpt, "--read", tmp_path / "line.png", "--lexicon", "none", "--json")
    assert r.returncode == 0 and Reading.from_json(json.loads(r.stdout)).text == lines[0]
    r = cli(predict_main, ckpt, "--read", tmp_path / "blank.png")
    assert r.returncode == 1 and "no writing found" in r.stdout and not r.stderr.strip()
    r = cli(predict_main, ckpt, "--read", tmp_path / "junk.png", "--lexicon", "none")
    assert r.returncode == 1 and r.stdout.count("\n") == 1 and "error:" in r.stdout
    r = cli(predict_main, ckpt, "--read", tmp_path / "line.png", "--lexicon", tmp_path / "nope.txt")
    assert r.returncode == 2 and "nope.txt not found" in r.stderr and r.stderr.count("\n") == 1
    for args in ([], ["--read", tmp_path / "line.png", tmp_path / "line.png"]):
        with pytest.raises(SystemExit) as e:
            cli(predict_main, ckpt, *args)
        assert e.value.code == 2 and "--read" in capsys.readouterr().err
