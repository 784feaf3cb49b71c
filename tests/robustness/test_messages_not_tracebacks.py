"""Inputs and faults that used to end in a Python traceback: each is now a message and the right exit code."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

BUILD = """\
name: m
dataset:
  source: {builtin: shapes, num_samples: 8}
  resolution: 32
model: {base: builtin:tiny-sd}
"""


def test_yaml_nested_deeper_than_python_recursion(cli, tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    r = cli("validate", deep)
    assert r.exit_code == 2
    assert "nest" in r.stderr and "Traceback" not in r.output


def test_yaml_nested_deep_but_parseable(cli, tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text(
        "name: x\ndataset: {source: {builtin: shapes}}\ndescription: " + "[" * 80 + "]" * 80 + "\n"
    )
    r = cli("validate", deep)
    assert r.exit_code == 2
    assert "levels deep" in r.stderr


def test_recipe_that_is_a_fifo_or_a_device(cli, tmp_path):
    fifo = tmp_path / "r.yaml"
    os.mkfifo(fifo)
    r = cli("validate", fifo)  # reading a FIFO with no writer would block forever
    assert r.exit_code == 2 and "not a regular file" in r.stderr
    r = cli("validate", "/dev/zero")  # and a device would never end
    assert r.exit_code == 2 and "not a regular file" in r.stderr


def test_file_names_with_rich_markup_are_printed_as_text(cli, tmp_path):
    bad = tmp_path / "run[bold]s [red]x.yaml"
    bad.write_text("name: x\n")
    r = cli("validate", bad)
    assert r.exit_code == 2
    assert "run[bold]s [red]x.yaml" in r.stderr
    assert "run[bold]s [red]x.yaml: 1 problem" in r.stderr  # the summary line too


def test_read_only_run_folder_is_a_message(cli, write_recipe, tmp_path):
    if os.geteuid() == 0:
        # root ignores permissions; a folder under a file is the same class of OS error for everyone
        blocker = tmp_path / "blocker"
        blocker.write_text("a file where a folder should be\n")
        out = blocker / "run"
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        out = locked / "run"
    r = cli("build-dataset", write_recipe(BUILD), "-o", out)
    assert r.exit_code == 2, r.output
    assert str(tmp_path) in r.stderr and "error:" in r.stderr


def test_unreadable_validation_image_is_found_before_training(cli, write_recipe, tmp_path):
    (tmp_path / "edge.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    recipe = write_recipe(
        BUILD + "train:\n  validation: {conditioning_images: [good.png, edge.png], prompts: [a, b]}\n"
    )
    r = cli("validate", recipe)
    assert r.exit_code == 2
    assert "conditioning_images.1" in r.stderr and "cannot be read" in r.stderr
    assert "conditioning_images.0" not in r.stderr


def test_disk_check_counts_every_checkpoint_when_none_is_removed(write_recipe):
    from recipe_runner.recipe.loader import load_recipe
    from recipe_runner.run.resources import disk_needed

    train = "train: {max_steps: 1000, checkpoint_every: 100%s}\n"
    unbounded = disk_needed(load_recipe(write_recipe(BUILD + train % "")), ["train"])["train"]
    limited = disk_needed(
        load_recipe(write_recipe(BUILD + train % ", checkpoints_total_limit: 2", "l.yaml")), ["train"]
    )["train"]
    assert unbounded > 3 * limited  # 11 checkpoints kept, against 3 at a time


def test_small_disk_needs_are_shown_in_mb(write_recipe, tmp_path, monkeypatch):
    from recipe_runner.errors import UserError
    from recipe_runner.recipe.loader import load_recipe
    from recipe_runner.run import resources

    monkeypatch.setattr(resources, "_free_bytes", lambda path: (1000, tmp_path))
    with pytest.raises(UserError) as e:
        resources.check_disk(load_recipe(write_recipe(BUILD)), tmp_path, ["dataset", "train"])
    assert "0.0 GB" not in e.value.message and " MB" in e.value.message


def test_extends_can_switch_the_condition_and_the_source(cli, tmp_path):
    (tmp_path / "data").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "data" / "a.png")
    (tmp_path / "data" / "a.txt").write_text("a caption\n")
    (tmp_path / "parent.yaml").write_text(
        "name: p\ncondition: {type: canny, low_threshold: 50}\n"
        "dataset: {source: {builtin: shapes, num_samples: 8}, resolution: 32}\n"
    )
    child = tmp_path / "child.yaml"
    child.write_text("extends: parent.yaml\ncondition: {type: scribble}\ndataset: {source: {path: data}}\n")
    r = cli("show", child)
    assert r.exit_code == 0, r.output
    assert "low_threshold: 50" not in r.stdout and "num_samples: 8" not in r.stdout
    assert "type: scribble" in r.stdout and "path: data" in r.stdout
    same = tmp_path / "same.yaml"  # the same kind still merges
    same.write_text("extends: parent.yaml\ncondition: {type: canny, high_threshold: 150}\n")
    r = cli("show", same)
    assert r.exit_code == 0 and "low_threshold: 50" in r.stdout and "high_threshold: 150" in r.stdout


def _interrupt_a_build(recipe: Path, out: Path, wait: float, stop) -> str:
    """Start `recipe build-dataset` in its own process group, `stop(proc)` once it is writing its
    temporary folder (and `wait` seconds more), and return its stderr once it exited 130 and left no
    temporary behind."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "recipe_runner", "build-dataset", str(recipe), "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a process group of its own, as a terminal's Ctrl-C reaches
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(p.name.endswith(".tmp") for p in _entries(out)):
        time.sleep(0.2)
    time.sleep(wait)
    stop(proc)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    assert not [p for p in _entries(out) if p.name.endswith(".tmp")]
    return err


