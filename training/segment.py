"""Where the characters of a line of handwriting may be: pieces of ink, and candidate cuts through pieces that may
hold touching characters. It decides nothing it cannot know from the ink alone: which runs of pieces are one
character is chosen by the model's confidence and the lexicon (training/reading.py), from the spans `Line.spans`
offers. Each span's crop is framed exactly as a single character is (training/preprocess.py).

The line is measured at about WORK_HEIGHT pixels of ink height whatever its resolution (a 20000x200 strip and a
phone photo alike), turned level (a rotated line) and unslanted (slanted writing) first; boxes are given back in
the coordinates of the input image.

numpy, scipy.ndimage and Pillow only, like preprocess.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage

from training.ink import to_grayscale_ink
from training.preprocess import NoCharacterFound

WORK_HEIGHT = 64  # pixels of ink height the line is measured at
MAX_WORK_WIDTH = 60_000  # a line longer than ~900 characters at that height is not one line
MAX_PIECES = 2000  # marks, and pieces after cutting (a line of 200 characters has ~400): more is noise, not writing
MIN_WORD_GAP = 0.3  # heights: a narrower gap is between letters
JUMP = 1.6  # word gaps begin where the sorted gaps jump by this factor (and more, see _word_starts)
MAX_SPAN = 4  # a character is at most this many pieces (a broken stroke, a cut that went too far)
_EIGHT = np.ones((3, 3), bool)  # diagonal neighbours belong to the same stroke
_MAX_TILT = math.radians(20)  # a line turned further than this is not levelled (and likely not a line)
_MIN_LEVEL_WIDTH = 3  # line heights of ink width needed to level and unslant it
_SLANTS = np.linspace(-0.7, 0.7, 15)  # shears tried (x shift per unit of height): up to ~35 degrees of slant


class TooMuchInk(ValueError):
    """The image holds far more separate marks than a line of writing (a page of noise, a photo)."""


@dataclass
class Piece:
    """A run of columns of one group of components: a whole character, part of one, or several touching."""

    left: int  # first and last column (inclusive) in the working image
    right: int
    comps: list[int]  # component labels whose pixels (in these columns) belong to it
    gap: float  # blank columns before it (0 after a cut through a component)


@dataclass
class Line:
    ink: np.ndarray  # the levelled, unslanted line (float32, ink 1), WORK_HEIGHT pixels of ink high
    labels: np.ndarray  # its components (int32, 0 = background)
    pieces: list[Piece]
    height: float  # the line's ink height in working pixels
    word_starts: list[int] = field(default_factory=list)  # indexes of the pieces that begin a word
    # the word-gap thresholds the reader may try instead (training/reading.py lets the lexicon choose): every gap
    # wide enough to be a word gap, the ink's own choice among them giving word_starts
    thresholds: list[float] = field(default_factory=list)
    to_input: np.ndarray = field(default_factory=lambda: np.eye(3))  # working (x, y, 1) -> input (x, y, 1)
    size: tuple[int, int] = (0, 0)  # the input image (width, height)
    _masks: dict = field(default_factory=dict, repr=False)  # piece index -> its pixels (see _member)
    _rims: dict = field(default_factory=dict, repr=False)  # piece index -> its pixels dilated (see _rim)

    def words(self, threshold: float | None = None) -> list[range]:
        """The pieces of each word, in reading order: as word_starts has them, or with the gaps of at least
        `threshold` blank columns as word gaps (one of `thresholds`; math.inf: the line as one word)."""
        starts = self.word_starts if threshold is None else _starts_at(self.pieces, threshold)
        ends = [*starts[1:], len(self.pieces)]
        return [range(a, b) for a, b in zip(starts, ends, strict=True)]

    def spans(self, word: range) -> list[tuple[int, int]]:
        """The runs of pieces (i, j), pieces i..j-1, that may be one character: one piece, or up to MAX_SPAN
        neighbours close enough together and not wider than a wide character (an m is 1.5 times as wide as the
        height of a line of small letters)."""
        out = []
        for i in word:
            for j in range(i + 1, min(i + MAX_SPAN, word.stop) + 1):
                if j - i > 1 and (self.pieces[j - 1].right - self.pieces[i].left + 1 > 1.8 * self.height
                                  or self.pieces[j - 1].gap > 0.3 * self.height):
                    break
                out.append((i, j))
        return out

    def crop(self, i: int, j: int) -> np.ndarray:
        """The ink of pieces i..j-1 alone (other characters' ink masked out, soft edges kept), stretched to 1: what
        training/preprocess.frame_ink takes."""
        left, right = self.pieces[i].left, self.pieces[j - 1].right
        cols = slice(max(0, left - 3), right + 4)
        shape = (self.labels.shape[0], cols.stop - cols.start)
        member, rim = np.zeros(shape, bool), np.zeros(shape, bool)
        whole = True  # every piece inside the crop's columns (a piece may reach past the first one's left)
        for k in range(i, j):
            p = self.pieces[k]
            a, b = max(p.left, cols.start), min(p.right + 1, cols.stop)
            member[:, a - cols.start : b - cols.start] |= self._member(k)[:, a - p.left : b - p.left]
            whole &= (a, b) == (p.left, p.right + 1)
            if whole:  # the rim of a union is the union of the rims: each piece's is found once a line
                a2, b2 = max(p.left - 2, cols.start), min(p.right + 3, cols.stop)
                rim[:, a2 - cols.start : b2 - cols.start] |= self._rim(k)[:, a2 - p.left + 2 : b2 - p.left + 2]
        rows = np.flatnonzero(member.any(axis=1))
        # the antialiased rim below 0.5: two 8-connected dilations (a 5x5 square, separable as a maximum filter)
        member = rim if whole else ndimage.maximum_filter(member.view(np.uint8), 5, mode="constant").view(bool)
        r0, r1 = max(0, int(rows[0]) - 3), int(rows[-1]) + 4
        out = self.ink[r0:r1, cols] * member[r0:r1, : self.ink.shape[1] - cols.start]
        top = float(out.max())
        return out / top if top > 0 else out

    def _member(self, k: int) -> np.ndarray:
        """Piece k's pixels within its columns (kept: a piece is in up to 2 * MAX_SPAN spans)."""
        if k not in self._masks:
            p = self.pieces[k]
            self._masks[k] = np.isin(self.labels[:, p.left : p.right + 1], p.comps)
        return self._masks[k]

    def _rim(self, k: int) -> np.ndarray:
        """Piece k's pixels dilated as crop dilates them, over its columns and two more each side."""
        if k not in self._rims:
            padded = np.pad(self._member(k), ((0, 0), (2, 2))).view(np.uint8)
            self._rims[k] = ndimage.maximum_filter(padded, 5, mode="constant").view(bool)
        return self._rims[k]

    def box(self, i: int, j: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of pieces i..j-1 in the input image's pixels (the box of the corners of its
        working box, mapped back through levelling and scaling)."""
        left, right = self.pieces[i].left, self.pieces[j - 1].right
        comps = sorted({c for p in self.pieces[i:j] for c in p.comps})
        rows = np.flatnonzero(np.isin(self.labels[:, left : right + 1], comps).any(axis=1))
        top, bottom = (int(rows[0]), int(rows[-1])) if rows.size else (0, self.ink.shape[0] - 1)
        corners = np.array([[left, top, 1], [right + 1, top, 1], [left, bottom + 1, 1], [right + 1, bottom + 1, 1]],
                           float)
        xy = corners @ self.to_input.T
        w, h = self.size
        x0, y0 = np.clip(np.floor(xy[:, :2].min(0)), 0, [w - 1, h - 1])
        x1, y1 = np.clip(np.ceil(xy[:, :2].max(0)), 1, [w, h])
        return int(x0), int(y0), int(x1), int(y1)


def _span_of_mass(weights: np.ndarray, share: float = 0.9) -> tuple[float, float]:
    """The interval holding the central `share` of a 1-D mass distribution."""
    c = np.cumsum(weights, dtype=np.float64)
    c /= c[-1]
    lo = float(np.searchsorted(c, (1 - share) / 2))
    hi = float(np.searchsorted(c, 1 - (1 - share) / 2))
    return lo, hi


def _level(ink: np.ndarray) -> tuple[float, float]:
    """(angle of the line in radians, slant as an x shift per unit of height) of a scaled line: the angle from a
    straight line through each column's centre of ink, the slant that makes the columns' ink the most peaked
    (upright strokes stand on few columns)."""
    ys, xs = np.nonzero(ink >= 0.5)
    # a word of a few letters says little of either: one V, 7 or z alone is most peaked sheared, the centres of
    # a b or a z fall along a slope; the model reads them as they are, as a single character is read
    if xs.size < 10 or np.ptp(xs) < _MIN_LEVEL_WIDTH * WORK_HEIGHT:
        return 0.0, 0.0
    step = xs.size // 200_000 + 1  # (every step-th pixel of ink: a long dense line measures as well, in a tenth)
    ys, xs = ys[::step], xs[::step]
    cols = np.bincount(xs)
    centre = np.bincount(xs, weights=ys) / np.maximum(cols, 1)
    used = np.flatnonzero(cols)
    slope = np.polyfit(used, centre[used], 1, w=np.sqrt(cols[used]))[0]
    angle = math.atan(slope)
    if abs(angle) > _MAX_TILT or abs(angle) < math.radians(1):
        angle = 0.0
    # the ink's coordinates once levelled, then the shear with the most peaked column histogram
    c, s = math.cos(-angle), math.sin(-angle)
    x, y = xs * c - ys * s, xs * s + ys * c
    y = y - y.mean()
    x = x - x.min()
    best, best_score = 0.0, -1.0
    for k in _SLANTS:
        shifted = np.rint(x - k * y)
        hist = np.bincount((shifted - shifted.min()).astype(np.int64))
        score = float((hist.astype(np.float64) ** 2).sum())
        if score > best_score * 1.02 or (abs(k) < abs(best) and score >= best_score):  # (ties: the upright)
            best, best_score = float(k), max(score, best_score)
    return angle, best


def _warp(ink: np.ndarray, angle: float, slant: float) -> tuple[np.ndarray, np.ndarray]:
    """The line turned by -angle and unslanted, and the 3x3 matrix from its (x, y) back to ink's (x, y)."""
    if angle == 0.0 and slant == 0.0:
        return ink, np.eye(3)
    c, s = math.cos(-angle), math.sin(-angle)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    h, w = ink.shape
    corners = np.array([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1]], float) @ rot.T
    yc = corners[:, 1].mean()
    shear = np.array([[1, -slant, slant * yc], [0, 1, 0], [0, 0, 1]])
    forward = shear @ rot
    out = np.array([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1]], float) @ forward.T
    lo, hi = np.floor(out[:, :2].min(0)), np.ceil(out[:, :2].max(0))
    forward = np.array([[1, 0, -lo[0]], [0, 1, -lo[1]], [0, 0, 1]]) @ forward
    back = np.linalg.inv(forward)
    shape = (int(hi[1] - lo[1]) + 1, int(hi[0] - lo[0]) + 1)
    # affine_transform maps output (row, col) to input (row, col): the (x, y) matrix with its axes swapped
    m = back[[1, 0]][:, [1, 0]]
    warped = ndimage.affine_transform(ink, m, offset=back[[1, 0], 2], output_shape=shape, order=1, cval=0.0)
    return warped.astype(np.float32), back


