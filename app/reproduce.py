"""``digits reproduce VERSION``: retrain a registered version from its record and compare the result with it.

In a temporary clone of the project at the version's git commit: its data version from the DVC cache or
remote, its recorded params (seed included), ``digits train`` into the clone's own MLflow store. Then the
two models side by side: weights, the answer on every test image, test accuracy, and the machines.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import yaml

from pipeline import registry, reproduce, versioning
from pipeline.reproduce import Comparison
from pipeline.settings import Settings

log = logging.getLogger(__name__)
REPRODUCED_TAG = "reproduced"


class ReproduceError(RuntimeError):
    """The version cannot be retrained from its record; the message says why and what to do."""


@dataclass(frozen=True)
class Reproduction:
    version: str
    run_id: str
    git_commit: str
    data_version: str
    reproduced_run_id: str
    comparison: Comparison

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "run_id": self.run_id,
            "git_commit": self.git_commit,
            "data_version": self.data_version,
            "reproduced_run_id": self.reproduced_run_id,
            **self.comparison.to_dict(),
        }


def reproduce_version(settings: Settings, version: str, say: Callable[[str], None] = log.info) -> Reproduction:
    """Retrain ``version`` from its record in a temporary clone and compare; the verdict is tagged on the version."""
    client = registry.connect(settings)
    ref = registry.get_version(client, settings.model_name, version)
    if not ref.run_id:
        raise ReproduceError(f"version {version} names no training run: there is nothing to retrain it from")
    run = client.get_run(ref.run_id)
    tags = run.data.tags
    commit, data_md5 = tags.get("git_commit"), tags.get("data_version")
    if not commit or commit == "unknown":
        raise ReproduceError(f"run {ref.run_id} recorded no git commit: it was not trained in a git checkout")
    if commit.endswith("-dirty"):
        raise ReproduceError(
            f"run {ref.run_id} was trained from uncommitted changes ({commit}): git holds no copy of that code to retrain"
        )
    if not data_md5:
        raise ReproduceError(f"run {ref.run_id} recorded no data version")
    params = json.loads(Path(client.download_artifacts(ref.run_id, "params.json")).read_text())

    with tempfile.TemporaryDirectory(prefix="digits-reproduce-") as folder:
        clone = Path(folder) / "project"
        say(f"cloning the project at {commit[:12]}")
        _clone_at(settings.home, clone, commit)
        say(f"checking out data version {data_md5} from the DVC cache or remote")
        _check_out_data(settings, clone, data_md5)
        (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        say(f"retraining with the recorded params (seed {params['train']['seed']}); this takes as long as the original")
        candidate = _train(clone, Path(folder) / "candidate.json")
        say("comparing weights, answers on the test set and machines")
        comparison = _compare(settings, ref, run, clone, candidate)
    client.set_model_version_tag(
        settings.model_name, ref.version, REPRODUCED_TAG, f"{comparison.verdict} ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)"
    )
    return Reproduction(ref.version, ref.run_id, commit, data_md5, candidate["run_id"], comparison)


def _clone_at(home: Path, clone: Path, commit: str) -> None:
    subprocess.run(["git", "clone", "--quiet", "--no-checkout", str(home), str(clone)], check=True, capture_output=True)
    checkout = subprocess.run(["git", "checkout", "--quiet", "--detach", commit], cwd=clone, capture_output=True, text=True)
    if checkout.returncode:
        raise ReproduceError(f"commit {commit} is not in this repository ({checkout.stderr.strip()}): fetch it, then retry")


def _check_out_data(settings: Settings, clone: Path, md5: str) -> None:
    """The recorded data version in the clone, from the project's own cache, else its remote (DVC checks every file)."""
    config = versioning.dvc_locations(settings.home)
    local = ["[core]", "    remote = origin", "[cache]", f"    dir = {config['cache']}"]
    if config.get("remote"):
        local += ["['remote \"origin\"']", f"    url = {config['remote']}"]
    (clone / ".dvc").mkdir(exist_ok=True)
    (clone / ".dvc" / "config.local").write_text("\n".join(local) + "\n")
    pointer = versioning.pointer_path(clone, clone / "data")
    pointer.write_text(yaml.safe_dump({"outs": [{"md5": md5, "path": "data", "hash": "md5"}]}, sort_keys=False))
    if not versioning.pull(clone, clone / "data"):
        raise ReproduceError(
            f"data version {md5}, recorded on the run, is in neither this project's DVC cache nor its remote: "
            "the record names data that was never stored here (or was altered); `dvc fetch` from the remote it was pushed to"
        )


def _train(clone: Path, out: Path) -> dict:
    """``digits train`` in the clone, with the clone's code first on the path and its own MLflow store."""
    path = os.pathsep.join(filter(None, [str(clone), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "DIGITS_HOME": str(clone), "PYTHONPATH": path}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [str(Path(sys.executable).parent / "digits"), "train", "--out", str(out)]
    finished = subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True)
    if finished.returncode:
        raise ReproduceError(f"the retrain failed (exit {finished.returncode}):\n{finished.stderr.strip()[-2000:]}")
    return json.loads(out.read_text())


def _compare(settings: Settings, ref: registry.ModelRef, run, clone: Path, candidate: dict) -> Comparison:
    from pipeline.data import load_dataset
    from pipeline.preprocess import to_model_input
    from pipeline.train import compiled_predictor

    test_images = load_dataset(clone / "data").x_test
    registered = registry.load_keras(ref.uri)
    clone_settings = Settings(home=clone, MLFLOW_TRACKING_URI=None)  # the embedded store the retrain wrote to
    try:  # for a while: the retrain's model and run are there
        reproduced_run = registry.store_client(clone_settings).get_run(candidate["run_id"])
        reproduced = registry.load_keras(candidate["model_uri"])
    finally:
        registry.store_client(settings)
    pixels = to_model_input(test_images)
    answers = [np.argmax(compiled_predictor(model)(pixels), axis=1) for model in (registered, reproduced)]
    return reproduce.compare(
        registered.get_weights(),
        reproduced.get_weights(),
        answers[0],
        answers[1],
        (run.data.metrics.get("test_accuracy", np.nan), reproduced_run.data.metrics.get("test_accuracy", np.nan)),
        (reproduce.from_tags(run.data.tags), reproduce.from_tags(reproduced_run.data.tags)),
    )
