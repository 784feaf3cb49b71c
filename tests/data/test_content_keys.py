"""Local data is keyed by content: a touched file (same bytes) keeps the built dataset, a changed byte
rebuilds it, and a memo of (path, size, mtime, inode, ctime) -> sha256 keeps `recipe plan` from reading
files it has already hashed."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from recipe_runner.data import file_hashes
from recipe_runner.data.build import dataset_status
from recipe_runner.data.sources import source_fingerprint
from recipe_runner.recipe.loader import load_recipe

OLD = 1_600_000_000 * 10**9  # a past mtime: files older than the memo's racy window are remembered


@pytest.fixture(autouse=True)
def memo_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A memo of this test's own (the session's models cache stays where it is for everything else)."""
    memo = tmp_path / "memo" / file_hashes.MEMO_NAME
    monkeypatch.setattr(file_hashes, "memo_path", lambda: memo)
    return memo


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files whose bytes are hashed, in order."""
    calls: list[str] = []
    real = file_hashes.hash_file

    def counting(path: str) -> str:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(file_hashes, "hash_file", counting)
    return calls


def _age(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        if p.is_file():
            os.utime(p, ns=(OLD, OLD))


def _touch(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def _flip_last_byte(path: Path, *, keep_mtime: bool) -> None:
    """One byte changed in place: the same size and inode, and (if asked) the old mtime restored."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    with open(path, "r+b") as f:
        f.write(data)
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_ino == st.st_ino


def _plan(cli, recipe: Path, run: Path) -> tuple[str, str]:
    result = cli("plan", recipe, "-o", run, "--json")
    assert result.exit_code == 0, result.output
    stage = json.loads(result.stdout)["stages"][0]
    return stage["status"], stage["reason"]


def _build(cli, recipe: Path, run: Path) -> str:
    result = cli("build-dataset", recipe, "-o", run)
    assert result.exit_code == 0, result.output
    return result.stderr


@pytest.fixture
def image_folder(tmp_path: Path, images, write_recipe) -> Path:
    """tagged/000.png..002.png with captions 000.txt..002.txt, aged; the recipe reading it."""
    images("tagged", 3)
    for i in range(3):
        (tmp_path / "tagged" / f"00{i}.txt").write_text(f"a red circle {i}", encoding="utf-8")
    _age(tmp_path / "tagged")
    return write_recipe("name: t\ndataset:\n  source: {path: tagged}\n  resolution: 32\n")


@pytest.fixture
def jsonl_project(tmp_path: Path, images, write_recipe) -> Path:
    """data/rows.jsonl naming data/img/000.png..002.png by path, aged; the recipe reading it."""
    names = images("data/img", 3)
    rows = "".join(json.dumps({"image": f"img/{n}", "text": f"p{n}"}) + "\n" for n in names)
    (tmp_path / "data" / "rows.jsonl").write_text(rows, encoding="utf-8")
    _age(tmp_path / "data")
    return write_recipe("name: t\ndataset:\n  source: {path: data/rows.jsonl}\n  columns: {prompt: text}\n")


def test_touching_a_file_of_an_image_folder_keeps_the_dataset(cli, image_folder, tmp_path):
    run = tmp_path / "run"
    assert "dataset: running (no dataset yet)" in _build(cli, image_folder, run)
    report = json.loads((run / "dataset" / "report.json").read_text())
    for name in ("001.png", "002.txt"):
        _touch(tmp_path / "tagged" / name)
    assert _plan(cli, image_folder, run)[0] == "cached"
    assert "✓ dataset: skipped (unchanged" in _build(cli, image_folder, run)
    assert json.loads((run / "dataset" / "report.json").read_text())["created_at"] == report["created_at"]

    # One byte of a caption, same size, same inode, old mtime restored: the content decides.
    _flip_last_byte(tmp_path / "tagged" / "002.txt", keep_mtime=True)
    assert _plan(cli, image_folder, run) == ("would run", "source changed (files changed)")
    assert "dataset: running (source changed (files changed))" in _build(cli, image_folder, run)
    from recipe_runner.data.report import data_digest

    assert data_digest(run / "dataset" / "data") != report["data_sha256"]
    assert _plan(cli, image_folder, run)[0] == "cached"


