"""The JSON every benchmark writes: its figures, when, and on what machine."""

from __future__ import annotations

import json
import os
import platform
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu_description(),
        "python": platform.python_version(),
        "tensorflow": version("tensorflow-cpu"),
    }


def write_results(path: Path, benchmark: str, **figures: object) -> None:
    """Write ``figures`` to ``path`` as JSON with the benchmark's name, a timestamp and the machine."""
    record = {
        "benchmark": benchmark,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        **figures,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
