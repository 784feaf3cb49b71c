"""Bad recipes: each gets exit code 2, a located message naming the field, and no traceback."""

from __future__ import annotations

import pytest

BASE = """\
name: t
dataset:
  source: {builtin: shapes, num_samples: 32}
  resolution: 64
model:
  base: builtin:tiny-sd
"""

# (id, recipe text, --set overrides, substrings the error output must contain)
CASES = [
    ("misspelt-top", BASE + "sed: 3\n", [], [":7:1", "sed", "unknown field", "did you mean 'seed'"]),
    (
        "misspelt-train",
        BASE + "train:\n  learnin_rate: 1e-5\n",
        [],
        [":8:3", "train.learnin_rate", "learning_rate"],
    ),
    ("wrong-type", BASE + "train:\n  batch_size: four\n", [], [":8:3", "train.batch_size", "valid integer"]),
    (
        "out-of-range",
        BASE + "train:\n  learning_rate: -1\n",
        [],
        [":8:3", "train.learning_rate", "greater than 0"],
    ),
    ("seed-negative", BASE + "seed: -1\n", [], [":7:1", "seed", "greater than or equal to 0"]),
    (
        "unknown-condition",
        BASE + "condition: {type: cany}\n",
        [],
        ["condition.type", "'cany'", "did you mean 'canny'"],
    ),
    ("condition-no-type", BASE + "condition: {low_threshold: 3}\n", [], ["condition", "needs a `type`"]),
    (
        "condition-param",
        BASE + "condition: {type: canny, sigma: 3}\n",
        [],
        ["condition.sigma", "unknown field"],
    ),
    (
        "canny-order",
        BASE + "condition: {type: canny, low_threshold: 200, high_threshold: 100}\n",
        [],
        ["condition.high_threshold", "high_threshold (100) must be >= low_threshold (200)"],
    ),
    (
        "canny-range",
        BASE + "condition: {type: canny, low_threshold: 300}\n",
        [],
        ["condition.low_threshold", "255"],
    ),
    (
        "custom-bad-path",
        BASE + "condition: {type: custom, function: 'not a path'}\n",
        [],
        ["condition.function", "package.module:function"],
    ),
    (
        "resolution-8",
        BASE.replace("resolution: 64", "resolution: 100"),
        [],
        [":4:3", "multiple of 8", "96 or 104"],
    ),
    ("no-source", "name: t\ndataset: {resolution: 64}\n", [], ["dataset.source", "required"]),
    (
        "two-sources",
        "name: t\ndataset: {source: {builtin: shapes, hub: a/b}}\n",
        [],
        ["exactly one of hub, path or builtin"],
    ),
    ("hub-id", "name: t\ndataset: {source: {hub: 'not an id'}}\n", [], ["dataset.source.hub", "owner/name"]),
    (
        "split-on-path",
        "name: t\ndataset: {source: {builtin: shapes, split: test}}\n",
        [],
        ["`split` applies only to a `hub`"],
    ),
    ("missing-name", BASE.replace("name: t\n", ""), [], ["name", "required"]),
    ("bad-name", BASE.replace("name: t", "name: 'my run!'"), [], ["name", "pattern"]),
    (
        "precision",
        BASE + "train: {mixed_precision: fp17}\n",
        [],
        ["train.mixed_precision", "did you mean 'fp16'"],
    ),
    (
        "steps-and-epochs",
        BASE + "train: {max_steps: 10, num_epochs: 2}\n",
        [],
        ["exactly one of max_steps and num_epochs"],
    ),
    (
        "warmup",
        BASE + "train: {max_steps: 10, lr_warmup_steps: 20}\n",
        [],
        ["lr_warmup_steps (20)", "max_steps (10)"],
    ),
    (
        "fp8-without-checkpointing",
        BASE + "train: {fp8_base: true}\n",
        [],
        ["train.fp8_base", "gradient_checkpointing: true"],
    ),
    (
        "fp8-with-compile",
        BASE + "train: {fp8_base: true, gradient_checkpointing: true, compile: true}\n",
        [],
        ["train.fp8_base", "fp8_base and compile do not combine"],
    ),
    (
        "validation-counts",
        BASE + "train:\n  validation: {prompts: [a, b], conditioning_images: [x, y, z]}\n",
        [],
        ["train.validation.conditioning_images", "2 prompts but 3 conditioning_images"],
    ),
    (
        "sdxl-only",
        BASE + "train: {micro_conditioning: {}}\n",
        [],
        ["micro_conditioning applies only to SDXL"],
    ),
    (
        "builtin-model",
        BASE.replace("builtin:tiny-sd", "builtin:huge"),
        [],
        ["model.base", "unknown builtin model"],
    ),
    ("push-no-id", BASE + "output: {push_to_hub: true}\n", [], ["push_to_hub needs hub_model_id"]),
    ("evaluate-holdout", BASE + "evaluate: {enabled: true}\n", [], ["evaluate.enabled needs held-out rows"]),
    (
        "holdout-too-big",
        BASE.replace("num_samples: 32}", "num_samples: 8}\n  holdout: 8"),
        [],
        [":4:3", "dataset.holdout", "holdout (8)", "num_samples (8)"],
    ),
    ("duplicate-key", BASE + "seed: 1\nseed: 2\n", [], [":8:1", "duplicate key 'seed'", "first at line 7"]),
    ("yaml-syntax", BASE + "train: {batch_size: 2\n", [], ["invalid YAML"]),
    ("unsafe-tag", BASE + "seed: !!python/object/apply:os.system ['true']\n", [], [":7:7", "not allowed"]),
    ("merge-key", BASE + "x: &a {seed: 1}\ntrain:\n  <<: *a\n", [], ["merge keys"]),
    ("not-a-mapping", "- just\n- a list\n", [], ["a recipe must be a mapping"]),
    (
        "missing-dataset-path",
        "name: t\ndataset: {source: {path: nowhere/data.parquet}}\n",
        [],
        ["dataset.source.path", "not found"],
    ),
    (
        "missing-model-folder",
        BASE.replace("builtin:tiny-sd", "./models/none"),
        [],
        ["model.base", "not found"],
    ),
    (
        "bad-model-ref",
        BASE.replace("builtin:tiny-sd", "'not a hub id'"),
        [],
        ["neither an existing folder nor a hub id"],
    ),
    (
        "missing-validation-image",
        BASE + "train:\n  validation: {prompts: [a], conditioning_images: [nope.png]}\n",
        [],
        ["train.validation.conditioning_images.0", "nope.png", "not found"],
    ),
    (
        "set-unknown",
        BASE,
        ["train.learnin_rate=1e-4"],
        ["--set train.learnin_rate=1e-4", "did you mean 'learning_rate'"],
    ),
    ("set-type", BASE, ["train.batch_size=many"], ["--set train.batch_size=many", "valid integer"]),
    ("set-syntax", BASE, ["train.batch_size"], ["expected --set path.to.field=value"]),
    ("set-into-scalar", BASE + "seed: 1\n", ["seed.x=1"], ["cannot set inside 'seed'"]),
    ("set-mapping-on-int", BASE, ["seed={x: 1}"], ["--set seed={x: 1}", "valid integer"]),
    # Was a ValueError traceback from the shapes generator, once the build started.
    ("shapes-too-small", BASE, ["dataset.resolution=8"], ["dataset.resolution", "16 px or more"]),
]


