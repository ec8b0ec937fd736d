"""From corrections to a data version and a gated retrain: the real prediction log (SQLite), the real
harvest flow (Prefect, DVC, Great Expectations) and the real retraining flow, on a slice of MNIST.

The answers are the champion's own, given by the served form of the registered version; the
corrected images are MNIST training images the slice never trained on, never test images.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from app.feedback import part_of
from cli.main import digits
from pipeline import prediction_log, registry
from pipeline.data import load_dataset
from pipeline.settings import get_settings
from tests.conftest import TRAIN_IMAGES
from tests.integration.loop_fixtures import champion_answers

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_engine")]


def _correct(request_ids: list[str], labels: np.ndarray, client: str) -> list[str]:
    engine = prediction_log.open_log(get_settings().prediction_log_url)
    policy = get_settings().feedback_policy
    return [
        prediction_log.record_feedback(engine, request_id, int(label), client, policy)["status"]
        for request_id, label in zip(request_ids, labels, strict=True)
    ]


def _harvest() -> dict:
    result = CliRunner().invoke(digits, ["data", "harvest", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{\n") :])


def test_corrections_become_a_data_version_and_a_flood_of_wrong_ones_cannot_move_the_champion(project, mnist):
    from flows.retrain import retrain

    first = retrain()
    assert first["promoted"] and first["champion_version"] == "1", first["reasons"]

    # 200 honest corrections of digits the champion never saw; those that contradict a confident answer wait
    honest = slice(TRAIN_IMAGES, TRAIN_IMAGES + 200)
    statuses = _correct(champion_answers(mnist.x_train[honest]), mnist.y_train[honest], "careful-user")
    # a person checks the held ones against their digits and accepts them
    result = CliRunner().invoke(digits, ["feedback", "review", "--approve-all"])
    assert result.exit_code == 0 and f"accepted {statuses.count('quarantined')}" in result.stdout, result.output

    report = _harvest()
    dataset = load_dataset(project / "data")
    assert report["data_version"] != first["data_version"]
    assert (
        report["feedback_train"] + report["feedback_test"] == 200 == len(dataset.x_feedback_train) + len(dataset.x_feedback_test)
    )
    # each image sits in the part its content hash names, so none is in both
    for part, images in (("train", dataset.x_feedback_train), ("test", dataset.x_feedback_test)):
        assert {part_of(image.tobytes(), 0.2) for image in images} == {part}
    assert 10 <= len(dataset.x_feedback_test) <= 70  # about a fifth of 200
    assert _harvest()["message"].startswith("nothing new to harvest")

    # a flood: 500 flipped labels from one sender; confident answers and everything past the daily cap wait
    flood = slice(TRAIN_IMAGES + 200, TRAIN_IMAGES + 700)
    flipped = (mnist.y_train[flood] + 1) % 10
    statuses = _correct(champion_answers(mnist.x_train[flood]), flipped, "flooder")
    assert statuses.count("accepted") <= get_settings().feedback_client_daily_cap
    held = statuses.count("quarantined")
    assert held >= 400
    summary = CliRunner().invoke(digits, ["feedback", "--json"])
    assert json.loads(summary.stdout)["quarantined"] == held

    # the last line holds even if a reviewer lets them all through: the gate refuses what they train
    assert f"accepted {held}" in CliRunner().invoke(digits, ["feedback", "review", "--approve-all"]).stdout
    poisoned = _harvest()
    assert poisoned["feedback_train"] + poisoned["feedback_test"] == 700
    second = retrain()
    assert not second["promoted"] and second["champion_version"] == "1", second

    # the gate scored feedback-test beside MNIST for the candidate and for the champion, re-scored
    client = registry.connect(get_settings())
    run = client.get_run(second["run_id"])
    assert run.data.params["feedback.train_weight"] == "10"
    assert 0 <= run.data.metrics["suite_feedback_accuracy"] <= 1
    table = client.load_table(run.info.experiment_id, "evaluation/suite_table.json", [second["run_id"]])
    row = table[table["family"] == "feedback"].iloc[0]
    assert 0 <= row["accuracy"] <= 1 and 0 <= row["champion_accuracy"] <= 1
    assert registry.get_alias(client, get_settings().model_name).version == "1"
