"""Images of a row: decoded from any cell (with EXIF orientation, a bounded decode of large JPEGs, and
every way a file can be bad named), cropped and resized, checked for one flat colour, and stored as PNG.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from recipe_runner.conditions.base import to_rgb
from recipe_runner.data.references import local_path

_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height

# The attribute an image decoded from PNG bytes carries while it is those bytes' pixels as they are: `png`
# stores the source's own bytes instead of encoding the same pixels again (fill50k's 512 px PNGs at
# resolution 512: two encodes a row saved). PIL copies no attribute of ours to a derived image (crop,
# resize, convert, copy), and rows' images are never changed in place.
_SOURCE_PNG = "_recipe_runner_source_png"


class BadImage(Exception):
    def __init__(self, reason: str, file: str, detail: str = ""):
        super().__init__(reason, file, detail)
        self.reason, self.file, self.detail = reason, file, detail


def open_image(
    value: Any, base_dir: str | None, draft: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """A decoded image from a cell (PIL image, {bytes, path} dict, bytes, or path string), and its full
    size after EXIF orientation. `draft` lets JPEG decode at a reduced scale that still covers it."""
    if isinstance(value, Image.Image):
        return value, value.size
    file = ""
    if isinstance(value, dict):
        file = value.get("path") or ""
        value = value.get("bytes") or file or None
    if value is None:
        raise BadImage("no image", file)
    raw = None  # the encoded bytes, where they are at hand
    if isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
        src: Any = io.BytesIO(raw)
    elif isinstance(value, str):
        file = value
        local = local_path(value, base_dir)  # as the dataset cache records it (references.py)
        if local is None:
            src = _download(value)
        else:
            src = local
            if not src.is_file():
                raise BadImage("missing file", file, f"looked at {src}")
            if src.suffix.lower() == ".png":
                raw = src.read_bytes()
                src = io.BytesIO(raw)
    else:
        raise BadImage("not an image", file, f"a {type(value).__name__} value")
    try:
        with Image.open(src) as im:
            full = im.size
            if draft and min(full) > 2 * draft:  # JPEG only: decode at 1/2, 1/4 or 1/8 scale, still >= draft
                scale = draft / min(full)
                im.draft(None, (math.ceil(im.width * scale), math.ceil(im.height * scale)))
            im.load()  # decode now: a truncated or corrupt file fails here, not later in the writer
            orientation = im.getexif().get(0x0112)
            rotated = orientation in _ROTATED
            image = ImageOps.exif_transpose(im)
            as_stored = im.format == "PNG" and orientation in (None, 1) and image.mode == "RGB"
    except Image.DecompressionBombError as e:
        raise BadImage("image too large", file, str(e)) from None
    except UnidentifiedImageError:
        raise BadImage("unreadable image", file, "not an image format Pillow knows") from None
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ... on bad data
        reason = "truncated image" if "truncated" in str(e) else "unreadable image"
        raise BadImage(reason, file, f"{type(e).__name__}: {e}") from None
    if raw is not None and as_stored:
        setattr(image, _SOURCE_PNG, raw)
    return image, (full[::-1] if rotated else full)


def _download(url: str) -> io.BytesIO:
    from datasets.utils.file_utils import xopen  # datasets' opener knows hf:// and the hub token

    try:
        with xopen(url, "rb") as f:
            return io.BytesIO(f.read())
    except Exception as e:
        raise BadImage("unreachable URL", url, f"{type(e).__name__}: {e}") from None


def fit(
    image: Image.Image, fraction_box: tuple[float, ...], size: tuple[int, int], resample: int
) -> Image.Image:
    """`image` as RGB, cropped to `fraction_box` (fractions of its size) and resized to `size`."""
    w, h = image.size
    x0, y0, x1, y1 = fraction_box
    rgb = to_rgb(image)
    if rgb.size == size and fraction_box == (0.0, 0.0, 1.0, 1.0):
        return rgb  # PIL would return a copy: this is the same pixels and keeps the source's PNG bytes
    return rgb.resize(size, resample, box=(x0 * w, y0 * h, x1 * w, y1 * h))


def crop_box(
    size: tuple[int, int], crop: str, rng: np.random.Generator | None, aspect: float = 1.0
) -> tuple[float, ...]:
    """The largest centred (or randomly placed) box of width/height `aspect`, as fractions of the image's
    width and height."""
    w, h = size
    box_w, box_h = (h * aspect, h) if w / h > aspect else (w, w / aspect)
    u = 0.5 if crop == "center" or rng is None else float(rng.random())
    x0, y0 = u * (w - box_w), u * (h - box_h)  # one of the two slacks is zero
    return (x0 / w, y0 / h, (x0 + box_w) / w, (y0 + box_h) / h)


def blank(image: Image.Image) -> bool:
    """One flat colour: every band's minimum is its maximum."""
    extrema = image.getextrema()
    bands = extrema if isinstance(extrema[0], tuple) else (extrema,)
    return all(low == high for low, high in bands)


def png(image: Image.Image) -> dict:
    """The image as a datasets Image cell of PNG bytes: its source's own bytes where it is a PNG's pixels
    as they are (see _SOURCE_PNG), else encoded here."""
    source = getattr(image, _SOURCE_PNG, None)
    if source is not None:
        return {"bytes": source, "path": None}
    # Encoded here rather than by datasets: an image opened from a file would otherwise be stored as a
    # reference to that path, and the built dataset must not depend on the source files.
    buf = io.BytesIO()
    # Lossless, so training sees exactly these pixels; level 1 writes faster than the default 6 for
    # slightly larger files (little difference on photos, which barely compress either way).
    image.save(buf, format="PNG", compress_level=1)
    return {"bytes": buf.getvalue(), "path": None}
