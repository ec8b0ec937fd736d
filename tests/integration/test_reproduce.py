"""`digits reproduce`: a registered version retrained from its record is the same model, and a tampered record is refused."""

from __future__ import annotations

import json
import subprocess

import pytest
from typer.testing import CliRunner

from pipeline import registry
from pipeline.settings import get_settings

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_engine")]


def test_a_version_retrained_from_its_record_is_identical_and_a_tampered_record_is_refused(project):
    from cli.main import digits
    from flows.retrain import retrain

    # a project as its users keep it: everything committed (the code is the installed one, as in every test)
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    commit = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-q", "-m", "the project"]
    subprocess.run(commit, cwd=project, check=True)
    first = retrain()
    assert first["promoted"], first["reasons"]
    client = registry.connect(get_settings())
    ref = registry.get_version(client, get_settings().model_name, "1")
    recorded = client.get_run(ref.run_id).data.tags
    assert recorded["env.tensorflow"] and recorded["env.threads"]  # the machine is on the run, to compare with

    result = CliRunner().invoke(digits, ["reproduce", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["verdict"] == "identical" and report["weights_identical"] and report["answers_differing"] == 0
    assert report["answers_compared"] > 0 and report["accuracy_registered"] == report["accuracy_reproduced"]
    assert report["environment_differences"] == {} and report["data_version"] == recorded["data_version"]
    assert registry.get_version(client, get_settings().model_name, "1").reproduced.startswith("identical (")
    status = CliRunner().invoke(digits, ["status", "--all"])
    assert "reproduced identical (" in status.stdout

    # a record naming data that was never stored: nothing is retrained, and the message says why
    client.set_tag(ref.run_id, "data_version", "0123456789abcdef0123456789abcdef.dir")
    refused = CliRunner().invoke(digits, ["reproduce", "1"])
    assert refused.exit_code == 1
    assert "0123456789abcdef0123456789abcdef.dir, recorded on the run, is in neither" in refused.output
    assert "Nothing was compared." in refused.output
