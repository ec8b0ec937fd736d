"""The JSON every benchmark writes: its figures, when, and on what machine."""

from __future__ import annotations

import json
import os
import platform
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_results(path: Path, benchmark: str, **figures: object) -> None:
    """Write ``figures`` to ``path`` as JSON with the benchmark's name, a timestamp and the machine."""
    record = {
        "benchmark": benchmark,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "tensorflow": version("tensorflow-cpu")},
        **figures,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
