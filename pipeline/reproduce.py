"""Whether a retrain reproduced a registered model: the machine each ran on, and what differs between them.

Training is deterministic for a seed on one machine and one set of libraries; another thread count,
another CPU instruction set or another library version can move the weights by rounding. Each run
records :func:`environment`, so a comparison can name what differed.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

# the run tag prefix of the machine a run trained on
ENVIRONMENT_TAG = "env."
LIBRARIES = ("tensorflow", "keras", "numpy")
# instruction sets the CPU kernels pick between; another set rounds differently
INSTRUCTION_SETS = ("avx512f", "avx2", "fma", "avx", "sse4_2", "neon", "asimd")
IDENTICAL = "identical"
WITHIN_TOLERANCE = "equal within tolerance"
DIFFERENT = "different"


def environment(threads: int | None = None) -> dict[str, str]:
    """What a run trained on: Python, the numeric libraries, the CPU's instruction sets, the threads."""
    found = {"python": platform.python_version(), "machine": platform.machine(), "cpu_sets": " ".join(_instruction_sets())}
    for library in LIBRARIES:
        try:
            found[library] = metadata.version(library)
        except metadata.PackageNotFoundError:
            found[library] = "absent"
    found["threads"] = str(threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()))
    return found


def _instruction_sets() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: the machine type stands for it
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith(("flags", "Features"))), [])
    return [name for name in INSTRUCTION_SETS if name in flags]


def as_tags(found: dict[str, str]) -> dict[str, str]:
    return {f"{ENVIRONMENT_TAG}{name}": value for name, value in found.items()}


def from_tags(tags: dict[str, str]) -> dict[str, str]:
    return {name.removeprefix(ENVIRONMENT_TAG): value for name, value in tags.items() if name.startswith(ENVIRONMENT_TAG)}


@dataclass(frozen=True)
class Comparison:
    """A registered model against its retrain: the verdict, and what differs and why it may."""

    verdict: str
    weights_identical: bool
    max_weight_difference: float
    answers_compared: int
    answers_differing: int
    accuracy_registered: float
    accuracy_reproduced: float
    environment_differences: dict[str, tuple[str, str]] = field(default_factory=dict)
    likely_cause: str | None = None

    @property
    def reproduced(self) -> bool:
        return self.verdict in (IDENTICAL, WITHIN_TOLERANCE)

    def to_dict(self) -> dict:
        return asdict(self) | {"reproduced": self.reproduced}

    def summary(self) -> str:
        weights = "bit for bit the same" if self.weights_identical else f"differ by up to {self.max_weight_difference:.3g}"
        lines = [
            f"verdict: {self.verdict}",
            f"weights: {weights}",
            f"answers on {self.answers_compared:,} test images: {self.answers_differing:,} differ",
            f"test accuracy: registered {self.accuracy_registered:.4%}, reproduced {self.accuracy_reproduced:.4%}",
        ]
        for name, (registered, reproduced) in self.environment_differences.items():
            lines.append(f"machine: {name} was {registered}, now {reproduced}")
        if self.likely_cause:
            lines.append(f"likely cause: {self.likely_cause}")
        return "\n".join(lines)


def compare(
    registered_weights: list[np.ndarray],
    reproduced_weights: list[np.ndarray],
    registered_answers: np.ndarray,
    reproduced_answers: np.ndarray,
    accuracies: tuple[float, float],
    environments: tuple[dict[str, str], dict[str, str]],
) -> Comparison:
    """Identical: the same weights bit for bit. Equal within tolerance: only where the machine differs, the same
    digit on every test image and the same test accuracy. Anything else is different, with the likely cause."""
    same_shapes = len(registered_weights) == len(reproduced_weights) and all(
        a.shape == b.shape for a, b in zip(registered_weights, reproduced_weights, strict=False)
    )
    identical = same_shapes and all(np.array_equal(a, b) for a, b in zip(registered_weights, reproduced_weights, strict=True))
    largest = (
        max((float(np.max(np.abs(a - b))) for a, b in zip(registered_weights, reproduced_weights, strict=True)), default=0.0)
        if same_shapes
        else float("inf")
    )
    differing = int(np.sum(np.asarray(registered_answers) != np.asarray(reproduced_answers)))
    registered_env, reproduced_env = environments
    changed = {
        name: (registered_env.get(name, "not recorded"), reproduced_env.get(name, "not recorded"))
        for name in sorted(set(registered_env) | set(reproduced_env))
        if registered_env.get(name) != reproduced_env.get(name)
    }
    if identical:
        verdict, cause = IDENTICAL, None
    elif changed and differing == 0 and accuracies[0] == accuracies[1]:
        verdict, cause = WITHIN_TOLERANCE, _cause(changed, same_shapes)
    else:
        verdict, cause = DIFFERENT, _cause(changed, same_shapes)
    return Comparison(
        verdict=verdict,
        weights_identical=identical,
        max_weight_difference=largest,
        answers_compared=len(registered_answers),
        answers_differing=differing,
        accuracy_registered=accuracies[0],
        accuracy_reproduced=accuracies[1],
        environment_differences=changed,
        likely_cause=cause,
    )


def _cause(changed: dict[str, tuple[str, str]], same_shapes: bool) -> str:
    if not same_shapes:
        return "another architecture: the code at the recorded commit builds another network than the registered one"
    if changed:
        return "the machine differs (" + ", ".join(changed) + "): rounding in other kernels or thread splits moves the weights"
    return "same machine and libraries, other weights: something in training is not deterministic (or the record is wrong)"
