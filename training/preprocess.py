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

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

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

# --- What counts as ink. -------------------------------------------------------------------
# Contrast (0..1) over the background that an image must reach, after a 3x3 mean filter
# and after subtracting the background noise level, to contain a character at all. The
# mean filter keeps single noisy pixels from passing; 0.08 is ~20 grey levels.
_MIN_CONTRAST = 0.08
# An alpha channel is used only when it varies by more than this (a transparent
# background); an opaque or uniformly translucent layer carries no shape.
_ALPHA_VARIES = 0.05

# Decompression-bomb guard for load_image: a character needs nowhere near this many pixels.
MAX_PIXELS = 40_000_000


class NoCharacterFound(ValueError):
    """The image has no ink: blank, uniform, or only faint noise."""


class ImageError(ValueError):
    """The input is not an image we can read: wrong type, shape, dtype, mode, or bytes."""


# --- Loading -----------------------------------------------------------------------------


def load_image(source) -> Image.Image:
    """Decode a path, bytes, or binary file object into a fully loaded PIL image.

    Safe against hostile uploads: the pixel count is checked from the header before any
    pixel is decoded (limit MAX_PIXELS), truncated or corrupt data raises ImageError
    instead of returning a half-decoded image, and non-image bytes raise ImageError.
    Animated images (GIF, WebP, APNG) yield their first frame. The EXIF orientation tag is
    applied, so a phone photo comes out the way viewers show it; beyond that the pixels are
    not flipped or rotated. A missing path raises FileNotFoundError as usual.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        fp = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        fp = os.fspath(source)
    elif hasattr(source, "read"):
        fp = source
    else:
        raise ImageError(f"cannot load an image from {type(source).__name__}: pass a path, bytes or file")

    limit_mp = MAX_PIXELS // 1_000_000
    # Pillow warns above ~89 Mpx and raises above ~179 Mpx while reading the header; turn
    # the warning into an error for this call only (no global state is changed).
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(fp)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(f"image too large (limit {limit_mp} megapixels): {e}") from e
        except UnidentifiedImageError as e:
            raise ImageError("not an image file (unrecognised or unsupported format)") from e

    # `with` closes the file only if Pillow opened it (a path); a caller's file object stays open.
    with img:
        width, height = img.size
        if width * height > MAX_PIXELS:
            raise ImageError(f"image too large: {width}x{height} pixels (limit {limit_mp} megapixels)")
        if width == 0 or height == 0:
            raise ImageError(f"image has no pixels ({width}x{height})")
        try:
            # Frame 0 is the first frame of an animation; Image.open already sits on it.
            img.seek(0)
            img.load()
            # copy() detaches the pixels from the (possibly multi-frame) file.
            out = img.copy()
        # Decoders fail with many exception types (OSError, SyntaxError, zlib.error,
        # struct.error, EOFError, ...); all mean the same thing to a caller.
        except Exception as e:
            raise ImageError(f"could not decode image: truncated or corrupt ({e})") from e

    try:
        out = ImageOps.exif_transpose(out)
    except Exception:  # a malformed EXIF block is not worth rejecting the image for
        pass
    return out


# --- Reading pixels ----------------------------------------------------------------------


def _divisor(a: np.ndarray, what: str) -> float:
    """Check the value range of a pixel array; return what maps it onto 0..1.

    Integers: 8-bit if they fit in 0..255, else 16-bit. A 16-bit container holding only
    0..255 is 8-bit data that was widened (taken as 16-bit it would be a near-black
    image); genuine 16-bit images use the high range. Floats: 0..1 or 0..255.
    """
    if a.dtype == np.bool_:
        return 1.0
    if np.issubdtype(a.dtype, np.integer):
        if a.min() < 0:
            raise ImageError(f"{what} has negative values; expected unsigned pixel values")
        top = int(a.max())
        if top > 65535:
            raise ImageError(f"{what} has values up to {top}; expected 8-bit (0..255) or 16-bit (0..65535)")
        return 255.0 if top <= 255 else 65535.0
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)):
            raise ImageError(f"{what} contains NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        if lo < -1e-3 or hi > 255.0 + 1e-3:
            raise ImageError(f"{what} has values in [{lo:g}, {hi:g}]; expected 0..1 or 0..255")
        return 1.0 if hi <= 1.0 + 1e-6 else 255.0
    raise ImageError(f"unsupported pixel dtype {a.dtype}; expected uint8, uint16, bool or float")


def _unit(channel: np.ndarray, divisor: float) -> np.ndarray:
    # float32 halves the memory of big photos and still represents v/255 closely enough
    # that 8-bit input comes back bit-identical. Dividing (not multiplying by 1/255)
    # keeps 255 -> exactly 1.0. Tiny negative float noise is clipped.
    return np.clip(channel.astype(np.float32) / np.float32(divisor), 0.0, None)


def _array_channels(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """numpy array -> (grey 0..1, alpha 0..1 or None), all float32."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (2, 3, 4):
        raise ImageError(
            f"array of shape {arr.shape} looks channel-first; expected HxW or HxWxC "
            "(C = 1, 2, 3 or 4): transpose it to HxWxC"
        )
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (2, 3, 4))):
        raise ImageError(f"array of shape {arr.shape} is not an image; expected HxW or HxWxC with C in 1..4")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"array of shape {arr.shape} has no pixels")

    div = _divisor(arr, f"{arr.dtype} array")
    if arr.ndim == 2:
        return _unit(arr, div), None
    channels = arr.shape[2]
    if channels == 2:  # grey + alpha
        return _unit(arr[..., 0], div), _unit(arr[..., 1], div)
    # ITU-R 601 luma, as Pillow's "L" conversion, but in float (no rounding); one
    # channel at a time so a big photo never exists as a float HxWx3 array.
    grey = _unit(arr[..., 0], div) * np.float32(0.299)
    grey += _unit(arr[..., 1], div) * np.float32(0.587)
    grey += _unit(arr[..., 2], div) * np.float32(0.114)
    return grey, (_unit(arr[..., 3], div) if channels == 4 else None)


