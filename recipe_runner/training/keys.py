"""Content keys of the training stage, and seeds derived from the recipe seed.

No torch here: `recipe plan` asks for the training stage's cache key without loading any model.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

import recipe_runner
from recipe_runner.recipe.effects import keyed, recipe_fields
from recipe_runner.recipe.loader import LoadedRecipe
from recipe_runner.recipe.recipe import Recipe

# Bump when what the training stage computes changes for the same inputs (steps, loss, cache layout).
TRAINING_CODE_VERSION = 1


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
    """The flattened recipe fields a checkpoint depends on (those not declared `resumable`, see
    recipe/effects.py); a resume with other values is refused."""
    fields = keyed(recipe, (), lambda effect: not effect.resumable)
    # Launch settings count by what they amount to: the processes on every machine, the precision in use.
    fields.pop("launch", None)
    fields["launch.num_processes"] = recipe.launch.total_processes
    fields["mixed_precision"] = effective_precision(recipe)
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
        defaults, switched = _left_out()
        if key in defaults:
            return f"{defaults[key]!r} (default)"
        section = next((s for s in switched if key.startswith(f"{s}.")), None)
        return f"({section.rpartition('.')[2]} off)" if section else "(absent)"

    keys = sorted(set(old) | set(new))
    return [f"{k}: {shown(old, k)} -> {shown(new, k)}" for k in keys if old.get(k) != new.get(k)]


@cache
def _left_out() -> tuple[dict[str, Any], tuple[str, ...]]:
    """Why a field can be missing from resume fields (recipe/effects.py): ({field: the default it is
    omitted at}, the sections keyed only while switched on, such as `dataset.buckets`)."""
    fields = recipe_fields()
    defaults = {
        f.dotted: f.info.get_default(call_default_factory=True) for f in fields if f.effect.omitted_at_default
    }
    return defaults, tuple(f.dotted for f in fields if f.effect.keyed_while is not None)


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
