"""Scale-out for real: `prefect server start`, `digits deploy`, a process worker, `digits retrain --deployment`.

The server, the worker and both CLI commands are separate processes, as on a team's machines. The worker
gets no DIGITS_HOME and runs from a folder of its own: the deployment alone must say where the project is.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, bound_port, wait_for_http

from pipeline import registry
from pipeline.settings import get_settings

# a Prefect server, a worker and two flow runs, one waiting for the other's slot: longer than the suite's timeout
pytestmark = [pytest.mark.integration, pytest.mark.timeout(3600)]

BIN = Path(sys.executable).parent
POOL = "digits-test"
PROMOTE_TASK = "register and promote (MLflow registry)"


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any digits or Prefect configuration, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIGITS_", "PREFECT_", "MLFLOW_"))}
    env.update(DO_NOT_TRACK="1", TF_CPP_MIN_LOG_LEVEL="3", PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra)
    return env


def _stop(process: subprocess.Popen, grace: float = 15) -> None:
    """Stop a process and every process it started (a worker's flow runs get sessions of their own).

    Ctrl-C first, as a person would; what is still alive after ``grace`` seconds is killed.
    """
    import psutil

    try:
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    _, alive = psutil.wait_procs(tree, timeout=grace)
    for leftover in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            leftover.kill()
    psutil.wait_procs(alive, timeout=grace)
    process.wait(grace)


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


@pytest.fixture
def prefect_server(tmp_path) -> Iterator[str]:
    """A real Prefect server on a port it binds itself, with its own home and sqlite database; yields its API URL."""
    home = tmp_path / "server-home"
    log = tmp_path / "server.log"
    env = _clean_env(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        # a run that waits for the promotion slot asks again after at most 2 s (default 10 s)
        PREFECT_SERVER_TASKS_TAG_CONCURRENCY_SLOT_WAIT_SECONDS="2",
    )
    # port 0: the server binds a free port (and prints 0 in its banner: the port is read from the process)
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", "0", "--no-ui"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            port = bound_port(process, "/api/health", timeout=900)
            wait_for_http(f"http://127.0.0.1:{port}/api/health", process, timeout=900)
        except (RuntimeError, TimeoutError) as err:
            pytest.fail(f"{err}\n{_tail(log)}")
        yield f"http://127.0.0.1:{port}/api"
    finally:
        _stop(process)


@pytest.fixture
def api(prefect_server):
    """A Prefect client of the test server, for checks made from this process."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
        yield client


@pytest.fixture
def worker(prefect_server, tmp_path) -> Iterator[tuple[subprocess.Popen, Path]]:
    """A real process worker on the test pool, in a folder of its own, with no project settings in its environment."""
    folder, log = tmp_path / "worker", tmp_path / "worker.log"
    folder.mkdir()
    env = _clean_env(PREFECT_API_URL=prefect_server, PREFECT_HOME=str(tmp_path / "worker-home"), PREFECT_WORKER_QUERY_SECONDS="1")
    command = [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process, log
    finally:
        _stop(process)


def _digits(api_url: str, project: Path, *args: str) -> subprocess.Popen:
    """The real `digits` command against the test server, for the test project."""
    return subprocess.Popen(
        [str(BIN / "digits"), *args],
        cwd=project,
        env=_clean_env(PREFECT_API_URL=api_url, DIGITS_HOME=str(project), PREFECT_HOME=str(project.parent / "cli-home")),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for(condition, timeout: float, what: str, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")


def test_a_worker_runs_the_deployment_and_promotion_waits_for_the_limit(project, prefect_server, api, worker, tmp_path):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort

    from flows import deployment as deployments
    from flows.retrain import PROMOTION_TAG

    worker, worker_log = worker  # starting while the deployment is made, as a team's worker would already run

    # 1. no deployment yet: the error says which command creates it (the CLI prints it as it is)
    with pytest.raises(deployments.DeploymentError, match=r"no deployment retrain-digits/digits .*`digits deploy`"):
        deployments.trigger(get_settings())

    # a lower floor is a reviewed change of params.yaml, not an override (runs of the deployment refuse those)
    import yaml

    reviewed = yaml.safe_load((project / "params.yaml").read_text())
    reviewed["gate"]["min_accuracy"] = 0.7
    (project / "params.yaml").write_text(yaml.safe_dump(reviewed))

    # 2. `digits deploy`: pool, promotion limit, deployment with a (paused) schedule and default parameters
    options = ["--pool", POOL, "--cron", "0 3 * * 1", "--paused", "--set", "train.epochs=3"]
    deploy = _digits(prefect_server, project, "deploy", *options)
    out, err = deploy.communicate(timeout=600)
    assert deploy.returncode == 0, out + err
    assert f"prefect worker start --pool {POOL}" in out
    assert api.read_work_pool(POOL).type == "process"
    assert api.read_concurrency_limit_by_tag(PROMOTION_TAG).concurrency_limit == 1
    deployment = api.read_deployment_by_name("retrain-digits/digits")
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * 1"] and deployment.paused
    assert deployment.parameters == {"trigger": "schedule", "overrides": {"train.epochs": 3}}
    assert deployment.job_variables["env"]["DIGITS_HOME"] == str(project)
    assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    # beside it, the monitor: hourly, and it starts the retraining deployment when production needs it
    monitor = api.read_deployment_by_name("monitor-digits/digits")
    assert [s.schedule.cron for s in monitor.schedules] == ["0 * * * *"] and monitor.paused
    assert monitor.parameters == {"window": "24h", "retrain_when_needed": True, "via_deployment": True}
    assert monitor.job_variables["env"]["DIGITS_HOME"] == str(project) and monitor.work_pool_name == POOL

    # 3. a run started as the UI or the API would, with a lowered floor (and the flag, which it may not take):
    # the worker refuses it before anything is trained
    lowered = api.create_flow_run_from_deployment(
        deployment.id,
        parameters={"overrides": {"gate.min_accuracy": 0.5}, "allow_unsafe_overrides": True},
    )
    try:
        refused = _wait_for(lambda: (r := api.read_flow_run(lowered.id)).state.is_final() and r, 900, "the lowered run ending")
    except TimeoutError as failure:
        pytest.fail(f"{failure}\nworker log:\n{_tail(worker_log)}")
    assert refused.state.is_failed(), f"a run with gate.min_accuracy=0.5 ended {refused.state.name}: it was not refused"
    assert "runs started through the deployment take model.* and train.* overrides only" in refused.state.message
    store = registry.connect(get_settings())
    assert registry.get_alias(store, get_settings().model_name) is None
    assert not store.search_runs([store.get_experiment_by_name(get_settings().experiment).experiment_id])  # nothing trained
    # the CLI refuses them before asking the server: as defaults, and for one run, with the flag or without
    for args in (
        ("deploy", "--pool", POOL, "--set", "gate.max_accuracy_drop=0.5"),
        ("retrain", "--deployment", "--set", "data.sources.local.sha256=" + "0" * 64, "--allow-unsafe-overrides"),
    ):
        cli = _digits(prefect_server, project, *args)
        out, err = cli.communicate(timeout=300)
        assert cli.returncode == 2 and "take model.* and train.* overrides only" in err, (args, out, err)
    assert api.read_deployment_by_name("retrain-digits/digits").parameters == deployment.parameters

    lease = None
    retrain = None
    try:
        # 4. another promotion holds the only slot: the run must train, then wait at promotion
        lease = api.increment_concurrency_slots_with_lease(
            names=[f"tag:{PROMOTION_TAG}"], slots=1, mode="concurrency", lease_duration=1800
        ).json()["lease_id"]
        retrain = _digits(prefect_server, project, "retrain", "--deployment", "--set", "train.batch_size=32")

        def promote_task_run():
            assert retrain.poll() is None, f"`digits retrain --deployment` ended early:\n{retrain.communicate()}"
            assert worker.poll() is None, f"the worker died:\n{_tail(worker_log)}"
            of_deployment = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
            runs = api.read_flow_runs(deployment_filter=of_deployment, sort=FlowRunSort.ID_DESC, limit=10)
            runs = [r for r in runs if r.id != refused.id]  # the run refused above
            if not runs:
                return None
            of_run = FlowRunFilter(id=FlowRunFilterId(any_=[runs[0].id]))
            tasks = api.read_task_runs(flow_run_filter=of_run, sort=TaskRunSort.EXPECTED_START_TIME_DESC, limit=50)
            return next((t for t in tasks if t.name.startswith(PROMOTE_TASK)), None)

        try:
            task_run = _wait_for(promote_task_run, 1200, "the flow run reaching promotion", poll=2)
        except (AssertionError, TimeoutError) as failure:
            pytest.fail(f"{failure}\nworker log:\n{_tail(worker_log)}")
        time.sleep(6)  # three slot retries at 2 s: long enough to see it does not go ahead
        flow_run = api.read_flow_run(task_run.flow_run_id)
        assert flow_run.state.is_running(), flow_run.state
        assert not api.read_task_run(task_run.id).state.is_completed()
        assert PROMOTION_TAG in task_run.tags
        assert registry.get_alias(registry.connect(get_settings()), get_settings().model_name) is None

        # 5. the slot frees: the run promotes and the CLI prints the same summary as a local run
        api.release_concurrency_slots_with_lease(lease)
        lease = None
        try:
            out, err = retrain.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`digits retrain --deployment` did not finish\nworker log:\n{_tail(worker_log)}")
        assert retrain.returncode == 0, f"{out}\n{err}\nworker log:\n{_tail(worker_log)}"
    finally:
        if lease is not None:
            api.release_concurrency_slots_with_lease(lease)
        if retrain is not None:
            _stop(retrain)

    assert "gate           PROMOTED v1" in out and "champion       v1" in out, out
    assert "Running" in err and "Completed" in err  # it followed the run's states
    flow_run = api.read_flow_run(flow_run.id)
    assert flow_run.state.is_completed()
    # the deployment's default parameters and this run's --set both reached the worker
    assert flow_run.parameters == {"trigger": "manual", "overrides": {"train.epochs": 3, "train.batch_size": 32}}

    client = registry.connect(get_settings())
    champion = registry.get_alias(client, get_settings().model_name)
    assert champion is not None and champion.version == "1"
    run = client.get_run(champion.run_id)
    assert run.data.params["train.epochs"] == "3" and run.data.params["train.batch_size"] == "32"
    # the overrides, recorded on the run and on the version, and shown by `digits status`
    recorded = {"train.batch_size": 32, "train.epochs": 3}
    assert json.loads(run.data.tags["overrides"]) == recorded and "unsafe_overrides" not in run.data.tags
    assert champion.overrides == recorded and champion.verdict == "promote"
    assert run.info.run_id in out
    status = _digits(prefect_server, project, "status")
    shown, err = status.communicate(timeout=300)
    assert status.returncode == 0 and "--set train.batch_size=32 --set train.epochs=3" in shown, shown + err
