"""Two training jobs on one machine: how much a run slows down beside another, per thread setting.

    python benchmarks/contention.py                  # tiny SD, 64 px, 40 steps (~3 min on 2 cores)
    python benchmarks/contention.py --arch shapes --batch-size 32 --steps 10 --settings default,passive

Each setting runs `benchmarks/train_speed.py --modes ours` alone, then two copies at once, as whole
processes (the OpenMP runtime reads its environment when torch loads, so nothing can share a process).
The figure that matters is the slowdown: steps/s alone ÷ steps/s beside the other (2 would be a fair
share of the cores; far more is threads spinning at barriers while the other job holds the cores).
  default   one intra-op thread per core and OpenMP's default wait policy (spin): plain torch
  passive   the same threads, OMP_WAIT_POLICY=PASSIVE (idle threads sleep): what `recipe` sets
  spin10k   the same threads, spinning 10,000 times before sleeping (GOMP_SPINCOUNT)
  one       torch.set_num_threads(1) in the process (OpenMP's threads were started already)
  one-env   OMP_NUM_THREADS=1 from the start (what the test suite pins; train.threads: 1 does this)
Run it alone: another job on the machine changes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORES = str(os.cpu_count() or 1)
SETTINGS = {
    "default": ({"OMP_WAIT_POLICY": "ACTIVE"}, ["--threads", CORES]),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, ["--threads", CORES]),
    "spin10k": ({"GOMP_SPINCOUNT": "10000"}, ["--threads", CORES]),
    "one": ({}, ["--threads", "1"]),
    "one-env": ({"OMP_NUM_THREADS": "1"}, []),
}


def _job(setting: str, steps: int, out: Path, extra: list[str]) -> subprocess.Popen:
    env_extra, args = SETTINGS[setting]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    }
    env.update(env_extra)
    cmd = [sys.executable, str(HERE / "train_speed.py"), "--modes", "ours", "--rounds", "1"]
    cmd += ["--steps", str(steps), "--json", str(out), *args, *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _rate(out: Path) -> float:
    report = json.loads(out.read_text())
    return float(report["modes"]["ours"]["steps_per_second"])


def measure(setting: str, steps: int, tmp: Path, extra: list[str]) -> dict:
    alone = tmp / f"{setting}-alone.json"
    job = _job(setting, steps, alone, extra)
    if job.wait() != 0:
        raise SystemExit(f"{setting} alone failed:\n{job.stderr.read()[-2000:]}")
    pair = [tmp / f"{setting}-pair-{i}.json" for i in range(2)]
    jobs = [_job(setting, steps, p, extra) for p in pair]
    for j in jobs:
        if j.wait() != 0:
            raise SystemExit(f"{setting} beside another failed:\n{j.stderr.read()[-2000:]}")
    a, b = _rate(alone), [_rate(p) for p in pair]
    return {"alone": a, "beside": b, "slowdown": a / min(b)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--settings", default="default,passive,one-env")
    parser.add_argument("--arch", default="tiny", help="train_speed.py's --arch (tiny, shapes, ...)")
    parser.add_argument("--batch-size", type=int, help="train_speed.py's --batch-size")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    extra = ["--arch", args.arch] + (["--batch-size", str(args.batch_size)] if args.batch_size else [])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings.split(","):
            started = time.perf_counter()
            results[setting] = measure(setting, args.steps, Path(tmp), extra)
            r = results[setting]
            print(
                f"{setting:8s} alone {r['alone']:6.2f} steps/s   beside another "
                f"{min(r['beside']):6.2f} / {max(r['beside']):6.2f}   slowdown ×{r['slowdown']:.2f}   "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps({"cpu_count": os.cpu_count(), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
