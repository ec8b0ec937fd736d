"""`digits reproduce` and `digits trace`: a version retrained from its record is the same model, an answer leads back to
its origins, and a tampered record is refused."""

from __future__ import annotations

import json
import subprocess

import pytest
from typer.testing import CliRunner

from pipeline import prediction_log, registry
from pipeline.settings import get_settings

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_engine")]


def test_a_version_retrained_from_its_record_is_identical_traced_and_a_tampered_record_is_refused(project, mnist_slice):
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

    # `digits trace`: from an answer back to the run, its data, its validation, its commit and its promotion
    from tests.integration.loop_fixtures import champion_answers

    (request_id,) = champion_answers(mnist_slice.x_test[:1])
    engine = prediction_log.open_log(get_settings().prediction_log_url)
    prediction_log.record_feedback(engine, request_id, int(mnist_slice.y_test[0]))
    traced = CliRunner().invoke(digits, ["trace", request_id])
    assert traced.exit_code == 0, traced.output
    lines = traced.stdout.splitlines()
    assert lines[0].startswith(f"answer {request_id}: ") and f"corrected to {mnist_slice.y_test[0]} (accepted)" in lines[0]
    assert "<- model digits-cnn v1  http://127.0.0.1:5000/#/models/digits-cnn/versions/1" in traced.stdout
    assert f"/runs/{ref.run_id}" in traced.stdout and "started by manual" in traced.stdout
    assert recorded["data_version"] in traced.stdout and f"git commit {recorded['git_commit']}" in traced.stdout
    assert "<- validation passed: http://127.0.0.1:5000/#/experiments/" in traced.stdout
    assert "reproduced identical (" in traced.stdout and "why (the last promotion):" in traced.stdout
    chain = json.loads(CliRunner().invoke(digits, ["trace", "1", "--json"]).stdout)
    assert chain["answer"] is None and chain["model_version"]["version"] == "1" and chain["run"]["run_id"] == ref.run_id
    assert chain["promotions"][0]["run_id"] == ref.run_id
    unknown = CliRunner().invoke(digits, ["trace", "0" * 32])
    assert unknown.exit_code == 1 and f"no answer has request id {'0' * 32}" in unknown.output

    # a record naming data that was never stored: nothing is retrained, and the message says why
    client.set_tag(ref.run_id, "data_version", "0123456789abcdef0123456789abcdef.dir")
    refused = CliRunner().invoke(digits, ["reproduce", "1"])
    assert refused.exit_code == 1
    assert "0123456789abcdef0123456789abcdef.dir, recorded on the run, is in neither" in refused.output
    assert "Nothing was compared." in refused.output
