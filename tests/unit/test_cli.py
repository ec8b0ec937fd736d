"""The command line: every command teaches with --help; bad params stop before any work."""

from __future__ import annotations

import pytest
from conftest import REPO
from typer.main import get_command
from typer.testing import CliRunner

from flows.cli import app
from pipeline.settings import get_settings

COMMANDS = sorted(get_command(app).commands)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_a_useful_help(command):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0
    summary = result.output.split("Options:")[0]
    assert len(summary.split()) >= 8, f"`digits {command} --help` says too little:\n{result.output}"


def test_unknown_params_key_is_refused_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.setenv("DIGITS_HOME", str(tmp_path))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["retrain", "--set", "train.epochz=3"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2
    assert "train.epochz: unknown key" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no data, no store, nothing started


def test_malformed_set_option_says_how_to_write_it():
    result = CliRunner().invoke(app, ["retrain", "--set", "epochs"])
    assert result.exit_code == 2 and "KEY=VALUE" in result.output
