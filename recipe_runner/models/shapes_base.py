"""The pretrained `shapes-sd` and `shapes-sd3` base models shipped inside the package.

A random base draws noise, so a ControlNet trained on it for a few CPU minutes shows nothing; these tiny
models (a few MB each) were pretrained on the builtin shapes data (see docs/shapes-base.md): `shapes-sd`,
an SD 1.x model (VAE, text encoder, UNet) by scripts/pretrain_shapes_base.py, and `shapes-sd3`, an
SD3-shaped flow-matching model (shapes-sd's VAE, two CLIP encoders, an MMDiT) by
scripts/pretrain_shapes_sd3.py. The denoiser and VAE weights are stored in fp16 to halve the package
size; `write_shipped_base` writes an all-fp32 copy, because transformers 5 loads a text encoder in the
dtype it was saved in, and training expects fp32 everywhere.
No torch or diffusers import here: copying the folder only needs safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
SHIPPED_BASES = ("shapes-sd", "shapes-sd3")
SHIPPED_DIR = ASSETS_DIR / "shapes-sd"
# Written by the pretraining script next to model_index.json: what training must know about this base.
SETTINGS_FILE = "recipe_runner.json"
_WEIGHTS = "*.safetensors"


def shapes_base_path(name: str = "shapes-sd") -> Path:
    """The shipped folder of base `name` (diffusers format, fp16 denoiser/VAE); loadable as is by its
    pipeline (StableDiffusionPipeline, StableDiffusion3Pipeline)."""
    if name not in SHIPPED_BASES:
        raise ValueError(f"no shipped base {name!r}; there are {', '.join(SHIPPED_BASES)}")
    folder = ASSETS_DIR / name
    if not (folder / "model_index.json").is_file():
        script = "pretrain_shapes_sd3.py" if name == "shapes-sd3" else "pretrain_shapes_base.py"
        raise FileNotFoundError(
            f"the {name} weights are missing from {folder}; reinstall recipe-runner, or rebuild them "
            f"with scripts/{script} (docs/shapes-base.md)"
        )
    return folder


def shapes_base_settings(folder: Path | None = None) -> dict:
    """A base's recipe_runner.json: VAE downsampling, resolution (shapes-sd: ControlNet conditioning
    channels too), and how it was pretrained."""
    return json.loads(((folder or shapes_base_path()) / SETTINGS_FILE).read_text())


def _upcast(src: Path, dst: Path) -> None:
    from safetensors.numpy import load_file, save_file

    # numpy, not torch: enough to change a dtype, and much lighter to import.
    tensors = {k: (v.astype("float32") if v.dtype.kind == "f" else v) for k, v in load_file(src).items()}
    save_file(tensors, dst, metadata={"format": "pt"})


def write_shipped_base(name: str, out_dir: Path) -> Path:
    """Write shipped base `name` into `out_dir` with every weight in fp32."""
    src, out_dir = shapes_base_path(name), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.rglob("*")):
        target = out_dir / path.relative_to(src)
        if path.is_dir():
            target.mkdir(exist_ok=True)
        elif path.match(_WEIGHTS):
            _upcast(path, target)
        else:
            shutil.copyfile(path, target)
    # transformers records the saved dtype and would otherwise load a text encoder back in fp16.
    for config_path in sorted(out_dir.glob("text_encoder*/config.json")):
        config = json.loads(config_path.read_text())
        config["dtype"] = "float32"
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def write_shapes_sd(out_dir: Path, *, seed: int = 0) -> Path:
    """The shipped shapes-sd in fp32 (a builder for BUILTIN_MODELS; `seed` is unused: the weights are
    fixed)."""
    del seed
    return write_shipped_base("shapes-sd", out_dir)


def write_shapes_sd3(out_dir: Path, *, seed: int = 0) -> Path:
    """The shipped shapes-sd3 in fp32 (a builder for BUILTIN_MODELS; `seed` is unused)."""
    del seed
    return write_shipped_base("shapes-sd3", out_dir)


def materialize_shapes_base(cache_root: Path, name: str = "shapes-sd") -> Path:
    """An fp32 copy of shipped base `name` at `cache_root/name`, written once and reused.

    Written to a temporary folder and renamed into place, so an interrupted copy never looks complete;
    a copy is current when its settings file matches the shipped one.
    """
    cache_root = Path(cache_root)
    final = cache_root / name
    shipped = (shapes_base_path(name) / SETTINGS_FILE).read_text()
    if (final / SETTINGS_FILE).is_file() and (final / SETTINGS_FILE).read_text() == shipped:
        return final
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.building-", dir=cache_root))
    try:
        write_shipped_base(name, tmp / name)
        (tmp / name).chmod(0o755)
        if final.exists():
            os.replace(final, tmp / "stale")
        os.replace(tmp / name, final)
    except OSError:
        if not (final / SETTINGS_FILE).is_file():  # lost a race to another process: use theirs
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
