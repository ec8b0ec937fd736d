"""A minute of the soak benchmark: steady load on a real `bentoml serve`, hot swaps, hostile uploads, the prediction log on."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

# training, two registrations, a server and a minute of load: longer than the suite's timeout on a busy machine
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]


def test_a_minute_of_load_with_swaps_and_hostile_uploads_fails_no_good_request(tmp_path):
    output = tmp_path / "soak.json"
    # a low rate keeps the CPU cost small; a promotion every 15 s and a service polling every second: swaps within the minute
    command = [sys.executable, str(REPO / "benchmarks" / "soak.py"), "--minutes", "1", "--rate", "20"]
    command += ["--promote-every", "15", "--poll-seconds", "1", "--train-images", "3000", "--output", str(output)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1700)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    figures = json.loads(output.read_text())

    assert figures["good_requests"] >= 1000  # 20 requests/s for 60 s, less the hostile ones
    assert figures["failed_good_requests"] == 0, figures["failed_good_samples"]
    assert figures["promotions_made"] >= 2, figures["promotions"]
    assert figures["swaps_seen"] >= 1, figures["versions_answering"]
    assert sum(sum(statuses.values()) for statuses in figures["hostile"].values()) > 0  # hostile uploads were mixed in
    resources = figures["resources"]
    # what leaks shows after the first swap (which allocates once what later swaps reuse); from the start, a looser bound
    assert resources["rss_growth_after_first_swap"] <= 0.10, resources
    assert resources["rss_growth"] <= 0.25, resources
    assert resources["open_files_growth"] <= 0.10, resources
    log = figures["prediction_log"]
    assert log and log["written"] >= figures["good_requests"] and not log["failed"], log
