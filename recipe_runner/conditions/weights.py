"""Finding annotator weights: a local folder or a Hugging Face repo, with errors that say what to download.

`condition.annotator` is either a folder (relative paths are resolved against the recipe's folder) or a
hub repo id. Either way the result is a local folder holding every needed file, so controlnet_aux only
ever sees local paths and never talks to the hub itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from recipe_runner.errors import UserError
from recipe_runner.offline import cache_only_reason, hub_offline, offline_unless_reachable
from recipe_runner.recipe.loader import resolve_against

EXAMPLE_FOLDER = "models/annotators"


def resolve_weights(
    source: str, files: Sequence[str], *, repo: str, condition: str, base_dir: Path | None = None
) -> Path:
    """A local folder holding `files` (paths relative to the folder or repo root).

    `repo` is the hub repo the files come from by default; error hints point there.
    """
    folder = resolve_against(base_dir, source)
    if not folder.is_dir():
        _check_repo_id(source, folder, files, repo)
        return _from_hub(source, files, condition, folder, repo)
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise UserError(
            f"condition.annotator: the {condition} annotator needs {_names(missing)}, "
            f"which {'is' if len(missing) == 1 else 'are'} not in {folder}",
            hint=_download_hint(missing, repo, folder),
        )
    return folder


def _check_repo_id(source: str, folder: Path, files: Sequence[str], repo: str) -> None:
    """A missing folder is fine if `source` could be a repo id ("owner/name"); otherwise it is an error."""
    if source.startswith((".", "/", "~")) or "\\" in source or source.count("/") != 1:
        raise UserError(
            f"condition.annotator: folder {folder} does not exist", hint=_download_hint(files, repo, folder)
        )


def _from_hub(repo: str, files: Sequence[str], condition: str, folder: Path, default_repo: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    offline_unless_reachable()
    paths: list[Path] = []
    failed: list[str] = []
    reason = ""
    for name in files:
        try:
            # After one failure only look in the cache: each unreachable download retries for ~20 s.
            paths.append(Path(hf_hub_download(repo, name, local_files_only=bool(failed))))
        except HFValidationError:
            raise UserError(
                f"condition.annotator: {repo!r} is neither an existing folder nor a Hugging Face repo id",
                hint=_download_hint(files, default_repo),
            ) from None
        except (OSError, EntryNotFoundError) as e:  # offline, connection, not found, gated: all OSError
            failed.append(name)
            reason = reason or _reason(e)
    if failed:
        raise UserError(
            f"condition.annotator: could not get {_names(failed)} for the {condition} annotator "
            f"from the Hugging Face repo {repo} ({reason})"
            + ("" if repo == default_repo else f", and there is no folder {folder}"),
            hint=_download_hint(failed, default_repo, None if repo == default_repo else folder),
        )
    # Files of one revision share a snapshot folder; climb from the first file to its root.
    return paths[0].parents[len(Path(files[0]).parts) - 1]


def _reason(error: Exception) -> str:
    from huggingface_hub import errors as hub

    if hub_offline() or isinstance(error, hub.OfflineModeIsEnabled):
        return f"{cache_only_reason()} and the files are not in the local cache"
    if isinstance(error, hub.LocalEntryNotFoundError):
        return "the Hub could not be reached and the files are not in the local cache"
    if isinstance(error, hub.GatedRepoError):
        return "the repo is gated: accept its terms on its page, then run `hf auth login`"
    if isinstance(error, hub.RepositoryNotFoundError):
        return "no such repo, or it is private and you are not logged in"
    if isinstance(error, getattr(hub, "RemoteEntryNotFoundError", hub.EntryNotFoundError)):
        return "the repo has no such file"
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _download_hint(files: Sequence[str], repo: str, folder: Path | None = None) -> str:
    """Where to get the files and where to put them: `folder` if the recipe names one, else a suggestion."""
    where = f"{folder}/" if folder is not None else f"{EXAMPLE_FOLDER}/ (beside the recipe)"
    then = "" if folder is not None else f" and set condition.annotator: {EXAMPLE_FOLDER}"
    return f"download {_names(files)} from {_repo_url(repo)} into {where}{_keep_paths(files)}{then}"


def _names(files: Sequence[str]) -> str:
    return ", ".join(files)


def _keep_paths(files: Sequence[str]) -> str:
    return " keeping the subfolders shown" if any("/" in f for f in files) else ""


def _repo_url(repo: str) -> str:
    return f"https://huggingface.co/{repo}"
