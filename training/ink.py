"""Any picture a user gives, as an ink map: float32 in [0, 1], 1 = ink, whatever the polarity (dark on light or
light on dark), the mode (1, L, P, RGB(A), CMYK, 16-bit, float arrays) or the transparency. The first half of
turning a picture into a model's input; training/preprocess.py frames the ink like EMNIST.

Decoding is guarded: a decompression bomb is refused before a pixel is decoded (MAX_PIXELS), and anything that is
not an image raises ImageError with a one-line reason, never another exception.

numpy and Pillow only: the web app and the CLI call this without torch.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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
