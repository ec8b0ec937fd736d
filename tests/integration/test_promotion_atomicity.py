"""Promotions that race or die: exactly one racer wins, and a promotion killed part-way is finished at the next start.

Racers wait at a barrier, then each holds for seconds between reading the champion and moving it
(the ``champion-read`` pause point): without a lock both would read "no champion" and both move it.
This holds on one machine (file lock) and across machines sharing a PostgreSQL store (advisory lock).
The versions are registered without training: moving an alias never loads a model.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from pipeline import registry
from pipeline.settings import Settings, get_settings
from tests.integration.tracking_server import ADMIN

pytestmark = pytest.mark.integration

# long enough that the second racer reads the champion while the first still holds it, without a lock
WINDOW_SECONDS = "3"


def _settings(monkeypatch, home: Path, tracking_uri: str | None, lock_url: str | None = None) -> Settings:
    monkeypatch.setenv("DIGITS_HOME", str(home))
    for name, value in (("MLFLOW_TRACKING_URI", tracking_uri), ("DIGITS_PROMOTION_LOCK_URL", lock_url)):
        if value:
            monkeypatch.setenv(name, value)
        else:
            monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    return get_settings()


def _versions(settings: Settings, source: str, count: int = 2) -> list[str]:
    client = registry.connect(settings)
    client.create_registered_model(settings.model_name)
    return [str(client.create_model_version(settings.model_name, source=source).version) for _ in range(count)]


def _model_folder(tmp_path: Path) -> str:
    (tmp_path / "model").mkdir()
    return str(tmp_path / "model")


def _racer(env: dict[str, str], version: str, barrier, results) -> None:
    os.environ.update(env)
    from pipeline import registry as reg
    from pipeline.settings import get_settings as settings_of

    settings = settings_of()
    client = reg.connect(settings)  # the slow imports and connection happen before the barrier
    barrier.wait(timeout=300)
    try:
        reg.move_champion(client, settings, version, None, f"race for v{version}")
        results.put((version, "won"))
    except reg.PromotionError as err:
        results.put((version, str(err)))
    except Exception as err:  # reported, not lost: the test says what went wrong
        results.put((version, f"failed: {type(err).__name__}: {err}"))


def _race(settings: Settings, homes: list[Path], versions: list[str]) -> None:
    """Each version promoted by its own process, from its own project folder (its own machine when they differ)."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(len(versions)), context.Queue()
    pause = {"DIGITS_TEST_PAUSE_AT": "champion-read", "DIGITS_TEST_PAUSE_SECONDS": WINDOW_SECONDS}
    tracking = {"MLFLOW_TRACKING_URI": settings.tracking_uri} if settings.tracking_uri else {}
    tracking |= {"DIGITS_PROMOTION_LOCK_URL": settings.promotion_lock_url} if settings.promotion_lock_url else {}
    credentials = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    tracking |= {name: os.environ[name] for name in credentials if name in os.environ}
    racers = [
        context.Process(target=_racer, args=({"DIGITS_HOME": str(home), **tracking, **pause}, version, barrier, results))
        for home, version in zip(homes, versions, strict=True)
    ]
    for racer in racers:
        racer.start()
    try:
        outcomes = dict(results.get(timeout=300) for _ in racers)
    finally:
        for racer in racers:
            racer.join(timeout=60)
            if racer.is_alive():
                racer.kill()
    winners = [v for v, outcome in outcomes.items() if outcome == "won"]
    assert len(winners) == 1, f"both racers moved the champion: {outcomes}"
    [loser] = [outcome for outcome in outcomes.values() if outcome != "won"]
    assert "the champion moved during this run" in loser
    client = registry.connect(settings)
    assert registry.alias_version(client, settings.model_name) == winners[0]
    assert registry.alias_version(client, settings.model_name, registry.PREVIOUS) is None
    assert [entry["version"] for entry in registry.promotion_history(client, settings.model_name)] == winners


def test_two_promotions_on_one_machine_leave_exactly_one_winner(tmp_path, monkeypatch):
    settings = _settings(monkeypatch, tmp_path / "project", None)
    versions = _versions(settings, _model_folder(tmp_path))
    _race(settings, [settings.home, settings.home], versions)


def test_two_machines_sharing_a_postgresql_store_leave_exactly_one_winner(tmp_path, monkeypatch, infra):
    """Two project folders (two machines: no file lock in common) on one PostgreSQL store, named by the tracking URI."""
    url = infra.postgres.create_database("race")
    settings = _settings(monkeypatch, tmp_path / "machine-a", url)
    versions = _versions(settings, _model_folder(tmp_path))
    _race(settings, [tmp_path / "machine-a", tmp_path / "machine-b"], versions)


