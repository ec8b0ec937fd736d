"""Soak: the service under steady load for minutes, with hot swaps, hostile uploads and the prediction log on.

Run from the project folder:

    .venv/bin/python benchmarks/soak.py [--minutes 10] [--rate R | --load-share 0.7] [--promote-every 120]

What it does, in a throw-away project (its own MLflow store, prediction log and MNIST files; nothing of
this project is touched):

1. A promoter child process trains the default architecture of ``params.yaml`` for one epoch on the head
   of MNIST (``--train-images``), logs it as the retraining flow does (the model, its TensorFlow Lite
   exports and calibration) and registers it twice: two versions, A and B, of the same run. A becomes champion through
   the project's own promote path (``app.promotion.override``, what ``digits promote`` runs: re-scored as
   served, floors, smoke check, the alias moved under its lock). The throw-away project's floors are
   lowered, so that a one-epoch model clears them.
2. A real ``bentoml serve serving.service:DigitClassifier`` starts on 127.0.0.1 with the prediction log on
   (a SQLite file in the temporary folder), pinned to the first CPU (``--no-pin``: not pinned); this
   process, the load generator, and the promoter run on the second.
3. Unless ``--rate`` is given, the service's capacity is measured (32 clients, single images, 10 s) and
   the rate set to ``--load-share`` of it.
4. For ``--minutes``, an open loop sends requests on a fixed schedule (latency counts from each
   request's scheduled send, so a stalled server cannot hide): good requests are single MNIST test
   images to ``POST /predict_pixels``; ``--hostile-share`` of them (1 %) are hostile, in turn: an upload
   over the size limit, a file that is not an image, a decompression bomb (a two-tone PNG of 6,300 x
   6,300 pixels, 29 KB on the wire), and wrong fields (a file under ``file`` instead of ``image``; JSON
   without ``pixels``). Every ``--promote-every`` seconds the promoter moves the champion to the other
   version (A -> B -> A ...), through the same promote path.
5. Every 10 s it samples the resident memory (RSS), open files and sockets of every process of the server.

Reported (stdout, and JSON under ``benchmarks/results/``):

* failed good requests: any answer that is not 200 with one prediction (digit 0-9, a registered
  version), a timeout (``--timeout``, 10 s) or a connection error. Must be 0.
* p50 / p99 / max latency of good requests, per minute of the run;
* hostile requests by kind and status: each must get a 4xx; a 5xx, a timeout or a dropped connection
  is a failure;
* resident memory and open files (file descriptors other than sockets) of the serving processes at the
  start of the load and at its end: growth within 10 %. Also from the first sample after the first swap
  to the end: the first swap allocates once what later ones reuse, so this is the figure that shows a
  leak. Sockets are reported apart: they follow the client's keep-alive connections, as many as
  requests were ever in flight at once;
* swaps seen: how often consecutive answers (in order of sending) changed ``model_version``, against
  the promotions made;
* what the prediction log wrote, dropped and failed (``/model``).

Nothing asserts (the test suite runs a one-minute version and asserts on its JSON): the targets are
printed as met or not. ``--quick`` is a smoke run: one minute at 20 requests/s, a promotion every 15 s,
the champion polled every second, a model trained on 3,000 images.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import harness
import numpy as np
from harness import ROOT, LoadClient, fmt, say, table

OUTPUT = harness.RESULTS / "soak.json"
SAMPLE_SECONDS = 10.0
GROWTH_LIMIT = 0.10
CAPACITY_CLIENTS = 32
CAPACITY_SECONDS = 10.0
HOSTILE_KINDS = ("oversized", "not an image", "bomb png", "wrong field (file)", "wrong field (json)")
BOUNDARY = "soakboundary7f3a9c"


# ---------------------------------------------------------------- the throw-away project and its promoter


def project_params(train_images: int) -> dict:
    """The repository's params.yaml for the throw-away project: floors a one-epoch model clears, a small suite
    (``digits promote`` scores the version on it at every promotion)."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    # one epoch of a few thousand images: small batches for enough steps, and an average of the weights over the
    # last ten or so of them, not a hundred (as the test suite's projects train)
    params["train"].update(epochs=1, batch_size=32, ema_momentum=0.9)
    params["model"].update(augment_stroke=0.0)
    params["gate"].update(min_accuracy=0.5, min_class_recall=0.0, min_family_accuracy={})
    params["suite"].update(size=20)
    return params