def _scaled(ink: np.ndarray, scale: float) -> np.ndarray:
    h, w = ink.shape
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = Image.fromarray(np.ascontiguousarray(ink, dtype=np.float32))
    # (shrinking: the box filter averages every input pixel, so thin strokes fade instead of vanishing)
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
    out = np.asarray(img.resize(size, resample), dtype=np.float32)
    top = float(out.max())
    return out / top if top > 0 else out


def _pieces(labels: np.ndarray, n: int, ink: np.ndarray, height: float, stroke: float) -> list[Piece]:
    """Components grouped into pieces (parts one above the other: the dot of an i, a broken upright stroke), then
    each piece cut where characters may touch (_cuts)."""
    boxes = ndimage.find_objects(labels, n)
    lefts = np.array([b[1].start for b in boxes])
    rights = np.array([b[1].stop - 1 for b in boxes])
    order = np.argsort((lefts + rights) / 2, kind="stable")
    groups: list[list[int]] = []  # component indexes (0-based)
    g_left, g_right = [], []
    for k in order:
        lft, r = int(lefts[k]), int(rights[k])
        if groups:
            overlap = min(r, g_right[-1]) - max(lft, g_left[-1]) + 1
            if overlap > 0.5 * min(r - lft + 1, g_right[-1] - g_left[-1] + 1):
                groups[-1].append(k)
                g_left[-1], g_right[-1] = min(lft, g_left[-1]), max(r, g_right[-1])
                continue
        groups.append([k])
        g_left.append(lft)
        g_right.append(r)
    pieces: list[Piece] = []
    prev_right = None
    for comps, lft, r in zip(groups, g_left, g_right, strict=True):
        gap = 0.0 if prev_right is None else float(max(0, lft - prev_right - 1))
        labs = [c + 1 for c in comps]
        cuts = _cuts(labels, ink, labs, lft, r, height, stroke)
        edges = [lft, *cuts, r + 1]
        for a, b in zip(edges[:-1], edges[1:], strict=True):
            pieces.append(Piece(a, b - 1, labs, gap if a == lft else 0.0))
        prev_right = r if prev_right is None else max(prev_right, r)
    return pieces