def test_two_machines_on_a_tracking_server_lock_in_its_database(tmp_path, monkeypatch, infra):
    """The scale-out set-up: MLflow over HTTP, and the lock in the server's database through a role that can only lock."""
    import psycopg2

    connection = psycopg2.connect(infra.postgres.url("postgres", driver="postgresql"))
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("CREATE ROLE digits_lock LOGIN")  # no rights on MLflow's tables
    finally:
        connection.close()
    lock_url = f"postgresql+psycopg2://digits_lock@127.0.0.1:{infra.postgres.port}/{infra.database}"
    for name, value in infra.server.credentials(ADMIN).items():  # the server runs basic auth: promotions are the admin's
        monkeypatch.setenv(name, value)
    settings = _settings(monkeypatch, tmp_path / "machine-a", infra.server.url, lock_url)
    versions = _versions(settings, "s3://stand-in/model")  # the server accepts no local path; nothing is read
    _race(settings, [tmp_path / "machine-a", tmp_path / "machine-b"], versions)


def _promote_and_stop(env: dict[str, str], version: str, expected: str) -> None:
    os.environ.update(env)
    from pipeline import registry as reg
    from pipeline.settings import get_settings as settings_of

    settings = settings_of()
    reg.move_champion(reg.connect(settings), settings, version, expected, f"promote v{version}")


def test_a_promotion_killed_between_its_alias_writes_is_finished_at_the_next_start(tmp_path, monkeypatch):
    settings = _settings(monkeypatch, tmp_path / "project", None)
    first, second = _versions(settings, _model_folder(tmp_path))
    client = registry.connect(settings)
    registry.move_champion(client, settings, first, None, "the first champion")
    marker = tmp_path / "paused"
    env = {"DIGITS_HOME": str(settings.home), "DIGITS_TEST_PAUSE_AT": "alias-writes", "DIGITS_TEST_PAUSE_FILE": str(marker)}
    promoter = multiprocessing.get_context("spawn").Process(target=_promote_and_stop, args=(env, second, first))
    promoter.start()
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert promoter.is_alive() and time.monotonic() < deadline, "the promotion never reached its alias writes"
        time.sleep(0.2)
    os.kill(promoter.pid, signal.SIGKILL)
    promoter.join(timeout=30)
    assert promoter.exitcode == -signal.SIGKILL
    # killed half-way: champion moved, the rest not yet written
    assert registry.alias_version(client, settings.model_name) == second
    assert registry.alias_version(client, settings.model_name, registry.PREVIOUS) is None

    # the next start finishes it: the alias for rollback, the version's tags and the history, as if never killed
    done = registry.repair_promotion(client, settings)
    assert registry.alias_version(client, settings.model_name) == second
    assert registry.alias_version(client, settings.model_name, registry.PREVIOUS) == first
    assert done and f"finished the interrupted promotion of v{second} (was v{first})" in done
    history = registry.promotion_history(client, settings.model_name)
    assert [(entry["version"], entry["from"]) for entry in history] == [(first, None), (second, first)]
    promoted = registry.get_version(client, settings.model_name, second)
    assert promoted.promoted_at == history[-1]["at"] and promoted.promotion_reason == f"promote v{second}"
    assert registry.INTENT_TAG not in client.get_registered_model(settings.model_name).tags
    assert registry.repair_promotion(client, settings) is None  # nothing left to do


def test_an_intent_whose_champion_never_moved_is_dropped(tmp_path, monkeypatch):
    """Killed after recording its intent but before the champion alias: nothing changed, nothing is finished."""
    settings = _settings(monkeypatch, tmp_path / "project", None)
    first, second = _versions(settings, _model_folder(tmp_path))
    client = registry.connect(settings)
    registry.move_champion(client, settings, first, None, "the first champion")
    intent = {"version": second, "from": first, "at": "2000-01-01T00:00:00+00:00", "by": "x", "run_id": None, "reason": "r"}
    client.set_registered_model_tag(settings.model_name, registry.INTENT_TAG, json.dumps(intent))
    registry.move_champion(client, settings, second, first, "the second champion")  # a promotion repairs first
    history = registry.promotion_history(client, settings.model_name)
    assert [(entry["version"], entry["from"]) for entry in history] == [(first, None), (second, first)]
    assert history[-1]["at"] != intent["at"]
    assert registry.INTENT_TAG not in client.get_registered_model(settings.model_name).tags