def make_project(home: Path, train_images: int, test_images: int) -> None:
    """``home``: params.yaml and the head of MNIST as its data (ingested from the repository's cache)."""
    import yaml

    from pipeline.data import has_dataset, ingest, load_dataset
    from pipeline.params import load_params

    source = ROOT / "data"
    if not has_dataset(source):
        source = home / "mnist-source"
        ingest(load_params(ROOT / "params.yaml").data, source, ROOT / ".cache")
    dataset = load_dataset(source).head(train_images, test_images)
    folder = home / "data" / "mnist"
    folder.mkdir(parents=True)
    for split, x, y in (("train", dataset.x_train, dataset.y_train), ("test", dataset.x_test, dataset.y_test)):
        np.save(folder / f"{split}_images.npy", x)
        np.save(folder / f"{split}_labels.npy", y)
    (home / "params.yaml").write_text(yaml.safe_dump(project_params(train_images)))


def promoter_main() -> None:
    """The promoter child (``--promoter``, DIGITS_HOME set): train, log and register two versions, promote the
    first; then one promotion per line of stdin (a version), one JSON line on stdout for each."""
    import keras
    import serving_latency

    from app import promotion
    from pipeline import registry
    from pipeline.data import load_dataset
    from pipeline.params import load_params
    from pipeline.preprocess import to_model_input
    from pipeline.settings import get_settings
    from pipeline.train import compiled_predictor, train

    def answer(record: dict) -> None:
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()

    settings = get_settings()
    params = load_params(settings.home / "params.yaml")
    keras.utils.disable_interactive_logging()
    dataset = load_dataset(settings.data_dir)
    model = train(dataset, params).model
    probabilities = compiled_predictor(model)(to_model_input(dataset.x_test))
    accuracy = float((probabilities.argmax(1) == dataset.y_test).mean())
    first, _ = serving_latency.log_and_register(model, dataset, probabilities, accuracy, params, int8_softmax=False)
    # the second version is the same logged model registered again: a swap loads it all the same, and the model is
    # logged (its exports built and checked) once
    client = registry.store_client(settings)
    source = client.get_model_version(settings.model_name, first.version).source
    second = registry.register(client, settings.model_name, source, first.run_id, {"data_version": "soak"})
    versions = [first.version, second.version]
    first = promotion.override(settings, params, versions[0], allow_regression=True)
    champion = first.champion.version if first.champion else None
    answer({"versions": versions, "accuracy": accuracy, "champion": champion, "reasons": list(first.decision.reasons)})
    for line in sys.stdin:
        version = line.strip()
        started = time.monotonic()
        try:
            outcome = promotion.override(settings, params, version, allow_regression=True)
            champion = outcome.champion.version if outcome.champion else None
            record = {"version": version, "champion": champion, "seconds": round(time.monotonic() - started, 2)}
            if champion != version:
                record["error"] = "refused: " + "; ".join(outcome.decision.reasons)
            answer(record)
        except Exception as err:  # reported by the parent, which goes on
            answer({"version": version, "error": f"{type(err).__name__}: {err}", "seconds": round(time.monotonic() - started, 2)})


