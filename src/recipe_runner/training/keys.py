"""Content keys of the training stage, and seeds derived from the recipe seed.

No torch here: `recipe plan` asks for the training stage's cache key without loading any model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import recipe_runner
from recipe_runner.recipe.loader import LoadedRecipe
from recipe_runner.recipe.recipe import Recipe

# Bump when what the training stage computes changes for the same inputs (steps, loss, cache layout).
TRAINING_CODE_VERSION = 1

# Fields that change neither the weights nor the data order, so a run can resume across them:
# `max_steps`/`num_epochs` may be raised to train longer, the rest is bookkeeping or speed.
_NOT_RESUME_RELEVANT = {
    "max_steps",
    "num_epochs",
    "validation",
    "checkpoint_every",
    "checkpoints_total_limit",
    "dataloader_num_workers",
    "nonfinite_loss",
    "compile",
    "precompute",
    "channels_last",
    "attention",
    "ema_offload",  # the same update, on the same device; only where the average waits between steps
}

# Fields added after runs were already recorded, left out at their default: checkpoints and finished runs
# from before them keep resuming and keep their cache keys.
_OMITTED_AT_DEFAULT = {
    "fp8_base": False,
    "snr_gamma": None,
    "noise_offset": 0.0,
    "ema_decay": None,
    "lora": None,
}


def sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from the recipe seed and labels (epoch, micro-step, ...); stable across processes and
    Python runs, unlike hash()."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def effective_precision(recipe: Recipe) -> str:
    """`launch.mixed_precision` overrides `train.mixed_precision` for launched processes."""
    return recipe.launch.mixed_precision or recipe.train.mixed_precision


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): value}


def resume_fields(recipe: Recipe) -> dict[str, Any]:
    """The flattened recipe fields a checkpoint depends on; a resume with other values is refused."""
    train = {
        k: v
        for k, v in recipe.train.model_dump(mode="json").items()
        if k not in _NOT_RESUME_RELEVANT and _OMITTED_AT_DEFAULT.get(k, ...) != v
    }
    fields = {
        "seed": recipe.seed,
        "model": recipe.model.model_dump(mode="json"),
        "dataset.resolution": recipe.dataset.resolution,
        # Buckets change every batch's rows; off, they are left out so older checkpoints still resume.
        **(
            {"dataset.buckets": recipe.dataset.buckets.model_dump(mode="json")}
            if recipe.dataset.buckets.enabled
            else {}
        ),
        "train": train,
        "launch.num_processes": recipe.launch.total_processes,
        "mixed_precision": effective_precision(recipe),
    }
    return _flatten(fields)


_PROCESSES, _BATCH = "launch.num_processes", "train.batch_size"
ROWS_PER_MICRO_STEP = "train.batch_size × processes"


def comparable(fields: dict[str, Any]) -> dict[str, Any]:
    """Resume fields as a resume compares them: the process count and the per-process batch only as
    their product, the rows of one micro-step. The batch order, each sample's noise and the averaged
    gradient depend on that alone (training/data.py), so 1 process x 4 rows resumes as 2 x 2."""
    out = dict(fields)
    if _PROCESSES in out and _BATCH in out:
        out[ROWS_PER_MICRO_STEP] = out.pop(_PROCESSES) * out.pop(_BATCH)
    return out


def saved_processes(fields: dict[str, Any]) -> int | None:
    return fields.get(_PROCESSES)


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable `field: old -> new` lines (a field left out at its default shows that default)."""

    def shown(fields: dict[str, Any], key: str) -> str:
        if key in fields:
            return repr(fields[key])
        name = key.removeprefix("train.")
        if name in _OMITTED_AT_DEFAULT:
            return f"{_OMITTED_AT_DEFAULT[name]!r} (default)"
        if key.startswith("dataset.buckets."):
            return "(buckets off)"
        return "(absent)"

    keys = sorted(set(old) | set(new))
    return [f"{k}: {shown(old, k)} -> {shown(new, k)}" for k in keys if old.get(k) != new.get(k)]


def training_cache_key(loaded: LoadedRecipe, dataset_fingerprint: str) -> str:
    """Key of the training stage's outputs: unchanged key, unchanged controlnet/ and samples/."""
    recipe = loaded.recipe
    return sha256_json(
        {
            "fields": resume_fields(recipe),
            "length": [recipe.train.max_steps, recipe.train.num_epochs],
            "validation": recipe.train.validation.model_dump(mode="json"),
            "dataset": dataset_fingerprint,
            "code": [recipe_runner.__version__, TRAINING_CODE_VERSION],
        }
    )


def dataset_fingerprint(data_dir: Path) -> str:
    """A cheap fingerprint of a saved DatasetDict: each split's datasets fingerprint plus its arrow files'
    names, sizes and modification times (hashing gigabytes of images on every run would cost minutes)."""
    parts: list[Any] = []
    for state in sorted(Path(data_dir).glob("*/state.json")):
        try:
            fingerprint = json.loads(state.read_text()).get("_fingerprint")
        except (OSError, ValueError):
            fingerprint = None
        files = [
            (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(state.parent.glob("*.arrow"))
        ]
        parts.append([state.parent.name, fingerprint, files])
    return sha256_json(parts)


def built_dataset_fingerprint(dataset_dir: Path) -> str:
    """The dataset stage's own content hash from report.json when there is one, else the file fingerprint
    of its data/ folder (datasets written by hand, e.g. in tests)."""
    try:
        report = json.loads((Path(dataset_dir) / "report.json").read_text())
    except (OSError, ValueError):
        report = {}
    for key in ("data_sha256", "fingerprint", "cache_key"):
        if isinstance(report.get(key), str) and report[key]:
            return f"{key}:{report[key]}"
    return dataset_fingerprint(Path(dataset_dir) / "data")
