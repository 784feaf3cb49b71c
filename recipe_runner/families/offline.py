"""A family's full-size architecture (models/archs.py) as a pipeline folder, with random weights.

For benchmarks and real-architecture runs without a download: from_pretrained loads it like a base.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from recipe_runner.families import FAMILIES
from recipe_runner.models.archs import ARCHS, TOKENIZER_FOLDERS, random_models, random_scheduler
from recipe_runner.models.tokenizer import write_tiny_clip_tokenizer


def build_random_pipeline(folder: Path, arch: str) -> Path:
    """A random-initialised pipeline folder of `arch` (kept: a second call reuses it)."""
    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(0)
    # Random init of ~3.5B parameters (SDXL; FLUX.1-dev: 17B) takes minutes on a CPU and seconds on a GPU.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        tokenizers, encoders, denoiser, vae = random_models(arch, folder)
    family = FAMILIES[ARCHS[arch].family]
    pipe = family.random_pipeline(tokenizers, encoders, denoiser, vae, random_scheduler(arch))
    # fp16 on disk halves the write (SDXL: 7 GB); from_pretrained loads it back as fp32.
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FOLDERS[: len(tokenizers)]:
        # transformers may save load-time kwargs there; the tiny tokenizer's 4 files suffice
        shutil.rmtree(folder / name)
        write_tiny_clip_tokenizer(folder / name)
    return folder
