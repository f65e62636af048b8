"""Turn an arbitrary user image into the 28x28 input an EMNIST-trained model expects.

EMNIST (Cohen et al. 2017) was made from binary NIST scans by: Gaussian blur (sigma 1 at
128 px), crop to the character's region of interest, centre it in a square frame keeping
the aspect ratio, pad with a 2 pixel border, downsample to 28x28 with bicubic
interpolation, and scale the intensities so the brightest pixel is 255. We repeat that
recipe on user images, with the geometry calibrated against the real files (numbers
below), so a drawing reaches the model looking like the training data:

- white ink on black, whatever the input polarity or transparency;
- upright, in the orientation of the *transposed* IDX images (the loader transposes the
  stored images; user images are already upright and are never transposed here);
- ink bounding box centred, long side ~22 px at half-intensity, ~24-26 px including the
  faint antialiased rim, i.e. the 2 px EMNIST border;
- brightest pixel exactly 255, soft edges like EMNIST's blurred strokes.

An image that already *is* EMNIST-shaped (28x28, ink framed with the standard margin) is
returned unchanged, so accuracy measured through `preprocess` matches raw accuracy.

numpy, scipy.ndimage and Pillow only: the web app and the CLI call this without torch.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

from training.ink import to_grayscale_ink

SIZE = 28
_EIGHT_CONNECTED = np.ones((3, 3), bool)  # diagonal neighbours belong to the same stroke

# --- Calibration against the real EMNIST files (upright bymerge train images). -----------
# Long side of the ink bounding box, thresholded at half intensity (>= 128): median 22,
# mean 21.9, 5-95 % range 20..24 (>= 64: mean 22.9; >= 1: 24 or 26, mean 25.0). Cropping
# user ink at half of its maximum and scaling that box to 22 px reproduces it (crisp
# drawings come out at 22.0 / 22.0 / 24.0 on those three thresholds); half intensity is
# the level a symmetric blur leaves in place, so crisp drawings and soft scans are
# measured alike. Finer EMNIST framing cannot be recovered from the ink alone: its
# half-intensity size varies +-5 % around 22 for the same framing rule.
_BOX_THRESHOLD = 0.5
_TARGET_LONG_SIDE = 22.0
# Extra Gaussian blur, in output pixels, before downsampling crisp high-resolution ink
# (EMNIST's sigma=1 at 128 px). Calibrated on the edge ramp: a rising edge in EMNIST has
# on average 1.65 pixels strictly between 10 % and 90 % grey; crisp drawings get 1.66
# with 0.4 (1.58 with 0.35, 1.87 with 0.5).
_BLUR_SIGMA_OUT = 0.4
# Downsampling runs via an intermediate grid of this many pixels per output pixel, where
# the blur is applied (cheap, and the same order of magnitude as EMNIST's 128 px stage).
_INTERMEDIATE_FACTOR = 4
# 28x28 inputs whose faint-rim bounding box has this long side are already framed like
# EMNIST (real images: 24 or 26 in 95 % of cases, 22..26 in 99.9 %): only shift them by
# whole pixels, never resample.
_FRAMED_LONG_SIDES = range(22, 27)

class NoCharacterFound(ValueError):
    """The image has no ink: blank, uniform, or only faint noise."""


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Inclusive (top, bottom, left, right) of the True pixels, or None."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def _ink_box(ink: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box of the character: half-intensity ink, minus isolated specks.

    Faint noise is already below the half-intensity threshold. Strong specks (dust,
    a stray dot, a scanner mark) are small connected pieces far from the character:
    pieces holding >= 2 % of the ink form the character, and smaller pieces count only
    when they lie near it (within 20 % of its size), which keeps the dot of an i, a
    j, or the gaps of a broken stroke. Components are found on a grid of at most
    ~128 cells a side (max-pooled, so thin strokes stay connected).
    """
    mask = ink >= _BOX_THRESHOLD
    if not mask.any():
        return None
    h, w = mask.shape
    f = max(1, -(-max(h, w) // 128))
    gh, gw = -(-h // f), -(-w // f)
    grid = np.zeros((gh * f, gw * f), bool)
    grid[:h, :w] = mask
    grid = grid.reshape(gh, f, gw, f).any(axis=(1, 3))

    labels, n = ndimage.label(grid, structure=_EIGHT_CONNECTED)  # 0 = background, pieces 1..n
    if n == 1:  # one piece: it is the character (the usual case; each candidate of a line is framed here)
        return _bbox(mask)
    areas = np.bincount(labels.ravel())[1:]
    boxes = np.array([(r.start, r.stop - 1, c.start, c.stop - 1) for r, c in ndimage.find_objects(labels)])
    tops, bottoms, lefts, rights = boxes.T

    # (If the ink is all dust-sized pieces, the largest ones stand for the character.)
    major = areas >= min(0.02 * areas.sum(), areas.max())
    top, bottom = tops[major].min(), bottoms[major].max()
    left, right = lefts[major].min(), rights[major].max()
    reach = 0.2 * max(bottom - top + 1, right - left + 1)
    gap = np.maximum.reduce([top - bottoms, tops - bottom, left - rights, lefts - right, np.zeros_like(tops)])
    keep = np.flatnonzero(major | (gap <= reach)) + 1
    if len(keep) == n:  # (every piece kept: the dot of an i, a broken stroke)
        return _bbox(mask)
    kept = np.isin(labels, keep)
    # Back to full resolution: a pixel counts if its grid cell belongs to a kept piece.
    full = kept if f == 1 else kept[np.arange(h) // f][:, np.arange(w) // f]
    return _bbox(mask & full[:h, :w])


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with zeros (background) outside the image."""
    if sigma < 0.05:
        return a
    return ndimage.gaussian_filter(a.astype(np.float64), sigma, mode="constant").astype(np.float32)


def _crop(a: np.ndarray, top: int, left: int, h: int, w: int) -> np.ndarray:
    """a[top:top+h, left:left+w] with zeros (background) outside the image."""
    out = np.zeros((h, w), np.float32)
    t0, l0 = max(top, 0), max(left, 0)
    t1, l1 = min(top + h, a.shape[0]), min(left + w, a.shape[1])
    if t1 > t0 and l1 > l0:
        out[t0 - top : t1 - top, l0 - left : l1 - left] = a[t0:t1, l0:l1]
    return out


def _resample(a: np.ndarray, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """Bicubic resample of the box (left, top, right, bottom) of a to size x size.

    Pillow's bicubic widens its kernel when shrinking (antialiasing), like MATLAB's
    imresize which EMNIST used.
    """
    img = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32))  # mode F
    return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC, box=box), dtype=np.float32)


def _frame(ink: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Centre the box in a square frame with EMNIST margins and resample it to SIZE x SIZE."""
    top, bottom, left, right = box
    # Continuous coordinates (pixel edges), so a box of n pixels measures n.
    cy, cx = (top + bottom + 1) / 2.0, (left + right + 1) / 2.0
    long_side = max(bottom - top + 1, right - left + 1)
    frame = long_side * SIZE / _TARGET_LONG_SIDE
    scale = frame / SIZE  # input pixels per output pixel

    if scale > _INTERMEDIATE_FACTOR:
        # Large input: shrink to an intermediate grid first (antialiased), then blur there.
        # The grid keeps a margin so the blur and the final kernel see real zeros.
        k = _INTERMEDIATE_FACTOR
        margin = 3 * k
        n = SIZE * k + 2 * margin
        step = frame / (SIZE * k)
        pad = int(np.ceil(margin * step)) + 2
        y0, x0 = int(np.floor(cy - frame / 2)) - pad, int(np.floor(cx - frame / 2)) - pad
        region = _crop(ink, y0, x0, int(np.ceil(frame)) + 2 * pad + 1, int(np.ceil(frame)) + 2 * pad + 1)
        top_f, left_f = cy - frame / 2 - y0 - margin * step, cx - frame / 2 - x0 - margin * step
        span = frame + 2 * margin * step
        grid = _resample(region, (left_f, top_f, left_f + span, top_f + span), n)
        grid = _blur(grid, _BLUR_SIGMA_OUT * k)
        return _resample(grid, (margin, margin, margin + SIZE * k, margin + SIZE * k), SIZE)

    # Small input: blur at native resolution when shrinking; never when enlarging (an
    # image at or below output resolution is already as soft as its pixels).
    sigma = _BLUR_SIGMA_OUT * scale if scale > 1 else 0.0
    pad = int(np.ceil(3 * sigma + 2 * max(scale, 1.0))) + 2
    y0, x0 = int(np.floor(cy - frame / 2)) - pad, int(np.floor(cx - frame / 2)) - pad
    side = int(np.ceil(frame)) + 2 * pad + 1
    region = _blur(_crop(ink, y0, x0, side, side), sigma)
    top_f, left_f = cy - frame / 2 - y0, cx - frame / 2 - x0
    return _resample(region, (left_f, top_f, left_f + frame, top_f + frame), SIZE)


def _shift_if_framed(ink: np.ndarray) -> np.ndarray | None:
    """For a 28x28 image already framed like EMNIST, re-centre it by whole pixels.

    "Framed" means the bounding box of all visible ink (>= 1 grey level, the faint
    antialiased rim included) has an EMNIST long side. Such an image needs no scaling,
    and whole-pixel shifts are lossless, so real EMNIST images pass through bit-identical.
    Returns None when the image needs resampling instead.
    """
    if ink.shape != (SIZE, SIZE):
        return None
    box = _bbox(ink >= 0.5 / 255)
    if box is None:
        return None
    top, bottom, left, right = box
    if max(bottom - top + 1, right - left + 1) not in _FRAMED_LONG_SIDES:
        return None
    # Move the box centre to the frame centre (13.5), truncating toward zero: an odd-sized
    # box cannot be centred exactly and stays put, as EMNIST's own odd boxes are.
    dy = int(np.fix((SIZE - 1 - top - bottom) / 2))
    dx = int(np.fix((SIZE - 1 - left - right) / 2))
    out = np.zeros_like(ink)
    out[max(dy, 0) : SIZE + min(dy, 0), max(dx, 0) : SIZE + min(dx, 0)] = ink[
        max(-dy, 0) : SIZE + min(-dy, 0), max(-dx, 0) : SIZE + min(-dx, 0)
    ]
    return out


def _to_uint8(a: np.ndarray) -> np.ndarray:
    top = float(a.max())
    if top <= 0:
        raise NoCharacterFound("no character found: nothing left after resampling")
    # Bicubic overshoot is clipped; the peak goes back to 255 as in EMNIST.
    return np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)


def preprocess(image) -> np.ndarray:
    """Any supported image -> uint8 (28, 28), white ink on black, upright, EMNIST-framed.

    Raises NoCharacterFound when there is no ink and ImageError for unsupported input.
    """
    return frame_ink(to_grayscale_ink(image))


def frame_ink(ink: np.ndarray) -> np.ndarray:
    """An ink map (float32 in [0, 1], ink high, its strongest ink 1: what to_grayscale_ink gives, or one character
    of a line, training/segment.py) -> uint8 (28, 28) EMNIST-framed: the second half of preprocess."""
    if not ink.any():
        raise NoCharacterFound("no character found: the image is blank (no ink)")
    shifted = _shift_if_framed(ink)
    if shifted is not None:
        return _to_uint8(shifted)
    box = _ink_box(ink)
    if box is None:  # unreachable in practice: the stretched maximum is 1
        raise NoCharacterFound("no character found: no ink above half intensity")
    return _to_uint8(_frame(ink, box))
