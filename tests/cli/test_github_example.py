"""examples/github/review-recipes.sh, the GitHub workflow's logic, run on a fixture repository."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "github" / "review-recipes.sh"
BIN = Path(sys.executable).parent  # the venv's `recipe` and python

pytestmark = pytest.mark.skipif(
    not (shutil.which("git") and shutil.which("bash") and (BIN / "recipe").exists()),
    reason="needs git, bash and the installed `recipe` command",
)

PRESET = "train:\n  learning_rate: 1.0e-5\n  batch_size: 2\n"
RECIPE = """\
extends: base/common.yaml
name: {name}
dataset: {{source: {{builtin: shapes, num_samples: 32}}, resolution: 64}}
model: {{base: builtin:tiny-sd}}
train: {{max_steps: {steps}}}
"""


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def _write(repo: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)


@pytest.fixture
def pr(tmp_path: Path) -> tuple[Path, str, str]:
    """A repository with a base commit (one recipe, one preset) and a head commit that changes the
    recipe, adds one and changes the preset; the head is checked out, as actions/checkout does."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _write(
        repo,
        {
            "recipes/base/common.yaml": PRESET,
            "recipes/changed.yaml": RECIPE.format(name="changed", steps=100),
            "README.md": "not a recipe\n",
        },
    )
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "base")
    base = _git(repo, "rev-parse", "HEAD")
    _write(
        repo,
        {
            "recipes/base/common.yaml": PRESET.replace("batch_size: 2", "batch_size: 4"),
            "recipes/changed.yaml": RECIPE.format(name="changed", steps=200),
            "recipes/added.yaml": RECIPE.format(name="added", steps=50),
            "other.yaml": "not: [a, recipe\n",  # outside recipes/: ignored, though it is broken YAML
        },
    )
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "head")
    return repo, base, _git(repo, "rev-parse", "HEAD")


def _review(repo: Path, tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, str]:
    comment = tmp_path / "comment.md"
    inherited = {
        k: v for k, v in os.environ.items() if k not in ("BASE_SHA", "HEAD_SHA", "GITHUB_EVENT_PATH")
    }
    full = {
        **inherited,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHON": sys.executable,
        "COMMENT_FILE": str(comment),
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_CONFIG_NOSYSTEM": "1",
        "COLUMNS": "200",
        **env,
    }
    done = subprocess.run(
        ["bash", str(SCRIPT)], cwd=repo, env=full, capture_output=True, text=True, timeout=120
    )
    return done, comment.read_text() if comment.exists() else ""


def test_review_comment_from_a_pull_request_event(pr, tmp_path):
    repo, base, head = pr
    event = tmp_path / "event.json"
    event.write_text(
        json.dumps({"number": 7, "pull_request": {"base": {"sha": base}, "head": {"sha": head}}})
    )
    done, comment = _review(repo, tmp_path, GITHUB_EVENT_PATH=str(event))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"`{base[:7]}`" in comment and f"`{head[:7]}`" in comment
    # The changed recipe: a semantic diff against the base commit, not a text diff.
    assert f"### Recipe diff: `recipes/changed.yaml@{base[:7]}` → `recipes/changed.yaml`" in comment
    assert "| `max_steps` | `100` | `200` |" in comment
    assert "steps 100 → 200" in comment
    # The added recipe: reported as new, with its resolved fields.
    assert "New recipe <code>recipes/added.yaml</code>" in comment and "(absent: new recipe)" in comment
    assert "new recipe: nothing to compare with" in comment
    assert "| `max_steps` (added) |  | `50` |" in comment
    # The preset: validated as a preset (it has no name or dataset), and its change shown.
    assert "### Preset `recipes/base/common.yaml`: valid as a preset" in comment
    assert "-  batch_size: 2" in comment and "+  batch_size: 4" in comment
    assert "other.yaml" not in comment and "README" not in comment
    assert "Validation failed" not in comment


def test_review_fails_on_an_invalid_changed_recipe(pr, tmp_path):
    repo, base, _ = pr
    (repo / "recipes" / "changed.yaml").write_text(
        RECIPE.format(name="changed", steps=200).replace("max_steps", "max_stepz")
    )
    done, comment = _review(repo, tmp_path, BASE_SHA=base)
    assert done.returncode != 0
    assert "### ✗ Validation failed" in comment
    assert "recipes/changed.yaml:5:9: error: train.max_stepz: unknown field 'max_stepz'" in comment
    assert "`recipes/changed.yaml`: invalid (see above), no diff" in comment
    assert "(absent: new recipe)" in comment  # the valid files are still reviewed


def test_review_writes_nothing_when_no_recipe_changed(pr, tmp_path):
    repo, _, head = pr
    done, comment = _review(repo, tmp_path, BASE_SHA=head)
    assert done.returncode == 0, done.stderr
    assert comment == ""


def test_review_names_a_missing_base_commit(pr, tmp_path):
    repo, _, _ = pr
    done, _ = _review(repo, tmp_path, BASE_SHA="0" * 40)
    assert done.returncode == 2
    assert "fetch-depth: 0" in done.stderr


def test_review_notes_a_base_version_that_does_not_load_without_failing(pr, tmp_path):
    repo, _, _ = pr
    (repo / "recipes" / "fixed.yaml").write_text("name: fixed\ntrain: {max_stepz: 1}\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "broken")
    base = _git(repo, "rev-parse", "HEAD")
    (repo / "recipes" / "fixed.yaml").write_text(RECIPE.format(name="fixed", steps=10))
    done, comment = _review(repo, tmp_path, BASE_SHA=base)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "`recipes/fixed.yaml`: no diff (the base version does not load)" in comment
    assert "max_stepz" in comment


def test_workflows_install_from_the_repository_and_call_the_script():
    import yaml

    review = yaml.safe_load((REPO / "examples" / "github" / "recipes.yml").read_text())
    comment = yaml.safe_load((REPO / "examples" / "github" / "recipes-comment.yml").read_text())
    steps = review["jobs"]["review"]["steps"]
    runs = "\n".join(s.get("run", "") for s in steps)
    assert "review-recipes.sh" in runs
    assert 'pip install --no-deps "$RECIPE_RUNNER"' in runs  # recipe-runner is not on PyPI
    assert not re.search(r"pip install (--no-deps )?recipe-runner\b", runs)
    assert review["env"]["RECIPE_RUNNER"].startswith("git+https://")
    assert review["permissions"] == {"contents": "read"}  # the fork-safe half: no write token
    # `on:` is YAML 1.1's boolean true for PyYAML.
    trigger = comment.get("on", comment.get(True))
    assert trigger["workflow_run"]["workflows"] == [review["name"]]
    assert not any("checkout" in s.get("uses", "") for s in comment["jobs"]["comment"]["steps"])
