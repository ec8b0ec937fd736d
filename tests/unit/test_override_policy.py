"""Which params overrides a run may take: model.* and train.* always; the rest only locally, on request."""

from __future__ import annotations

import pytest

from pipeline.params import SWEEP_OVERRIDE_SECTIONS, OverrideRefused, ParamsError, check_overrides, unsafe_overrides

SAFE = {"train.epochs": 1, "model.dense_units": 64}
LOWERED = {"gate.min_accuracy": 0.5, "train.epochs": 1}
DATA = {"data.sources.local.sha256": "0" * 64}


def test_model_and_train_overrides_are_taken_everywhere():
    for deployment in (True, False):
        check_overrides(SAFE, deployment=deployment)
        check_overrides({}, deployment=deployment)
        check_overrides(None, deployment=deployment)


def test_unsafe_keys_are_the_ones_outside_model_and_train_sorted():
    assert unsafe_overrides({**LOWERED, **DATA, "validation.max_null_share": 1}) == [
        "data.sources.local.sha256",
        "gate.min_accuracy",
        "validation.max_null_share",
    ]
    assert unsafe_overrides(SAFE) == []
    # a section name must match whole: "training" is not "train"
    assert unsafe_overrides({"trainer.x": 1, "model": 2}) == ["trainer.x"]


@pytest.mark.parametrize("overrides", [LOWERED, DATA, {"suite.families": []}])
def test_a_deployment_run_refuses_them_even_when_asked_to_allow(overrides):
    for allow in (False, True):
        with pytest.raises(
            OverrideRefused, match="runs started through the deployment take model.\\* and train.\\* overrides only"
        ):
            check_overrides(overrides, deployment=True, allow_unsafe=allow)


def test_a_local_run_needs_the_flag_and_the_message_says_which_keys_and_what_to_do():
    with pytest.raises(OverrideRefused) as refused:
        check_overrides({**LOWERED, **DATA}, deployment=False)
    message = str(refused.value)
    assert "data.sources.local.sha256, gate.min_accuracy" in message and "--allow-unsafe-overrides" in message
    assert "train.epochs" not in message
    assert isinstance(refused.value, ParamsError)  # the CLI reports it as bad params (exit 2)
    check_overrides({**LOWERED, **DATA}, deployment=False, allow_unsafe=True)


def test_a_sweep_may_also_set_its_grid():
    check_overrides({"sweep.grid": {"model.dense_units": [64, 128]}}, deployment=False, safe=SWEEP_OVERRIDE_SECTIONS)
    with pytest.raises(OverrideRefused):
        check_overrides({"sweep.grid": {}}, deployment=False)
    with pytest.raises(OverrideRefused):
        check_overrides({"gate.min_accuracy": 0}, deployment=False, safe=SWEEP_OVERRIDE_SECTIONS)


@pytest.mark.parametrize(
    "args",
    [
        ["retrain", "--set", "gate.min_accuracy=0.5"],
        ["retrain", "--deployment", "--set", "gate.min_accuracy=0.5", "--allow-unsafe-overrides"],
        ["deploy", "--set", "data.source=keras"],
        ["sweep", "--set", "validation.min_train_rows=1"],
    ],
)
def test_the_cli_refuses_before_any_work_with_exit_2(args, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cli.main import digits
    from pipeline.settings import get_settings

    monkeypatch.setenv("DIGITS_HOME", str(tmp_path))  # an empty folder: any work would fail differently
    get_settings.cache_clear()
    result = CliRunner().invoke(digits, args)
    get_settings.cache_clear()
    assert result.exit_code == 2, result.output
    assert "refused" in result.output and "Nothing was trained or promoted." in result.output
    assert not any(tmp_path.iterdir())
