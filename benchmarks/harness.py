"""What the benchmarks share: the command line, the results file, CPU pinning, servers, load.

A script run as ``python benchmarks/<script>.py`` imports it as ``harness``. Import it before any
project module: it quiets TensorFlow's C++ logging and MLflow's progress bars, which are read when
those libraries load.

* ``command_line`` -- an ``argparse`` parser with the ``--quick`` and ``--output`` every script has;
* ``write_results`` -- the JSON a benchmark writes: its figures, when, and on what machine;
* ``split_cpus`` / ``pin_this_process`` / ``pinned`` -- one CPU for a server, another for the client;
* ``serve`` -- a server subprocess on 127.0.0.1, in its own process group, ready when a URL answers
  200, and stopped with every process it started;
* ``LoadClient`` -- an open loop at a fixed rate and a closed loop of concurrent clients, both bounded
  in requests and time; ``latency_ms`` turns their latencies into percentiles;
* ``suite_families`` / ``suite_accuracies`` -- the out-of-distribution suite, normalised once through
  the service's photo path, and a model's accuracy on each family;
* ``table`` / ``say`` -- a text table for stdout, a progress line for stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
HOST = "127.0.0.1"
# a load loop refuses to send more than this, whatever its rate and length
MAX_REQUESTS = 1_000_000


# ---------------------------------------------------------------- command line and results


def command_line(doc: str, output: Path, quick: str) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of ``doc``, with ``--quick`` (help ``quick``) and ``--output``."""
    result = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    result.add_argument("--quick", action="store_true", help=quick)
    result.add_argument("--output", type=Path, default=output, help=f"the JSON file to write (default {output.name})")
    return result


def fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def say(text: str) -> None:
    """A progress line, on stderr: stdout holds the tables."""
    print(text, file=sys.stderr, flush=True)


def table(columns: Sequence[tuple[str, str]], rows: Iterable[Sequence[object]]) -> str:
    """A text table under a rule: ``columns`` are (header, format spec: "<20", ">8.2f", ...); None shows "-"."""
    shapes = [re.match(r"([<>^]?)(\d*)", spec).groups() for _, spec in columns]
    head = " ".join(format(name, f"{align or '<'}{width}") for (name, _), (align, width) in zip(columns, shapes, strict=True))
    lines = [head.rstrip(), "-" * len(head.rstrip())]
    for row in rows:
        cells = [
            format("-", f"{align or '>'}{width}") if value is None else format(value, spec)
            for value, (_, spec), (align, width) in zip(row, columns, shapes, strict=True)
        ]
        lines.append(" ".join(cells).rstrip())
    return "\n".join(lines)


