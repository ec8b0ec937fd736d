"""The promotion gate: a typed decision with its reasons (the README's "How it works" states the gate)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pipeline.evaluate import Metrics
from pipeline.params import GateParams


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class GateDecision:
    checks: tuple[Check, ...]
    candidate_accuracy: float
    champion_version: str | None = None
    champion_accuracy: float | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def promote(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def reasons(self) -> list[str]:
        """Why not, when rejected; every check passed, when promoted."""
        failed = [c for c in self.checks if not c.passed]
        return [f"{c.name}: {c.detail}" for c in (failed or self.checks)]

    def with_check(self, check: Check) -> GateDecision:
        return dataclasses.replace(self, checks=self.checks + (check,))

    def to_dict(self) -> dict:
        return {
            "promote": self.promote,
            "reasons": self.reasons,
            "checks": [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in self.checks],
            "candidate_accuracy": self.candidate_accuracy,
            "champion_version": self.champion_version,
            "champion_accuracy": self.champion_accuracy,
            "notes": list(self.notes),
        }

    def to_markdown(self) -> str:
        verdict = "**PROMOTE**" if self.promote else "**REJECT** (the champion does not move)"
        lines = [f"## Gate decision: {verdict}", "", "| check | result | detail |", "|---|---|---|"]
        lines += [f"| {c.name} | {'pass' if c.passed else 'FAIL'} | {c.detail} |" for c in self.checks]
        lines += ["", *[f"- {note}" for note in self.notes]]
        return "\n".join(lines).rstrip() + "\n"


def decide(
    candidate: Metrics,
    gate: GateParams,
    champion: Metrics | None = None,
    champion_version: str | None = None,
) -> GateDecision:
    """Floors and the comparison with the champion re-scored on the same test data.

    The smoke prediction from the registry is the third check, added with ``with_check`` once the
    candidate is registered (it can only run after registration).
    """
    if champion is not None and champion.n_images != candidate.n_images:
        raise ValueError(
            f"champion scored on {champion.n_images} images, candidate on {candidate.n_images}: "
            "the gate compares both on the same test data"
        )
    checks = [
        Check(
            "accuracy floor",
            candidate.accuracy >= gate.min_accuracy,
            f"test accuracy {candidate.accuracy:.4f} vs floor {gate.min_accuracy:.4f}",
        ),
        Check(
            "per-class recall floor",
            candidate.min_class_recall >= gate.min_class_recall,
            f"lowest recall {candidate.min_class_recall:.4f} (digit {candidate.weakest_class}) "
            f"vs floor {gate.min_class_recall:.4f}",
        ),
    ]
    if champion is None:
        notes: tuple[str, ...] = ("no champion yet: the first model that clears the floors becomes champion",)
    else:
        drop = champion.accuracy - candidate.accuracy
        checks.append(
            Check(
                "not worse than champion",
                drop <= gate.max_accuracy_drop + 1e-12,
                f"candidate {candidate.accuracy:.4f} vs champion v{champion_version} {champion.accuracy:.4f} "
                f"on the same {candidate.n_images} images (allowed drop {gate.max_accuracy_drop:.4f})",
            )
        )
        notes = ()
    return GateDecision(
        tuple(checks),
        candidate.accuracy,
        champion_version,
        champion.accuracy if champion else None,
        notes,
    )
