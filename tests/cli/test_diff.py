"""`recipe diff`: semantic differences of resolved recipes and what they imply, in text, markdown and JSON."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

A = """\
name: x
dataset: {source: {builtin: shapes, num_samples: 64}, resolution: 64}
model: {base: "builtin:tiny-sd"}
train: {max_steps: 10, batch_size: 2}
"""


def test_reformatted_recipe_has_no_semantic_difference(cli, write_recipe):
    a = write_recipe(A, "a.yaml")
    b = write_recipe(
        """\
        # the same recipe: keys reordered, flow style expanded, defaults written out
        train:
          batch_size: 2
          max_steps: 10
          learning_rate: 1.0e-5     # the default
        model:
          base: builtin:tiny-sd
        name: x
        seed: 0
        dataset:
          resolution: 64
          source:
            num_samples: 64
            builtin: shapes
        condition: {type: canny, low_threshold: 100, high_threshold: 200}
        """,
        "b.yaml",
    )
    r = cli("diff", a, b)
    assert r.exit_code == 0, r.output
    assert "no semantic difference" in r.stdout
    assert "formatting" in r.stdout
    assert cli("diff", a, b, "--exit-code").exit_code == 0


@pytest.mark.parametrize(("old", "new", "says"), [("1e-5", "2e-5", "×2"), ("2e-5", "1e-5", "÷2")])
def test_learning_rate_ratio(cli, write_recipe, old, new, says):
    a = write_recipe(A.replace("batch_size: 2}", f"batch_size: 2, learning_rate: {old}}}"), "a.yaml")
    b = write_recipe(A.replace("batch_size: 2}", f"batch_size: 2, learning_rate: {new}}}"), "b.yaml")
    r = cli("diff", a, b)
    assert r.exit_code == 0, r.output
    assert f"learning rate {says}" in r.stdout
    assert "training restarts from scratch; dataset reused" in r.stdout


def test_batch_change_shows_effective_batch(cli, write_recipe):
    a = write_recipe(A, "a.yaml")
    b = write_recipe(
        A.replace("batch_size: 2}", "batch_size: 4, gradient_accumulation_steps: 2}")
        + "launch: {num_processes: 2}\n",
        "b.yaml",
    )
    r = cli("diff", a, b)
    assert r.exit_code == 0, r.output
    assert "effective batch 2 → 16" in r.stdout
    assert "batch_size" in r.stdout and "num_processes" in r.stdout


def test_condition_threshold_rebuilds_dataset(cli, write_recipe):
    a = write_recipe(A, "a.yaml")
    b = write_recipe(A + "condition: {type: canny, low_threshold: 50}\n", "b.yaml")
    r = cli("diff", a, b)
    assert r.exit_code == 0, r.output
    assert "dataset will rebuild (condition.low_threshold)" in r.stdout
    assert "low_threshold" in r.stdout and "100" in r.stdout and "50" in r.stdout


def test_condition_type_and_family_changes_are_named(cli, write_recipe):
    a = write_recipe(A, "a.yaml")
    b = write_recipe(
        A.replace("builtin:tiny-sd", "builtin:tiny-sdxl") + "condition: {type: depth}\n", "b.yaml"
    )
    out = cli("diff", a, b).stdout
    assert "condition type changed: canny → depth (needs annotator weights)" in out
    assert "model family changed sd1 → sdxl" in out


def test_steps_precision_and_prompts(cli, write_recipe):
    a = write_recipe(A, "a.yaml")
    train = (
        "train: {max_steps: 5, batch_size: 2, mixed_precision: bf16,\n"
        "        validation: {prompts: [a red circle], conditioning_images: [edge.png]}}\n"
    )
    b = write_recipe(A.replace("train: {max_steps: 10, batch_size: 2}\n", train), "b.yaml")
    r = cli("diff", a, b)
    assert r.exit_code == 0, r.output
    assert "steps 10 → 5" in r.stdout
    assert "precision no → bf16" in r.stdout
    assert "+ a red circle" in r.stdout


def test_output_only_change_needs_no_retraining(cli, write_recipe):
    a = write_recipe(A, "a.yaml")
    b = write_recipe(A + "output: {dir: runs/elsewhere}\nlogging: {tracker: none}\n", "b.yaml")
    out = cli("diff", a, b).stdout
    assert "only logging/output changed: no retraining" in out
    assert "run folder runs/x → runs/elsewhere" in out


def test_markdown_names_both_files_and_has_tables(cli, write_recipe):
    a = write_recipe(A, "a.yaml")
    b = write_recipe(A.replace("batch_size: 2}", "batch_size: 2, learning_rate: 2e-5}"), "b.yaml")
    r = cli("diff", a, b, "--format", "markdown")
    assert r.exit_code == 0, r.output
    md = r.stdout
    assert "a.yaml" in md and "b.yaml" in md
    assert "| field |" in md and "|---|---|---|" in md
    assert "#### train" in md
    assert "**What this means:**" in md and "learning rate ×2" in md


def test_json_lists_changes(cli, write_recipe):
    a = write_recipe(A, "a.yaml")
    b = write_recipe(A + "seed: 3\n", "b.yaml")
    r = cli("diff", a, b, "--format", "json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["changes"] == [
        {"path": "seed", "section": "top-level", "kind": "changed", "old": 0, "new": 3}
    ]
    assert data["implications"][0]["code"] == "rebuild"
    assert json.loads(cli("diff", a, b, "--json").stdout) == data


def test_exit_code_option(cli, write_recipe):
    a = write_recipe(A, "a.yaml")
    b = write_recipe(A + "seed: 3\n", "b.yaml")
    assert cli("diff", a, b).exit_code == 0
    assert cli("diff", a, b, "--exit-code").exit_code == 1


def test_set_b_previews_an_override(cli, write_recipe):
    a = write_recipe(A, "a.yaml")
    r = cli("diff", a, a, "--set-b", "train.learning_rate=5e-5")
    assert r.exit_code == 0, r.output
    assert "learning rate ×5" in r.stdout
    assert "(with --set-b)" in r.stdout
    both = cli("diff", a, a, "--set", "train.learning_rate=5e-5")
    assert "no semantic difference" in both.stdout


def test_invalid_b_is_located(cli, write_recipe):
    a = write_recipe(A, "a.yaml")
    b = write_recipe(A + "train_extra: 1\n", "b.yaml")
    r = cli("diff", a, b)
    assert r.exit_code == 2
    assert "b.yaml:5:1" in r.stderr
    assert "unknown field" in r.stderr


def test_wrong_number_of_files(cli, write_recipe):
    a = write_recipe(A, "a.yaml")
    r = cli("diff", a)
    assert r.exit_code == 2
    assert "two recipe files" in r.stderr


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_revision_against_working_copy(cli, tmp_path: Path):
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "common.yaml").write_text("train: {max_steps: 10, batch_size: 2}\n")
    recipe = tmp_path / "r.yaml"
    body = A.replace("train: {max_steps: 10, batch_size: 2}\n", "")
    recipe.write_text("extends: base/common.yaml\n" + body)
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    recipe.write_text("extends: base/common.yaml\n" + body + "train: {learning_rate: 2e-5}\n")
    r = cli("diff", "--git", "HEAD", recipe)
    assert r.exit_code == 0, r.output
    assert "learning rate ×2" in r.stdout
    assert "@HEAD" in r.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".r@")]  # the temporary copy is gone
    bad = cli("diff", "--git", "no-such-rev", recipe)
    assert bad.exit_code == 2 and "no-such-rev" in bad.stderr
