"""Progress that a pipe, log.txt or a tool can read: throttled plain lines, and JSON lines under --json."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import pytest
from rich.console import Console

from recipe_runner.runfolder.events import ENV, NULL, Reporter, json_lines, progress_seconds, reporter

RECIPE = """\
name: progress
dataset:
  source: {builtin: shapes, num_samples: 12}
  resolution: 64
  holdout: 0
model:
  base: builtin:tiny-sd
train:
  max_steps: 6
  batch_size: 2
  checkpoint_every: 100
  validation: {every: 100, num_images: 1, num_rows: 1, num_inference_steps: 1, guidance_scale: 1.0}
logging: {tracker: none}
"""

TRAIN_LINE = re.compile(r"^train: step (\d+)/6, loss \d+\.\d{4}, lr \S+, [\d.]+ it/s, ETA \d+s$", re.M)
DATASET_LINE = re.compile(r"^dataset: 12/12 rows, [\d.]+ rows/s, ETA 0s$", re.M)
PRECOMPUTE_LINE = re.compile(r"^precompute: 12/12 rows, [\d.]+ rows/s, ETA 0s$", re.M)
BAR = re.compile(r"^(dataset|training|encoding images) .*━", re.M)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`recipe run` into a pipe and `recipe run --json`, side by side (one process each, not a TTY);
    RECIPE_RUNNER_PROGRESS_SECONDS=0: every update is a line."""
    root = tmp_path_factory.mktemp("progress")
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE)
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    env.update({ENV: "0", "OMP_NUM_THREADS": "1"})
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "recipe_runner", "run", str(recipe), "-o", str(root / name), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in (("plain", []), ("json", ["--json"]))
    }
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        out[name] = (root / name, stdout, stderr)
    return out


def test_a_piped_run_prints_plain_progress_lines_and_logs_them(runs):
    folder, _, stderr = runs["plain"]
    log = (folder / "log.txt").read_text()
    for text in (stderr, log):
        assert DATASET_LINE.search(text), text
        assert PRECOMPUTE_LINE.search(text), text
        assert [int(s) for s in TRAIN_LINE.findall(text)] == [1, 2, 3, 4, 5, 6], text
    assert not BAR.search(log), log  # rich's bars stay off the log: the lines say it


def test_json_streams_stage_and_progress_events_then_the_result(runs):
    folder, stdout, stderr = runs["json"]
    events = [json.loads(line) for line in stdout.splitlines()]
    kinds = [(e["event"], e.get("stage")) for e in events]
    assert [k for k in kinds if k[0] != "progress"] == [
        ("stage_start", "dataset"),
        ("stage_end", "dataset"),
        ("stage_start", "train"),
        ("stage_end", "train"),
        ("result", None),
    ]
    assert kinds.index(("progress", "dataset")) < kinds.index(("stage_end", "dataset"))
    assert kinds.index(("stage_start", "train")) < kinds.index(("progress", "precompute"))
    assert events[0]["reason"] == "no dataset yet"
    for end in (e for e in events if e["event"] == "stage_end"):
        assert end["skipped"] is False and end["seconds"] > 0
    train = [e for e in events if e["event"] == "progress" and e["stage"] == "train"]
    assert [e["step"] for e in train] == [1, 2, 3, 4, 5, 6]
    for e in train:
        assert e["total"] == 6 and isinstance(e["loss"], float) and e["steps_per_second"] > 0
        assert e["eta_seconds"] >= 0
    rows = [e for e in events if e["event"] == "progress" and e["stage"] == "dataset"]
    assert rows[-1]["rows"] == rows[-1]["total"] == 12 and rows[-1]["rows_per_second"] > 0
    result = events[-1]
    assert result["run_dir"] == str(folder)
    assert {"dataset", "train"} <= set(result["stages"])
    assert result["stages"]["train"]["steps"] == 6
    assert "train: step" not in stderr  # stdout is the events; the plain lines go to the log alone
    assert [int(s) for s in TRAIN_LINE.findall((folder / "log.txt").read_text())] == [1, 2, 3, 4, 5, 6]


def _reporter(terminal: bool, every: float = 30.0):
    now = [0.0]
    console = Console(file=io.StringIO(), force_terminal=terminal, width=200)
    logged: list[str] = []
    return Reporter(console, logged.append, every=every, clock=lambda: now[0]), console, logged, now


def test_lines_are_throttled_and_the_last_one_always_shows():
    report, console, logged, now = _reporter(terminal=False)
    report.progress("train", 0, 100, unit="step")  # the first report starts the clock: no line
    for step in range(1, 101):
        now[0] = float(step)  # a step a second
        report.progress("train", step, 100, unit="step", loss=0.5, lr=1e-4)
    report.progress("train", 100, 100, unit="step", loss=0.5, lr=1e-4)  # done: said once only
    lines = console.file.getvalue().splitlines()
    assert [int(re.search(r"step (\d+)/", line).group(1)) for line in lines] == [30, 60, 90, 100]
    assert lines[0] == "train: step 30/100, loss 0.5000, lr 1.00e-04, 1.00 it/s, ETA 1m10s"
    assert not logged  # off a terminal the console writes them (and, in a run, its log)


def test_on_a_terminal_only_the_log_gets_the_lines():
    report, console, logged, now = _reporter(terminal=True, every=5)
    report.progress("dataset", 0, 50)
    for done in range(10, 51, 10):
        now[0] += 2.0
        report.progress("dataset", done, 50)
    assert console.file.getvalue() == ""  # the live bar is the terminal's
    assert logged == [
        "dataset: 30/50 rows, 5.00 rows/s, ETA 4s\n",
        "dataset: 50/50 rows, 5.00 rows/s, ETA 0s\n",
    ]


def test_json_events_and_the_default_throttle(monkeypatch, capsys):
    with json_lines(True) as emit:
        report, *_ = _reporter(terminal=False, every=0)
        report.stage_start("train", "no trained weights yet")
        report.progress("train", 0, 2, unit="step")
        report.progress("train", 1, 2, unit="step", loss=float("nan"))
        emit({"event": "result", "run_dir": "r"})
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in events] == ["stage_start", "progress", "result"]
    assert events[1]["loss"] is None and events[1]["step"] == 1  # NaN is no JSON
    assert Reporter(Console(), print).json_out is None  # outside json_lines: no events
    assert reporter(None) is NULL and reporter(Console()) is NULL
    monkeypatch.delenv(ENV, raising=False)
    assert progress_seconds() == 30
    monkeypatch.setenv(ENV, "2.5")
    assert progress_seconds() == 2.5


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_log_keeps_what_is_printed_and_not_the_bar(monkeypatch, tmp_path):
    from rich.progress import Progress

    from recipe_runner.runfolder.log import run_console

    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TERM"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(ENV, "0")
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with run_console(tmp_path / "log.txt") as console, Progress(console=console) as bar:
        task = bar.add_task("training", total=2)
        reporter(console).progress("train", 0, 2, unit="step")
        console.print("[bold]saved[/] checkpoint step-1")  # printed while the bar runs
        bar.advance(task)
        reporter(console).progress("train", 1, 2, unit="step", loss=0.25)
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert len(lines) == 2 and lines[0] == "saved checkpoint step-1", lines  # plain, and no bar frame
    assert lines[1].startswith("train: step 1/2, loss 0.2500, "), lines
    assert "training" in terminal.getvalue() and "train: step" not in terminal.getvalue()
