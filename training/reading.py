"""Reading a line of handwriting with a single-character model: which runs of ink are characters, what they say,
and which words they make.

training/segment.py offers candidate characters (spans of pieces of ink) without deciding among them. Each span is
framed exactly as a single character is (training/preprocess.frame_ink) and all of them are classified in one
batch by the model (an ensemble and TTA included, as for one character). training/decoder.py then chooses, word
by word, the segmentation and the characters with the highest probability under the model (a beam search over the
lattice of spans) and, with a lexicon, the word that scores best on the model's probabilities, its frequency and
its edit distance from what the model read.

EMNIST Balanced merges the two cases of c, i, j, k, l, m, o, p, s, u, v, w, x, y, z (one class each, named by the
capital). Their case in the output comes from the lexicon's word when it has one of its own, else from the case of
the letters the model does tell apart in the same word (or the line); `CharReading.merged` says which characters
those were.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from training.decoder import decode_line
from training.ink import ImageError
from training.lexicon import Lexicon
from training.preprocess import NoCharacterFound, frame_ink
from training.segment import TooMuchInk, segment_line

CUT_COST = 1.0  # a character boundary where segment.py cut through ink (most letters do not touch)
MERGE_COST = 2.0  # one character over blank columns (a broken stroke is rarer than two letters)
SPLIT_COST = 4.0  # each word more than the ink's own choice, when the lexicon chooses the line's words (decoder)
MAX_WORD_PIECES = 40  # (a word of 12 letters, some cut in two or three)
SCREEN_COARSE = True  # the screen's candidates framed from crops at half size (see read_line)


class ReadingError(ValueError):
    """A saved Reading that cannot be read back (damaged or of another shape)."""


@dataclass
class CharReading:
    char: str  # the character as read (its case set from the word or line where the class merges cases)
    box: tuple[int, int, int, int]  # (left, top, right, bottom) in the input image's pixels
    image: np.ndarray  # the 28x28 uint8 image the model saw
    top: list[tuple[str, float]]  # the model's classes for it with probabilities, best first
    merged: bool  # its class holds both cases (EMNIST Balanced: c/C, o/O, s/S, ...)

    def to_json(self) -> dict:
        return {"char": self.char, "box": list(self.box), "image": np.asarray(self.image, np.uint8).tolist(),
                "top": [[c, p] for c, p in self.top], "merged": self.merged}

    @classmethod
    def from_json(cls, d: dict) -> CharReading:
        image = np.asarray(d["image"], dtype=np.float64)
        if image.shape != (28, 28) or not np.all((image >= 0) & (image <= 255)):
            raise ValueError("image is not 28x28 values in 0..255")
        box = tuple(int(v) for v in d["box"])
        if len(box) != 4:
            raise ValueError("box is not 4 numbers")
        top = [(str(c), float(p)) for c, p in d["top"]]
        if not isinstance(d["char"], str) or not isinstance(d["merged"], bool):
            raise ValueError("char or merged of the wrong type")
        return cls(d["char"], box, image.astype(np.uint8), top, d["merged"])


@dataclass
class WordReading:
    text: str  # after the lexicon (the model's reading without one)
    raw: str  # the model alone
    chars: list[CharReading]  # the characters of `text`, in order
    in_lexicon: bool = False

    def to_json(self) -> dict:
        return {"text": self.text, "raw": self.raw, "in_lexicon": self.in_lexicon,
                "chars": [c.to_json() for c in self.chars]}

    @classmethod
    def from_json(cls, d: dict) -> WordReading:
        if not all(isinstance(d[k], str) for k in ("text", "raw")) or not isinstance(d["in_lexicon"], bool):
            raise ValueError("text, raw or in_lexicon of the wrong type")
        return cls(d["text"], d["raw"], [CharReading.from_json(c) for c in d["chars"]], d["in_lexicon"])


@dataclass
class Reading:
    text: str  # the words after the lexicon, one space between them
    raw: str  # the model alone
    words: list[WordReading] = field(default_factory=list)
    lexicon: str = "none"  # "none", "english" or the word list's file name
    size: tuple[int, int] = (0, 0)  # the input image (width, height)
    message: str = ""  # why nothing was read ("no writing found: ...")

    @property
    def found(self) -> bool:
        return bool(self.words)

    @property
    def chars(self) -> list[CharReading]:
        return [c for w in self.words for c in w.chars]

    def to_json(self) -> dict:
        return {"text": self.text, "raw": self.raw, "lexicon": self.lexicon, "size": list(self.size),
                "message": self.message, "words": [w.to_json() for w in self.words]}

    @classmethod
    def from_json(cls, d: dict, where: str = "reading") -> Reading:
        """The Reading saved by to_json; ReadingError naming `where` and the field for anything else."""
        if not isinstance(d, dict):
            raise ReadingError(f"{where}: not a JSON object")
        for key in ("text", "raw", "lexicon", "size", "message", "words"):
            if key not in d:
                raise ReadingError(f"{where}: field {key!r} is missing")
        try:
            words = [WordReading.from_json(w) for w in d["words"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ReadingError(f"{where}: field 'words' is damaged ({type(e).__name__}: {e})") from None
        for key in ("text", "raw", "lexicon", "message"):
            if not isinstance(d[key], str):
                raise ReadingError(f"{where}: field {key!r} is not a string")
        try:
            w, h = (int(v) for v in d["size"])
        except (TypeError, ValueError):
            raise ReadingError(f"{where}: field 'size' is not two numbers") from None
        return cls(d["text"], d["raw"], words, d["lexicon"], (w, h), d["message"])


# -- the model's view of a line -------------------------------------------------------------------------------



def read_line(image, probabilities: Callable[[np.ndarray], np.ndarray], classes: list[str],
              lexicon: Lexicon | None = None, k: int = 3, screen: Callable | None = None) -> Reading:
    """Read a line of writing. `probabilities` takes (N, 28, 28) uint8 images and gives (N, len(classes))
    probabilities (Predictor.probabilities); `screen`, the same from a cheaper pass of the model (one view of a
    TTA model, one member of an ensemble, bf16), or None to score every candidate with `probabilities`. Every
    character read is scored by `probabilities` either way. Never raises for the image: a Reading with a message
    instead."""
    name = lexicon.name if lexicon is not None else "none"
    try:
        line = segment_line(image)
    except (NoCharacterFound, TooMuchInk, ImageError) as e:
        message = str(e)
        if isinstance(e, NoCharacterFound) and not message.startswith("no writing found"):
            message = "no writing found: " + message.split(": ", 1)[-1]
        return Reading("", "", [], name, message=message)
    size = line.size
    words = line.words()
    # with a lexicon, the line's other word-gap thresholds too (segment.py's choice first): the words each one
    # makes are read, and decode_line keeps the threshold whose words score best
    # (words of more than MAX_WORD_PIECES pieces are not tried: runs of several words, and slow to read)
    choices = [words]
    if lexicon is not None:
        for t in line.thresholds:
            other = line.words(t)
            if other not in choices and max(len(w) for w in other) <= MAX_WORD_PIECES:
                choices.append(other)
    spans = {w: line.spans(w) for c in choices for w in c}
    every = list(dict.fromkeys(s for ss in spans.values() for s in ss))
    images = []
    usable = []
    for s in every:
        try:
            # (the screen's candidates framed from the crop at half size: a quarter of the pixels to blur and
            # resample, and the images differ little; what the decoder chooses is framed again at full size)
            images.append(frame_ink(line.crop(*s) if screen is None or not SCREEN_COARSE else _coarse(line.crop(*s))))
            usable.append(s)
        except NoCharacterFound:  # a span whose ink all lies outside its columns' mask: not a character
            continue
    if not images:
        return Reading("", "", [], name, size=size, message="no writing found: no character in the line")
    framed = dict(zip(usable, images, strict=True))
    specs = [[(w.start, w.stop, [s for s in spans[w] if s in framed]) for w in c] for c in choices]
    bias = [_gap_prior(c, len(words)) for c in choices]
    prior = span_prior(line, words, usable)
    if screen is None:
        by_span = dict(zip(usable, np.asarray(probabilities(np.stack(images)), dtype=np.float64), strict=True))
        decoded = decode_line(specs, by_span, list(classes), lexicon, prior, bias)
    else:
        # a line of n letters offers ~7n candidate characters, of which the decoder keeps n: one pass of the model
        # (a TTA's identity view, an ensemble's first member) screens them all, then the full model scores the
        # spans of each word's CONFIRM best readings and of the words chosen, again until every span the decoder
        # chooses has the full model's probabilities (a few rounds; at worst every span once)
        by_span = dict(zip(usable, np.asarray(screen(np.stack(images)), dtype=np.float64), strict=True))
        confirmed: set = set()
        while True:
            decoded = decode_line(specs, by_span, list(classes), lexicon, prior, bias)
            need = sorted({sp for d in decoded if d is not None for sp in d.contenders} - confirmed)
            if not need:
                break
            if SCREEN_COARSE:
                for sp in need:
                    try:
                        framed[sp] = frame_ink(line.crop(*sp))
                    except NoCharacterFound:  # (cannot happen to ink the coarse frame found; kept as it was)
                        pass
            full = np.asarray(probabilities(np.stack([framed[sp] for sp in need])), dtype=np.float64)
            by_span.update(zip(need, full, strict=True))
            confirmed.update(need)
    out = []
    for d in decoded:
        if d is None:  # a word none of whose segmentations reaches its end (every span of a piece unusable)
            continue
        chars = []
        for ch, span in zip(d.text, d.spans, strict=True):
            p = by_span[span]
            order = np.argsort(-p)[:k]
            chars.append(CharReading(ch, line.box(*span), framed[span], [(classes[c], float(p[c])) for c in order],
                                     ch.upper() in d.merged))
        out.append(WordReading(d.text, d.raw, chars, d.in_lexicon))
    if not out:
        return Reading("", "", [], name, size=size, message="no writing found: no character in the line")
    return Reading(" ".join(w.text for w in out), " ".join(w.raw for w in out), out, name, size)


def _coarse(crop: np.ndarray) -> np.ndarray:
    """A crop at half size (2x2 means), its strongest ink 1 again: what frame_ink takes."""
    h, w = crop.shape
    a = np.zeros((h + h % 2, w + w % 2), np.float32)
    a[:h, :w] = crop
    a = a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]
    top = float(a.max())
    return a / top if top > 0 else a


def _gap_prior(words: list, ink_words: int) -> float:
    """A way to split the line into words, before its words are read: each word more than the ink's own choice
    (segment.py's word_starts) costs SPLIT_COST. (A word the model misreads splits into short words the lexicon
    knows, "una orally cd" for "uniformly", more easily than written words join.)"""
    return -SPLIT_COST * max(0, len(words) - ink_words)


def span_prior(line, words: list[range], spans: list[tuple[int, int]]) -> dict[tuple[int, int], float]:
    """What the ink alone says of each span: a character that ends where segment.py cut through ink costs
    CUT_COST, one that runs over blank columns MERGE_COST for each gap (pieces of one component, cut apart,
    are joined for free)."""
    stop_of = {k: w.stop for w in words for k in w}
    pieces = line.pieces

    def cut(k: int) -> bool:  # pieces k-1 and k are parts of one component
        return 0 < k < len(pieces) and pieces[k].comps == pieces[k - 1].comps

    out = {}
    for i, j in spans:
        score = -sum(MERGE_COST for k in range(i + 1, j) if not cut(k))
        if j < stop_of[i] and cut(j):
            score -= CUT_COST
        out[(i, j)] = score
    return out



def describe(reading: Reading) -> str:
    """The command line's printout: the text (and the model's own reading when the lexicon changed it), then
    each character's top 3."""
    if not reading.found:
        return reading.message
    lines = [reading.text]
    if reading.raw != reading.text:
        lines.append(f"(model alone: {reading.raw})")
    for c in reading.chars:
        top = "  ".join(f"{s} {p:.3f}" for s, p in c.top[:3])
        note = " (either case)" if c.merged else ""
        lines.append(f"  {c.char}{note}: {top}")
    return "\n".join(lines)

