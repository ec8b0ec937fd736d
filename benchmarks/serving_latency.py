"""Benchmark 4 of issue 4: serving latency and throughput, our BentoML service against a naive one.

Run from the project folder:

    .venv/bin/python benchmarks/serving_latency.py [--quick] [--no-pin]

The same model (the champion of the project's store; when there is none, the default architecture of
``params.yaml`` trained here for one epoch into a temporary store: latency does not depend on accuracy)
answers the same real MNIST test images these ways, one after the other, never at the same time:

* ``in-process``   -- the model called in a Python process, no HTTP, timed per call: its TensorFlow
                      Lite exports through LiteRT (``tflite-int8`` and ``tflite``, float32),
                      ``compiled_predictor`` (Keras in a ``tf.function``) and Keras ``model.predict``;
* ``ours``         -- the project's service, ``bentoml serve serving.service:DigitClassifier``, as it
                      runs by default: the champion's int8 export when its run kept one, else the
                      float32 export, else Keras (the table says which);
* ``ours-float32`` -- the same service with ``DIGITS_SERVE_RUNTIME=tflite``: the float32 export;
* ``ours-keras``   -- the same service with ``DIGITS_SERVE_RUNTIME=keras``;
* ``naive``      -- ``benchmarks/naive_service.py``, BentoML calling ``model.predict`` per request: the
                    baseline of the ratios, measured in the same run.

An aiohttp load generator in this process drives each server on 127.0.0.1:

* open loop at fixed rates of single images: requests leave on a schedule whatever the answers, and
  latency counts from each request's *scheduled* send time, so a stalled server cannot hide by
  slowing the client down; a service is not driven above the first rate it could not keep;
* closed loop with 32 concurrent clients, single images and batches of 64 images: peak throughput.

Every answer is checked: a non-200 status, a timeout, a connection error or an answer that does not
hold one prediction per image counts as an error. The machine has 2 cores, shared by the server and
the load generator: by default the server (all its processes) runs on the first CPU and this process
on the second (``--no-pin`` lets them share both). Nothing asserts: it prints tables and ratios and
writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from results_file import machine  # noqa: E402

from pipeline.data import Dataset, has_dataset, ingest, load_dataset  # noqa: E402
from pipeline.params import load_params  # noqa: E402
from pipeline.registry import ModelRef  # noqa: E402
from pipeline.settings import get_settings  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "serving_latency.json"
# name -> (bentoml service target, --working-dir, extra environment)
SERVICES = {
    "ours": ("serving.service:DigitClassifier", ROOT, {"DIGITS_SERVE_RUNTIME": "tflite-int8"}),
    "ours-float32": ("serving.service:DigitClassifier", ROOT, {"DIGITS_SERVE_RUNTIME": "tflite"}),
    "ours-keras": ("serving.service:DigitClassifier", ROOT, {"DIGITS_SERVE_RUNTIME": "keras"}),
    "naive": ("naive_service:NaiveDigitClassifier", ROOT / "benchmarks", {}),
}
# our services, and the in-process method each calls for a request
OURS = {"ours": "tflite-int8", "ours-float32": "tflite", "ours-keras": "compiled_predictor"}
RATES = (10, 25, 50, 100, 200, 400)
CLIENTS = 32
BATCH = 64
TARGET_RATE = 100
TARGET_P99_MS = 10.0
TARGET_THROUGHPUT_RATIO = 10.0
# an open-loop rate a service did not keep: any error, fewer answers than offered, or a backlog this long
SATURATED_P99_S = 1.0
JSON_HEADERS = {"Content-Type": "application/json"}


# ---------------------------------------------------------------- results


@dataclass
class LoadResult:
    service: str
    load: str  # "open" (fixed rate) or "closed" (concurrent clients)
    images_per_request: int
    offered_rate: float | None  # requests/s on the schedule (open loop)
    clients: int | None  # concurrent clients (closed loop)
    seconds: float  # the measuring window
    requests: int  # requests measured (open loop: scheduled; closed loop: started in the window)
    ok: int
    errors: dict[str, int]  # "HTTP 503", "timeout", "ClientOSError", "bad answer", ... -> count
    requests_per_second: float  # 200 answers per second
    images_per_second: float
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    mean_ms: float | None
    send_lag_max_ms: float | None = None  # open loop: how late the generator itself sent a request
    differing_answers: int = 0  # images whose digit differs from the in-process model's
    differing_samples: list[dict] = field(default_factory=list)
    model_versions: list[str] = field(default_factory=list)
    server_cpu_seconds: float | None = None  # CPU time of the server's processes in the window
    client_cpu_seconds: float = 0.0  # CPU time of this process (the load generator) in the window
    saturated: bool = False
    error_samples: list[str] = field(default_factory=list)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def _ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None}
    a = np.asarray(values) * 1000.0
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p99_ms": round(float(np.percentile(a, 99)), 3),
        "max_ms": round(float(a.max()), 3),
        "mean_ms": round(float(a.mean()), 3),
    }


class Recorder:
    """Outcomes of one run: latencies of the good answers, errors by kind, a few error texts."""

    def __init__(self, expected: np.ndarray) -> None:
        self.expected = expected
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.samples: list[str] = []
        self.requests = 0
        self.differing = 0
        self.differing_samples: list[dict] = []
        self.versions: set[str] = set()
        self.lags: list[float] = []

    def add(
        self,
        outcome: tuple[str | None, str, list | None],
        first_image: int,
        seconds: float,
        prefix: str = "",
        measured: bool = True,
    ) -> None:
        """Record one request; ``measured=False``: only its error counts (the warm-up of a closed loop)."""
        error, detail, answers = outcome
        if not measured and error is None:
            return
        self.requests += measured
        if error is None and answers is not None:
            n = len(answers)
            wanted = self.expected[first_image : first_image + n]
            try:
                digits = np.array([a["digit"] for a in answers])
                self.versions.update(str(a["model_version"]) for a in answers[:1])
            except (TypeError, KeyError):
                error, detail = "bad answer", f"no digit/model_version in {str(answers)[:200]}"
            else:
                differing = int((digits != wanted).sum()) if len(wanted) == n else 0
                self.differing += differing
                if differing and len(self.differing_samples) < 5:
                    self.differing_samples.append(self._describe(answers, digits, first_image))
        if error is None:
            if measured:
                self.latencies.append(seconds)
            return
        self.errors[prefix + error] += 1
        if len(self.samples) < 5:
            self.samples.append(f"{prefix}{error}: {detail}"[:300])

    def _describe(self, answers: list, digits: np.ndarray, first_image: int) -> dict:
        """Evidence for answers unlike the in-process model's: near ties (low confidence), or the answers
        of other images (the offset of the pool whose digits they match best)."""
        n = len(digits)
        wrong = np.flatnonzero(digits != self.expected[first_image : first_image + n])
        offsets = range(len(self.expected) - n + 1)
        best = max(offsets, key=lambda o: int((self.expected[o : o + n] == digits).sum()))
        return {
            "first_image": first_image,
            "images": n,
            "differing": len(wrong),
            "confidence_of_differing": [answers[i].get("confidence") for i in wrong[:8]],
            "best_matching_offset": best,
            "matches_at_best_offset": int((self.expected[best : best + n] == digits).sum()),
            "run_id": answers[0].get("run_id"),
        }


# ---------------------------------------------------------------- CPUs and processes


def pin_this_process(cpus: set[int]) -> None:
    """Pin every thread of this process (sched_setaffinity(0) alone moves only the calling thread)."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


