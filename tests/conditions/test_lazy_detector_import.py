"""controlnet_aux detectors import without controlnet_aux/__init__.py, so a too-new mediapipe cannot break them.

One subprocess with a fake mediapipe >= 0.10.22 (no `solutions`) first on the path. It also runs HED end to
end on randomly initialised weights: the only test here that imports torch.
"""

from __future__ import annotations

from pathlib import Path

SCRIPT = """
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import mediapipe
from recipe_runner.conditions import build_condition
from recipe_runner.conditions.detectors import _import_detector
from recipe_runner.errors import UserError
from recipe_runner.recipe.condition import HedCondition, MediapipeFaceCondition

assert not hasattr(mediapipe, "solutions"), "the fake mediapipe is not the one imported"
empty, weights = Path(sys.argv[1]), Path(sys.argv[2])
image = Image.new("RGB", (80, 48))
ImageDraw.Draw(image).rectangle([20, 10, 60, 40], fill=(250, 200, 10))

def user_error(fn):
    try:
        fn(image)
    except UserError as e:
        return e.message
    raise AssertionError("no UserError")

assert "ControlNetHED.pth" in user_error(build_condition(HedCondition(annotator=str(empty))))
assert "mediapipe 0.10.30" in user_error(build_condition(MediapipeFaceCondition()))

for sub, name in [("hed", "HEDdetector"), ("midas", "MidasDetector"), ("open_pose", "OpenposeDetector"),
                  ("open_pose.body", "Body"), ("open_pose.hand", "Hand"), ("open_pose.face", "Face"),
                  ("mlsd", "MLSDdetector"), ("lineart", "LineartDetector"), ("normalbae", "NormalBaeDetector"),
                  ("segment_anything", "SamDetector")]:
    _import_detector(sub, name)
assert not [m for m in sys.modules if m.startswith("controlnet_aux.mediapipe_face")]

import torch
torch.manual_seed(0)
torch.save(_import_detector("hed", "ControlNetHED_Apache2")().state_dict(), weights / "ControlNetHED.pth")
hed = build_condition(HedCondition(annotator=str(weights), detect_resolution=64, safe=True))
out = hed(image)
assert out.mode == "RGB" and out.size == image.size, (out.mode, out.size)
assert (np.asarray(hed.extract(image)) == np.asarray(out)).all(), "not deterministic"

# The trick is needed: the package's own __init__ fails with this mediapipe.
for name in [m for m in sys.modules if m == "controlnet_aux" or m.startswith("controlnet_aux.")]:
    del sys.modules[name]
try:
    import controlnet_aux
except AttributeError as e:
    assert "solutions" in str(e)
else:
    raise AssertionError("controlnet_aux imported despite the broken mediapipe")
print("ok")
"""


def test_detectors_import_and_run_with_a_broken_mediapipe(run_python, tmp_path: Path) -> None:
    fake = tmp_path / "fake"
    (fake / "mediapipe").mkdir(parents=True)
    (fake / "mediapipe" / "__init__.py").write_text('__version__ = "0.10.30"\n')
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights").mkdir()
    done = run_python(SCRIPT, str(tmp_path / "empty"), str(tmp_path / "weights"), path=fake)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
