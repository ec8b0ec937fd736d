"""The service's refusal of versions the gate did not pass: the checks that need no registry."""

from __future__ import annotations

import hashlib

import pytest

from pipeline import registry
from pipeline.served import load


def _ref(**tags) -> registry.ModelRef:
    return registry.ModelRef("digits", "2", "run", {}, None, None, None, None, None, **tags)


def test_a_version_without_the_gates_verdict_is_refused_before_anything_is_downloaded():
    # no run and no store: a refusal that reached for a file would fail differently
    with pytest.raises(registry.IntegrityError, match="not promoted through the gate"):
        load(_ref(), verify=True)
    with pytest.raises(registry.IntegrityError, match="not promoted through the gate"):
        load(_ref(verdict="reject", served_sha256={"serving/model.tflite": "0" * 64}), verify=True)
    with pytest.raises(registry.IntegrityError, match="no hashes"):
        load(_ref(verdict=registry.PROMOTE), verify=True)


def test_a_served_file_must_be_the_recorded_one_and_the_reason_names_no_path():
    content = b"the export the gate passed"
    expected = {"serving/model.tflite": hashlib.sha256(content).hexdigest()}
    registry.check_served(expected, "serving/model.tflite", content)
    with pytest.raises(registry.IntegrityError) as changed:
        registry.check_served(expected, "serving/model.tflite", content + b"!")
    assert str(changed.value) == "its TensorFlow Lite export differs from the one the gate passed"
    with pytest.raises(registry.IntegrityError, match="int8 TensorFlow Lite export was not among the files the gate passed"):
        registry.check_served(expected, "serving/model-int8.tflite", content)
    assert registry.describe_served("model/data/model.keras") == "Keras model"


def test_the_hashes_stay_out_of_what_people_are_shown():
    ref = _ref(verdict=registry.PROMOTE, served_sha256={"serving/model.tflite": "0" * 64}, overrides={"train.epochs": 1})
    shown = ref.to_dict()
    assert "served_sha256" not in shown and shown["verdict"] == "promote" and shown["overrides"] == {"train.epochs": 1}
