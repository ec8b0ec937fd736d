"""Commands that start servers stop them, and everything they started, when they are told to stop.

A process manager stops a command with SIGTERM, a closed terminal with SIGHUP, a person with Ctrl+C
(SIGINT). Python's default for the first two is to die at once, leaving the servers a command started
running, bound to their ports; and BentoML's answer to SIGHUP is to reload, not to stop. Here:

* ``run_server`` runs a server as a child in a process group of its own and, on any of the three
  signals, stops it with SIGTERM (SIGINT for Ctrl+C), waits, then kills what is left: the child's
  process group and every process it started (found because this process is their subreaper on Linux,
  so even processes that left the group or outlived their parent come back to it).
* ``interrupt_on_stop_signals`` makes SIGTERM and SIGHUP interrupt a command that runs in this process
  (as Ctrl+C does), so that its ``finally`` blocks and exit handlers stop what it started.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
# how long a server may take to stop on its own before it is killed
GRACE_SECONDS = 20.0
_PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> bool:
    """Have orphaned descendants re-parented to this process rather than to init (Linux), so they can be found."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _descendants() -> list:
    """This process's descendants (psutil comes with BentoML and DVC); [] without psutil."""
    try:
        import psutil
    except ImportError:
        return []
    with contextlib.suppress(psutil.Error):
        return psutil.Process().children(recursive=True)
    return []


def stop_all(process: subprocess.Popen, first: int = signal.SIGTERM, grace: float = GRACE_SECONDS) -> None:
    """Stop ``process`` (started in a process group of its own) and everything it started.

    ``first`` goes to the process, which stops its own children as servers do; after ``grace`` seconds
    what is left of its group and of this process's descendants is killed.
    """
    known = _descendants()
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(first)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.poll() is None:
        process.kill()
    process.wait()
    _kill_left_over(known + _descendants(), grace)


def _kill_left_over(processes: list, grace: float) -> None:
    """Processes that outlived the server: SIGTERM, then SIGKILL after ``grace`` seconds (reaped when they are ours)."""
    if not processes:
        return
    import psutil

    alive = []
    for left in processes:
        with contextlib.suppress(psutil.Error):
            if left.is_running():  # the same process, not a new one under a reused pid
                left.terminate()
                alive.append(left)
    _, still = psutil.wait_procs(alive, timeout=grace)
    for left in still:
        with contextlib.suppress(psutil.Error):
            left.kill()
    psutil.wait_procs(still, timeout=5)


def run_server(command: Sequence[str], env: Mapping[str, str] | None = None, grace: float = GRACE_SECONDS) -> int:
    """Run ``command`` until it exits or this process gets SIGTERM, SIGHUP or SIGINT; then stop it and all it started.

    Returns the server's exit code, or 128 + the signal's number when a signal stopped it.
    """
    _become_subreaper()
    received: list[int] = []

    def on_signal(signum: int, _frame) -> None:
        received.append(signum)

    # set before the child starts: a signal in between is then not lost
    previous = {signum: signal.signal(signum, on_signal) for signum in STOP_SIGNALS}
    try:
        # a process group of its own: a terminal's Ctrl+C reaches this process alone, which passes it on once
        process = subprocess.Popen(list(command), env=dict(env) if env is not None else None, process_group=0)
        try:
            while process.poll() is None and not received:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=0.2)
        finally:
            stop_all(process, signal.SIGINT if received[:1] == [signal.SIGINT] else signal.SIGTERM, grace)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 128 + received[0] if received else process.returncode


def interrupt_on_stop_signals() -> None:
    """From now on SIGTERM and SIGHUP raise KeyboardInterrupt in the main thread, as SIGINT does.

    A command running in this process then stops as on Ctrl+C: its ``finally`` blocks and exit handlers
    run and stop the servers it started, where Python's default would end the process on the spot.
    """

    def interrupt(signum: int, _frame) -> None:
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)