def choose_cpus(no_pin: bool) -> tuple[set[int], set[int]] | None:
    """(server CPUs, load-generator CPUs), or None when not pinning."""
    if no_pin:
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        print(f"only CPU {allowed} is available to this process: server and load generator are not pinned", file=sys.stderr)
        return None
    return {allowed[0]}, {allowed[1]}


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # fields from "state" on (the name may hold spaces)


def descendants(root: int) -> list[int]:
    """``root`` and every process under it (BentoML starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return sorted(found)


def cpu_seconds(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / ticks


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def store_env(base: dict[str, str], home: Path, keep_tracking_uri: bool) -> dict[str, str]:
    """The environment of the servers and the in-process child: ``base`` (this process's environment
    before MLflow touched it), pointed at the store of ``home``."""
    env = {k: v for k, v in base.items() if keep_tracking_uri or k != "MLFLOW_TRACKING_URI"}
    env.update(
        {
            "DIGITS_HOME": str(home),
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            "DO_NOT_TRACK": "1",
            "BENTOML_DO_NOT_TRACK": "true",
            "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        }
    )
    return env


@dataclass
class Server:
    """A ``bentoml serve`` subprocess in its own process group, optionally pinned to ``cpus``."""

    name: str
    target: str
    workdir: Path
    env: dict[str, str]
    log_path: Path
    cpus: set[int] | None
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        command = [
            sys.executable,
            "-m",
            "bentoml",
            "serve",
            self.target,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--working-dir",
            str(self.workdir),
        ]
        cpus = self.cpus
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                env={**self.env, "BENTOML_HOME": str(self.log_path.parent / "bentoml")},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # in the child before exec: the server and every process it starts stay on these CPUs
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
            )
        return self

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout: float) -> float:
        """Wait for /readyz to answer 200 (a model is loaded); returns the seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name}: `bentoml serve {self.target}` exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise TimeoutError(f"{self.name}: {self.url}/readyz did not answer 200 within {timeout:.0f} s:\n{self.log_tail()}")

    def pids(self) -> list[int]:
        return descendants(self.process.pid) if self.process and self.process.poll() is None else []

    def affinities(self) -> dict[int, list[int]]:
        out = {}
        for pid in self.pids():
            with contextlib.suppress(OSError):
                out[pid] = sorted(os.sched_getaffinity(pid))
        return out

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pids())

    async def settle(self, timeout: float = 60.0, idle_share: float = 0.2) -> float:
        """Wait until the server's processes use less than ``idle_share`` of a CPU (a backlog left by
        abandoned requests is drained before the next load starts); returns the seconds waited."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            before = self.cpu_seconds()
            await asyncio.sleep(0.5)
            if self.cpu_seconds() - before < 0.5 * idle_share:
                break
        return time.monotonic() - started

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        workers = [pid for pid in self.pids() if pid != self.process.pid]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)  # `bentoml serve` stops its workers on SIGTERM
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        time.sleep(1.0)
        for pid in workers:  # a worker that outlived its server (it has a session of its own)
            with contextlib.suppress(OSError):
                if b"bentoml" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------- the model


def served_runtime(server: Server) -> str | None:
    """What answers in the server ("tflite-int8", "tflite" or "keras", from ``/model``); None for the naive service."""
    try:
        with urllib.request.urlopen(server.url + "/model", timeout=30) as response:
            return json.loads(response.read()).get("runtime")
    except (urllib.error.URLError, ValueError, OSError):
        return None


def describe_store(home: Path, tracking_uri: str | None) -> str:
    """Where the model comes from, without machine paths (the JSON may be committed)."""
    if tracking_uri:
        return "the tracking server in MLFLOW_TRACKING_URI"
    if home.resolve() == ROOT:
        return "the project's store (mlflow/)"
    return "the store of DIGITS_HOME"


def use_store(home: Path, keep_tracking_uri: bool = True) -> None:
    # (mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI: servers get a snapshot taken before)
    os.environ["DIGITS_HOME"] = str(home)
    if not keep_tracking_uri:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    get_settings.cache_clear()


def champion_of(home: Path) -> ModelRef | None:
    """The champion of the store at ``home`` (or of MLFLOW_TRACKING_URI), None when there is none."""
    from pipeline.registry import get_alias
    from serving.champion import missing_store, registry_client

    use_store(home)
    settings = get_settings()
    if missing_store(settings):
        return None
    return get_alias(registry_client(settings), settings.model_name)


def train_temporary_champion(store: Path, dataset: Dataset) -> tuple[ModelRef, float, int]:
    """Train the default architecture of params.yaml for 1 epoch, log, register and promote it as the
    retraining flow does, in a throw-away store; (champion, test accuracy, training images)."""
    import keras
    import mlflow
    import mlflow.tensorflow
    from mlflow.models import infer_signature

    from pipeline import export, registry
    from pipeline.preprocess import to_model_input
    from pipeline.train import compiled_predictor, train

    use_store(store, keep_tracking_uri=False)
    settings = get_settings()
    params = load_params(ROOT / "params.yaml", {"train.epochs": 1})
    keras.utils.disable_interactive_logging()
    result = train(dataset, params)
    probabilities = compiled_predictor(result.model)(to_model_input(dataset.x_test))
    accuracy = float((probabilities.argmax(1) == dataset.y_test).mean())
    client = registry.connect(settings)
    example = to_model_input(dataset.x_test[:2])
    # stated, as the flow states them: inferring them re-imports the model in a subprocess
    requirements = [f"{name}=={package_version(name)}" for name in ("tensorflow-cpu", "keras", "numpy", "mlflow")]
    with mlflow.start_run(run_name="serving-benchmark") as run:
        mlflow.log_metrics({"test_accuracy": accuracy})
        info = mlflow.tensorflow.log_model(
            result.model,
            name="model",
            signature=infer_signature(example, probabilities[:2]),
            input_example=example,
            pip_requirements=requirements,
        )
        # as the flow does: the service runs them
        export.log_tflite_exports(
            result.model, dataset.x_test, probabilities, calibration=dataset.x_train[: export.CALIBRATION_IMAGES]
        )
    version = registry.register(
        client, settings.model_name, info.model_uri, run.info.run_id, {"data_version": "serving-benchmark"}
    )
    registry.move_champion(client, settings, version.version, None, "serving benchmark: trained for it, 1 epoch", run.info.run_id)
    return registry.get_alias(client, settings.model_name), accuracy, len(dataset.x_train)


# ---------------------------------------------------------------- in-process baseline (a child process)


def in_process_main(spec: dict) -> dict:
    """Time the model called in this process, per call, on the benchmark's images (run as a child)."""
    from pipeline.export import RUNTIME_FILES, tflite_predictor
    from pipeline.preprocess import to_model_input
    from pipeline.registry import load_keras, load_tflite
    from pipeline.train import compiled_predictor
    from serving.champion import configure_tensorflow, registry_client

    settings = get_settings()
    registry_client(settings)  # MLflow reads the store of DIGITS_HOME (or MLFLOW_TRACKING_URI), as the service does
    configure_tensorflow(settings.serve_tf_threads)  # the same TensorFlow threads as the service
    model = load_keras(spec["uri"])
    predictor = compiled_predictor(model)
    pool = load_dataset(ROOT / "data").x_test[: spec["pool"]]
    digits = predictor(to_model_input(pool)).argmax(1)
    methods = {"compiled_predictor": predictor, "model.predict": lambda x: model.predict(x, verbose=0)}
    for runtime, file in RUNTIME_FILES.items():  # what the service runs when the run has them
        if (content := load_tflite(spec["run_id"], file)) is not None:
            methods[runtime] = tflite_predictor(content, settings.serve_tf_threads)
    results = []
    for method, calls_by_size in spec["calls"].items():
        if method not in methods:
            print(f"  in-process {method}: the run has no TensorFlow Lite export; skipped", file=sys.stderr, flush=True)
            continue
        fn = methods[method]
        for size, calls in calls_by_size.items():
            n = int(size)
            inputs = [pool[k : k + n] for k in range(0, len(pool) - n + 1, n)]
            for x in inputs[:3]:  # warm: traces, first-call allocations
                fn(to_model_input(x))
            times = []
            for i in range(calls):
                x = inputs[i % len(inputs)]
                started = time.perf_counter()
                np.argmax(fn(to_model_input(x)), axis=1)
                times.append(time.perf_counter() - started)
            total = sum(times)
            results.append(
                {
                    "method": method,
                    "images_per_call": n,
                    "calls": calls,
                    **_ms(times),
                    "calls_per_second": round(calls / total, 1),
                    "images_per_second": round(calls * n / total, 1),
                }
            )
            print(
                f"  in-process {method:<18} {n:>3} image(s)/call: p50 {results[-1]['p50_ms']:.2f} ms, "
                f"p99 {results[-1]['p99_ms']:.2f} ms",
                file=sys.stderr,
                flush=True,
            )
    return {"results": results, "digits": digits.tolist(), "tf_threads": settings.serve_tf_threads}


