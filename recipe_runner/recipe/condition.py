"""The `condition:` section: how conditioning images are made when the data has none.

A discriminated union on `type`. The code that applies each condition lives in
`recipe_runner.conditions`; this module only describes and validates parameters.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from recipe_runner.recipe.base import FieldError, Section

DEFAULT_ANNOTATORS = "lllyasviel/Annotators"
_FUNCTION_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


class CannyCondition(Section):
    """Canny edges (OpenCV). No weights needed."""

    type: Literal["canny"] = "canny"
    """Which condition: `canny`."""
    low_threshold: int = Field(100, ge=0, le=255)
    """Lower hysteresis threshold of the Canny edge detector (0-255)."""
    high_threshold: int = Field(200, ge=0, le=255)
    """Upper hysteresis threshold of the Canny edge detector (0-255); must be >= low_threshold."""

    @model_validator(mode="after")
    def _ordered(self) -> CannyCondition:
        if self.high_threshold < self.low_threshold:
            raise FieldError(
                "high_threshold",
                f"high_threshold ({self.high_threshold}) must be >= low_threshold ({self.low_threshold})",
            )
        return self


class ScribbleCondition(Section):
    """Scribble-like strokes made from Canny edges, thickened. No weights needed."""

    type: Literal["scribble"] = "scribble"
    """Which condition: `scribble`."""
    low_threshold: int = Field(100, ge=0, le=255)
    """Lower Canny threshold for the edges the scribble is drawn from."""
    high_threshold: int = Field(200, ge=0, le=255)
    """Upper Canny threshold for the edges the scribble is drawn from."""
    thickness: int = Field(3, ge=1, le=32)
    """Stroke width in pixels after dilating the edges."""

    @model_validator(mode="after")
    def _ordered(self) -> ScribbleCondition:
        if self.high_threshold < self.low_threshold:
            raise FieldError(
                "high_threshold",
                f"high_threshold ({self.high_threshold}) must be >= low_threshold ({self.low_threshold})",
            )
        return self


class ShuffleCondition(Section):
    """Content shuffle: the image's content randomly warped, for style transfer. No weights needed."""

    type: Literal["shuffle"] = "shuffle"
    """Which condition: `shuffle`."""
    grid: int = Field(256, ge=2, le=4096)
    """Flow-field cell size in pixels (ControlNet 1.1: 256 at 512 px); smaller scrambles more."""


class ColorPaletteCondition(Section):
    """Pixelated colour palette (SD 2.1 colour ControlNet): downscale to a grid, upscale nearest-neighbour."""

    type: Literal["color_palette"] = "color_palette"
    """Which condition: `color_palette`."""
    grid_size: int = Field(8, ge=1, le=256)
    """Cells per side of the palette grid (e.g. 8 gives an 8x8 mosaic)."""


class AnnotatorCondition(Section):
    """Shared parameters of conditions computed by a controlnet_aux annotator with weights."""

    annotator: str = DEFAULT_ANNOTATORS
    """Where the annotator weights come from: a hub repo id or a local folder holding the same files."""
    detect_resolution: int = Field(512, ge=64, le=4096)
    """Resolution the annotator sees; the result is resized to the dataset resolution."""


class HedCondition(AnnotatorCondition):
    """Soft edges from HED (controlnet_aux HEDdetector)."""

    type: Literal["hed"] = "hed"
    """Which condition: `hed`."""
    safe: bool = False
    """Quantise the soft edges (less noise, as in ControlNet 1.1's softedge_hedsafe)."""
    scribble: bool = False
    """Post-process into scribble-like strokes."""


class DepthCondition(AnnotatorCondition):
    """Monocular depth (MiDaS through controlnet_aux)."""

    type: Literal["depth"] = "depth"
    """Which condition: `depth`."""


class OpenposeCondition(AnnotatorCondition):
    """Human pose skeletons (OpenPose through controlnet_aux)."""

    type: Literal["openpose"] = "openpose"
    """Which condition: `openpose`."""
    include_body: bool = True
    """Draw the body skeleton."""
    include_hand: bool = False
    """Also draw hand keypoints."""
    include_face: bool = False
    """Also draw face keypoints."""


class MlsdCondition(AnnotatorCondition):
    """Straight line segments (M-LSD), for architecture and interiors."""

    type: Literal["mlsd"] = "mlsd"
    """Which condition: `mlsd`."""
    value_threshold: float = Field(0.1, gt=0, le=2)
    """Score threshold of M-LSD's line proposals."""
    distance_threshold: float = Field(0.1, gt=0, le=20)
    """Distance threshold of M-LSD's line proposals."""


class LineartCondition(AnnotatorCondition):
    """Line art extracted by the ControlNet 1.1 lineart model."""

    type: Literal["lineart"] = "lineart"
    """Which condition: `lineart`."""
    coarse: bool = False
    """Use the coarse line-art model (thicker, fewer lines)."""


class NormalCondition(AnnotatorCondition):
    """Surface normals (NormalBae through controlnet_aux)."""

    type: Literal["normal"] = "normal"
    """Which condition: `normal`."""


class SegmentationCondition(AnnotatorCondition):
    """Segmentation maps (Segment Anything through controlnet_aux)."""

    type: Literal["segmentation"] = "segmentation"
    """Which condition: `segmentation`."""
    annotator: str = "ybelkada/segment-anything"
    """Where the SAM weights come from: a Hugging Face repo id or a local folder."""
    checkpoint: str = "checkpoints/sam_vit_b_01ec64.pth"
    """File of the SAM checkpoint inside the annotator repo or folder."""


class MediapipeFaceCondition(Section):
    """Face landmarks (MediaPipe face mesh), as in the Uncanny Faces blog. Needs the `face` extra."""

    type: Literal["mediapipe_face"] = "mediapipe_face"
    """Which condition: `mediapipe_face`."""
    max_faces: int = Field(1, ge=1, le=32)
    """Largest number of faces drawn per image."""
    min_confidence: float = Field(0.5, ge=0, le=1)
    """Minimum detection confidence for a face to be drawn."""


class CustomCondition(Section):
    """Your own function: `module:function` taking a PIL image (plus `params`) and returning one.

    The module is imported only when the dataset is built, never by `recipe validate`.
    """

    type: Literal["custom"] = "custom"
    """Which condition: `custom`."""
    function: str
    """Import path of the function, as `package.module:function`."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments passed to the function for every image."""

    @field_validator("function")
    @classmethod
    def _import_path(cls, v: str) -> str:
        if not _FUNCTION_RE.match(v):
            raise ValueError(f"expected 'package.module:function', got {v!r}")
        return v


Condition = Annotated[
    Union[
        CannyCondition,
        HedCondition,
        DepthCondition,
        OpenposeCondition,
        MlsdCondition,
        LineartCondition,
        NormalCondition,
        ScribbleCondition,
        SegmentationCondition,
        ShuffleCondition,
        ColorPaletteCondition,
        MediapipeFaceCondition,
        CustomCondition,
    ],
    Field(discriminator="type"),
]

CONDITION_TYPES: tuple[str, ...] = (
    "canny",
    "hed",
    "depth",
    "openpose",
    "mlsd",
    "lineart",
    "normal",
    "scribble",
    "segmentation",
    "shuffle",
    "color_palette",
    "mediapipe_face",
    "custom",
)
