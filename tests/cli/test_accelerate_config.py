"""launch.accelerate_config: what the launched workers would not do as the file says is refused by
`recipe validate` (exit 2), before any data is built, instead of being ignored."""

from __future__ import annotations

import pytest

from tests.conftest import MINIMAL, REPO

RECIPE = MINIMAL + "launch:\n  num_processes: 2\n  accelerate_config: accelerate.yaml\n"
LINE = RECIPE.splitlines().index("  accelerate_config: accelerate.yaml") + 1

FSDP = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
num_machines: 1
num_processes: 2
"""


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (FSDP, ["launch.accelerate_config", "distributed_type: FSDP", "DDP", "MULTI_GPU"]),
        ("distributed_type: DEEPSPEED\ndeepspeed_config: {zero_stage: 3}\n", ["distributed_type: DEEPSPEED"]),
        ("distributed_type: MULTI_GPU\nnum_machines: 2\n", ["num_machines: 2", "launch.num_machines: 1"]),
        ("distributed_type: [unclosed\n", ["cannot be read"]),
        ("- a list\n", ["not a mapping"]),
    ],
    ids=["fsdp", "deepspeed", "machines", "broken-yaml", "not-a-mapping"],
)
def test_what_the_workers_would_not_do_is_refused(cli, write_recipe, tmp_path, config, expected):
    recipe = write_recipe(RECIPE)
    (tmp_path / "accelerate.yaml").write_text(config)
    result = cli("validate", recipe)
    assert result.exit_code == 2, result.output
    for text in expected:
        assert text in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{recipe.name}:{LINE}:3" in result.stderr  # the recipe line that names the file


def test_a_data_parallel_config_validates(cli, write_recipe, tmp_path):
    recipe = write_recipe(RECIPE)
    (tmp_path / "accelerate.yaml").write_text(
        "distributed_type: MULTI_GPU\nnum_machines: 1\nnum_processes: 2\n"
    )
    result = cli("validate", recipe)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("name", ["1-node-8-gpus", "2-nodes-8-gpus-node0", "2-nodes-8-gpus-node1"])
def test_the_shipped_accelerate_configs_validate(cli, write_recipe, name):
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file

    config = REPO / "examples" / "accelerate" / f"{name}.yaml"
    assert load_config_from_file(str(config)).distributed_type == "MULTI_GPU"  # accelerate reads it
    machines = yaml.safe_load(config.read_text())["num_machines"]
    recipe = write_recipe(
        MINIMAL + f"launch:\n  num_processes: 8\n  num_machines: {machines}\n  accelerate_config: {config}\n"
    )
    result = cli("validate", recipe)
    assert result.exit_code == 0, result.output
