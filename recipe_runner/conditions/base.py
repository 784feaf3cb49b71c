"""What every condition is: a picklable callable from an image to its conditioning image.

A condition object is cheap to build and holds only its recipe section until `setup()` loads what it
needs (weights, user code). `datasets.map(num_proc=N)` pickles the object to each worker, so loaded
state is dropped on pickling and each worker sets itself up again on its first image. That also keeps
the pickle (and so the datasets cache fingerprint) independent of whether setup has run.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
from PIL import Image

# Modes holding more than 8 bits per grey pixel; PIL's own convert("RGB") clips them instead of scaling.
_WIDE_GREY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


class ConditionFn(Protocol):
    """The interface `build_condition` returns."""

    cfg: Any  # the recipe's condition section

    def setup(self, device: str | None = None) -> None: ...

    def __call__(self, image: Image.Image) -> Image.Image: ...

    def extract(self, image: Image.Image) -> Image.Image: ...


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: transparency composited over white, 16-bit grey scaled to 8 bits.

    White matches controlnet_aux's HWC3, so an RGBA input gives the same annotation here and there.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_GREY_MODES:
        grey = np.asarray(image).astype(np.float64)
        grey = np.rint(np.clip(grey, 0, 65535) / 257.0).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode == "F":
        return image.convert("L").convert("RGB")
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def image_seed(rgb: np.ndarray) -> int:
    """A seed derived from the pixels, for conditions that need randomness but must be reproducible."""
    digest = hashlib.blake2b(rgb.tobytes() + repr(rgb.shape).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def as_image(result: np.ndarray | Image.Image, size: tuple[int, int], resample: int) -> Image.Image:
    """A detector's output as an RGB PIL image of `size` (annotators work at their own resolution)."""
    out = Image.fromarray(result) if isinstance(result, np.ndarray) else result
    out = to_rgb(out)
    if out.size != size:
        out = out.resize(size, resample)
    return out


class BaseCondition:
    """Shared behaviour: input conversion, lazy setup, output size and mode, pickling without weights.

    Calling the object twice on the same image gives the same result (on the same machine and device):
    evaluation re-extracts the condition from generated images with `extract`, and a rebuilt dataset
    must be bit-identical.
    """

    type: ClassVar[str]
    resample: ClassVar[int] = Image.Resampling.BILINEAR  # for resizing an annotator's output back

    def __init__(self, cfg: Any, *, base_dir: Path | None = None):
        self.cfg = cfg
        self.base_dir = Path(base_dir).resolve() if base_dir is not None else None
        self._model: Any = None
        self._ready = False

    def setup(self, device: str | None = None) -> None:
        """Load what the condition needs, once per process; calling it again does nothing."""
        if not self._ready:
            self._model = self._load(device)
            self._ready = True

    def __call__(self, image: Image.Image) -> Image.Image:
        """The conditioning image for `image` (any mode): RGB, same size as the input."""
        self.setup()
        rgb = to_rgb(image)
        return as_image(self._apply(rgb), rgb.size, self.resample)

    def extract(self, image: Image.Image) -> Image.Image:
        """Same as calling the object; the name evaluation uses when re-extracting from generated images."""
        return self(image)

    def _load(self, device: str | None) -> Any:
        return None

    def _apply(self, image: Image.Image) -> np.ndarray | Image.Image:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_model"], state["_ready"] = None, False
        return state

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.cfg.model_dump().items() if k != "type")
        return f"{type(self).__name__}({fields})"
