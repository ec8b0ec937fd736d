"""The command line: every command teaches with --help; bad params stop before any work."""

from __future__ import annotations

import pytest
from conftest import REPO
from typer.main import get_command
from typer.testing import CliRunner

from cli.main import digits
from pipeline.settings import get_settings

COMMANDS = sorted(get_command(digits).commands)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_a_useful_help(command):
    result = CliRunner().invoke(digits, [command, "--help"])
    assert result.exit_code == 0
    summary = result.output.split("Options:")[0]
    assert len(summary.split()) >= 8, f"`digits {command} --help` says too little:\n{result.output}"


def test_unknown_params_key_is_refused_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.setenv("DIGITS_HOME", str(tmp_path))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(digits, ["retrain", "--set", "train.epochz=3"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2
    assert "train.epochz: unknown key" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no data, no store, nothing started


def test_malformed_set_option_says_how_to_write_it():
    result = CliRunner().invoke(digits, ["retrain", "--set", "epochs"])
    assert result.exit_code == 2 and "KEY=VALUE" in result.output


@pytest.fixture
def prefect_api(monkeypatch):
    """Point the Prefect client at ``url`` (None: no server configured) for an in-process command."""
    from contextlib import contextmanager

    # importing prefect here would hand the `pipeline` loggers to Prefect's API handler (the CLI's default)
    # for the rest of the session, and other tests' log lines would warn that no flow run is there
    monkeypatch.setenv("PREFECT_LOGGING_EXTRA_LOGGERS", "")
    # Prefect sets up its logging on its first full import, and its console handler keeps the sys.stderr of
    # that moment: import it here, not inside CliRunner.invoke, whose stream is closed when the call returns
    # (a flow run later in the session would fail writing its log lines to it)
    import prefect.main  # noqa: F401
    from prefect.settings import PREFECT_API_URL, temporary_settings

    @contextmanager
    def use(url: str | None):
        if url is None:
            with temporary_settings(restore_defaults={PREFECT_API_URL}):
                yield
        else:
            with temporary_settings(updates={PREFECT_API_URL: url}):
                yield

    return use


@pytest.mark.parametrize("command", [["retrain", "--deployment"], ["deploy"]])
def test_deployment_commands_without_a_prefect_server_say_how_to_start_one(command, prefect_api):
    with prefect_api(None):
        result = CliRunner().invoke(digits, command)
    assert result.exit_code == 1
    assert "no Prefect server is configured" in result.output and "prefect server start" in result.output


def test_an_unreachable_prefect_server_is_named(prefect_api):
    from conftest import free_port

    url = f"http://127.0.0.1:{free_port()}/api"
    with prefect_api(url):
        result = CliRunner().invoke(digits, ["retrain", "--deployment"])
    assert result.exit_code == 1
    assert f"the Prefect server at {url} does not answer" in result.output


def test_bad_params_are_refused_before_a_deployment_run_is_triggered(tmp_path, monkeypatch, prefect_api):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.setenv("DIGITS_HOME", str(tmp_path))
    get_settings.cache_clear()
    try:
        with prefect_api(None):  # had it got as far as the server, it would fail on that instead
            result = CliRunner().invoke(digits, ["retrain", "--deployment", "--set", "train.epochz=3"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2 and "train.epochz: unknown key" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "nothing to sweep: sweep.grid in params.yaml is empty"),
        (["--grid", "model.dense_unitz=[16,32]"], "sweep.grid.model.dense_unitz: unknown key"),
        (["--grid", "train.seed=[1,2]"], "sweep.grid.train.seed: cannot vary in a sweep"),
        (["--grid", "model.dense_units=64"], "--grid takes KEY=[V1,V2,...]"),
        (["--grid", "model.dense_units=[16,32]", "--set", "train.epochz=3"], "train.epochz: unknown key"),
    ],
)
def test_a_sweep_with_nothing_to_sweep_or_a_bad_grid_stops_before_any_work(args, message, tmp_path, monkeypatch):
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["sweep"] = {"grid": {}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv("DIGITS_HOME", str(tmp_path))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(digits, ["sweep", *args])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no data, no store, no cluster started


def test_serve_on_port_0_lets_the_server_bind_a_free_port(tmp_path, monkeypatch):
    """`digits serve --port 0` hands 0 to BentoML, which binds a free port (tests read it back), not the default 3000."""
    import cli.processes

    started: list[list[str]] = []

    def run(command, env=None, grace=None):  # what `digits serve` would start and watch
        started.append(list(command))
        return 0

    monkeypatch.setattr(cli.processes, "run_server", run)
    monkeypatch.setenv("DIGITS_HOME", str(tmp_path))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(digits, ["serve", "--port", "0"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    (command,) = started
    assert command[command.index("--port") + 1] == "0", command
    assert "on a free port" in result.output