class Promoter:
    """The promoter child: its two versions, and a blocking ``promote``."""

    def __init__(self, env: dict[str, str], cpus: set[int] | None, log_path: Path, timeout: float) -> None:
        command = [sys.executable, str(Path(__file__).resolve()), "--promoter"]
        self.log = open(log_path, "wb")
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            preexec_fn=harness.pinned(cpus),
        )
        ready = self._read(timeout)
        if "versions" not in ready:
            raise RuntimeError(f"the promoter did not register its versions: {ready}")
        self.versions: list[str] = ready["versions"]
        self.accuracy: float = ready["accuracy"]
        if ready.get("champion") != self.versions[0]:
            raise RuntimeError(f"the first promotion did not make v{self.versions[0]} champion: {ready}")
        self.log_path = log_path

    def _read(self, timeout: float) -> dict:
        import selectors

        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                raise RuntimeError(f"the promoter did not answer within {timeout:.0f} s")
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the promoter exited ({self.process.poll()}); see {self.log.name}")
        return json.loads(line)

    def promote(self, version: str, timeout: float = 600.0) -> dict:
        self.process.stdin.write(version + "\n")
        self.process.stdin.flush()
        return self._read(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


# ---------------------------------------------------------------- requests


def multipart(field_name: str, filename: str, content: bytes, content_type: str = "image/png") -> tuple[bytes, str]:
    """A multipart form with one file, built once (no encoding cost per request): (body, Content-Type)."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field_name}"; filename="{filename}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode()
    return head + content + f"\r\n--{BOUNDARY}--\r\n".encode(), f"multipart/form-data; boundary={BOUNDARY}"


def bomb_png(side: int = 6300) -> bytes:
    """A two-tone PNG of ``side`` x ``side`` pixels: a few dozen KB on the wire, tens of MB once decoded."""
    from PIL import Image, ImageDraw

    image = Image.new("1", (side, side), 1)
    ImageDraw.Draw(image).rectangle((side // 3, side // 3, 2 * side // 3, 2 * side // 3), fill=0)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def digit_png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class Request:
    kind: str  # "good" or one of HOSTILE_KINDS
    path: str
    body: bytes
    content_type: str


def hostile_requests(sample: np.ndarray) -> dict[str, Request]:
    """One request of each hostile kind; ``sample``: a real digit (what a wrong field carries)."""
    from pipeline.preprocess import MAX_BYTES

    png = digit_png(sample)
    oversized = png + os.urandom(MAX_BYTES + 1024 - len(png))
    built = {
        "oversized": ("/predict", *multipart("image", "big.png", oversized)),
        "not an image": ("/predict", *multipart("image", "notes.png", b"this is not an image\n" * 200, "text/plain")),
        "bomb png": ("/predict", *multipart("image", "bomb.png", bomb_png())),
        "wrong field (file)": ("/predict", *multipart("file", "digit.png", png)),
        "wrong field (json)": ("/predict_pixels", json.dumps({"pixel": sample.tolist()}).encode(), "application/json"),
    }
    return {kind: Request(kind, path, body, content_type) for kind, (path, body, content_type) in built.items()}


def good_requests(images: np.ndarray) -> list[Request]:
    return [
        Request("good", "/predict_pixels", json.dumps({"pixels": p.tolist()}, separators=(",", ":")).encode(), "application/json")
        for p in images
    ]


@dataclass
class Outcome:
    at: float  # scheduled send, seconds from the start of the load
    kind: str
    latency: float | None  # seconds from the scheduled send to the answer (None: no answer)
    status: str  # "200", "413", ..., "timeout", "ClientOSError"
    version: str | None = None  # the model version that answered (good requests)
    digit_right: bool | None = None
    problem: str | None = None  # why a good request failed, or a hostile one was answered wrongly


def judge_good(status: int, payload: bytes, label: int, versions: set[str]) -> tuple[str | None, str | None, bool | None]:
    """(problem or None, model version, digit right) of a good request's answer."""
    if status != 200:
        return f"HTTP {status}: {payload[:200].decode(errors='replace')}", None, None
    try:
        answers = json.loads(payload)
        (answer,) = answers
        digit, version = int(answer["digit"]), str(answer["model_version"])
    except (ValueError, TypeError, KeyError):
        return f"bad answer: {payload[:200].decode(errors='replace')}", None, None
    if not 0 <= digit <= 9 or version not in versions:
        return f"bad answer: digit {digit}, version {version}", version, None
    return None, version, digit == label


async def send(session, url: str, request: Request, deadline: float) -> tuple[str, bytes, str | None]:
    """(status or error kind, payload, error detail)."""
    import aiohttp

    try:
        async with asyncio.timeout_at(deadline):
            async with session.post(url + request.path, data=request.body, headers={"Content-Type": request.content_type}) as r:
                return str(r.status), await r.read(), None
    except TimeoutError:
        return "timeout", b"", "no answer in time"
    except (aiohttp.ClientError, OSError) as err:
        return type(err).__name__, b"", str(err)[:200]


# ---------------------------------------------------------------- the soak


@dataclass
class Sample:
    at: float  # seconds from the start of the load
    rss_mb: float
    open_files: int  # file descriptors other than sockets: files, pipes, the log's database
    sockets: int  # mostly the client's keep-alive connections, as many as requests were ever in flight at once
    processes: int


def sample_server(server: harness.Server, at: float) -> Sample:
    """Resident memory, open files and sockets of every process of the server, summed."""
    page = os.sysconf("SC_PAGE_SIZE")
    rss, files, sockets, pids = 0, 0, 0, server.pids()
    for pid in pids:
        try:
            rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):  # closed between the listing and the reading
                    if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                        sockets += 1
                    else:
                        files += 1
        except (OSError, IndexError, ValueError):
            continue  # a process that ended between the listing and the reading
    return Sample(round(at, 1), round(rss / 2**20, 1), files, sockets, len(pids))


