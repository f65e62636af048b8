"""Lines of handwriting made from single EMNIST characters, seeded, with the box of every character placed: what
benchmarks/read.py measures reading on (the test split's characters), and what the segmentation tests use
(characters drawn by the tests themselves).

How a line is made: its words are written with one character image per letter (an image of that class, its case
folded where EMNIST merges it); every character is scaled (its size jitters around the line's), put on a jittered
baseline with a random gap to the previous one (some touching or overlapping), the whole line slanted, written
dark on white at the line's resolution, with a little noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass
class MadeLine:
    image: np.ndarray  # uint8 (H, W), dark ink on white
    text: str  # the words, one space between them
    boxes: list[tuple[int, int, int, int]]  # (left, top, right, bottom) of each non-space character, in text order
    touching: list[int]  # indexes (into boxes) of characters placed touching or overlapping the one before


def _ink_box(img: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(img >= 128)
    if xs.size == 0:
        ys, xs = np.nonzero(img > 0)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def make_line(glyphs: list[list[np.ndarray]], text: str, rng: np.random.Generator, height: int = 48,
              touch: float = 0.1, slant: float = 0.0, noise: float = 0.03) -> MadeLine:
    """`glyphs[i]`: the 28x28 uint8 images (white on black) of the i-th non-space character of `text`, one chosen.
    height: pixels of a character's ink height; touch: the share of letter gaps inside a word that touch or overlap;
    slant: x shift per unit of height (0.25 ~ 14 degrees)."""
    chars = [c for c in text if c != " "]
    if len(chars) != len(glyphs):
        raise ValueError("one list of glyphs per non-space character")
    placed = []  # (image scaled, x, y)
    x = int(height * 0.5)
    boxes, touching = [], []
    base = int(height * 0.6)
    i = 0
    after_space = False
    for c in text:
        if c == " ":
            x += int(height * rng.uniform(0.45, 0.8))
            after_space = True
            continue
        img = glyphs[i][rng.integers(len(glyphs[i]))]
        i += 1
        left, top, right, bottom = _ink_box(img)
        crop = img[top:bottom, left:right]
        s = height * rng.uniform(0.85, 1.1) / 22.0  # EMNIST's ink is ~22 px high in its 28 px frame
        w, h = max(1, round(crop.shape[1] * s)), max(1, round(crop.shape[0] * s))
        scaled = np.asarray(Image.fromarray(crop).resize((w, h), Image.Resampling.BILINEAR))
        y = base + int(rng.normal(0, height * 0.04)) + (height - h) // 2
        if boxes and not after_space and rng.random() < touch:  # letters of a word touch, never two words
            gap = -int(rng.uniform(0.0, 0.12) * height)  # touching, or overlapping a little
            touching.append(len(boxes))
        elif boxes:
            gap = int(rng.uniform(0.08, 0.22) * height)
        else:
            gap = 0
        x += gap
        placed.append((scaled, x, y))
        boxes.append((x, y, x + w, y + h))
        x += w
        after_space = False
    width, total_h = x + int(height * 0.5), base + 2 * height
    canvas = np.zeros((total_h, width), np.float32)
    for scaled, px, py in placed:
        region = canvas[py : py + scaled.shape[0], px : px + scaled.shape[1]]
        np.maximum(region, scaled[: region.shape[0], : region.shape[1]] / 255.0, out=region)
    boxes_out = boxes
    if slant:
        canvas, boxes_out = _slanted(canvas, boxes, slant)
    canvas = np.clip(canvas + rng.normal(0, noise, canvas.shape), 0, 1)
    image = np.rint(255 * (1 - canvas)).astype(np.uint8)  # dark on white
    return MadeLine(image, text, boxes_out, touching)


def _slanted(canvas: np.ndarray, boxes: list, slant: float) -> tuple[np.ndarray, list]:
    """Shear x by slant * (distance above the bottom): upright strokes lean right for slant > 0."""
    h, w = canvas.shape
    extra = int(np.ceil(abs(slant) * h)) + 2
    out = np.zeros((h, w + extra), np.float32)
    for y in range(h):
        shift = int(round(slant * (h - 1 - y))) + (0 if slant >= 0 else extra - 1)
        out[y, shift : shift + w] = canvas[y]
    moved = []
    for left, top, right, bottom in boxes:
        shifts = [int(round(slant * (h - 1 - y))) + (0 if slant >= 0 else extra - 1) for y in (top, bottom - 1)]
        moved.append((left + min(shifts), top, right + max(shifts), bottom))
    return out, moved


def glyph_bank(x: np.ndarray, y: np.ndarray, classes: list[str]) -> dict[str, list[np.ndarray]]:
    """Images by the character they show, keyed both ways for merged classes (EMNIST's 'C' is c and C)."""
    bank: dict[str, list[np.ndarray]] = {}
    for img, label in zip(x, y, strict=True):
        c = classes[int(label)]
        bank.setdefault(c, []).append(img)
        if c.isupper() and c.lower() not in classes:
            bank.setdefault(c.lower(), []).append(img)
    return bank