def cpu_description() -> str:
    """The CPU's model name and widest vector instructions: figures move with them between machines."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = {key.strip(): value for key, value in (line.split(":", 1) for line in info.splitlines() if ":" in line)}
    name = " ".join(fields.get("model name", platform.machine()).split())
    flags = set(fields.get("flags", "").split())
    vectors = [f for f in ("avx512f", "avx512_bf16", "amx_tile", "avx2") if f in flags]
    return f"{name} ({', '.join(vectors) or 'no AVX'})"


def package_versions(*names: str) -> dict[str, str | None]:
    """Installed version of each package, None for one that is not installed."""
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu_description(),
        "python": platform.python_version(),
        "tensorflow": version("tensorflow-cpu"),
    }


def write_results(path: Path, benchmark: str, machine_extra: dict | None = None, **figures: object) -> None:
    """Write ``figures`` to ``path`` as JSON with the benchmark's name, a timestamp and the machine."""
    record = {
        "benchmark": benchmark,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {**machine(), **(machine_extra or {})},
        **figures,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


# ---------------------------------------------------------------- CPUs and processes


def split_cpus(no_pin: bool) -> tuple[set[int], set[int]] | None:
    """(server CPUs, client CPUs): the first allowed CPU and the second; None when not pinning."""
    if no_pin:
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        say(f"only CPU {allowed} is available to this process: server and client are not pinned")
        return None
    return {allowed[0]}, {allowed[1]}


def pin_this_process(cpus: set[int]) -> None:
    """Pin every thread of this process (sched_setaffinity(0) alone moves only the calling thread)."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


def pinned(cpus: set[int] | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that pins a child before it execs, so every process it starts stays on ``cpus``."""
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat from "state" on (the name before them may hold spaces)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def descendants(root: int) -> list[int]:
    """``root`` and every process under it, found by parent pid (a server's workers may start sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return sorted(found)


def cpu_seconds(pids: Sequence[int]) -> float:
    """User and system CPU time of ``pids``, the processes that still exist."""
    ticks = 0
    for pid in pids:
        if (fields := _stat(pid)) is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def listening_ports(pids: Sequence[int]) -> list[int]:
    """The TCP ports of 127.0.0.1 that ``pids`` listen on (psutil comes with BentoML and DVC)."""
    import psutil

    found = set()
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            for connection in psutil.Process(pid).net_connections(kind="tcp4"):
                if connection.status == psutil.CONN_LISTEN and connection.laddr.ip == HOST:
                    found.add(connection.laddr.port)
    return sorted(found)


def get_json(url: str, timeout: float = 30.0) -> object | None:
    """The JSON a GET of ``url`` on this machine answers, None when it does not."""
    _local(url)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, ValueError, OSError):
        return None


def _local(url: str) -> None:
    if urllib.parse.urlsplit(url).hostname != HOST:
        raise ValueError(f"benchmarks only talk to {HOST}, not {url}")


class ServerNotReady(RuntimeError):
    """The server exited, or did not answer 200 in time, before any measurement."""


@dataclass
class Server:
    """A running server subprocess: its address, its processes, their CPU time."""

    name: str
    port: int
    log_path: Path
    process: subprocess.Popen | None = None
    ready_seconds: float | None = None
    seen: dict[int, str] = field(default_factory=dict)  # pid -> start time, of every process found under it

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def pids(self) -> list[int]:
        if self.process is None or self.process.poll() is not None:
            return []
        pids = descendants(self.process.pid)
        for pid in pids:
            if (fields := _stat(pid)) is not None:
                self.seen.setdefault(pid, fields[19])
        return pids

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pids())

    def affinities(self) -> dict[int, list[int]]:
        found = {}
        for pid in self.pids():
            with contextlib.suppress(OSError):
                found[pid] = sorted(os.sched_getaffinity(pid))
        return found

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, path: str, timeout: float) -> None:
        """Poll ``path`` until it answers 200; fail as soon as the process exits. A server started on port 0
        binds a free port itself (and BentoML prints 0): its port is the one of its listening sockets that answers."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise ServerNotReady(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            for port in [self.port] if self.port else listening_ports(self.pids()):
                try:
                    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=2) as response:
                        if response.status == 200:
                            self.port, self.ready_seconds = port, time.monotonic() - started
                            return
                except urllib.error.HTTPError:  # an HTTP server all the same (503 until the model is loaded)
                    self.port = port
                except (urllib.error.URLError, OSError, http.client.HTTPException):  # not yet, or not HTTP
                    pass
            time.sleep(0.25)
        raise ServerNotReady(f"{self.name}: {self.url}{path} did not answer 200 within {timeout:.0f} s:\n{self.log_tail()}")

    async def settle(self, timeout: float = 60.0, idle_share: float = 0.2) -> float:
        """Wait until the server uses less than ``idle_share`` of a CPU, so that a backlog left by
        abandoned requests drains before the next load; returns the seconds waited."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            before = self.cpu_seconds()
            await asyncio.sleep(0.5)
            if self.cpu_seconds() - before < 0.5 * idle_share:
                break
        return time.monotonic() - started

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``grace`` seconds; then SIGKILL to any of its processes left."""
        if self.process is None:
            return
        self.pids()  # note the workers while the server still runs
        group = self.process.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
            self.process.wait(timeout=10)
        deadline = time.monotonic() + 5.0
        while (left := self._left()) and time.monotonic() < deadline:
            time.sleep(0.25)  # workers in sessions of their own stop when their server does, a little later
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _left(self) -> list[int]:
        """Processes of the server's group, or seen under it, that still run (a pid seen with another
        start time was reused: not ours)."""
        group = str(self.process.pid)
        alive = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (fields := _stat(int(entry))) is not None and fields[0] != "Z":
                pid = int(entry)
                if fields[2] == group or self.seen.get(pid) == fields[19]:
                    alive.append(pid)
        return alive


