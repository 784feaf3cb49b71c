"""Dataset build and precompute of the demo data in one process against several, as whole `recipe run`s.

    python benchmarks/shared_precompute.py [--processes 2] [--rounds 3] [--json results.json]

Each run is `recipe run recipes/demo.yaml` into a new folder, cut to what is measured: 1 training step,
no evaluation, the smallest final grid. "1" runs with `dataset.num_proc: 1` and one process; "N" with
`dataset.num_proc: N` (datasets' map processes) and `launch.num_processes: N` (the launched workers
share the precompute, each encoding every Nth batch: training/precompute.py, Shard). Measured from each
run's lock: the dataset stage's seconds and the precompute's (`stages.train.precompute_seconds`), and
the whole process's wall time; compared: the datasets' `data_sha256` and every cache array. Runs
alternate (1 first in even rounds), ratios are per round (1's time / N's), reported as medians. Run it
alone on the machine: two torch jobs on 2 cores slow each other far more than 2x.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
METRICS = ("dataset_s", "precompute_s", "wall_s")


def _run(root: Path, processes: int, index: int) -> dict:
    out = root / f"run-{processes}-{index}"
    shutil.rmtree(out, ignore_errors=True)
    sets = {
        "train.max_steps": "1",
        "train.checkpoint_every": "1000",
        "train.validation": "{every: 1000, num_images: 1, num_rows: 1, num_inference_steps: 1}",
        "evaluate.enabled": "false",
        "logging.tracker": "none",
        "dataset.num_proc": str(processes),
        "launch.num_processes": str(processes),
    }
    cmd = [sys.executable, "-m", "recipe_runner", "run", str(REPO / "recipes" / "demo.yaml"), "-o", str(out)]
    cmd += ["--quiet", *(a for k, v in sets.items() for a in ("--set", f"{k}={v}"))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(root / f"hf-{processes}-{index}")}
    start = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"shared_precompute: exit {done.returncode}: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    stages = json.loads((out / "run.lock.json").read_text())["stages"]
    (cache,) = (out / "cache").iterdir()
    return {
        "wall_s": wall,
        "dataset_s": stages["dataset"]["seconds"],
        "precompute_s": stages["train"]["precompute_seconds"],
        "data_sha256": stages["dataset"]["data_sha256"],
        "cache": str(cache),
    }


def _compare(a: Path, b: Path) -> dict:
    import numpy as np

    names = sorted(p.name for p in a.glob("*.npy"))
    assert names == sorted(p.name for p in b.glob("*.npy")), (a, b)
    worst, identical = 0.0, True
    for name in names:
        x, y = np.load(a / name), np.load(b / name)
        identical &= bool(np.array_equal(x, y))
        if x.dtype.kind == "f":
            worst = max(worst, float(np.abs(x.astype(np.float64) - y).max()))
    return {"same_key": a.name == b.name, "identical": identical, "max_abs_difference": worst}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "shared-precompute.json")
    args = parser.parse_args(argv)
    n = args.processes
    rounds = []
    with tempfile.TemporaryDirectory(prefix="shared-precompute-") as tmp:
        root = Path(tmp)
        for r in range(args.rounds):
            order = (1, n) if r % 2 == 0 else (n, 1)
            runs = {p: _run(root, p, r) for p in order}
            runs["cache"] = _compare(Path(runs[1]["cache"]), Path(runs[n]["cache"]))
            runs["same_data"] = runs[1]["data_sha256"] == runs[n]["data_sha256"]
            rounds.append(runs)
            print(json.dumps(runs, indent=1), flush=True)

    def ratio(metric: str) -> dict:
        per = [x[1][metric] / x[n][metric] for x in rounds]
        return {"median": statistics.median(per), "per_round": [round(p, 3) for p in per]}

    both = [x[1]["dataset_s"] + x[1]["precompute_s"] for x in rounds]
    both_n = [x[n]["dataset_s"] + x[n]["precompute_s"] for x in rounds]
    report = {
        "benchmark": "shared_precompute",
        "date": dt.date.today().isoformat(),
        "cpus": len(os.sched_getaffinity(0)),
        "processes": n,
        "median_seconds": {
            str(p): {m: statistics.median(x[p][m] for x in rounds) for m in METRICS} for p in (1, n)
        },
        "speedup": {
            "dataset": ratio("dataset_s"),
            "precompute": ratio("precompute_s"),
            "dataset_and_precompute": {
                "median": statistics.median(a / b for a, b in zip(both, both_n, strict=True)),
                "per_round": [round(a / b, 3) for a, b in zip(both, both_n, strict=True)],
            },
            "whole_run": ratio("wall_s"),
        },
        "same_data_every_round": all(x["same_data"] for x in rounds),
        "cache": [x["cache"] for x in rounds],
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
