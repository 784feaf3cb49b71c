"""Content hashes of local data files, memoised by stat so that an unchanged file is read only once.

The dataset cache keys local files by their bytes, so a `touch`, a `git checkout` or a copy that keeps
the bytes keeps the built dataset. `recipe plan` must stay fast, so each hash is remembered with the
file's (size, mtime_ns, inode, ctime_ns): a file whose stat matches its entry is not read again. The
memo is one JSON file beside the models cache (`$RECIPE_RUNNER_CACHE/file-hashes.json`, default
~/.cache/recipe-runner/), shared by every run on the machine and replaced atomically. A memo that is
missing, corrupt, replaced by another process meanwhile or not writable only costs reading files again.

    with file_hashes.memo() as hashes:
        digest = hashes.sha256(path)   # None when the file is missing or unreadable
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from recipe_runner.runfolder.atomic import write_text
from recipe_runner.runfolder.layout import RunFolder

MEMO_NAME = "file-hashes.json"
MAX_ENTRIES = 200_000  # ~40 MB of JSON; a source with more files keeps all of its own (see `save`)
_VERSION = 1
# A file modified this recently could change again within its mtime's resolution (a coarse kernel tick,
# 2 s on FAT) with the same size and inode: its hash is used but not remembered, as git does.
_RACY_NS = 2_000_000_000
_CHUNK = 1 << 20

# The memo as last read or written by this process, with the memo file's stat: one `recipe plan` looks
# files up several times, and parses the JSON once.
_loaded: dict[str, tuple[tuple[int, int, int], dict[str, list]]] = {}


def memo_path() -> Path:
    """Where the memo lives: beside the shared models cache."""
    return RunFolder(Path()).models_cache.parent / MEMO_NAME


def hash_file(path: str) -> str:
    """sha256 of a file's bytes (raises OSError)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _stat_key(st: os.stat_result) -> list[int]:
    # ctime too: a tool that rewrites a file in place and restores its mtime (rsync -t, cp -p) still
    # changes it.
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _read(path: Path) -> dict[str, list]:
    """The memo's entries in age order (oldest first); empty when missing, corrupt or of another version."""
    sig = _signature(path)
    if sig is None:
        return {}
    cached = _loaded.get(str(path))
    if cached is not None and cached[0] == sig:
        return cached[1]
    try:
        data = json.loads(path.read_bytes())
        entries = data["entries"] if data.get("version") == _VERSION else {}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        entries = {}
    if not isinstance(entries, dict):
        entries = {}
    _loaded[str(path)] = (sig, entries)
    return entries


class FileHashes:
    """The memo for one batch of look-ups; `save` writes back what was learnt."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = memo_path() if path is None else path
        self._entries = _read(self.path)
        self._new: dict[str, list] = {}
        self._used: set[str] = set()

    def sha256(self, path: str | os.PathLike[str]) -> str | None:
        """sha256 of the file's bytes, read only when its stat is not in the memo; None when the file is
        missing or cannot be read."""
        key = os.path.abspath(path)
        try:
            before = os.stat(key)
        except OSError:
            return None
        stat = _stat_key(before)
        self._used.add(key)
        entry = self._new.get(key) or self._entries.get(key)
        if isinstance(entry, list) and len(entry) == 5 and entry[:4] == stat and isinstance(entry[4], str):
            return entry[4]
        try:
            digest = hash_file(key)
            after = os.stat(key)
        except OSError:
            return None
        # Remembered only when the file held still while it was read and is not racily new.
        if _stat_key(after) == stat and time.time_ns() - before.st_mtime_ns > _RACY_NS:
            self._new[key] = [*stat, digest]
        return digest

    def save(self) -> None:
        """Merge what was hashed into the memo on disk (as it is now: another process may have written
        it meanwhile) and drop the oldest entries beyond MAX_ENTRIES, keeping every file looked up here."""
        if not self._new:
            return
        entries = dict(_read(self.path))
        used = [k for k in entries if k in self._used] + [k for k in self._new if k not in entries]
        for key in used:  # most recently used last, so that trimming drops the oldest
            value = self._new.get(key) or entries[key]
            entries.pop(key, None)
            entries[key] = value
        keep = max(MAX_ENTRIES, len(self._used))
        if len(entries) > keep:
            entries = dict(list(entries.items())[len(entries) - keep :])
        # ASCII escapes: a file name that is not valid UTF-8 (a surrogate escape) survives the round trip.
        text = json.dumps({"version": _VERSION, "entries": entries}, separators=(",", ":"))
        try:
            write_text(self.path, text)
        except OSError:  # a read-only home or full disk: the next look-up reads the files again
            return
        sig = _signature(self.path)
        if sig is not None:
            _loaded[str(self.path)] = (sig, entries)
        self._entries, self._new = entries, {}


@contextlib.contextmanager
def memo(path: Path | None = None) -> Iterator[FileHashes]:
    """The memo for a batch of look-ups, saved at the end (also when the batch stops early)."""
    hashes = FileHashes(path)
    try:
        yield hashes
    finally:
        hashes.save()
