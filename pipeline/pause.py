"""Named points where a process can be told to stop, so tests can kill it there (``kill -9``) or widen a race.

Only the crash and race tests set these variables; unset, ``pause_point`` costs one environment lookup.

- ``DIGITS_TEST_PAUSE_AT``: the point's name (e.g. ``epoch``, ``registered``, ``alias-writes``);
- ``DIGITS_TEST_PAUSE_FILE``: a file written when the process reaches it (the test waits for it);
- ``DIGITS_TEST_PAUSE_SECONDS``: how long to wait there before going on; unset, until killed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def pause_point(name: str) -> None:
    """Stop here if a test asked for ``name``: write the marker file, then sleep."""
    if os.environ.get("DIGITS_TEST_PAUSE_AT") != name:
        return
    marker = os.environ.get("DIGITS_TEST_PAUSE_FILE")
    if marker:
        Path(marker).write_text(f"{os.getpid()}\n")
    seconds = os.environ.get("DIGITS_TEST_PAUSE_SECONDS")
    if seconds:
        time.sleep(float(seconds))
        return
    while True:  # until the test kills the process
        time.sleep(3600)
