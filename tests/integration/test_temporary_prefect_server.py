"""`digits retrain`'s temporary Prefect API: a real `prefect server start`, a real flow run on it, then stopped."""

from __future__ import annotations

import socket

import pytest

from flows.temporary_server import TemporaryPrefectServer, TemporaryServerError

pytestmark = pytest.mark.integration


@pytest.fixture
def no_prefect_api(monkeypatch):
    """No Prefect server configured, whatever other tests of the session set up."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        yield


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_a_flow_runs_on_the_temporary_server_which_stops_at_the_end(no_prefect_api):
    from prefect import flow, runtime
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    @flow(name="temporary-server-check")
    def own_run_id() -> str:
        return runtime.flow_run.id

    server = TemporaryPrefectServer.start_unless_configured()
    assert server is not None
    try:
        with server.api() as api_url:
            assert api_url == server.api_url == PREFECT_API_URL.value()
            run_id = own_run_id()
            with get_client(sync_client=True) as client:
                assert client.read_flow_run(run_id).state.is_completed()
        assert not PREFECT_API_URL.value()  # the setting is this command's only
        assert _listening(server.port)
    finally:
        server.stop()
    assert server.process.returncode is not None and not _listening(server.port)


def test_a_configured_server_is_used_and_none_is_started(no_prefect_api):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert TemporaryPrefectServer.start_unless_configured() is None


def test_a_server_that_cannot_start_is_reported_with_its_own_words(no_prefect_api, monkeypatch, tmp_path):
    not_a_folder = tmp_path / "prefect-home"
    not_a_folder.write_text("")
    monkeypatch.setenv("PREFECT_HOME", str(not_a_folder))  # the server cannot create its database there
    server = TemporaryPrefectServer.start_unless_configured()
    assert server is not None
    with pytest.raises(TemporaryServerError) as failure, server.api():
        pytest.fail("the server cannot have answered")
    message = str(failure.value)
    assert "Prefect's temporary server exited with code" in message
    assert "unable to open database file" in message and "set PREFECT_API_URL" in message
    assert server.process.returncode is not None


def test_a_server_too_slow_to_answer_is_stopped_and_reported(no_prefect_api):
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    server = TemporaryPrefectServer.start_unless_configured()
    assert server is not None
    with temporary_settings(updates={PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 1}):  # it needs seconds more
        with pytest.raises(TemporaryServerError, match="did not answer .* within 1 s") as failure, server.api():
            pytest.fail("the server cannot have answered")
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in str(failure.value)
    assert server.process.returncode is not None and not _listening(server.port)
