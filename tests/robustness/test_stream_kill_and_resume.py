"""SIGKILL a real `recipe run` of a streaming source at random moments, resume, get bit-identical weights."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.conftest import write_shapes_shards
from tests.robustness.test_kill_and_resume import RECIPE, _check, _env, _recipe_cmd


@pytest.mark.slow
def test_a_streaming_run_killed_twice_then_resumed_matches_an_uninterrupted_run(tmp_path):
    """120 steps over 40 rows in 4 shards: several epochs, each checkpoint mid-epoch, the shuffle buffer's
    order replayed on every resume."""
    write_shapes_shards(tmp_path / "shards", rows=40, shards=4)
    recipe = tmp_path / "killme.yaml"
    source = (
        '{webdataset: "shards/{00000..00003}.tar", shuffle_buffer: 8}\n  columns: {image: png, prompt: txt}'
    )
    recipe.write_text(RECIPE.replace("{builtin: shapes, num_samples: 40}", source))
    out = tmp_path / "uninterrupted"
    start = time.perf_counter()
    done = subprocess.run(_recipe_cmd(recipe, out), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    _check(
        (recipe, out, time.perf_counter() - start), tmp_path, kills=2, seed=3
    )  # kills at 0.44 and 0.63 of a run: early enough to land