@dataclass
class Soak:
    rate: float
    seconds: float
    promote_every: float
    hostile_share: float
    timeout: float
    outcomes: list[Outcome] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    promotions: list[dict] = field(default_factory=list)
    send_lag_max: float = 0.0
    client_cpu_seconds: float = 0.0
    server_cpu_seconds: float = 0.0


async def run_soak(
    soak: Soak, server: harness.Server, promoter: Promoter, goods: list[Request], labels: np.ndarray, hostile: dict
) -> None:
    import aiohttp

    versions = set(promoter.versions)
    rng = random.Random(42)
    count = harness._bounded(max(1, round(soak.rate * soak.seconds)), soak.seconds)
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.5
    cpu, server_cpu = time.process_time(), server.cpu_seconds()
    connector = aiohttp.TCPConnector(limit=512)

    async def one(session, i: int, at: float, request: Request, label: int) -> None:
        soak.send_lag_max = max(soak.send_lag_max, loop.time() - at)
        status, payload, detail = await send(session, server.url, request, at + soak.timeout)
        answered = loop.time() - at if status not in ("timeout",) and status.isdigit() else None
        outcome = Outcome(round(at - start, 4), request.kind, answered, status)
        if request.kind == "good":
            if detail is not None:
                outcome.problem = f"{status}: {detail}"
            else:
                outcome.problem, outcome.version, outcome.digit_right = judge_good(int(status), payload, label, versions)
        elif not (status.isdigit() and 400 <= int(status) < 500):  # a hostile request must get a 4xx
            outcome.problem = f"{status}: {detail or payload[:200].decode(errors='replace')}"
        soak.outcomes.append(outcome)

    async def sampler() -> None:
        while True:  # in a thread: listing every process of the machine must not hold up the schedule
            soak.samples.append(await asyncio.to_thread(sample_server, server, max(0.0, loop.time() - start)))
            await asyncio.sleep(SAMPLE_SECONDS)

    async def promotions() -> None:
        turn = 1  # A is champion: B next
        while True:
            next_at = start + soak.promote_every * (len(soak.promotions) + 1)
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            if next_at - start >= soak.seconds:
                return
            version = promoter.versions[turn % 2]
            began = loop.time() - start
            record = await asyncio.to_thread(promoter.promote, version)
            soak.promotions.append({"at": round(began, 1), **record})
            result = record.get("champion") or record.get("error")
            say(f"  promotion at {began:.0f} s: v{version} -> champion {result} in {record['seconds']} s")
            turn += 1

    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        background = [asyncio.create_task(sampler()), asyncio.create_task(promotions())]
        tasks, kinds = [], 0
        for i in range(count):
            at = start + i / soak.rate
            if (delay := at - loop.time()) > 0:
                await asyncio.sleep(delay)
            if rng.random() < soak.hostile_share:
                request, label = hostile[HOSTILE_KINDS[kinds % len(HOSTILE_KINDS)]], -1
                kinds += 1
            else:
                request, label = goods[i % len(goods)], int(labels[i % len(goods)])
            tasks.append(asyncio.create_task(one(session, i, at, request, label)))
            if i % 1000 == 999:  # keep the task list short
                tasks = [t for t in tasks if not t.done()]
        await asyncio.gather(*tasks)
        soak.samples.append(sample_server(server, loop.time() - start))
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
    soak.client_cpu_seconds = time.process_time() - cpu
    soak.server_cpu_seconds = server.cpu_seconds() - server_cpu
    soak.outcomes.sort(key=lambda o: o.at)


