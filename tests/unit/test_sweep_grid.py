"""The sweep grid: strict parsing, its expansion into candidates, the choice of the best, the cluster's size."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from app.training import TrainedModel, best
from pipeline.params import ParamsError, grid_points, load_params, parse_params
from pipeline.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def raw(grid: dict | None = None, **train) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"].update(train)
    if grid is not None:
        params["sweep"] = {"grid": grid}
    return params


def test_the_committed_grid_parses_and_a_missing_section_is_an_empty_grid():
    assert load_params(REPO / "params.yaml").sweep.grid is not None
    without = raw()
    without.pop("sweep", None)
    params = parse_params(without)
    assert params.sweep.grid == {}
    [only] = grid_points(params)  # an empty grid is one candidate: the params as they are
    assert only.values == {} and only.params.model == params.model and only.label == "params.yaml as it is"


def test_every_combination_in_grid_order_each_a_whole_params_without_a_grid():
    params = parse_params(raw({"model.dense_units": [64, 128], "train.learning_rate": [0.001, 0.002, 0.004]}))
    candidates = grid_points(params)
    assert [c.name for c in candidates] == ["c1", "c2", "c3", "c4", "c5", "c6"]
    assert [(c.params.model.dense_units, c.params.train.learning_rate) for c in candidates] == [
        (64, 0.001),
        (64, 0.002),
        (64, 0.004),
        (128, 0.001),
        (128, 0.002),
        (128, 0.004),
    ]
    assert candidates[1].values == {"model.dense_units": 64, "train.learning_rate": 0.002}
    assert candidates[1].label == "model.dense_units=64, train.learning_rate=0.002"
    for c in candidates:
        assert c.params.sweep.grid == {}  # a candidate is one configuration
        # everything outside the grid is what every candidate starts from
        assert c.params.train.epochs == params.train.epochs and c.params.gate == params.gate
        assert c.params.model.conv_filters == params.model.conv_filters


def test_list_valued_keys_take_a_list_of_lists():
    candidates = grid_points(parse_params(raw({"model.conv_filters": [[16], [32, 64]]})))
    assert [c.params.model.conv_filters for c in candidates] == [[16], [32, 64]]


def test_overrides_set_the_base_and_the_grid_wins_on_its_own_keys():
    params = parse_params(raw(), {"train.epochs": 1, "model.dense_units": 8, "sweep.grid": {"model.dense_units": [16, 32]}})
    candidates = grid_points(params)
    assert [(c.params.train.epochs, c.params.model.dense_units) for c in candidates] == [(1, 16), (1, 32)]


def test_expansion_does_not_touch_its_input():
    params = parse_params(raw({"model.dense_units": [16, 32]}))
    before = params.model_dump()
    grid_points(params)
    assert params.model_dump() == before


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"model.dense_unitz": [1]}, r"sweep\.grid\.model\.dense_unitz: unknown key"),
        ({"train.epochz": [1, 2]}, r"sweep\.grid\.train\.epochz: unknown key"),
        ({"gate.min_accuracy": [0.9]}, r"sweep\.grid\.gate\.min_accuracy: a grid key names one model\.\* or train\.\* value"),
        ({"model": [1]}, r"sweep\.grid\.model: a grid key names one"),
        ({"model.dense_units.x": [1]}, r"sweep\.grid\.model\.dense_units\.x: a grid key names one"),
        ({"train.seed": [1, 2]}, r"sweep\.grid\.train\.seed: cannot vary in a sweep: it picks the validation hold-out"),
        ({"train.validation_split": [0.1, 0.2]}, r"sweep\.grid\.train\.validation_split: cannot vary"),
        ({"model.dense_units": []}, r"sweep\.grid\.model\.dense_units: give at least one value"),
        ({"model.dense_units": [8, 8]}, r"sweep\.grid\.model\.dense_units: 8 is listed twice"),
        (
            {"model.dense_units": [8, -5]},
            r"sweep\.grid\.model\.dense_units: -5 is not a valid value: .*greater than or equal to 0",
        ),
        ({"train.learning_rate": ["fast"]}, r"sweep\.grid\.train\.learning_rate: 'fast' is not a valid value"),
        ({"model.dense_units": 64}, r"sweep\.grid\.model\.dense_units: Input should be a valid list"),
    ],
)
def test_a_bad_grid_is_refused_by_name_when_params_are_read(grid, message):
    with pytest.raises(ParamsError, match=message):
        parse_params(raw(grid))


def test_an_unknown_key_in_the_sweep_section_is_named():
    bad = raw()
    bad["sweep"] = {"grids": {}}
    with pytest.raises(ParamsError, match=r"sweep\.grids: unknown key"):
        parse_params(bad)


def test_a_grid_needs_a_validation_hold_out_to_choose_on():
    with pytest.raises(ParamsError, match=r"train\.validation_split: is 0, but a sweep chooses"):
        parse_params(raw({"model.dense_units": [16, 32]}, validation_split=0))
    parse_params(raw({}, validation_split=0))  # no grid, no sweep: retrain may train on everything


def _trained(name: str, accuracy: float, loss: float) -> TrainedModel:
    return TrainedModel(run_id=name, model_uri=f"runs:/{name}/model", val_accuracy=accuracy, val_loss=loss)


def test_the_best_model_is_the_best_validation_accuracy_then_loss_then_grid_order():
    assert best([_trained("a", 0.90, 0.3), _trained("b", 0.95, 0.5), _trained("c", 0.93, 0.1)]).run_id == "b"
    assert best([_trained("a", 0.95, 0.3), _trained("b", 0.95, 0.2)]).run_id == "b"
    assert best([_trained("a", 0.95, 0.2), _trained("b", 0.95, 0.2)]).run_id == "a"
    with pytest.raises(ValueError, match="every sweep candidate failed"):
        best([])


def test_a_local_cluster_shares_the_cores_and_an_address_leaves_sizing_to_its_workers():
    from app import sweep
    from flows.sweep import task_runner

    base = Settings(home=REPO)
    assert sweep.plan_cluster(base, points=2, cores=4) == sweep.Cluster(None, 2, 2)  # no idle workers
    assert sweep.plan_cluster(base, points=9, cores=4) == sweep.Cluster(None, 4, 1)  # one worker per core
    assert sweep.plan_cluster(base, points=1, cores=1) == sweep.Cluster(None, 1, 1)
    assert sweep.plan_cluster(base.model_copy(update={"dask_workers": 3}), 9, cores=4) == sweep.Cluster(None, 3, 1)
    assert sweep.plan_cluster(base.model_copy(update={"sweep_tf_threads": 2}), 9, cores=4) == sweep.Cluster(None, 4, 2)
    assert sweep.plan_cluster(base, points=2).workers >= 1  # this machine's own cores

    remote = sweep.plan_cluster(base.model_copy(update={"dask_address": "tcp://10.0.0.5:8786"}), points=9)
    assert remote == sweep.Cluster("tcp://10.0.0.5:8786", None, None)
    assert sweep.plan_cluster(base, points=9, address="tcp://h:1").address == "tcp://h:1"  # the CLI option wins
    assert task_runner(remote).address == "tcp://10.0.0.5:8786"
    local = task_runner(sweep.Cluster(None, 2, 1))
    assert local.address is None and local.cluster_kwargs["n_workers"] == 2
    assert local.cluster_kwargs["threads_per_worker"] == 1 and local.cluster_kwargs["env"]["TF_NUM_INTRAOP_THREADS"] == "1"


def test_settings_read_the_dask_address_from_the_environment(monkeypatch):
    monkeypatch.setenv("DIGITS_DASK_ADDRESS", "tcp://scheduler:8786")
    monkeypatch.setenv("DIGITS_DASK_WORKERS", "6")
    settings = Settings()
    assert settings.dask_address == "tcp://scheduler:8786" and settings.dask_workers == 6
