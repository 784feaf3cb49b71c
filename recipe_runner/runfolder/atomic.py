"""Write-then-rename helpers: nothing half-written is ever visible under its final name."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

COMPLETE_MARKER = ".complete"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    """Write a file atomically (temporary sibling, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a run's files are as readable as any other
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write (by any library); on success it is renamed to `path`,
    as readable as the umask allows (safetensors writes 0600). On any exception it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(target: Path, marker: str | None = COMPLETE_MARKER) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `target` (with a completion marker inside).

    On any exception the temporary folder is removed and `target` is left as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        _as_umask_allows(tmp)
        if marker:  # the marker lists what was written, so a folder missing part of it is not complete
            names = sorted(p.name for p in tmp.iterdir())
            (tmp / marker).write_text("ok\n" + "".join(f"{name}\n" for name in names))
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _as_umask_allows(root: Path) -> None:
    """Files as readable as any other the user makes: safetensors (and mkstemp) write 0600, which hides
    a run's weights from the group and from a web server sharing them."""
    mode = 0o666 & ~_umask()
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path) and os.stat(path).st_mode & 0o777 != mode:
                os.chmod(path, mode)


def is_complete(folder: Path, marker: str = COMPLETE_MARKER) -> bool:
    """Whether `atomic_dir` finished `folder` and everything it wrote at the top level is still there
    (markers of older versions hold only "ok")."""
    try:
        lines = (folder / marker).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    return bool(lines) and lines[0] == "ok" and all((folder / name).exists() for name in lines[1:] if name)


def remove_stale_temporaries(parent: Path) -> None:
    """Remove temporaries left by a killed process (names start with '.' and end with '.tmp' or '.old-*')."""
    if not parent.is_dir():
        return
    for p in parent.iterdir():
        if p.name.startswith(".") and (p.name.endswith(".tmp") or ".old-" in p.name):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