def run_in_process(spec: dict, env: dict[str, str], cpus: set[int] | None) -> dict:
    """The in-process baseline in a fresh process: same CPU and TensorFlow threads as the server."""
    completed = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--in-process", json.dumps(spec)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=None,  # progress lines go straight through
        text=True,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        timeout=1800,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"the in-process baseline failed (exit {completed.returncode}); see its output above")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- load generation


@dataclass
class Workload:
    """Pre-encoded request bodies: request k holds images [k*n, (k+1)*n) of the image pool."""

    images_per_request: int
    bodies: list[bytes]

    @classmethod
    def of(cls, pool: np.ndarray, n: int) -> Workload:
        bodies = []
        for k in range(len(pool) // n):
            pixels = pool[k * n] if n == 1 else pool[k * n : (k + 1) * n]  # one image is sent as (28, 28)
            bodies.append(json.dumps({"pixels": pixels.tolist()}, separators=(",", ":")).encode())
        return cls(n, bodies)

    def body(self, i: int) -> tuple[bytes, int]:
        k = i % len(self.bodies)
        return self.bodies[k], k * self.images_per_request


class LoadGenerator:
    """Drives one server with open- and closed-loop loads; every answer is checked."""

    def __init__(self, server: Server, expected: np.ndarray, timeout: float) -> None:
        self.server = server
        self.url = server.url + "/predict_pixels"
        self.expected = expected
        self.timeout = timeout

    async def call(self, session, body: bytes, deadline: float) -> tuple[str | None, str, list | None]:
        """One request: (error kind or None, detail, the answers)."""
        import aiohttp

        try:
            async with asyncio.timeout_at(deadline):
                async with session.post(self.url, data=body, headers=JSON_HEADERS) as response:
                    status = response.status
                    payload = await response.read()
        except TimeoutError:
            return "timeout", f"no answer within {self.timeout:.0f} s of the scheduled send", None
        except (aiohttp.ClientError, OSError) as err:
            return type(err).__name__, str(err), None
        if status != 200:
            return f"HTTP {status}", payload[:200].decode(errors="replace"), None
        try:
            answers = json.loads(payload)
        except ValueError:
            return "bad answer", f"not JSON: {payload[:100]!r}", None
        if not isinstance(answers, list):
            return "bad answer", f"not a list: {str(answers)[:100]}", None
        return None, "", answers

    def _checked(self, outcome, n: int):
        error, detail, answers = outcome
        if error is None and len(answers) != n:
            return "bad answer", f"{len(answers)} predictions for {n} images", None
        return outcome

    def _result(self, rec: Recorder, load: str, workload: Workload, window: float, **extra) -> LoadResult:
        ok = len(rec.latencies)
        return LoadResult(
            service=self.server.name,
            load=load,
            images_per_request=workload.images_per_request,
            seconds=round(window, 3),
            requests=rec.requests,
            ok=ok,
            errors=dict(rec.errors),
            requests_per_second=round(ok / window, 2),
            images_per_second=round(ok * workload.images_per_request / window, 1),
            **_ms(rec.latencies),
            send_lag_max_ms=round(max(rec.lags) * 1000, 3) if rec.lags else None,
            differing_answers=rec.differing,
            differing_samples=rec.differing_samples,
            model_versions=sorted(rec.versions),
            error_samples=rec.samples,
            **extra,
        )

    async def warm_up(self, session, workloads: list[Workload], requests: int = 20) -> Recorder:
        """Sequential requests before measuring (first-call costs, traces for each batch size)."""
        loop = asyncio.get_running_loop()
        rec = Recorder(self.expected)
        for workload in workloads:
            for i in range(requests):
                body, first = workload.body(i)
                started = loop.time()
                outcome = self._checked(await self.call(session, body, started + self.timeout), workload.images_per_request)
                rec.add(outcome, first, loop.time() - started, prefix="warm-up ")
        return rec

    async def open_loop(self, session, workload: Workload, rate: float, seconds: float) -> LoadResult:
        """Requests sent on a fixed schedule; latency from the scheduled send time."""
        loop = asyncio.get_running_loop()
        rec = Recorder(self.expected)
        count = max(1, round(rate * seconds))
        start = loop.time() + 0.05
        cpu, server_cpu = time.process_time(), self.server.cpu_seconds()
        last = [start]

        async def one(i: int, at: float) -> None:
            rec.lags.append(loop.time() - at)
            body, first = workload.body(i)
            outcome = self._checked(await self.call(session, body, at + self.timeout), workload.images_per_request)
            now = loop.time()
            rec.add(outcome, first, now - at)
            last[0] = max(last[0], now)

        tasks = []
        for i in range(count):
            at = start + i / rate
            delay = at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, at)))
        await asyncio.gather(*tasks)
        window = max(last[0] - start, count / rate)
        result = self._result(
            rec,
            "open",
            workload,
            window,
            offered_rate=rate,
            clients=None,
            server_cpu_seconds=round(self.server.cpu_seconds() - server_cpu, 3),
            client_cpu_seconds=round(time.process_time() - cpu, 3),
        )
        result.saturated = (
            result.error_count > 0
            or result.ok < 0.9 * count
            or (result.p99_ms is not None and result.p99_ms > SATURATED_P99_S * 1000)
        )
        return result

    async def closed_loop(self, session, workload: Workload, clients: int, seconds: float, warmup: float) -> LoadResult:
        """``clients`` clients, each sending its next request when the previous one is answered."""
        loop = asyncio.get_running_loop()
        rec = Recorder(self.expected)
        measure_from = loop.time() + warmup
        stop_at = measure_from + seconds
        marks: dict[str, tuple[float, float]] = {}

        def mark(name: str) -> None:  # CPU times at the edges of the window (not of the warm-up or the tail)
            marks[name] = (time.process_time(), self.server.cpu_seconds())

        loop.call_at(measure_from, mark, "from")
        loop.call_at(stop_at, mark, "to")

        async def client(c: int) -> None:
            i = c
            while (started := loop.time()) < stop_at:
                body, first = workload.body(i)
                outcome = self._checked(await self.call(session, body, started + self.timeout), workload.images_per_request)
                if started >= measure_from:
                    rec.add(outcome, first, loop.time() - started)
                else:  # an error in the warm-up still counts as an error
                    rec.add(outcome, first, 0.0, prefix="warm-up ", measured=False)
                i += clients

        await asyncio.gather(*(client(c) for c in range(clients)))
        (cpu_from, server_from), (cpu_to, server_to) = marks["from"], marks.get("to", marks["from"])
        # requests started in the window and answered after it still count (a steady state)
        return self._result(
            rec,
            "closed",
            workload,
            seconds,
            offered_rate=None,
            clients=clients,
            server_cpu_seconds=round(server_to - server_from, 3),
            client_cpu_seconds=round(cpu_to - cpu_from, 3),
        )


