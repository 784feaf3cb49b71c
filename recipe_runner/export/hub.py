"""`output.push_to_hub` and `recipe push`: the run's weights, card, grid and exports to the Hub.

huggingface_hub does the work (`create_repo`, `upload_folder`); the token comes only from where it keeps
one (the HF_TOKEN environment variable or `hf auth login`'s cache, `get_token`) and is passed to it, never
written anywhere. Checked before training starts (`check_push`): offline or without a token a run would
train for hours and then fail to publish.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recipe_runner.errors import RunFailed, UserError
from recipe_runner.offline import cache_only_reason, hub_offline
from recipe_runner.runfolder.layout import RunFolder

# What goes up: the run's weights, card, sample grids and exports (the dataset, cache and checkpoints stay).
UPLOAD = [
    "README.md",
    "controlnet/**",
    "adapter/**",
    "samples/**",
    "export/**",
    "run.lock.json",
    "recipe.resolved.yaml",
]
IGNORE = [".*", "**/.*"]  # markers and temporaries (also the .in-use lock)
ATTEMPTS = 4
TOKEN_HINT = (
    "log in with `hf auth login` or set HF_TOKEN (a token with write access, "
    "https://huggingface.co/settings/tokens); or set output.push_to_hub: false"
)

Say = Callable[[str], None]


def check_push(repo_id: str | None) -> str:
    """The token to push with; a UserError when offline or there is none (before any work)."""
    if not repo_id:
        raise UserError("output.push_to_hub needs output.hub_model_id (e.g. 'your-name/controlnet-canny')")
    if hub_offline():
        raise UserError(
            f"output.push_to_hub: cannot push to {repo_id}: the Hugging Face Hub is offline here "
            f"({cache_only_reason()})",
            hint="unset HF_HUB_OFFLINE on a machine with a network, or set output.push_to_hub: false and "
            "later run `recipe push RUN_DIR` where there is one",
        )
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise UserError(f"output.push_to_hub: no Hugging Face token to push to {repo_id}", hint=TOKEN_HINT)
    return token


def _transient(e: Exception) -> bool:
    """Worth retrying: connection trouble, timeouts, 429 and 5xx answers."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status is not None:
        return status == 429 or status >= 500
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    try:  # huggingface_hub 1.x+ talks through httpx
        import httpx

        return isinstance(e, httpx.TransportError)
    except ImportError:
        return False


def _retried(what: str, call: Callable[[], Any], say: Say, sleep: Callable[[float], None]) -> Any:
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return call()
        except Exception as e:
            if attempt == ATTEMPTS or not _transient(e):
                raise
            wait = 2.0**attempt
            say(
                f"{what} failed ({type(e).__name__}: {e}); "
                f"retrying in {wait:.0f} s ({attempt}/{ATTEMPTS - 1})"
            )
            sleep(wait)
    raise AssertionError("unreachable")


def push_folder(
    folder: RunFolder,
    repo_id: str,
    *,
    private: bool = True,
    token: str | None = None,
    api: Any = None,
    say: Say = lambda _m: None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Create `repo_id` (private unless told) if needed and upload the run's files to it."""
    token = token or check_push(repo_id)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    files = sorted(str(p.relative_to(folder.root)) for p in _uploaded(folder.root))
    if not files:
        raise UserError(f"{folder.root} has nothing to push (no model card, weights or exports)")
    size = sum((folder.root / f).stat().st_size for f in files)
    say(f"pushing {len(files)} files ({size / 2**20:.1f} MiB) to https://huggingface.co/{repo_id} ...")
    try:
        url = _retried(
            "create_repo",
            lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token),
            say,
            sleep,
        )
        commit = _retried(
            "upload",
            lambda: api.upload_folder(
                repo_id=repo_id,
                folder_path=str(folder.root),
                repo_type="model",
                allow_patterns=UPLOAD,
                ignore_patterns=IGNORE,
                commit_message=f"recipe-runner: {folder.root.name}",
                token=token,
            ),
            say,
            sleep,
        )
    except UserError:
        raise
    except Exception as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise UserError(f"the Hub refused the push to {repo_id} ({status})", hint=TOKEN_HINT) from None
        raise RunFailed(f"pushing to {repo_id} failed: {type(e).__name__}: {e}") from None
    say(f"pushed to https://huggingface.co/{repo_id}")
    return {
        "repo_id": repo_id,
        "private": private,
        "files": files,
        "bytes": size,
        "url": str(getattr(url, "url", url) or ""),
        "commit": str(getattr(commit, "oid", commit) or ""),
    }


def _uploaded(root: Path) -> list[Path]:
    """The files UPLOAD selects (as upload_folder's fnmatch patterns would), without the IGNORE ones."""
    from fnmatch import fnmatch

    found = []
    for p in root.rglob("*"):
        if not p.is_file():
            continue
        rel = p.relative_to(root).as_posix()
        hidden = any(part.startswith(".") for part in Path(rel).parts)
        if not hidden and any(fnmatch(rel, pat) for pat in UPLOAD):
            found.append(p)
    return found
