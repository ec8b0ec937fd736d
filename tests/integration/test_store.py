"""The embedded MLflow store under concurrent first use: a retrain and a service may open a new store at once."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration

OPEN_AT = """
import sys, time
from pathlib import Path
from pipeline import registry
from pipeline.settings import Settings
home, ready, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
settings = Settings(home=home)
ready.touch()  # MLflow imported: wait for the others, then open the store together
while not go.exists():
    time.sleep(0.01)
client = registry.store_client(settings)
client.search_experiments(max_results=1)
client.search_registered_models(max_results=1)
"""


def test_processes_opening_a_new_store_at_once_all_succeed(tmp_path):
    (tmp_path / "mlflow").mkdir()
    ready, go = [tmp_path / f"ready-{i}" for i in range(3)], tmp_path / "go"
    openers = [
        subprocess.Popen([sys.executable, "-c", OPEN_AT, str(tmp_path), str(r), str(go)], stderr=subprocess.PIPE, text=True)
        for r in ready
    ]
    deadline = time.monotonic() + 300  # every process has imported MLflow: they open the store together
    while not all(r.exists() for r in ready):
        assert all(p.poll() is None for p in openers), "an opener exited before the start"
        assert time.monotonic() < deadline, "the openers did not import MLflow within 300 s"
        time.sleep(0.05)
    go.touch()
    failures = [err[-2000:] for process in openers if (err := process.communicate(timeout=300)[1]) and process.returncode]
    assert failures == []