def progress(r: LoadResult) -> None:
    what = f"{r.offered_rate:g} req/s" if r.load == "open" else f"{r.clients} clients"
    print(
        f"  {r.service:<10} {r.load:<6} {what:>10} x{r.images_per_request:<3} {r.requests_per_second:8.1f} req/s "
        f"p50 {fmt(r.p50_ms, '.1f')} ms p99 {fmt(r.p99_ms, '.1f')} ms errors {r.error_count}"
        f"{'  (saturated)' if r.saturated else ''}",
        file=sys.stderr,
        flush=True,
    )


async def measure_service(server: Server, expected: np.ndarray, singles: Workload, batches: Workload, args) -> dict:
    import aiohttp

    generator = LoadGenerator(server, expected, args.timeout)
    connector = aiohttp.TCPConnector(limit=max(256, 2 * args.clients))
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        warm = await generator.warm_up(session, [singles, batches])
        settled = [round(await server.settle(), 1)]  # seconds until the server was idle, before each load
        runs: list[LoadResult] = []
        skipped: list[float] = []
        for rate in args.rates:
            if runs and runs[-1].saturated:
                skipped.append(rate)
                continue
            runs.append(await generator.open_loop(session, singles, rate, args.seconds))
            progress(runs[-1])
            settled.append(round(await server.settle(), 1))
        for workload in (singles, batches):
            runs.append(await generator.closed_loop(session, workload, args.clients, args.seconds, args.warmup))
            progress(runs[-1])
            settled.append(round(await server.settle(), 1))
    return {
        "warm_up_errors": dict(warm.errors),
        "warm_up_error_samples": warm.samples,
        "model_versions": sorted(warm.versions),
        "runs": runs,
        "skipped_rates": skipped,
        "settle_seconds": settled[:-1],
    }