@pytest.mark.parametrize(("text", "overrides", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_recipe_is_reported(cli, write_recipe, text, overrides, expected):
    path = write_recipe(text)
    args = ["validate", path]
    for o in overrides:
        args += ["--set", o]
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for part in expected:
        assert part in result.stderr, f"{part!r} not in:\n{result.stderr}"


def test_five_mistakes_all_reported_at_once(cli, write_recipe):
    path = write_recipe(
        """\
        extends: missing-base.yaml
        name: t
        condition: {type: cany}
        dataset:
          source: {builtin: shapes}
          resolution: 64
        train:
          learnin_rate: 1e-4
          batch_size: four
          max_grad_norm: -1
        """
    )
    result = cli("validate", path)
    assert result.exit_code == 2
    err = result.stderr
    for part in [
        "recipe.yaml:1:1: error: extends: extended file 'missing-base.yaml' not found",
        "recipe.yaml:3:13: error: condition.type: unknown condition type 'cany'",
        "recipe.yaml:8:3: error: train.learnin_rate: unknown field",
        "recipe.yaml:9:3: error: train.batch_size:",
        "recipe.yaml:10:3: error: train.max_grad_norm:",
    ]:
        assert part in err, f"{part!r} not in:\n{err}"
    assert "5 problems" in err


def test_errors_in_an_extended_file_point_into_it(cli, write_recipe):
    write_recipe("train:\n  batch_size: 0\n", name="base/b.yaml")
    path = write_recipe("extends: base/b.yaml\n" + BASE)
    result = cli("validate", path)
    assert result.exit_code == 2
    assert "b.yaml:2:3: error: train.batch_size" in result.stderr


def test_extends_cycle(cli, write_recipe):
    write_recipe("extends: b.yaml\n", name="a.yaml")
    write_recipe("extends: a.yaml\n" + BASE, name="b.yaml")
    path = write_recipe("extends: a.yaml\n", name="top.yaml")
    result = cli("validate", path)
    assert result.exit_code == 2
    assert "extends cycle" in result.stderr


def test_alias_bomb_is_bounded(cli, write_recipe):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 8):
        prev = f"*a{i - 1}"
        lines.append(f"a{i}: &a{i} [{', '.join([prev] * 10)}]")
    path = write_recipe("\n".join(lines) + "\n" + BASE)
    result = cli("validate", path)
    assert result.exit_code == 2
    assert "alias bomb" in result.stderr


def test_missing_file_and_non_utf8(cli, tmp_path):
    result = cli("validate", tmp_path / "nope.yaml")
    assert result.exit_code == 2 and "file not found" in result.stderr
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"name: caf\xe9\n")
    result = cli("validate", bad)
    assert result.exit_code == 2 and "not UTF-8" in result.stderr


