"""DVC versions, the registry's locked promotion, and the CLI's overrides, on real stores."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from app import data, training
from cli.main import digits
from pipeline import registry, tracking, versioning
from pipeline.data import load_dataset
from pipeline.params import load_params
from pipeline.settings import get_settings

pytestmark = pytest.mark.integration


def _settings_and_params():
    settings = get_settings()
    return settings, load_params(settings.params_path)


def test_data_version_round_trips_through_the_remote_and_grows_with_added_images(project, mnist_slice):
    settings, params = _settings_and_params()
    first = data.prepare(settings, params)
    assert first.pushed and first.files == 4
    assert versioning.is_checked_out(project, settings.data_dir)
    # ingesting the same source again gives the same bytes, so the same version
    shutil.rmtree(settings.data_dir)
    (project / "data.dvc").unlink()
    assert data.prepare(settings, params).md5 == first.md5

    # a fresh clone has data.dvc but no data/: the version comes back from the DVC remote
    shutil.rmtree(settings.data_dir)
    shutil.rmtree(project / ".dvc" / "cache", ignore_errors=True)
    assert versioning.pull(project, settings.data_dir)
    assert np.array_equal(np.load(settings.data_dir / "mnist" / "test_labels.npy"), mnist_slice.y_test)

    # labelled images added from a folder make a new version that the next retrain sees
    folder = project.parent / "new-digits" / "4"
    folder.mkdir(parents=True)
    for index in np.flatnonzero(mnist_slice.y_test == 4)[:3]:
        buffer = io.BytesIO()
        Image.fromarray(255 - mnist_slice.x_test[index]).resize((120, 120)).save(buffer, format="PNG")
        (folder / f"{index}.png").write_bytes(buffer.getvalue())
    result = CliRunner().invoke(digits, ["data", "add", str(folder.parent)])
    assert result.exit_code == 0, result.output
    pointer = versioning.read_pointer(project / "data.dvc")
    assert pointer["md5"] != first.md5 and pointer["md5"] in result.output
    assert len(load_dataset(settings.data_dir).y_train) == len(mnist_slice.y_train) + 3


def test_corrupt_added_data_makes_no_new_version(project):
    settings, params = _settings_and_params()
    before = data.prepare(settings, params)
    folder = project.parent / "bad" / "3"
    folder.mkdir(parents=True)
    (folder / "scan.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    result = CliRunner().invoke(digits, ["data", "add", str(folder.parent)])
    assert result.exit_code == 1
    assert "3/scan.jpg" in result.output and "nothing was added" in result.output
    assert versioning.read_pointer(project / "data.dvc")["md5"] == before.md5
    # a link out of the folder is not followed, whatever it points at
    (folder / "scan.jpg").unlink()
    (folder / "passwd.png").symlink_to("/etc/passwd")
    result = CliRunner().invoke(digits, ["data", "add", str(folder.parent)])
    assert result.exit_code == 1 and "3/passwd.png: a link to outside the folder, not followed" in result.output
    assert versioning.read_pointer(project / "data.dvc")["md5"] == before.md5


def _register_trained(settings, params, epochs: int) -> registry.ModelRef:
    """Train a quick candidate on the project's slice and register it (no alias)."""
    data_version = data.prepare(settings, params)
    tuned = params.model_copy(update={"train": params.train.model_copy(update={"epochs": epochs})})
    run_id = tracking.start_run(settings, tuned, data_version)
    candidate = training.train_and_evaluate(settings, tuned, run_id)
    tracking.finish_run(settings, run_id)
    return registry.register(
        registry.connect(settings), settings.model_name, candidate.model_uri, run_id, {"data_version": data_version.md5}
    )


def test_manual_promote_and_rollback_go_through_the_checks(project):
    params_file = project / "params.yaml"
    params_file.write_text(
        params_file.read_text()
        .replace("min_accuracy: 0.8", "min_accuracy: 0.5")
        .replace("min_class_recall: 0.5", "min_class_recall: 0.0")
    )
    settings, params = _settings_and_params()
    good = _register_trained(settings, params, epochs=3)
    weak = _register_trained(settings, params, epochs=2)
    runner = CliRunner()
    client = registry.connect(settings)
    champion = lambda alias=registry.CHAMPION: registry.get_alias(client, settings.model_name, alias).version  # noqa: E731

    promoted = runner.invoke(digits, ["promote", good.version])
    assert promoted.exit_code == 0, promoted.output
    status = json.loads(runner.invoke(digits, ["status", "--json"]).output)
    assert status["champion"]["version"] == good.version and status["champion"]["promoted_at"]

    # the weaker version loses the comparison with the champion unless the person insists
    refused = runner.invoke(digits, ["promote", weak.version])
    assert refused.exit_code == 1 and "not worse than champion" in refused.output
    assert champion() == good.version

    forced = runner.invoke(digits, ["promote", weak.version, "--allow-regression"])
    assert forced.exit_code == 0, forced.output
    assert champion() == weak.version and champion(registry.PREVIOUS) == good.version

    back = runner.invoke(digits, ["rollback"])
    assert back.exit_code == 0, back.output
    assert champion() == good.version and champion(registry.PREVIOUS) == weak.version
    history = registry.promotion_history(client, settings.model_name)
    assert [h["version"] for h in history] == [good.version, weak.version, good.version]

    missing = runner.invoke(digits, ["promote", "99"])
    assert missing.exit_code == 1 and "no version 99" in missing.output
