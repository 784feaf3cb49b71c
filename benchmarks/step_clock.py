"""Run a training program as `__main__`, unchanged, and record when each of its optimizer steps ends.

    python benchmarks/step_clock.py OUT.json SCRIPT.py [ARGS...]        # a diffusers example script
    python benchmarks/step_clock.py OUT.json -m recipe_runner [ARGS...]  # recipe-runner's CLI

It watches the progress bar each program already advances once per optimizer step: diffusers' scripts'
tqdm bar named "Steps", recipe-runner's TrainingProgress. OUT.json gets, in time.monotonic() seconds
(one clock for every process on the machine): `started` (this wrapper's first line), `loop_start` (the
bar made, just before the step loop), `steps` (each update of the bar), `ended` (interpreter exit);
and `omp_wait_policy`, OMP_WAIT_POLICY as the program left it.
Only the bars are patched, nothing of the training; importing tqdm and rich first costs nothing either
program does not import anyway. No torch is imported here: recipe-runner sets its CPU threads before.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
import time
from pathlib import Path

CLOCK: dict = {"started": time.monotonic(), "loop_start": None, "steps": []}


def _watch_tqdm() -> None:
    import tqdm.auto

    base = tqdm.auto.tqdm

    class Clocked(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self._clocked = kwargs.get("desc") == "Steps"  # the scripts' training bar; not datasets' bars
            if self._clocked:
                CLOCK["loop_start"] = time.monotonic()

        def update(self, n: float | None = 1) -> bool | None:
            if getattr(self, "_clocked", False):
                CLOCK["steps"].append(time.monotonic())
            return super().update(n)

    tqdm.auto.tqdm = Clocked


def _watch_recipe_runner() -> None:
    from recipe_runner.training.progress import TrainingProgress

    enter, update = TrainingProgress.__enter__, TrainingProgress.update

    def clocked_enter(self: TrainingProgress) -> TrainingProgress:
        CLOCK["loop_start"] = time.monotonic()
        return enter(self)

    def clocked_update(self: TrainingProgress, *args: object, **kwargs: object) -> None:
        CLOCK["steps"].append(time.monotonic())
        update(self, *args, **kwargs)

    TrainingProgress.__enter__ = clocked_enter  # type: ignore[method-assign]
    TrainingProgress.update = clocked_update  # type: ignore[method-assign]


def main(argv: list[str]) -> None:
    """`argv`: OUT.json, then a script and its arguments, or `-m MODULE` and its arguments."""
    if len(argv) < 2 or (argv[1] == "-m" and len(argv) < 3):
        raise SystemExit(__doc__)
    out = Path(argv[0])

    def dump() -> None:
        # The OpenMP wait policy the program ran with: recipe-runner picks PASSIVE itself when the
        # machine is busy as it starts (cli/stages.py), unless the environment sets one.
        policy = os.environ.get("OMP_WAIT_POLICY")
        out.write_text(json.dumps({**CLOCK, "ended": time.monotonic(), "omp_wait_policy": policy}))

    atexit.register(dump)
    if argv[1] == "-m":
        sys.path[0] = os.getcwd()  # as `python -m MODULE` has it
        _watch_recipe_runner()
        sys.argv = [argv[2], *argv[3:]]
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
    else:
        _watch_tqdm()
        sys.argv = argv[1:]
        sys.path[0] = str(Path(argv[1]).resolve().parent)  # as `python SCRIPT.py` has it
        runpy.run_path(argv[1], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