@contextlib.contextmanager
def serve(
    command: Callable[[int], Sequence[str]],
    *,
    name: str,
    env: dict[str, str],
    log_path: Path,
    cwd: Path = ROOT,
    cpus: set[int] | None = None,
    ready_path: str = "/readyz",
    ready_timeout: float = 600.0,
    binds_port_zero: bool = True,
) -> Iterator[Server]:
    """Run ``command(0)`` on 127.0.0.1 until the block ends: the server binds a free port itself (no other process
    can take it between a choice and the bind), read back from its listening sockets. Ready once ``ready_path``
    answers 200, else ``ServerNotReady``. Its output goes to ``log_path``.

    ``binds_port_zero=False``, for a server that takes 0 as "no port given" (``mlflow models serve`` then listens
    on uvicorn's default, 8000): a free port is chosen, and another one when the server finds it taken."""
    for attempt in range(3):
        server = Server(name, 0 if binds_port_zero else free_port(), log_path)
        try:
            with open(log_path, "wb") as log:
                server.process = subprocess.Popen(
                    list(command(server.port)),
                    cwd=cwd,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group, so that stop() reaches every process it starts
                    preexec_fn=pinned(cpus),
                )
            try:
                server.wait_ready(ready_path, ready_timeout)
            except ServerNotReady:
                taken = "address already in use" in server.log_tail().lower()
                if binds_port_zero or not taken or attempt == 2:
                    raise
                say(f"{name}: port {server.port} was taken before the server bound it; again on another port")
                continue
            yield server
            return
        finally:
            server.stop()


def free_port() -> int:
    """A port nobody listens on now (another process may take it before the server binds it: see ``serve``)."""
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- load


def latency_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50, p99, max and mean of ``seconds``, in milliseconds."""
    if not seconds:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None}
    a = np.asarray(seconds) * 1000.0
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p99_ms": round(float(np.percentile(a, 99)), 3),
        "max_ms": round(float(a.max()), 3),
        "mean_ms": round(float(a.mean()), 3),
    }


# check(request index, the answer's JSON) -> why the answer is wrong, or None
Check = Callable[[int, object], str | None]


@dataclass
class Load:
    """What one loop measured: the good answers' latencies and the errors by kind."""

    seconds: float = 0.0  # the measuring window
    requests: int = 0  # requests measured (open loop: scheduled; closed loop: started in the window)
    latencies: list[float] = field(default_factory=list)  # seconds, of the answers that passed the check
    errors: Counter[str] = field(default_factory=Counter)  # "HTTP 503", "timeout", "bad answer", ... -> count
    error_samples: list[str] = field(default_factory=list)  # the first few, with their detail
    lags: list[float] = field(default_factory=list)  # open loop: how late each request left its schedule
    client_cpu_seconds: float = 0.0  # CPU time of this process in the window
    server_cpu_seconds: float | None = None  # CPU time of the server's processes in the window

    @property
    def ok(self) -> int:
        return len(self.latencies)

    def add(self, outcome: tuple[str | None, str], seconds: float, measured: bool = True) -> None:
        """Count one request; outside the window (``measured=False``) only its error counts, as "warm-up ..."."""
        error, detail = outcome
        self.requests += measured
        if error is None:
            if measured:
                self.latencies.append(seconds)
            return
        kind = error if measured else f"warm-up {error}"
        self.errors[kind] += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(f"{kind}: {detail}"[:300])