async def measure_capacity(server: harness.Server, goods: list[Request]) -> float:
    """Single-image requests per second the service answers to 32 concurrent clients."""
    async with LoadClient(server.url + "/predict_pixels", 10.0, 2 * CAPACITY_CLIENTS) as client:
        load = await client.closed_loop([g.body for g in goods], CAPACITY_CLIENTS, CAPACITY_SECONDS, warmup=2.0)
    await server.settle()
    return load.ok / load.seconds


async def warm_up(server: harness.Server, goods: list[Request]) -> None:
    async with LoadClient(server.url + "/predict_pixels", 30.0) as client:
        await client.closed_loop([g.body for g in goods], 1, 60.0, requests=20)


# ---------------------------------------------------------------- figures


def per_minute(soak: Soak) -> list[dict]:
    rows = []
    for minute in range(max(1, int(np.ceil(soak.seconds / 60)))):
        window = [o for o in soak.outcomes if minute * 60 <= o.at < (minute + 1) * 60]
        good = [o for o in window if o.kind == "good"]
        latencies = [o.latency for o in good if o.problem is None]
        rows.append(
            {
                "minute": minute + 1,
                "good": len(good),
                "failed_good": sum(o.problem is not None for o in good),
                "hostile": len(window) - len(good),
                "failed_hostile": sum(o.problem is not None for o in window if o.kind != "good"),
                **harness.latency_ms(latencies),
                "versions": sorted({o.version for o in good if o.version}),
            }
        )
    return rows


def swaps_seen(outcomes: list[Outcome]) -> int:
    """How often the answering version changed, along the good answers in order of sending."""
    versions = [o.version for o in outcomes if o.kind == "good" and o.version]
    return sum(a != b for a, b in zip(versions, versions[1:], strict=False))


def growth(samples: list[Sample], first_swap_at: float | None) -> dict:
    """Growth from the start of the load to its end; and from the first sample after the first swap, which is the
    leak measure: the first swap loads a version while another answers, and what it allocates once (TensorFlow's
    functions, the allocator's arenas) stays."""
    first, last = samples[0], samples[-1]
    ratio = lambda a, b: round(b / a - 1, 4) if a else None  # noqa: E731
    settled = next((s for s in samples if first_swap_at is not None and s.at >= first_swap_at + 1.0), None)
    return {
        "start": asdict(first),
        "after_first_swap": asdict(settled) if settled else None,
        "end": asdict(last),
        "max_rss_mb": max(s.rss_mb for s in samples),
        "rss_growth": ratio(first.rss_mb, last.rss_mb),
        "open_files_growth": ratio(first.open_files, last.open_files),
        "rss_growth_after_first_swap": ratio(settled.rss_mb, last.rss_mb) if settled and settled is not last else None,
        "open_files_growth_after_first_swap": ratio(settled.open_files, last.open_files)
        if settled and settled is not last
        else None,
    }