_PIL_DIRECT = {"1", "L", "I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
_PIL_VIA_RGB = {"CMYK", "YCbCr", "HSV", "LAB", "RGBX"}


def _pil_channels(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """PIL image -> (grey 0..1, alpha 0..1 or None), without 8-bit rounding where avoidable."""
    mode = img.mode
    if img.width == 0 or img.height == 0:
        raise ImageError(f"image has no pixels ({img.width}x{img.height})")
    if mode == "P" or mode == "PA":
        # Palette images: transparency lives in the palette or info["transparency"].
        img = img.convert("RGBA" if img.has_transparency_data else "RGB")
        mode = img.mode
    elif mode in ("La", "RGBa"):
        # Premultiplied alpha: un-premultiply so colours mean what they say.
        img = img.convert("LA" if mode == "La" else "RGBA")
        mode = img.mode
    elif mode in ("L", "1") and "transparency" in img.info:
        img = img.convert("LA")  # single transparent grey level (e.g. GIF frames)
        mode = img.mode
    elif mode == "RGB" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = img.mode
    elif mode in _PIL_VIA_RGB:
        try:
            img = img.convert("RGB")
        except (ValueError, OSError) as e:
            raise ImageError(f"cannot convert PIL mode {mode} to RGB: {e}") from e
        mode = "RGB"

    if mode in _PIL_DIRECT:
        arr = np.asarray(img)
        return _unit(arr, _divisor(arr, f"mode {mode} image")), None
    if mode in ("LA", "RGB", "RGBA"):
        return _array_channels(np.asarray(img))
    raise ImageError(f"unsupported PIL image mode {mode!r}; expected 1, L, LA, P, RGB, RGBA, CMYK, I;16, I or F")


def _channels(image) -> tuple[np.ndarray, np.ndarray | None]:
    if isinstance(image, Image.Image):
        return _pil_channels(image)
    if isinstance(image, (str, bytes, bytearray, os.PathLike)) or hasattr(image, "read"):
        raise ImageError("preprocess takes pixels (PIL image or array); decode files with load_image first")
    if isinstance(image, np.ndarray) or hasattr(image, "__array__"):  # also CPU tensors
        try:
            arr = np.asarray(image)
        except (TypeError, ValueError, RuntimeError) as e:  # e.g. a tensor on a GPU
            raise ImageError(f"cannot read {type(image).__name__} as a pixel array: {e}") from e
        return _array_channels(arr)
    raise ImageError(f"unsupported image type {type(image).__name__}; expected a PIL image or numpy array")


# --- Ink extraction ------------------------------------------------------------------------


def _mean3(a: np.ndarray) -> np.ndarray:
    """3x3 mean filter (edge-replicated); averages single-pixel noise down by ~3x."""
    p = np.pad(a, 1, mode="edge")
    rows = p[:-2] + p[1:-1] + p[2:]
    return (rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]) / 9.0


def _border_ring(a: np.ndarray) -> np.ndarray:
    """The outer ring of pixels, ~2 % of the short side thick (at least one pixel)."""
    k = max(1, min(a.shape) // 50)
    if 2 * k >= min(a.shape):
        return a.ravel()
    return np.concatenate([a[:k].ravel(), a[-k:].ravel(), a[k:-k, :k].ravel(), a[k:-k, -k:].ravel()])


def _flatten_alpha(grey: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    """Composite a transparent drawing onto a backdrop that contrasts with its strokes."""
    if alpha is None:
        return grey
    lo, hi = float(alpha.min()), float(alpha.max())
    if hi < _ALPHA_VARIES:
        return np.zeros_like(grey)  # fully transparent: nothing is drawn
    if hi - lo <= _ALPHA_VARIES:
        return grey  # opaque (or uniformly translucent): the colours carry the shape
    # The shape is where the alpha is. Canvas apps store transparent pixels as black
    # (0,0,0,0), so luminance alone would hide black strokes; compositing onto white
    # for dark strokes and onto black for light ones makes the strokes the contrast in
    # both cases, with antialiased (partial-alpha) edges kept soft.
    stroke = float((grey * alpha).sum() / alpha.sum())
    backdrop = 1.0 if stroke < 0.5 else 0.0
    return grey * alpha + backdrop * (1.0 - alpha)


def _ink_from_grey(grey: np.ndarray) -> np.ndarray:
    ring = _border_ring(grey)
    background = float(np.median(ring))
    # Background noise (paper texture, JPEG, sensor): 3 robust sigmas of the ring, so the
    # noise floor is subtracted along with the background instead of being stretched.
    noise = 3.0 * 1.4826 * float(np.median(np.abs(ring - background)))
    smooth = _mean3(grey)
    # Polarity: the ink is whichever side of the background shows the stronger contrast.
    # A light background can only hold darker ink and vice versa, so this agrees with
    # "invert when the border is light" and also copes with mid-grey backgrounds.
    darker = background - float(smooth.min())
    lighter = float(smooth.max()) - background
    if max(darker, lighter) - noise < _MIN_CONTRAST:
        return np.zeros(grey.shape, np.float32)
    ink = (background - grey) if darker > lighter else (grey - background)
    ink = np.clip(ink - noise, 0.0, None)
    # Stretch so the strongest ink is 1 (EMNIST images all peak at exactly 255).
    return (ink / ink.max()).astype(np.float32)


def to_grayscale_ink(image) -> np.ndarray:
    """Any supported image -> float32 HxW in [0, 1], ink high (white on black).

    Handles PIL modes 1, L, LA, P (with or without transparency), RGB, RGBA, CMYK, I;16,
    I and F, and numpy arrays HxW / HxWx1 / HxWx2 (grey+alpha) / HxWx3 / HxWx4 of dtype
    bool, uint8, uint16 (or other integers holding 8/16-bit values) and float (0..1 or
    0..255). The background (median of the border) is subtracted with its noise level and
    the strongest ink is stretched to 1. Returns all zeros when there is no ink; raises
    ImageError for anything that is not an image.
    """
    grey, alpha = _channels(image)
    return _ink_from_grey(_flatten_alpha(grey, alpha))


# --- Geometry ------------------------------------------------------------------------------


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

    labels, _ = ndimage.label(grid, structure=_EIGHT_CONNECTED)  # 0 = background, pieces 1..n
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
    kept = np.isin(labels, keep)
    # Back to full resolution: a pixel counts if its grid cell belongs to a kept piece.
    full = kept[np.arange(h) // f][:, np.arange(w) // f]
    return _bbox(mask & full)


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
    ink = to_grayscale_ink(image)
    if not ink.any():
        raise NoCharacterFound("no character found: the image is blank (no ink)")
    shifted = _shift_if_framed(ink)
    if shifted is not None:
        return _to_uint8(shifted)
    box = _ink_box(ink)
    if box is None:  # unreachable in practice: the stretched maximum is 1
        raise NoCharacterFound("no character found: no ink above half intensity")
    return _to_uint8(_frame(ink, box))
