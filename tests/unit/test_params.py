"""params.yaml parsing: unknown keys and wrong types are rejected before any work, by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.params import ParamsError, load_params, parse_params

REPO = Path(__file__).resolve().parents[2]


def raw() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_the_committed_params_parse():
    params = load_params(REPO / "params.yaml")
    assert params.data.source == "pypi-wheel" and params.train.epochs >= 1
    assert params.flat()["train.seed"] == params.train.seed


def test_unknown_key_is_named():
    bad = raw()
    bad["train"]["epochz"] = 3
    with pytest.raises(ParamsError, match=r"train\.epochz: unknown key"):
        parse_params(bad)


def test_wrong_type_is_named_with_the_value():
    bad = raw()
    bad["train"]["batch_size"] = "big"
    with pytest.raises(ParamsError, match=r"train\.batch_size: .*'big'"):
        parse_params(bad)


def test_out_of_range_threshold_is_rejected():
    bad = raw()
    bad["gate"]["min_accuracy"] = 1.5
    with pytest.raises(ParamsError, match=r"gate\.min_accuracy"):
        parse_params(bad)


def test_more_conv_blocks_than_the_image_can_halve_are_refused():
    # a fifth max-pool would shrink the last pixel to nothing and crash Keras mid-build
    with pytest.raises(ParamsError, match=r"model\.conv_filters: .*at most 4"):
        parse_params(raw(), {"model.conv_filters": [8, 8, 8, 8, 8]})
    assert parse_params(raw(), {"model.conv_filters": [8, 8, 8, 8]}).model.conv_filters == [8, 8, 8, 8]


def test_local_source_needs_a_path():
    bad = raw()
    bad["data"]["source"] = "local"
    with pytest.raises(ParamsError, match="local_path"):
        parse_params(bad)


def test_overrides_apply_dotted_keys_without_touching_the_input():
    original = raw()
    params = parse_params(original, {"train.epochs": 1, "gate.min_accuracy": 0.5})
    assert params.train.epochs == 1 and params.gate.min_accuracy == 0.5
    assert original == raw()


def test_override_of_an_unknown_key_is_rejected():
    with pytest.raises(ParamsError, match=r"train\.nope: unknown key"):
        parse_params(raw(), {"train.nope": 1})


def test_unreadable_file_says_what_to_do(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("data: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")
