"""Conditions computed by controlnet_aux annotators with weights (HED, MiDaS, OpenPose, ...).

Order of checks in `setup`: controlnet_aux installed, then weights present (before importing torch, so
a missing file is reported in a second), then the detector is imported and loaded.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from recipe_runner.conditions.base import BaseCondition, image_seed
from recipe_runner.conditions.detectors import _import_detector, require_controlnet_aux
from recipe_runner.conditions.weights import resolve_weights
from recipe_runner.errors import UserError
from recipe_runner.recipe.condition import (
    DEFAULT_ANNOTATORS,
    DepthCondition,
    HedCondition,
    LineartCondition,
    MlsdCondition,
    NormalCondition,
    OpenposeCondition,
    SegmentationCondition,
)


class Annotator(BaseCondition):
    """A controlnet_aux detector run at `detect_resolution`, its output resized back to the input size."""

    repo: ClassVar[str] = DEFAULT_ANNOTATORS  # where the files come from by default; named in error hints

    def weight_files(self) -> list[str]:
        """Files needed inside `cfg.annotator`, relative to its root."""
        raise NotImplementedError

    def _build(self, folder: Path) -> Any:
        raise NotImplementedError

    def _options(self) -> dict[str, Any]:
        return {}

    def _load(self, device: str | None) -> Any:
        require_controlnet_aux()
        folder = resolve_weights(
            self.cfg.annotator,
            self.weight_files(),
            repo=self.repo,
            condition=self.type,
            base_dir=self.base_dir,
        )
        detector = self._build(folder)
        if device is not None:
            detector.to(device)
        return detector

    def _apply(self, image: Image.Image) -> np.ndarray:
        res = self.cfg.detect_resolution
        return self._model(
            np.asarray(image),
            detect_resolution=res,
            image_resolution=res,
            output_type="np",
            **self._options(),
        )


class Hed(Annotator):
    type = "hed"
    cfg: HedCondition

    def weight_files(self) -> list[str]:
        return ["ControlNetHED.pth"]

    def _build(self, folder: Path) -> Any:
        return _import_detector("hed", "HEDdetector").from_pretrained(
            str(folder), filename="ControlNetHED.pth"
        )

    def _options(self) -> dict[str, Any]:
        return {"safe": self.cfg.safe, "scribble": self.cfg.scribble}


class Depth(Annotator):
    type = "depth"
    cfg: DepthCondition

    def weight_files(self) -> list[str]:
        return ["dpt_hybrid-midas-501f0c75.pt"]

    def _build(self, folder: Path) -> Any:
        detector = _import_detector("midas", "MidasDetector")
        return detector.from_pretrained(str(folder), filename=self.weight_files()[0])


class Openpose(Annotator):
    type = "openpose"
    cfg: OpenposeCondition

    def weight_files(self) -> list[str]:
        # The body model is always needed: hands and faces are located from the body keypoints.
        files = ["body_pose_model.pth"]
        files += ["hand_pose_model.pth"] if self.cfg.include_hand else []
        return files + (["facenet.pth"] if self.cfg.include_face else [])

    def _build(self, folder: Path) -> Any:
        # Built by hand rather than with from_pretrained, which loads all three models unconditionally.
        def part(submodule: str, name: str, file: str, wanted: bool = True) -> Any:
            return _import_detector(submodule, name)(str(folder / file)) if wanted else None

        detector = _import_detector("open_pose", "OpenposeDetector")(
            part("open_pose.body", "Body", "body_pose_model.pth"),
            part("open_pose.hand", "Hand", "hand_pose_model.pth", self.cfg.include_hand),
            part("open_pose.face", "Face", "facenet.pth", self.cfg.include_face),
        )
        return _PartsOnDevice(detector)

    def _options(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "include_body": cfg.include_body,
            "include_hand": cfg.include_hand,
            "include_face": cfg.include_face,
        }


class _PartsOnDevice:
    """OpenposeDetector whose `to` skips the hand and face models that were not loaded."""

    def __init__(self, detector: Any):
        self.detector = detector

    def to(self, device: str) -> _PartsOnDevice:
        d = self.detector
        for part in (d.body_estimation, d.hand_estimation, d.face_estimation):
            if part is not None:
                part.to(device)
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.detector(*args, **kwargs)


class Mlsd(Annotator):
    type = "mlsd"
    cfg: MlsdCondition

    def weight_files(self) -> list[str]:
        return ["mlsd_large_512_fp32.pth"]

    def _build(self, folder: Path) -> Any:
        detector = _import_detector("mlsd", "MLSDdetector")
        return detector.from_pretrained(str(folder), filename=self.weight_files()[0])

    def _options(self) -> dict[str, Any]:
        return {"thr_v": self.cfg.value_threshold, "thr_d": self.cfg.distance_threshold}


class Lineart(Annotator):
    type = "lineart"
    cfg: LineartCondition

    def weight_files(self) -> list[str]:
        return ["sk_model2.pth" if self.cfg.coarse else "sk_model.pth"]

    def _build(self, folder: Path) -> Any:
        # from_pretrained wants both models; give it the one we use twice (17 MB) rather than need both files.
        name = self.weight_files()[0]
        detector = _import_detector("lineart", "LineartDetector")
        return detector.from_pretrained(str(folder), filename=name, coarse_filename=name)

    def _options(self) -> dict[str, Any]:
        return {"coarse": self.cfg.coarse}


class Normal(Annotator):
    type = "normal"
    cfg: NormalCondition

    def weight_files(self) -> list[str]:
        return ["scannet.pt"]

    def _build(self, folder: Path) -> Any:
        detector = _import_detector("normalbae", "NormalBaeDetector")
        return detector.from_pretrained(str(folder), filename="scannet.pt")


class Segmentation(Annotator):
    """Segment Anything masks, each filled with a colour; colours are seeded from the image."""

    type = "segmentation"
    cfg: SegmentationCondition
    repo = "ybelkada/segment-anything"
    resample = Image.Resampling.NEAREST  # keep mask colours exact

    def weight_files(self) -> list[str]:
        return [self.cfg.checkpoint]

    def _load(self, device: str | None) -> Any:
        self._model_type()  # a bad checkpoint name fails before any download
        return super()._load(None)  # SamDetector has no `to`; it moves itself to CUDA when there is one

    def _model_type(self) -> str:
        match = re.search(r"vit_[hlbt]", Path(self.cfg.checkpoint).name)
        if match is None:
            raise UserError(
                f"condition.checkpoint: cannot tell the SAM model type from {self.cfg.checkpoint!r}",
                hint="the file name must contain vit_h, vit_l, vit_b or vit_t, as the official ones do",
            )
        return match.group(0)

    def _build(self, folder: Path) -> Any:
        detector = _import_detector("segment_anything", "SamDetector")
        return detector.from_pretrained(
            str(folder), model_type=self._model_type(), filename=self.cfg.checkpoint
        )

    def _apply(self, image: Image.Image) -> np.ndarray:
        # SamDetector colours masks with NumPy's global RNG; seed it from the image, then put it back.
        state = np.random.get_state()
        np.random.seed(image_seed(np.asarray(image)) % 2**32)
        try:
            return super()._apply(image)
        finally:
            np.random.set_state(state)
