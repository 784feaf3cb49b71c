"""Run a command and record its own peak RSS, CPU time and wall time.

    python benchmarks/own_usage.py OUT.json COMMAND [ARGS...]

Why a process of its own: Linux carries a parent's memory into its child's ru_maxrss. A child begins as
a copy of its parent, and at exec keeps the larger of its own high-water mark and that copy's, so every
child of a benchmark that has loaded torch (vs_diffusers.py builds its models in-process) reported at
least the benchmark's own RSS, about 1.2 GB there. Started from this small process (about 10 MiB, with
nothing imported but the standard library), the command's ru_maxrss is its own.

OUT.json gets `started` and `ended` (time.monotonic(), one clock for every process on the machine),
`peak_rss_kib` (ru_maxrss), `cpu_s` (user + system) and `exit_code`; this process exits with that code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def main() -> int:
    out, command = sys.argv[1], sys.argv[2:]
    started = time.monotonic()
    child = subprocess.Popen(command)
    _, status, usage = os.wait4(child.pid, 0)
    ended = time.monotonic()
    code = os.waitstatus_to_exitcode(status)
    record = {
        "started": started,
        "ended": ended,
        "peak_rss_kib": usage.ru_maxrss,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "exit_code": code,
    }
    with open(out, "w", encoding="utf-8") as f:
        json.dump(record, f)
    return code if code >= 0 else 128 - code  # killed by a signal: as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
