"""Whether a built `dataset/` still holds what the recipe would build, and if not, why.

Two checks, both cheap enough for `recipe plan` (no data is read, no user code runs):
- the cache key: a digest of `key_inputs`, everything the rows depend on that is known before reading
  the data (the source's file fingerprint, the condition with a custom condition's source, the
  processing settings, the seed and this code's version), stored in report.json to say what changed;
- the files the rows named by path, recorded by the build (`references.py`) and stat-ed again.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from recipe_runner.data import references
from recipe_runner.data.condition_code import code_digest
from recipe_runner.data.sources import source_fingerprint
from recipe_runner.recipe.dataset import DatasetSpec
from recipe_runner.recipe.effects import keyed
from recipe_runner.recipe.loader import LoadedRecipe
from recipe_runner.runfolder.atomic import is_complete
from recipe_runner.runfolder.layout import RunFolder

DATASET_CODE_VERSION = 1
DATA_MARKER = "dataset_dict.json"  # what save_to_disk writes last for a DatasetDict: data/ is whole
"""Bump when a change to this package changes the rows it builds: every cached dataset is rebuilt."""
_PARTS = {
    "source": "source",
    "condition": "condition",
    "processing": "dataset settings",
    "seed": "seed",
    "code_version": "dataset code version",
}


def computes_condition(loaded: LoadedRecipe) -> bool:
    """Whether conditioning images are made by the recipe's condition (rather than given by the data)."""
    spec = loaded.recipe.dataset
    return spec.columns.conditioning_image is None and spec.source.conditioning_dir is None


def _condition(loaded: LoadedRecipe) -> dict | None:
    if not computes_condition(loaded):
        return None
    cfg = loaded.recipe.condition
    key = cfg.model_dump(mode="json")
    if cfg.type == "custom":  # the function's code makes the pixels as much as its params do
        key["code"] = code_digest(cfg.function.partition(":")[0], loaded.base_dir)
    return key


def _processing(spec: DatasetSpec) -> dict:
    """The dataset settings the rows depend on, as their fields' effects declare (recipe/effects.py: not
    how fast it builds, options added later only away from their defaults). The source is keyed by its
    content instead (source_fingerprint)."""
    settings = keyed(spec, ("dataset",), lambda effect: effect.invalidates == "dataset")
    settings.pop("source", None)
    return settings


def key_inputs(loaded: LoadedRecipe) -> dict:
    """Everything the built rows depend on, by part; stored in report.json to say what changed."""
    r = loaded.recipe
    return {
        "source": source_fingerprint(loaded),
        "condition": _condition(loaded),
        "processing": _processing(r.dataset),
        "seed": r.seed,
        "code_version": DATASET_CODE_VERSION,
    }


def digest(inputs: dict) -> str:
    """sha256 of a JSON-able value, independent of key order."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def dataset_cache_key(loaded: LoadedRecipe) -> str:
    """sha256 of `key_inputs`: equal keys mean a rebuild would give the same rows. Reads no data."""
    return digest(key_inputs(loaded))


def _old_report(folder: RunFolder) -> dict | None:
    try:
        return json.loads((folder.dataset / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def current_report(
    loaded: LoadedRecipe, folder: RunFolder, inputs: dict | None = None
) -> tuple[dict | None, str]:
    """(report, why): the built dataset's report.json when `build_dataset` would reuse it (else None),
    and why, without reading its data. `inputs` are `key_inputs(loaded)` when the caller has them."""
    if not folder.dataset.exists():
        return None, "no dataset yet"
    report = _old_report(folder)
    if report is None or not is_complete(folder.dataset) or not (folder.dataset_data / DATA_MARKER).is_file():
        return None, "the dataset folder is incomplete (an earlier build did not finish)"
    inputs = key_inputs(loaded) if inputs is None else inputs
    if report.get("cache_key") != digest(inputs):
        return None, _what_changed(report.get("key_inputs") or {}, inputs)
    src = loaded.recipe.dataset.source
    recorded = report.get("referenced_files")
    if recorded is None and src.path is not None:
        return None, "built by a version that did not record the files the data refers to"
    stale = references.changed(folder.dataset, recorded or {}, loaded.base_dir)
    if stale is not None:
        return None, stale
    unpinned = " (hub source without a revision: not re-checked)" if src.hub and not src.revision else ""
    return report, f"unchanged since {report.get('created_at', 'the last build')}{unpinned}"


def dataset_status(loaded: LoadedRecipe, folder: RunFolder) -> tuple[bool, str]:
    """(cached?, why): whether `build_dataset` would reuse the built dataset, without reading its data."""
    report, why = current_report(loaded, folder)
    return report is not None, why


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for k, v in value.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _what_changed(old: dict, new: dict) -> str:
    changes = []
    for part, label in _PARTS.items():
        if old.get(part) == new[part]:
            continue
        a, b = _flat(old.get(part)), _flat(new[part])
        diffs = []
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k) != b.get(k):
                diffs.append(_difference(k, part, a, b))
        shown = sorted(set(diffs), key=diffs.index)[:3]
        changes.append(f"{label} changed ({'; '.join(shown)})")
    return ", ".join(changes) or "cache key changed"


def _difference(key: str, part: str, a: dict, b: dict) -> str:
    if "content" in key:
        return "files changed"
    if key == "code" or key.startswith("code."):
        where = b.get("code.source") or a.get("code.source")
        return f"the code in {where} changed" if where else "its code changed"
    return f"{key or part}: {a.get(key)!r} -> {b.get(key)!r}"
