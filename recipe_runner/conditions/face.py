"""The `mediapipe_face` condition: face mesh landmarks drawn as in the Uncanny Faces ControlNet.

mediapipe is an optional extra, imported only in `setup`. Its legacy `mediapipe.solutions` API, which
controlnet_aux's drawing code uses, was removed in mediapipe 0.10.22, and 0.10.21 needs numpy < 2.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
from PIL import Image

from recipe_runner.conditions.base import BaseCondition
from recipe_runner.conditions.detectors import _import_detector, require_controlnet_aux
from recipe_runner.errors import UserError
from recipe_runner.recipe.condition import MediapipeFaceCondition

FACE_HINT = "pip install 'recipe-runner[face]' (mediapipe==0.10.21, needs numpy<2)"
DETECT_RESOLUTION = 512  # controlnet_aux's default; its face-size filter (64 px) assumes it


def require_mediapipe() -> None:
    """Fail with a fix when mediapipe is missing or too new to have `mediapipe.solutions`."""
    try:
        import mediapipe
    except ImportError as e:
        raise UserError(
            f"the mediapipe_face condition needs mediapipe, which could not be imported ({e})", hint=FACE_HINT
        ) from None
    if not hasattr(mediapipe, "solutions"):
        version = getattr(mediapipe, "__version__", "of unknown version")
        raise UserError(
            f"mediapipe {version} is installed, but the mediapipe_face condition needs mediapipe.solutions, "
            "which mediapipe removed in 0.10.22",
            hint=f"pip install 'mediapipe==0.10.21' 'numpy<2', or {FACE_HINT}",
        )


class MediapipeFace(BaseCondition):
    type = "mediapipe_face"
    cfg: MediapipeFaceCondition

    def _load(self, device: str | None) -> Any:
        require_controlnet_aux()
        require_mediapipe()
        return _import_detector("mediapipe_face.mediapipe_face_common", "generate_annotation")

    def _apply(self, image: Image.Image) -> np.ndarray:
        import cv2  # here, not at the top: conditions/simple.py says why

        rgb = np.asarray(image)
        h, w = rgb.shape[:2]
        k = DETECT_RESOLUTION / min(h, w)
        size = (max(1, round(w * k)), max(1, round(h * k)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_LANCZOS4)
        # generate_annotation prints a line for every image without a face; keep dataset builds quiet.
        with contextlib.redirect_stdout(io.StringIO()):
            return self._model(rgb, self.cfg.max_faces, self.cfg.min_confidence)