def test_touching_an_image_a_jsonl_names_keeps_the_dataset(cli, jsonl_project, tmp_path):
    run = tmp_path / "run"
    _build(cli, jsonl_project, run)
    recorded = json.loads((run / "dataset" / "referenced_files.json").read_text())["files"]
    image = tmp_path / "data" / "img" / "001.png"
    entry = next(f for f in recorded if f["path"] == str(image))
    assert entry["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()

    _touch(image)
    _touch(tmp_path / "data" / "rows.jsonl")
    assert _plan(cli, jsonl_project, run)[0] == "cached"
    assert "✓ dataset: skipped (unchanged" in _build(cli, jsonl_project, run)

    _flip_last_byte(image, keep_mtime=True)
    why = "1 of 3 files the data refers to changed (e.g. data/img/001.png)"
    assert _plan(cli, jsonl_project, run) == ("would run", why)
    assert f"▶ dataset: running ({why})" in _build(cli, jsonl_project, run)
    assert _plan(cli, jsonl_project, run)[0] == "cached"


def test_a_warm_memo_reads_no_file(recipe, tmp_path, images, reads, memo_dir):
    images("faces", 4)
    (tmp_path / "cond").mkdir()
    images("cond", 4)
    _age(tmp_path / "faces")
    _age(tmp_path / "cond")
    loaded = recipe({"source": {"path": "faces", "conditioning_dir": "cond"}, "prompt": "a face"})
    first = source_fingerprint(loaded)
    assert len(reads) == 8 and memo_dir.is_file()
    reads.clear()
    assert source_fingerprint(loaded) == first and reads == []

    file_hashes._loaded.clear()  # as a new process sees it: the memo file alone
    assert source_fingerprint(loaded) == first and reads == []

    _touch(tmp_path / "faces" / "002.png")  # a new stat: read once, same key
    assert source_fingerprint(loaded) == first and [Path(p).name for p in reads] == ["002.png"]


def test_plan_with_a_warm_memo_reads_no_file(cli, jsonl_project, tmp_path, reads):
    run = tmp_path / "run"
    _build(cli, jsonl_project, run)
    reads.clear()
    assert _plan(cli, jsonl_project, run)[0] == "cached"
    assert reads == []


def test_a_file_modified_just_now_is_hashed_every_time(recipe, tmp_path, images, reads):
    """Within its mtime's resolution a file could change again unseen: not remembered until it is older."""
    images("fresh", 2)
    loaded = recipe({"source": {"path": "fresh"}, "prompt": "x"})
    source_fingerprint(loaded)
    source_fingerprint(loaded)
    assert len(reads) == 4


def test_a_corrupt_memo_is_treated_as_empty(recipe, tmp_path, images, reads, memo_dir):
    images("faces", 2)
    _age(tmp_path / "faces")
    loaded = recipe({"source": {"path": "faces"}, "prompt": "x"})
    first = source_fingerprint(loaded)
    for garbage in (
        b"{not json",
        b'{"version": 1, "entries": []}',
        b"[1, 2]",
        b'{"version": 1, "entries": {"x": 3}}',
    ):
        memo_dir.write_bytes(garbage)
        file_hashes._loaded.clear()
        reads.clear()
        assert source_fingerprint(loaded) == first and len(reads) == 2
    reads.clear()
    assert source_fingerprint(loaded) == first and reads == []  # rewritten whole


def test_the_memo_keeps_the_newest_entries_and_all_of_one_source(
    recipe, tmp_path, images, memo_dir, monkeypatch
):
    monkeypatch.setattr(file_hashes, "MAX_ENTRIES", 3)
    images("a", 5)
    images("b", 2)
    _age(tmp_path / "a")
    _age(tmp_path / "b")
    source_fingerprint(recipe({"source": {"path": "a"}, "prompt": "x"}))
    entries = json.loads(memo_dir.read_text())["entries"]
    assert len(entries) == 5  # more than the bound: every file of the source just looked up
    source_fingerprint(recipe({"source": {"path": "b"}, "prompt": "x"}))
    entries = json.loads(memo_dir.read_text())["entries"]
    assert [Path(p).relative_to(tmp_path).as_posix() for p in entries] == [
        "a/004.png",
        "b/000.png",
        "b/001.png",
    ]


def test_an_unwritable_memo_only_costs_reads(recipe, tmp_path, images, reads, monkeypatch):
    images("faces", 2)
    _age(tmp_path / "faces")
    (tmp_path / "ro").write_text("a file where the memo's folder would be")
    monkeypatch.setattr(file_hashes, "memo_path", lambda: tmp_path / "ro" / file_hashes.MEMO_NAME)
    loaded = recipe({"source": {"path": "faces"}, "prompt": "x"})
    assert source_fingerprint(loaded) == source_fingerprint(loaded)
    assert len(reads) == 4


def test_the_memo_lives_beside_the_models_cache(monkeypatch, tmp_path):
    monkeypatch.undo()  # the real memo_path, without this module's fixture
    monkeypatch.setenv("RECIPE_RUNNER_CACHE", str(tmp_path / "cache"))
    assert file_hashes.memo_path() == tmp_path / "cache" / "file-hashes.json"


def test_a_record_without_hashes_rebuilds_once(cli, jsonl_project, tmp_path, folder):
    """referenced_files.json from a version that kept sizes and mtimes only."""
    _build(cli, jsonl_project, folder.root)
    record = folder.dataset / "referenced_files.json"
    files = json.loads(record.read_text())["files"]
    raw = json.dumps({"files": [{k: v for k, v in f.items() if k != "sha256"} for f in files]}).encode()
    record.write_bytes(raw)
    report = json.loads((folder.dataset / "report.json").read_text())
    report["referenced_files"]["sha256"] = hashlib.sha256(raw).hexdigest()
    (folder.dataset / "report.json").write_text(json.dumps(report))
    cached, why = dataset_status(load_recipe(jsonl_project), folder)
    assert (
        not cached
        and why == "the list of files the data refers to (referenced_files.json) predates content hashes"
    )
    _build(cli, jsonl_project, folder.root)
    assert dataset_status(load_recipe(jsonl_project), folder)[0] is True


def test_two_writers_of_the_memo_keep_both_their_entries(tmp_path, images, memo_dir, reads):
    """A process saves what it learnt into the memo as it is on disk now, not as it was when it began."""
    images("a", 1)
    images("b", 1)
    _age(tmp_path / "a")
    _age(tmp_path / "b")
    one, two = file_hashes.FileHashes(), file_hashes.FileHashes()  # both start from an empty memo
    one.sha256(tmp_path / "a" / "000.png")
    two.sha256(tmp_path / "b" / "000.png")
    one.save()
    two.save()
    file_hashes._loaded.clear()
    reads.clear()
    with file_hashes.memo() as hashes:
        hashes.sha256(tmp_path / "a" / "000.png")
        hashes.sha256(tmp_path / "b" / "000.png")
    assert reads == []
