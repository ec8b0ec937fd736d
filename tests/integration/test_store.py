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
home, start_at = Path(sys.argv[1]), float(sys.argv[2])
settings = Settings(home=home)
time.sleep(max(0.0, start_at - time.time()))
client = registry.store_client(settings)
client.search_experiments(max_results=1)
client.search_registered_models(max_results=1)
"""


def test_processes_opening_a_new_store_at_once_all_succeed(tmp_path):
    (tmp_path / "mlflow").mkdir()
    start_at = time.time() + 8  # every process has imported MLflow by then, and they open the store together
    openers = [
        subprocess.Popen([sys.executable, "-c", OPEN_AT, str(tmp_path), str(start_at)], stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    failures = [err[-2000:] for process in openers if (err := process.communicate(timeout=300)[1]) and process.returncode]
    assert failures == []
