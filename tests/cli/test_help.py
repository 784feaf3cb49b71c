"""`--help` reads as a user expects: flags without a type, values with a name, shell completion offered."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("command", ["run", "train", "build-dataset", "plan", "validate", "diff", "sample"])
def test_flags_show_no_type(cli, command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    r = cli(command, "--help")
    assert r.exit_code == 0
    assert "<bool>" not in r.stdout and "--json" in r.stdout


def test_output_dir_names_its_value_and_completion_is_offered(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    assert "DIR" in cli("run", "--help").stdout
    assert "--install-completion" in cli("--help").stdout
