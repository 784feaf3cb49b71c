"""Dataset build throughput: the builtin shapes dataset with canny, at num_proc=1 and 2, and a cache hit.

    python benchmarks/dataset_build.py [--rows 2000] [--resolution 256] [--out results.json]

Prints JSON: rows/s for each num_proc, their ratio, and an unchanged rebuild's time as a percentage of
the first build. Runs offline; everything is written to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

RECIPE = """\
name: bench
seed: 0
condition: {{type: canny, low_threshold: 100, high_threshold: 200}}
dataset:
  source: {{builtin: shapes, num_samples: {rows}}}
  resolution: {resolution}
  num_proc: {num_proc}
  batch_size: {batch_size}
"""


def _build(root: Path, rows: int, resolution: int, num_proc: int, batch_size: int) -> tuple[dict, float]:
    from recipe_runner.data.build import build_dataset
    from recipe_runner.recipe.loader import load_recipe
    from recipe_runner.runfolder.layout import RunFolder

    path = root / f"recipe-{num_proc}.yaml"
    path.write_text(RECIPE.format(rows=rows, resolution=resolution, num_proc=num_proc, batch_size=batch_size))
    start = time.perf_counter()
    report = build_dataset(load_recipe(path), RunFolder(root / f"run-{num_proc}"))
    return report, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, help="write the JSON here instead of stdout")
    args = parser.parse_args(argv)

    results: dict = {
        "rows": args.rows,
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "builds": {},
    }
    with tempfile.TemporaryDirectory(prefix="recipe-runner-bench-") as tmp:
        root = Path(tmp)
        for num_proc in (1, 2):
            report, seconds = _build(root, args.rows, args.resolution, num_proc, args.batch_size)
            results["builds"][f"num_proc={num_proc}"] = {
                "seconds": round(seconds, 3),
                "rows_per_second": round(args.rows / seconds, 1),
                "data_sha256": report["data_sha256"],
            }
        report, hit = _build(root, args.rows, args.resolution, 1, args.batch_size)
        assert report["cached"], "an unchanged rebuild should be a cache hit"
    one, two = results["builds"]["num_proc=1"], results["builds"]["num_proc=2"]
    results["speedup_num_proc_2_over_1"] = round(two["rows_per_second"] / one["rows_per_second"], 2)
    results["same_data_for_both"] = one["data_sha256"] == two["data_sha256"]
    results["cache_hit_seconds"] = round(hit, 4)
    results["cache_hit_percent_of_first_build"] = round(100 * hit / one["seconds"], 3)
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