# ---------------------------------------------------------------- report


def fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def load_table(services: dict[str, dict]) -> str:
    head = (
        f"{'service':<10} {'load':<18} {'img/req':>7} {'req/s':>8} {'img/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'max ms':>8} {'errors':>6} {'srv CPU':>7} {'gen CPU':>7}"
    )
    lines = [head, "-" * len(head)]
    for name, s in services.items():
        for r in s["runs"]:
            what = f"open {r.offered_rate:g}/s" if r.load == "open" else f"closed {r.clients} clients"
            srv = "-" if r.server_cpu_seconds is None else f"{r.server_cpu_seconds / r.seconds:.0%}"
            lines.append(
                f"{name:<10} {what:<18} {r.images_per_request:>7} {r.requests_per_second:>8,.1f} {r.images_per_second:>8,.0f} "
                f"{fmt(r.p50_ms, '>8.2f')} {fmt(r.p99_ms, '>8.2f')} {fmt(r.max_ms, '>8.1f')} {r.error_count:>6} "
                f"{srv:>7} {r.client_cpu_seconds / r.seconds:>7.0%}{'  saturated' if r.saturated else ''}"
            )
        if s["skipped_rates"]:
            lines.append(f"{name:<10} open {', '.join(f'{x:g}' for x in s['skipped_rates'])}/s: not run (saturated below)")
    return "\n".join(lines)