def test_json_output_lists_every_problem(cli, write_recipe):
    import json

    path = write_recipe(BASE + "seed: -1\ntrain: {batch_size: 0}\n")
    result = cli("validate", path, "--json")
    assert result.exit_code == 2
    payload = json.loads(result.stdout)
    assert payload["valid"] is False
    paths = {p["path"] for p in payload["files"][0]["problems"]}
    assert paths == {"seed", "train.batch_size"}
    assert all(p["line"] for p in payload["files"][0]["problems"])


@pytest.mark.parametrize(
    ("text", "overrides"),
    [
        (BASE + "train:\n  mixed_precision: no\n", []),
        (BASE, ["train.mixed_precision=no", "launch.mixed_precision=no"]),
    ],
    ids=["file", "set"],
)
def test_unquoted_no_precision_means_no(cli, write_recipe, text, overrides):
    """YAML 1.1 reads a bare `no` as false; for mixed_precision the user meant "no" (fp32)."""
    args = ["show", write_recipe(text)]
    for o in overrides:
        args += ["--set", o]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert "mixed_precision: 'no'" in result.stdout
    bad = cli("validate", write_recipe(BASE + "train:\n  mixed_precision: yes\n"))
    assert bad.exit_code == 2 and "train.mixed_precision" in bad.stderr


def test_every_cross_section_problem_is_reported_at_once(cli, tmp_path):
    """The checks that span sections stopped at the first: a user fixed and reran five times."""
    import json

    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: bad\n"
        "dataset: {source: {builtin: shapes}, resolution: 72}\n"
        "model: {base: 'builtin:tiny-flux', t5: false}\n"
        "train: {snr_gamma: 5}\n"
        "evaluate: {enabled: true}\n"
        "output: {export: [single-file]}\n"
    )
    result = cli("validate", path, "--json")
    assert result.exit_code == 2
    problems = json.loads(result.output)["files"][0]["problems"]
    assert [(p["path"], p["line"]) for p in problems] == [
        ("dataset.resolution", 2),
        ("model.t5", 3),
        ("train.snr_gamma", 4),
        ("evaluate.enabled", 5),
        ("output.export", 6),
    ]
    assert "no multiple of 16" in problems[0]["message"] and "FLUX.1" in problems[2]["message"]