def first_swap(outcomes: list[Outcome]) -> float | None:
    """When (scheduled send) the first answer came from another version than the first answers'."""
    good = [o for o in outcomes if o.kind == "good" and o.version]
    return next((o.at for o in good if o.version != good[0].version), None) if good else None


def summarise(soak: Soak, promoter: Promoter, prediction_log: dict | None) -> dict:
    good = [o for o in soak.outcomes if o.kind == "good"]
    failed = [o for o in good if o.problem is not None]
    hostile: dict[str, Counter] = {kind: Counter() for kind in HOSTILE_KINDS}
    hostile_failures = []
    for o in soak.outcomes:
        if o.kind != "good":
            hostile[o.kind][o.status] += 1
            if o.problem:
                hostile_failures.append(f"{o.kind}: {o.problem}")
    resources = growth(soak.samples, first_swap(soak.outcomes))
    made = [p for p in soak.promotions if "error" not in p]
    seen = swaps_seen(soak.outcomes)
    within = lambda g: g is not None and g <= GROWTH_LIMIT  # noqa: E731
    return {
        "requests": len(soak.outcomes),
        "good_requests": len(good),
        "failed_good_requests": len(failed),
        "failed_good_samples": [f"at {o.at:.1f} s: {o.problem}" for o in failed[:10]],
        "good_latency_ms": harness.latency_ms([o.latency for o in good if o.problem is None]),
        "digit_accuracy": round(float(np.mean([o.digit_right for o in good if o.digit_right is not None] or [0])), 4),
        "per_minute": per_minute(soak),
        "hostile": {kind: dict(statuses) for kind, statuses in hostile.items()},
        "failed_hostile_requests": len(hostile_failures),
        "failed_hostile_samples": hostile_failures[:10],
        "resources": resources,
        "resource_samples": [asdict(s) for s in soak.samples],
        "promotions": soak.promotions,
        "promotions_made": len(made),
        "swaps_seen": seen,
        "versions_answering": sorted({o.version for o in good if o.version}),
        "prediction_log": prediction_log,
        "send_lag_max_ms": round(soak.send_lag_max * 1000, 1),
        "client_cpu_seconds": round(soak.client_cpu_seconds, 1),
        "server_cpu_seconds": round(soak.server_cpu_seconds, 1),
        "targets": {
            "zero_failed_good_requests": not failed,
            "zero_failed_hostile_requests": not hostile_failures,
            "rss_growth_within_10_percent": within(resources["rss_growth"]),
            "open_files_growth_within_10_percent": within(resources["open_files_growth"]),
            "rss_growth_after_first_swap_within_10_percent": within(resources["rss_growth_after_first_swap"]),
            "every_promotion_seen": seen >= len(made) > 0 if made else None,
        },
    }


