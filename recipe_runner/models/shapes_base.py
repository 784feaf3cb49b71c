"""The pretrained `shapes-sd` base model shipped inside the package.

A random base draws noise, so a ControlNet trained on it for a few CPU minutes shows nothing; this tiny
SD 1.x model (VAE, text encoder, UNet; a few MB) was pretrained on the builtin shapes data by
scripts/pretrain_shapes_base.py (see docs/shapes-base.md). The UNet and VAE weights are stored in fp16
to halve the package size; `write_shapes_sd` writes an all-fp32 copy, because transformers 5 loads a
text encoder in the dtype it was saved in, and training expects fp32 everywhere.
No torch or diffusers import here: copying the folder only needs safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "assets" / "shapes-sd"
# Written by the pretraining script next to model_index.json: what training must know about this base.
SETTINGS_FILE = "recipe_runner.json"
_WEIGHTS = "*.safetensors"


def shapes_base_path() -> Path:
    """The shipped folder (diffusers format, fp16 UNet/VAE); loadable as is by StableDiffusionPipeline."""
    if not (SHIPPED_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the shapes-sd weights are missing from {SHIPPED_DIR}; reinstall recipe-runner, or rebuild them "
            "with scripts/pretrain_shapes_base.py (docs/shapes-base.md)"
        )
    return SHIPPED_DIR


def shapes_base_settings(folder: Path | None = None) -> dict:
    """The base's recipe_runner.json: ControlNet conditioning channels, VAE downsampling, resolution."""
    return json.loads(((folder or shapes_base_path()) / SETTINGS_FILE).read_text())


def _upcast(src: Path, dst: Path) -> None:
    from safetensors.numpy import load_file, save_file

    # numpy, not torch: enough to change a dtype, and much lighter to import.
    tensors = {k: (v.astype("float32") if v.dtype.kind == "f" else v) for k, v in load_file(src).items()}
    save_file(tensors, dst, metadata={"format": "pt"})


def write_shapes_sd(out_dir: Path, *, seed: int = 0) -> Path:
    """Write the shipped base into `out_dir` with every weight in fp32 (a builder for BUILTIN_MODELS;
    `seed` is unused: the weights are fixed)."""
    del seed
    src, out_dir = shapes_base_path(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.rglob("*")):
        target = out_dir / path.relative_to(src)
        if path.is_dir():
            target.mkdir(exist_ok=True)
        elif path.match(_WEIGHTS):
            _upcast(path, target)
        else:
            shutil.copyfile(path, target)
    # transformers records the saved dtype and would otherwise load the text encoder back in fp16.
    config_path = out_dir / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def materialize_shapes_base(cache_root: Path) -> Path:
    """An fp32 copy of the shipped base at `cache_root/shapes-sd`, written once and reused.

    Written to a temporary folder and renamed into place, so an interrupted copy never looks complete;
    a copy is current when its settings file matches the shipped one.
    """
    cache_root = Path(cache_root)
    final = cache_root / "shapes-sd"
    shipped = (shapes_base_path() / SETTINGS_FILE).read_text()
    if (final / SETTINGS_FILE).is_file() and (final / SETTINGS_FILE).read_text() == shipped:
        return final
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".shapes-sd.building-", dir=cache_root))
    try:
        write_shapes_sd(tmp / "shapes-sd")
        (tmp / "shapes-sd").chmod(0o755)
        if final.exists():
            os.replace(final, tmp / "stale")
        os.replace(tmp / "shapes-sd", final)
    except OSError:
        if not (final / SETTINGS_FILE).is_file():  # lost a race to another process: use theirs
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