def _entries(root: Path) -> list[Path]:
    return list(root.iterdir()) if root.is_dir() else []


@pytest.mark.slow
def test_sigterm_during_the_dataset_build_exits_130_and_leaves_no_temporaries(write_recipe, tmp_path):
    recipe = write_recipe(BUILD.replace("num_samples: 8", "num_samples: 200000").replace("32\n", "256\n"))
    err = _interrupt_a_build(recipe, tmp_path / "run", 1.0, lambda proc: proc.send_signal(signal.SIGTERM))
    assert "SIGTERM" in err


def test_a_command_leaves_the_signal_handlers_as_it_found_them(cli, write_recipe):
    """The handlers that turn SIGTERM into a clean stop are the command's, not the process's: forked pool
    workers made later (datasets' num_proc) must still die on the SIGTERM their pool sends them."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert cli("validate", write_recipe(BUILD)).exit_code == 0
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


@pytest.mark.slow
def test_ctrl_c_during_a_two_process_build_is_one_message(write_recipe, tmp_path):
    recipe = write_recipe(
        BUILD.replace("num_samples: 8", "num_samples: 200000").replace("32\n", "256\n  num_proc: 2\n")
    )
    # the workers are mapping after 3 s; Ctrl-C reaches the whole process group
    err = _interrupt_a_build(recipe, tmp_path / "run", 3.0, lambda proc: os.killpg(proc.pid, signal.SIGINT))
    assert "KeyboardInterrupt" not in err


def test_temporaries_a_killed_precompute_left_are_removed_by_the_next_run(cli, write_recipe, tmp_path):
    out = tmp_path / "run"
    assert cli("build-dataset", write_recipe(BUILD), "-o", out).exit_code == 0
    left = out / "cache" / ".0123abcd.k3j2.tmp"  # what atomic_dir names a precompute in progress
    left.mkdir(parents=True)
    (left / "latent_mean.npy").write_bytes(b"half")
    theirs = out / "cache" / "notes.txt"  # not a temporary: kept
    theirs.write_text("mine\n")
    assert cli("build-dataset", write_recipe(BUILD), "-o", out).exit_code == 0
    assert not left.exists() and theirs.is_file()