def in_process_table(results: list[dict]) -> str:
    head = f"{'in-process':<20} {'img/call':>8} {'calls':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'img/s':>9}"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r['method']:<20} {r['images_per_call']:>8} {r['calls']:>6} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
            f"{r['max_ms']:>8.1f} {r['images_per_second']:>9,.0f}"
        )
    return "\n".join(lines)


def find(runs: list[LoadResult], load: str, images: int, rate: float | None = None) -> LoadResult | None:
    return next(
        (r for r in runs if r.load == load and r.images_per_request == images and (rate is None or r.offered_rate == rate)), None
    )


def compare(services: dict[str, dict], in_process: list[dict], batch: int) -> dict:
    """The ratios of each of our services (by runtime) against naive and against its model in-process."""
    return {name: compare_one(services, name, in_process, batch) for name in OURS if name in services}


def compare_one(services: dict[str, dict], name: str, in_process: list[dict], batch: int) -> dict:
    """One of ours against naive (throughput, p99 at each rate) and against in-process (p99)."""
    ours, naive = services[name]["runs"], services.get("naive", {}).get("runs", [])
    local = {(r["method"], r["images_per_call"]): r for r in in_process}
    out: dict = {"throughput": {}, "p99_at_rate": {}}
    for images, key in ((1, "single"), (batch, f"batch_{batch}")):
        o, n = find(ours, "closed", images), find(naive, "closed", images)
        out["throughput"][key] = {
            "ours_images_per_second": o.images_per_second if o else None,
            "naive_images_per_second": n.images_per_second if n else None,
            "ours_over_naive": ratio(o.images_per_second, n.images_per_second) if o and n else None,
            "ours_p99_ms": o.p99_ms if o else None,
            "naive_p99_ms": n.p99_ms if n else None,
            "errors": {"ours": o.error_count if o else None, "naive": n.error_count if n else None},
        }
    same, predict = local.get((OURS[name], 1)), local.get(("model.predict", 1))
    out["in_process_method"] = OURS[name]
    for o in (r for r in ours if r.load == "open"):
        n = find(naive, "open", 1, o.offered_rate)
        naive_note = None if n else ("not run: it saturated at a lower rate" if naive else "not measured")
        if n is not None and n.saturated:
            naive_note = f"saturated ({n.error_count} errors, {n.requests_per_second:.1f} of {n.offered_rate:g} req/s answered)"
        out["p99_at_rate"][f"{o.offered_rate:g}"] = {
            "ours_p99_ms": o.p99_ms,
            "ours_errors": o.error_count,
            "ours_saturated": o.saturated,
            "naive_p99_ms": n.p99_ms if n else None,
            "naive_note": naive_note,
            "naive_over_ours": ratio(n.p99_ms, o.p99_ms) if n and not n.saturated else None,
            "ours_over_in_process_same_runtime": ratio(o.p99_ms, same["p99_ms"]) if same else None,
            "ours_over_in_process_model_predict": ratio(o.p99_ms, predict["p99_ms"]) if predict else None,
        }
    at_target = out["p99_at_rate"].get(f"{TARGET_RATE:g}")
    out["targets"] = {
        f"p99_at_{TARGET_RATE}_rps_le_{TARGET_P99_MS:g}_ms": None
        if not at_target or at_target["ours_p99_ms"] is None
        else (at_target["ours_p99_ms"] <= TARGET_P99_MS and at_target["ours_errors"] == 0),
        **{
            f"throughput_{key}_ge_{TARGET_THROUGHPUT_RATIO:g}x_naive": None
            if x["ours_over_naive"] is None
            else x["ours_over_naive"] >= TARGET_THROUGHPUT_RATIO
            for key, x in out["throughput"].items()
        },
        "zero_errors": None if not ours else (sum(r.error_count for r in ours) == 0 and not services[name]["warm_up_errors"]),
    }
    return out


def verdict(value: bool | None) -> str:
    return "not measured" if value is None else ("met" if value else "NOT met")


def answering(service: dict) -> list[str]:
    """The model versions that answered a service's requests, warm-up included."""
    return sorted(set(service["model_versions"]).union(*(r.model_versions for r in service["runs"])))


