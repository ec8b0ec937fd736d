"""Two promotions at once: exactly one wins, on one machine (file lock) and across machines (PostgreSQL lock).

Both racers wait at a barrier, then each holds for seconds between reading the champion and moving
it (the ``champion-read`` pause point): without a lock both would read "no champion" and both move it.
The versions are registered without training: moving an alias never loads a model.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import registry
from pipeline.settings import Settings, get_settings
from tests.integration.tracking_server import Postgres, postgres_bin

pytestmark = pytest.mark.integration

# long enough that the second racer reads the champion while the first still holds it, without a lock
WINDOW_SECONDS = "3"


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    try:
        for program in ("initdb", "postgres"):
            postgres_bin(program)
    except RuntimeError as err:
        pytest.fail(str(err))
    server = Postgres().start()
    try:
        yield server
    finally:
        server.stop()


def _settings(monkeypatch, home: Path, tracking_uri: str | None) -> Settings:
    monkeypatch.setenv("DIGITS_HOME", str(home))
    if tracking_uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    get_settings.cache_clear()
    return get_settings()


def _two_versions(settings: Settings, source: Path) -> list[str]:
    client = registry.connect(settings)
    client.create_registered_model(settings.model_name)
    source.mkdir(parents=True, exist_ok=True)
    return [str(client.create_model_version(settings.model_name, source=str(source)).version) for _ in range(2)]


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


def _race(settings: Settings, homes: list[Path], versions: list[str]) -> None:
    """Each version promoted by its own process, from its own project folder (its own machine when they differ)."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(len(versions)), context.Queue()
    pause = {"DIGITS_TEST_PAUSE_AT": "champion-read", "DIGITS_TEST_PAUSE_SECONDS": WINDOW_SECONDS}
    tracking = {"MLFLOW_TRACKING_URI": settings.tracking_uri} if settings.tracking_uri else {}
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
    versions = _two_versions(settings, tmp_path / "model")
    _race(settings, [settings.home, settings.home], versions)


def test_two_machines_sharing_a_postgresql_store_leave_exactly_one_winner(tmp_path, monkeypatch, postgres):
    """Two project folders (two machines: no file lock in common) on one PostgreSQL-backed store."""
    url = postgres.create_database("race")
    settings = _settings(monkeypatch, tmp_path / "machine-a", url)
    versions = _two_versions(settings, tmp_path / "model")
    _race(settings, [tmp_path / "machine-a", tmp_path / "machine-b"], versions)