def report(figures: dict, soak: Soak) -> None:
    columns = [("minute", ">6"), ("good", ">7"), ("failed", ">6"), ("hostile", ">7"), ("h.fail", ">6")]
    columns += [("p50 ms", ">8.2f"), ("p99 ms", ">8.2f"), ("max ms", ">8.1f"), ("versions", "<12")]
    rows = [
        (r["minute"], r["good"], r["failed_good"], r["hostile"], r["failed_hostile"], r["p50_ms"], r["p99_ms"], r["max_ms"])
        + (",".join(r["versions"]),)
        for r in figures["per_minute"]
    ]
    print("\n" + table(columns, rows) + "\n")
    res = figures["resources"]
    print(
        f"rate {soak.rate:.1f} requests/s for {soak.seconds:.0f} s: {figures['good_requests']:,} good requests, "
        f"{figures['failed_good_requests']} failed; p99 {fmt(figures['good_latency_ms']['p99_ms'], '.2f')} ms overall"
    )
    for sample in figures["failed_good_samples"][:5]:
        print(f"  failed: {sample}")
    print(f"hostile: {figures['hostile']} ({figures['failed_hostile_requests']} not answered with a 4xx)")
    for sample in figures["failed_hostile_samples"][:5]:
        print(f"  hostile failed: {sample}")
    s, e, a = res["start"], res["end"], res["after_first_swap"]
    print(
        f"server processes: RSS {s['rss_mb']:,.0f} MB -> {e['rss_mb']:,.0f} MB ({fmt(res['rss_growth'], '+.1%')}, "
        f"max {res['max_rss_mb']:,.0f} MB), open files {s['open_files']} -> {e['open_files']} "
        f"({fmt(res['open_files_growth'], '+.1%')}), sockets {s['sockets']} -> {e['sockets']}, "
        f"processes {s['processes']} -> {e['processes']}"
    )
    if a:
        print(
            f"  from the first sample after the first swap ({a['at']:.0f} s): RSS {a['rss_mb']:,.0f} MB -> "
            f"{e['rss_mb']:,.0f} MB ({fmt(res['rss_growth_after_first_swap'], '+.1%')}), open files {a['open_files']} -> "
            f"{e['open_files']} ({fmt(res['open_files_growth_after_first_swap'], '+.1%')})"
        )
    print(
        f"promotions made {figures['promotions_made']} (of {len(figures['promotions'])} tried), swaps seen in the answers "
        f"{figures['swaps_seen']}; versions answering {figures['versions_answering']}"
    )
    if log := figures["prediction_log"]:
        print(f"prediction log: {harness_log_line(log)}")
    print(
        f"load generator: CPU {figures['client_cpu_seconds']} s, latest send {figures['send_lag_max_ms']} ms behind "
        f"schedule; server CPU {figures['server_cpu_seconds']} s"
    )
    for key, met in figures["targets"].items():
        print(f"target {key}: {'not measured' if met is None else ('met' if met else 'NOT met')}")


def harness_log_line(log: dict) -> str:
    if log.get("problem"):
        return f"not written: {log['problem']}"
    return f"{log.get('written', 0):,} answers written, {log.get('dropped')} dropped, {log.get('failed')} failed"


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = harness.command_line(
        __doc__,
        OUTPUT,
        quick="smoke run: 1 minute at 20 requests/s, a promotion every 15 s, polled every second, a model trained on "
        "3,000 images (figures not comparable)",
    )
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = __doc__
    p.add_argument("--minutes", type=float, default=None, help="minutes of load (default 10; --quick 1)")
    p.add_argument("--rate", type=float, default=None, help="requests/s (default: --load-share of the measured capacity)")
    p.add_argument(
        "--load-share", type=float, default=0.7, help="the rate as a share of the capacity measured first (default 0.7)"
    )
    p.add_argument("--promote-every", type=float, default=None, help="seconds between promotions (default 120; --quick 15)")
    p.add_argument("--hostile-share", type=float, default=0.01, help="share of requests that are hostile (default 0.01)")
    p.add_argument(
        "--poll-seconds", type=float, default=None, help="DIGITS_CHAMPION_POLL_SECONDS of the service (default 10; --quick 1)"
    )
    p.add_argument("--train-images", type=int, default=None, help="MNIST training images of the model (default 20,000)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds before a request counts as failed (default 10)")
    p.add_argument("--no-pin", action="store_true", help="do not pin the server to the first CPU and this process to the second")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds the server and the promoter may take to start")
    p.add_argument("--promoter", action="store_true", help=argparse.SUPPRESS)  # the child
    args = p.parse_args(argv)
    args.minutes = args.minutes or (1.0 if args.quick else 10.0)
    args.promote_every = args.promote_every or (15.0 if args.quick else 120.0)
    args.poll_seconds = args.poll_seconds or (1.0 if args.quick else 10.0)
    args.train_images = args.train_images or (3000 if args.quick else 20_000)
    if args.quick and args.rate is None:
        args.rate = 20.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.promoter:
        try:
            promoter_main()
        except Exception:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        sys.stdout.flush()
        os._exit(0)  # TensorFlow's teardown can take long on a busy machine; nothing is left to do
    import serving_latency

    base_env = dict(os.environ)
    cpus = harness.split_cpus(args.no_pin)
    if cpus:
        harness.pin_this_process(cpus[1])
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp_name:
        tmp = Path(tmp_name)
        home = tmp / "project"
        home.mkdir()
        make_project(home, args.train_images, 2000)
        env = serving_latency.store_env(base_env, home, keep_tracking_uri=False)
        say(f"promoter: training for 1 epoch on {args.train_images:,} images, registering two versions")
        promoter = Promoter(env, cpus[1] if cpus else None, tmp / "promoter.log", args.ready_timeout)
        try:
            say(f"versions {promoter.versions}, test accuracy {promoter.accuracy:.2%}; v{promoter.versions[0]} is champion")
            figures = serve_and_soak(args, env, tmp, promoter, cpus)
        finally:
            promoter.stop()
    harness.write_results(args.output, "soak", machine_extra={"niceness": os.nice(0)}, **figures)
    return 0


