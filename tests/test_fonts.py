"""Prompts with accents, dashes and other scripts are legible in preview.png and the validation grids
(runfolder/fonts.py): Pillow's own font drew each of their letters as the box it draws for a glyph it
lacks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from recipe_runner.data.preview import render_preview
from recipe_runner.runfolder import fonts
from recipe_runner.training.validation import ValidationPair, make_grid

NOT_A_GLYPH = "\U0010fffd"  # mapped by no font: drawn as the missing-glyph box
WORDS = "café — naïve, Straße, Ωμέγα, жёлтый"


@pytest.fixture(autouse=True)
def _a_wide_font_installed() -> None:
    if not any(fonts._has_glyphs(f, WORDS) for f in fonts._installed(14)):
        pytest.skip("none of runfolder/fonts.py's fonts with these glyphs is installed here")


def _tile() -> Image.Image:
    return Image.new("RGB", (64, 64), (40, 80, 120))


def _preview(prompt: str) -> np.ndarray:
    return np.asarray(render_preview([{"image": _tile(), "conditioning_image": _tile(), "prompt": prompt}]))


def _grid(prompt: str) -> np.ndarray:
    return np.asarray(make_grid([ValidationPair(prompt, _tile())], [[_tile()]], resolution=64))


@pytest.mark.parametrize("draw", [_preview, _grid], ids=["preview", "validation-grid"])
@pytest.mark.parametrize("letter", ["é", "ñ", "ß", "—", "ж"])
def test_a_letter_beyond_ascii_is_drawn_as_itself(draw, letter: str) -> None:
    assert not np.array_equal(draw(f"a {letter}"), draw(f"a {NOT_A_GLYPH}"))


def test_each_prompt_gets_a_font_with_its_glyphs() -> None:
    font = fonts.font_for(WORDS, 14)
    assert fonts._has_glyphs(font, WORDS)
    assert not fonts._has_glyphs(font, NOT_A_GLYPH)


def test_no_font_installed_falls_back_to_pillows_own() -> None:
    font = fonts.font_for(WORDS, 14, candidates=("no-such-font-anywhere.ttf",))
    assert font.getlength("abc") > 0


def test_wrapped_lines_fit_the_width_and_say_when_text_was_left_out() -> None:
    font = fonts.font_for(WORDS, 14)
    text = " ".join([WORDS] * 10)
    lines = fonts.wrap(text, font, 200, max_lines=3)
    assert len(lines) == 3 and lines[-1].endswith(" ...")
    assert all(font.getlength(line) <= 200 for line in lines)
    assert fonts.wrap("short", font, 200, max_lines=3) == ["short"]
