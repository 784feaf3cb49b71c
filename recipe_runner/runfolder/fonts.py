"""The font of the prompts and labels drawn into the run folder's pictures (dataset/preview.png, the
validation grids under samples/).

Pillow's own default font (Aileron, bundled) has glyphs for ASCII alone: é, ñ, ß, ø, Ω, ж and the em
dash of a caption all came out as empty boxes. So text is drawn with the first of a few common system
fonts that has a glyph for each of its characters (DejaVu Sans on most Linux systems, Noto and its CJK
fonts where installed, Arial or Segoe UI on Windows, Arial Unicode or Helvetica on macOS; Pillow finds
them by name in the system's font folders), else the first of them found, else Pillow's default.
"""

from __future__ import annotations

import functools
import textwrap

from PIL import ImageFont

Font = ImageFont.ImageFont | ImageFont.FreeTypeFont

# Wide coverage first; the CJK ones after, for text the others lack glyphs for.
CANDIDATES = (
    "DejaVuSans.ttf",
    "NotoSans-Regular.ttf",
    "LiberationSans-Regular.ttf",
    "segoeui.ttf",
    "arial.ttf",
    "Arial Unicode.ttf",
    "Helvetica.ttc",
    "NotoSansCJK-Regular.ttc",
    "wqy-zenhei.ttc",
    "msyh.ttc",
)
# A code point no font maps (the last private-use one): what a font draws for a glyph it lacks.
_NO_GLYPH = "\U0010fffd"


@functools.cache
def _installed(size: int, candidates: tuple[str, ...] = CANDIDATES) -> tuple[ImageFont.FreeTypeFont, ...]:
    found = []
    for name in candidates:
        try:
            found.append(ImageFont.truetype(name, size))
        except OSError:  # not installed here (or Pillow without FreeType)
            continue
    return tuple(found)


@functools.lru_cache(maxsize=4096)
def _drawn(font: Font, char: str) -> tuple[tuple[int, int], bytes]:
    mask = font.getmask(char)
    return mask.size, bytes(mask)


def _has_glyphs(font: Font, text: str) -> bool:
    missing = _drawn(font, _NO_GLYPH)
    return all(_drawn(font, ch) != missing for ch in set(text) if not ch.isspace())


def default_font(size: int) -> Font:
    """Pillow's own font: scalable when Pillow has FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):
        return ImageFont.load_default()


def font_for(text: str, size: int, candidates: tuple[str, ...] = CANDIDATES) -> Font:
    """The first installed candidate with a glyph for every character of `text`; else the first one
    installed; else Pillow's default font."""
    fonts = _installed(size, candidates)
    for font in fonts:
        if _has_glyphs(font, text):
            return font
    return fonts[0] if fonts else default_font(size)


def wrap(text: str, font: Font, width: int, max_lines: int) -> list[str]:
    """`text` in lines no wider than `width` pixels in `font` (lines of 8 characters at the least), at
    most `max_lines`, the last one ending in ' ...' where text was left out."""
    size = getattr(font, "size", 10)
    most = min(len(text), int(width / (0.25 * size)))  # no glyph is narrower than a quarter em
    lines: list[str] = []
    for chars in range(max(8, most), 7, -1):  # the longest lines that fit
        lines = textwrap.wrap(text, width=chars, max_lines=max_lines, placeholder=" ...")
        if all(font.getlength(line) <= width for line in lines):
            break
    return lines