def serve_and_soak(args, env: dict[str, str], tmp: Path, promoter: Promoter, cpus) -> dict:
    import serving_latency

    from pipeline.data import load_dataset

    dataset = load_dataset(tmp / "project" / "data")
    goods = good_requests(dataset.x_test[:500])
    labels = dataset.y_test[:500]
    hostile = hostile_requests(dataset.x_test[0])
    server_env = {
        **env,
        "BENTOML_HOME": str(tmp / "bentoml"),
        "DIGITS_LOG_DB_URL": f"sqlite:///{tmp / 'predictions.db'}",  # the prediction log on, in the temporary folder
        "DIGITS_CHAMPION_POLL_SECONDS": f"{args.poll_seconds:g}",
    }
    target = "serving.service:DigitClassifier"
    bentoml = [sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1", "--working-dir", str(ROOT)]
    say(f"starting `bentoml serve {target}`")
    with harness.serve(
        lambda port: [*bentoml, "--port", str(port)],
        name=f"`bentoml serve {target}`",
        env=server_env,
        log_path=tmp / "server.log",
        cpus=cpus[0] if cpus else None,
        ready_timeout=args.ready_timeout,
    ) as server:
        say(f"ready in {server.ready_seconds:.1f} s on {server.url}")
        asyncio.run(warm_up(server, goods))
        capacity = None
        if args.rate is None:
            capacity = asyncio.run(measure_capacity(server, goods))
            args.rate = round(args.load_share * capacity, 1)
            say(f"capacity {capacity:.0f} requests/s (32 clients, single images): soaking at {args.rate:g} requests/s")
        soak = Soak(args.rate, args.minutes * 60, args.promote_every, args.hostile_share, args.timeout)
        say(f"soak: {soak.seconds:.0f} s at {soak.rate:g} requests/s, a promotion every {soak.promote_every:g} s")
        asyncio.run(run_soak(soak, server, promoter, goods, labels, hostile))
        model = serving_latency.served_model(server)
        prediction_log = model.get("prediction_log")
        if prediction_log:
            prediction_log = {k: v for k, v in prediction_log.items() if k != "database"}
        log_tail = server.log_tail(60) if any(o.problem for o in soak.outcomes) else None
    figures = summarise(soak, promoter, prediction_log)
    report(figures, soak)
    if args.quick:
        print("(--quick: smoke run, the figures mean nothing)")
    settings = {
        "minutes": args.minutes,
        "rate": soak.rate,
        "capacity_requests_per_second": None if capacity is None else round(capacity, 1),
        "load_share": args.load_share if capacity else None,
        "promote_every_seconds": soak.promote_every,
        "champion_poll_seconds": args.poll_seconds,
        "hostile_share": soak.hostile_share,
        "timeout_seconds": soak.timeout,
        "train_images": args.train_images,
        "model_test_accuracy": round(promoter.accuracy, 4),
        "pinning": "not pinned" if cpus is None else f"server on CPU {sorted(cpus[0])}, client and promoter on {sorted(cpus[1])}",
    }
    return {"quick": args.quick, "settings": settings, **figures, "server_log_tail": log_tail}


if __name__ == "__main__":
    raise SystemExit(main())