def print_summary(
    ratios: dict, services: dict[str, dict], in_process: list[dict], batch: int, clients: int, version: str
) -> None:
    for name, r in ratios.items():
        runtime = services[name].get("runtime") or "?"
        for key, label in (("single", "single images"), (f"batch_{batch}", f"batches of {batch}")):
            x = r["throughput"][key]
            print(
                f"{name} ({runtime}), peak throughput, {clients} clients, {label}: "
                f"{fmt(x['ours_images_per_second'], ',.0f')} img/s, naive {fmt(x['naive_images_per_second'], ',.1f')} img/s"
                f" -> {fmt(x['ours_over_naive'], '.1f')}x"
            )
        for rate, x in r["p99_at_rate"].items():
            naive = f"naive {fmt(x['naive_p99_ms'], '.1f')} ms" + (f" [{x['naive_note']}]" if x["naive_note"] else "")
            print(
                f"{name} ({runtime}), p99 at {rate} req/s: {fmt(x['ours_p99_ms'], '.2f')} ms ({x['ours_errors']} errors), "
                f"{naive}, naive/{name} {fmt(x['naive_over_ours'], '.1f')}x; {name}/in-process {r['in_process_method']} "
                f"{fmt(x['ours_over_in_process_same_runtime'], '.1f')}x"
            )
    local = {(r["method"], r["images_per_call"]): r for r in in_process}
    methods = [m for m in ("tflite-int8", "tflite", "compiled_predictor", "model.predict") if (m, 1) in local]
    print("(in-process, one image, p99: " + ", ".join(f"{m} {local[(m, 1)]['p99_ms']:.2f} ms" for m in methods) + ")")
    for name, s in services.items():
        if s.get("failed"):
            print(f"{name}: NOT MEASURED, the server did not start: {s['failed'].splitlines()[0]}")
            continue
        total = sum(r.requests for r in s["runs"])
        kinds: Counter[str] = Counter(s["warm_up_errors"])  # already prefixed "warm-up "
        for r in s["runs"]:
            kinds.update(r.errors)
        warm = sum(n for kind, n in kinds.items() if kind.startswith("warm-up "))
        errors = sum(kinds.values()) - warm
        differing = sum(r.differing_answers for r in s["runs"])
        print(
            f"{name}: {errors} errors in {total:,} measured requests, {warm} more in warm-ups "
            f"({dict(kinds) or 'no errors'}); "
            f"model version(s) answering {', '.join(answering(s)) or '?'}; "
            f"{differing} answers differ from the in-process model's digit"
        )
        if answering(s) != [version]:
            print(
                f"  WARNING: the in-process baseline used v{version} but {name} answered with v{', v'.join(answering(s))}: "
                "the champion moved during the run (differing answers and latencies around the swap come from that)"
            )
    for name, r in ratios.items():
        for key, value in r["targets"].items():
            print(f"target {key} ({name}): {verdict(value)}")


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2 s per load, fewer in-process calls (figures not comparable)"
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin the server to the first CPU and the load generator to the second"
    )
    parser.add_argument("--rates", type=float, nargs="+", default=list(RATES), help="open-loop rates, requests/s")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per load (default 15, --quick 2)")
    parser.add_argument("--clients", type=int, default=CLIENTS, help="concurrent clients of the closed loop")
    parser.add_argument("--batch", type=int, default=BATCH, help="images per request of the batch loads")
    parser.add_argument("--services", nargs="+", default=list(SERVICES), choices=list(SERVICES))
    parser.add_argument(
        "--home",
        type=Path,
        default=None,
        help="project folder whose store holds the champion (default: DIGITS_HOME, else this project)",
    )
    parser.add_argument(
        "--fresh-model", action="store_true", help="train a model for 1 epoch into a temporary store even if there is a champion"
    )
    parser.add_argument("--timeout", type=float, default=None, help="seconds before a request counts as timed out (10)")
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds a server may take to load the model")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--in-process", default=None, help=argparse.SUPPRESS)  # the child of run_in_process
    args = parser.parse_args(argv)

    if args.in_process is not None:
        code = 1
        try:
            print(json.dumps(in_process_main(json.loads(args.in_process))), flush=True)
            code = 0
        except Exception:
            import traceback

            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)  # TensorFlow's teardown can take minutes on a busy machine; nothing is left to do

    os.chdir(ROOT)
    base_env = dict(os.environ)
    args.seconds = args.seconds or (2.0 if args.quick else 15.0)
    args.warmup = 1.0 if args.quick else 3.0
    args.timeout = args.timeout or 10.0
    calls = (
        {
            "tflite-int8": {"1": 200, str(args.batch): 50},
            "tflite": {"1": 200, str(args.batch): 50},
            "compiled_predictor": {"1": 200, str(args.batch): 50},
            "model.predict": {"1": 20, str(args.batch): 10},
        }
        if args.quick
        else {
            "tflite-int8": {"1": 2000, str(args.batch): 500},
            "tflite": {"1": 2000, str(args.batch): 500},
            "compiled_predictor": {"1": 2000, str(args.batch): 500},
            "model.predict": {"1": 300, str(args.batch): 100},
        }
    )
    pool_size = args.batch * (8 if args.quick else 32)  # test images the requests cycle through

    params = load_params(ROOT / "params.yaml")
    if not has_dataset(ROOT / "data"):
        ingest(params.data, ROOT / "data", ROOT / ".cache")
    dataset = load_dataset(ROOT / "data")
    cpus = choose_cpus(args.no_pin)
    pinning = (
        f"server on CPU {sorted(cpus[0])}, load generator on CPU {sorted(cpus[1])}"
        if cpus
        else "not pinned: server and load generator share the CPUs"
    )
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="serving-benchmark-") as tmp_name:
        tmp = Path(tmp_name)
        home = (args.home or Path(os.environ.get("DIGITS_HOME") or ROOT)).resolve()
        where = describe_store(home, base_env.get("MLFLOW_TRACKING_URI"))
        ref = None if args.fresh_model else champion_of(home)
        if ref is not None:
            model_note = f"the champion of {where}"
            env = store_env(base_env, home, keep_tracking_uri=True)
        else:
            print(
                f"no champion in {where}{' (--fresh-model)' if args.fresh_model else ''}: training the "
                "default architecture of params.yaml for 1 epoch into a temporary store",
                file=sys.stderr,
                flush=True,
            )
            store = tmp / "store"
            store.mkdir()
            ref, accuracy, n_train = train_temporary_champion(store, dataset.head(10_000) if args.quick else dataset)
            model_note = (
                f"no champion: the default architecture of params.yaml trained for 1 epoch on {n_train:,} images "
                f"(test accuracy {accuracy:.2%}) into a temporary store; latency does not depend on accuracy"
            )
            env = store_env(base_env, store, keep_tracking_uri=False)
        print(f"model: {ref.uri} (run {ref.run_id}), {model_note}", file=sys.stderr, flush=True)
        print(f"pinning: {pinning}", file=sys.stderr, flush=True)

        pool = dataset.x_test[:pool_size]
        singles, batches = Workload.of(pool, 1), Workload.of(pool, args.batch)
        if cpus:
            pin_this_process(cpus[1])
        spec = {"uri": ref.uri, "run_id": ref.run_id, "pool": pool_size, "calls": calls}
        in_process = run_in_process(spec, env, cpus[0] if cpus else None)
        expected = np.asarray(in_process["digits"])

        gc.collect()
        gc.freeze()  # the pre-encoded bodies and the rest of this process stay out of collections under load
        services: dict[str, dict] = {}
        pin_checks: dict[str, dict] = {}
        for name in args.services:
            target, workdir, extra_env = SERVICES[name]
            server = Server(name, target, workdir, {**env, **extra_env}, tmp / f"{name}.log", cpus[0] if cpus else None)
            try:
                server.start()
                print(f"{name}: starting `bentoml serve {target}`", file=sys.stderr, flush=True)
                try:
                    ready = server.wait_ready(args.ready_timeout)
                except (RuntimeError, TimeoutError) as err:  # measure the other service all the same
                    message = str(err).replace(str(tmp), "<tmp>").replace(str(ROOT), ".")
                    print(message, file=sys.stderr, flush=True)
                    services[name] = {
                        "failed": message,
                        "runs": [],
                        "warm_up_errors": {},
                        "model_versions": [],
                        "skipped_rates": [],
                    }
                    continue
                affinities = server.affinities()
                pin_checks[name] = {"processes": len(affinities), "cpus": sorted({c for v in affinities.values() for c in v})}
                print(
                    f"{name}: ready in {ready:.1f} s on {server.url}; {len(affinities)} process(es) on CPU(s) "
                    f"{pin_checks[name]['cpus']}",
                    file=sys.stderr,
                    flush=True,
                )
                services[name] = asyncio.run(measure_service(server, expected, singles, batches, args))
                services[name]["ready_seconds"] = round(ready, 1)
                services[name]["runtime"] = served_runtime(server)
                if any(r.error_count for r in services[name]["runs"]) or services[name]["warm_up_errors"]:
                    # evidence for the report, without this machine's paths
                    tail = server.log_tail(60).replace(str(tmp), "<tmp>").replace(str(ROOT), ".")
                    services[name]["server_log_tail"] = tail
            finally:
                server.stop()

    ratios = compare(services, in_process["results"], args.batch)
    print()
    print(in_process_table(in_process["results"]))
    print()
    print(load_table(services))
    print()
    print_summary(ratios, services, in_process["results"], args.batch, args.clients, ref.version)
    print(
        f"(2 CPU cores shared by server and load generator; {pinning}; niceness {os.nice(0)}; "
        f"load average before {load_before[0]:.2f}; TensorFlow threads in-process {in_process['tf_threads']}; "
        "latency from the scheduled send time in the open loop)"
    )
    if args.quick:
        print("(--quick: smoke run, the figures mean nothing)")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "benchmark": "serving_latency",
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": {
                    **machine(),
                    **{name: _version(name) for name in ("bentoml", "keras", "aiohttp", "ai-edge-litert", "uvloop")},
                    "niceness": os.nice(0),
                    "load_average_before": [round(x, 2) for x in load_before],
                },
                "quick": args.quick,
                "pinning": {"used": cpus is not None, "description": pinning, "servers": pin_checks},
                "model": {"uri": ref.uri, "version": ref.version, "run_id": ref.run_id, "source": model_note},
                "settings": {
                    "rates": args.rates,
                    "seconds": args.seconds,
                    "warmup_seconds": args.warmup,
                    "clients": args.clients,
                    "batch": args.batch,
                    "timeout_seconds": args.timeout,
                    "image_pool": pool_size,
                    "in_process_calls": calls,
                },
                "targets": {
                    "p99_ms_at_rate": {"rate": TARGET_RATE, "p99_ms": TARGET_P99_MS},
                    "throughput_ratio_vs_naive": TARGET_THROUGHPUT_RATIO,
                },
                "in_process": in_process["results"],
                "in_process_tf_threads": in_process["tf_threads"],
                "services": {
                    name: {**{k: v for k, v in s.items() if k != "runs"}, "runs": [asdict(r) for r in s["runs"]]}
                    for name, s in services.items()
                },
                "ratios": ratios,
                "versions_answering": {name: answering(s) for name, s in services.items()},
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")
    return 0


def _version(name: str) -> str | None:
    try:
        return package_version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