def _cuts(labels: np.ndarray, ink: np.ndarray, labs: list[int], left: int, right: int, height: float,
          stroke: float) -> list[int]:
    """Columns where a piece may be cut in two (characters that touch): minima of its ink per column (a thin
    junction), and the middles of strokes too thick to be one (two upright strokes drawn over each other), well
    inside the piece and apart. Too many cuts cost only spans to score; a missing one loses a character."""
    mine = np.isin(labels[:, left : right + 1], labs)
    profile = (ink[:, left : right + 1] * mine).sum(0)
    # a narrow character (i, l, 1) is about one stroke wide: cuts may come that close to the piece's ends
    margin, apart = max(2, int(0.7 * stroke)), max(2, int(stroke))
    if len(profile) <= 2 * margin:
        return []
    smooth = ndimage.uniform_filter1d(profile, 3)
    # thin columns (a junction is about one stroke high, the middle of an o two): each run of them between
    # thicker ink, a valley of the profile, is cut at its lowest; a flat bottom (the arm of an r touching an i) at
    # both its ends, where the arm leaves the stem and where it meets the next letter
    thin = smooth <= 2 * stroke
    thin = ndimage.binary_closing(thin, np.ones(int(stroke) // 2 + 1, bool)) | thin  # (a pixel of noise is no stem)
    thin[:margin] = thin[len(profile) - margin :] = False
    minima = []
    for (run,) in ndimage.find_objects(ndimage.label(thin)[0]):
        if run.start == margin or run.stop == len(profile) - margin:
            continue  # ink thinning out towards the piece's end (the bar of an L, the arm of a w): no valley
        bottom = run.start + np.flatnonzero(smooth[run] <= smooth[run].min() + 0.25 * stroke)
        ends = [bottom[0], bottom[-1]] if bottom[-1] - bottom[0] > 2 * stroke else [bottom[len(bottom) // 2]]
        minima += [int(c) for c in ends]
    # and where thicker ink dips by a stroke between yet thicker ink on both sides (round letters touching along a
    # curve: their two sides together)
    reach = max(2, int(2 * stroke))
    tops = np.lib.stride_tricks.sliding_window_view(np.pad(smooth, reach), reach).max(axis=1)
    left_top, right_top = tops[: len(smooth)], tops[reach + 1 :]  # the highest of the `reach` columns each side
    dips = (smooth > 2 * stroke) & (smooth <= ndimage.minimum_filter1d(smooth, 3))
    dips &= np.minimum(left_top, right_top) - smooth >= stroke
    minima += [int(c) for c in np.flatnonzero(dips) if margin <= c < len(profile) - margin]
    # ink that holds a block wider than a stroke and a quarter of the line high, in a tall column (not the corner
    # of an N or the point of a V): two upright strokes drawn over each other, cut in the middle
    block = (max(2, int(0.25 * height)), max(2, math.ceil(1.15 * stroke)))
    thick_cols = ndimage.minimum_filter(mine.view(np.uint8), block, mode="constant").any(axis=0)  # (an erosion)
    thick = []
    for (band,) in ndimage.find_objects(ndimage.label(thick_cols)[0]):
        # the merged strokes span the band and half a block each side; k strokes side by side are cut in k
        lo, wide = band.start - block[1] // 2, band.stop - band.start + block[1] - 1
        k = min(3, max(2, round(wide / stroke)))  # (three at most: a stem between two, as i in min)
        thick += [lo + wide * q // k for q in range(1, k)]
    thick = [c for c in thick if margin <= c < len(profile) - margin and smooth[c] >= 0.5 * smooth.max()]
    chosen: list[int] = []
    for c in thick + sorted(minima, key=lambda c: (smooth[c], c)):
        if all(abs(c - o) >= apart for o in chosen):
            chosen.append(c)
    return sorted(left + c for c in chosen[: max(1, int(len(profile) / (0.15 * height)))])  # (a blot: bounded)


def _stroke_width(mask: np.ndarray) -> float:
    """The commonest length of the runs of ink across rows and down columns: a stroke's width (an upright
    stroke's runs across, a level one's runs down). Not the median: runs along strokes, and across strokes merged
    where letters touch, are long and many in a crowded line."""
    runs = []
    for m in (mask, mask.T):
        d = np.diff(np.pad(m, ((0, 0), (1, 1))).astype(np.int8), axis=1).ravel()
        runs.append(np.flatnonzero(d == -1) - np.flatnonzero(d == 1))
    counts = np.bincount(np.concatenate(runs))
    if counts.size < 2:
        return 1.0
    return float(max(1, np.argmax(ndimage.uniform_filter1d(counts[1:].astype(float), 3)) + 1))


def _starts_at(pieces: list[Piece], threshold: float) -> list[int]:
    return [0] + [i for i in range(1, len(pieces)) if pieces[i].gap >= threshold]


def _word_starts(pieces: list[Piece], height: float) -> list[int]:
    """The pieces that begin a word, from the line's own gaps. Sorted, letter gaps come first and word gaps after a
    jump: the first gap that is wide (0.3 heights), JUMP times the gap before it and a fifth of a height wider than
    the typical gap below it starts the word gaps. With no such jump the gaps are all of one kind: word gaps when
    every one is wide (letters that all touch), else letter gaps. (On lines of EMNIST letters: 96 of 120 right,
    67 when the gaps were split in two groups by the variance of their logarithms, where the many near-zero gaps
    of touching letters form a group of their own.)"""
    gaps = np.array([p.gap for p in pieces[1:]], float)
    values = np.sort(gaps[gaps > 0])
    if values.size == 0:
        return [0]
    threshold = math.inf
    for t in range(1, values.size):
        v = values[t]
        if v >= MIN_WORD_GAP * height and v >= JUMP * values[t - 1] and v >= np.median(values[:t]) + 0.2 * height:
            threshold = v
            break
    if threshold == math.inf and values[0] >= 0.4 * height:
        threshold = values[0]
    return _starts_at(pieces, threshold)


def _thresholds(pieces: list[Piece], height: float) -> list[float]:
    """The word-gap thresholds worth trying: each gap that may be a word gap (MIN_WORD_GAP heights, as
    _word_starts asks; narrower gaps are letter gaps, and candidate characters span them), and math.inf (no word
    gap). The sorted gaps of a line often show no clear jump (a broken letter's wide gap, a narrow space): the
    lexicon tells "map ped" from "mapped" where the ink cannot."""
    wide = {p.gap for p in pieces[1:] if p.gap >= MIN_WORD_GAP * height}
    return sorted(wide) + [math.inf]


def segment_line(image) -> Line:
    """The pieces of a line of writing in any supported image (see training/ink.py). NoCharacterFound: no ink;
    TooMuchInk: far more marks than a line holds."""
    ink = to_grayscale_ink(image)
    size = (ink.shape[1], ink.shape[0])
    mask = ink >= 0.5
    if not mask.any():
        raise NoCharacterFound("no writing found: the image is blank (no ink stands out from its background)")
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    lo, hi = _span_of_mass(mask.sum(axis=1)[rows[0] : rows[-1] + 1])
    tall = max(hi - lo + 1, 0.5 * (rows[-1] - rows[0] + 1), 4.0)
    pad = int(0.3 * tall) + 2
    y0, x0 = max(0, rows[0] - pad), max(0, cols[0] - pad)
    crop = ink[y0 : rows[-1] + pad + 1, x0 : cols[-1] + pad + 1]
    scale = min(WORK_HEIGHT / tall, MAX_WORK_WIDTH / crop.shape[1], 8.0)
    scaled = _scaled(crop, scale)
    angle, slant = _level(scaled)
    work, back = _warp(scaled, angle, slant)
    # working (x, y) -> scaled -> crop -> input: pixel centres scale about their edges
    to_input = np.array([[1 / scale, 0, x0], [0, 1 / scale, y0], [0, 0, 1]]) @ back
    mask = work >= 0.5
    labels, n = ndimage.label(mask, structure=_EIGHT)
    if n == 0:
        raise NoCharacterFound("no writing found: no ink above half intensity")
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    rows = np.flatnonzero(mask.any(axis=1))
    lo, hi = _span_of_mass(mask.sum(axis=1)[rows[0] : rows[-1] + 1])
    height = max(hi - lo + 1, 4.0)
    # specks: far too small to be a stroke of a character this tall (the dot of an i is ~30 times larger)
    specks = np.flatnonzero(areas < max(2.0, 0.0015 * height * height))
    specks = specks[specks > 0]
    if specks.size:
        labels[np.isin(labels, specks)] = 0
        labels, n = ndimage.label(labels > 0, structure=_EIGHT)
    if n == 0:
        raise NoCharacterFound("no writing found: only specks")
    if n > MAX_PIECES:
        raise TooMuchInk(f"no line of writing found: {n} separate marks (a line of 200 characters has about 250)")
    pieces = _pieces(labels, n, work, height, _stroke_width(labels > 0))
    if len(pieces) > MAX_PIECES:
        raise TooMuchInk(f"no line of writing found: {len(pieces)} pieces (a line of 200 characters has about 400)")
    line = Line(work, labels, pieces, float(height), to_input=to_input, size=size)
    line.word_starts = _word_starts(pieces, height)
    line.thresholds = _thresholds(pieces, height)
    return line