class LoadClient:
    """HTTP POSTs of JSON bodies to one URL on 127.0.0.1, in open or closed loops; use as ``async with``."""

    def __init__(self, url: str, timeout: float, connections: int = 256) -> None:
        _local(url)
        self.url, self.timeout, self.connections = url, timeout, connections
        self.session = None

    async def __aenter__(self) -> LoadClient:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=self.connections)
        self.session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def post(self, body: bytes, deadline: float, index: int = 0, check: Check | None = None) -> tuple[str | None, str]:
        """One request, answered by ``deadline`` (loop time): (error kind or None, detail)."""
        import aiohttp

        try:
            async with asyncio.timeout_at(deadline):
                async with self.session.post(self.url, data=body, headers={"Content-Type": "application/json"}) as response:
                    status, payload = response.status, await response.read()
        except TimeoutError:
            return "timeout", f"no answer within {self.timeout:.0f} s of the scheduled send"
        except (aiohttp.ClientError, OSError) as err:
            return type(err).__name__, str(err)
        if status != 200:
            return f"HTTP {status}", payload[:200].decode(errors="replace")
        try:
            answer = json.loads(payload)
        except ValueError:
            return "bad answer", f"not JSON: {payload[:100]!r}"
        wrong = check(index, answer) if check else None
        return ("bad answer", wrong) if wrong else (None, "")

    async def open_loop(
        self, bodies: Sequence[bytes], rate: float, seconds: float, check: Check | None = None, server: Server | None = None
    ) -> Load:
        """``rate`` requests a second for ``seconds``, sent on schedule whatever the answers; latency counts
        from each request's scheduled send, so a stalled server cannot hide by slowing the client."""
        count = _bounded(max(1, round(rate * seconds)), seconds)
        loop = asyncio.get_running_loop()
        load = Load()
        start = loop.time() + 0.05
        cpu, server_cpu = time.process_time(), server.cpu_seconds() if server else None
        last = start

        async def one(i: int, at: float) -> None:
            nonlocal last
            load.lags.append(loop.time() - at)
            outcome = await self.post(bodies[i % len(bodies)], at + self.timeout, i, check)
            now = loop.time()
            load.add(outcome, now - at)
            last = max(last, now)

        tasks = []
        for i in range(count):
            at = start + i / rate
            if (delay := at - loop.time()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, at)))
        await asyncio.gather(*tasks)
        load.seconds = max(last - start, count / rate)
        load.client_cpu_seconds = time.process_time() - cpu
        load.server_cpu_seconds = server.cpu_seconds() - server_cpu if server else None
        return load

    async def closed_loop(
        self,
        bodies: Sequence[bytes],
        clients: int,
        seconds: float,
        warmup: float = 0.0,
        requests: int = MAX_REQUESTS,
        check: Check | None = None,
        server: Server | None = None,
    ) -> Load:
        """``clients`` clients, each sending its next request when its last is answered, for ``warmup``
        seconds unmeasured and then ``seconds`` (or until ``requests`` were sent); ``check`` judges the
        measured answers. Requests started in the window count even when answered after it."""
        requests = _bounded(requests, warmup + seconds)
        loop = asyncio.get_running_loop()
        load = Load()
        measure_from = loop.time() + warmup
        stop_at = measure_from + seconds
        marks: dict[str, tuple[float, float | None]] = {}

        def mark(edge: str) -> None:  # CPU times at the window's edges, not the warm-up's or the tail's
            marks.setdefault(edge, (time.process_time(), server.cpu_seconds() if server else None))

        edges = [loop.call_at(measure_from, mark, "from"), loop.call_at(stop_at, mark, "to")]
        sent = 0

        async def client(c: int) -> None:
            nonlocal sent
            i = c
            while (started := loop.time()) < stop_at and sent < requests:
                sent += 1
                measured = started >= measure_from
                outcome = await self.post(bodies[i % len(bodies)], started + self.timeout, i, check if measured else None)
                load.add(outcome, loop.time() - started, measured)
                i += clients

        await asyncio.gather(*(client(c) for c in range(clients)))
        for handle in edges:
            handle.cancel()
        mark("from")  # a loop ended by its request bound before an edge: the edge is now
        mark("to")
        (cpu_from, server_from), (cpu_to, server_to) = marks["from"], marks["to"]
        load.seconds = min(seconds, max(loop.time() - measure_from, 1e-9))
        load.client_cpu_seconds = cpu_to - cpu_from
        load.server_cpu_seconds = server_to - server_from if server else None
        return load


def _bounded(requests: int, seconds: float) -> int:
    if not (0 < requests <= MAX_REQUESTS and 0 <= seconds < math.inf):
        raise ValueError(f"a load loop must be bounded: {requests} requests over {seconds} s")
    return requests


def suite_families(x_test: np.ndarray, y_test: np.ndarray, size: int) -> dict[str, tuple[object, np.ndarray]]:
    """Every family of ``pipeline.suite``, rendered and normalised once: ``{name: (normalised, labels)}``."""
    from pipeline import suite

    started = time.perf_counter()
    built = suite.build_suite(x_test, y_test, size)
    families = {name: (suite.to_pixels(family), family.labels) for name, family in built.items()}
    say(f"suite: {len(families)} families of {size}, normalised in {time.perf_counter() - started:.0f} s")
    return families


def accuracy(predict: Callable, pixels: np.ndarray, labels: np.ndarray, refused: np.ndarray | None = None) -> float:
    """The share of ``pixels`` a model's predictor gets right; refused images (the photo path's errors) count as wrong."""
    from pipeline.evaluate import predict_classes

    right = predict_classes(predict, pixels)[1] == labels
    return float(np.mean(right & ~refused) if refused is not None else np.mean(right))


def suite_accuracies(predict: Callable, families: dict[str, tuple[object, np.ndarray]]) -> dict[str, float]:
    """A predictor's accuracy on each family of ``suite_families``."""
    return {name: accuracy(predict, n.pixels, labels, n.refused) for name, (n, labels) in families.items()}
