"""The promotion gate: a typed decision with its reasons (the README's "How it works" states the gate)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from pipeline.evaluate import Metrics
from pipeline.params import GateParams


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class Paired:
    """The candidate and the champion on the same test images: how many each alone got right."""

    images: int
    only_candidate: int
    only_champion: int
    same_answers: bool  # the same digit on every image, right or wrong

    @classmethod
    def compare(cls, y_true: np.ndarray, candidate: np.ndarray, champion: np.ndarray) -> Paired:
        if not len(y_true) == len(candidate) == len(champion):
            raise ValueError("the gate compares candidate and champion on the same test images")
        candidate_right, champion_right = candidate == y_true, champion == y_true
        return cls(
            len(y_true),
            int(np.sum(candidate_right & ~champion_right)),
            int(np.sum(champion_right & ~candidate_right)),
            bool(np.array_equal(candidate, champion)),
        )

    @property
    def p_value(self) -> float:
        """One-sided exact McNemar test: how likely so many images only the champion got right, were both as good."""
        from scipy.stats import binomtest

        disagreements = self.only_candidate + self.only_champion
        if disagreements == 0:
            return 1.0
        return float(binomtest(self.only_champion, disagreements, 0.5, alternative="greater").pvalue)

    def describe(self) -> str:
        return (
            f"only the candidate right on {self.only_candidate}, only the champion on {self.only_champion}, "
            f"one-sided exact McNemar p = {self.p_value:.3g}"
        )


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
    *,
    paired: Paired | None = None,
    families: dict[str, float] | None = None,
    champion_families: dict[str, float] | None = None,
    same_setup: bool = False,
) -> GateDecision:
    """Floors, then the comparison with the champion re-scored on the same test data.

    ``paired`` holds both models' answers on the test images (a drop beyond ``max_accuracy_drop``
    is refused only when it is significant); ``families`` and ``champion_families`` are accuracies
    on the out-of-distribution suite; ``same_setup`` says the candidate was trained on the
    champion's data version with its params, so that answering exactly like it changes nothing.
    The smoke prediction from the registry is added with ``with_check`` once the candidate is
    registered (it can only run after registration).
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
    if families and gate.min_family_accuracy:
        checks.append(_family_floors(families, gate.min_family_accuracy))
    if champion is None:
        notes: tuple[str, ...] = ("no champion yet: the first model that clears the floors becomes champion",)
    else:
        checks.append(_not_worse(candidate, champion, champion_version, gate, paired))
        if families and champion_families and gate.max_family_drop:
            checks.append(_family_drops(families, champion_families, champion_version, gate.max_family_drop))
        if same_setup and paired is not None and paired.same_answers:
            checks.append(_unchanged(paired, champion_version))
        notes = ()
    return GateDecision(
        tuple(checks),
        candidate.accuracy,
        champion_version,
        champion.accuracy if champion else None,
        notes,
    )


def _not_worse(
    candidate: Metrics, champion: Metrics, champion_version: str | None, gate: GateParams, paired: Paired | None
) -> Check:
    drop = champion.accuracy - candidate.accuracy
    detail = (
        f"candidate {candidate.accuracy:.4f} vs champion v{champion_version} {champion.accuracy:.4f} "
        f"on the same {candidate.n_images} images (allowed drop {gate.max_accuracy_drop:.4f}"
    )
    if paired is None:
        return Check("not worse than champion", drop <= gate.max_accuracy_drop + 1e-12, detail + ")")
    significant = paired.p_value < gate.significance
    return Check(
        "not worse than champion",
        drop <= gate.max_accuracy_drop + 1e-12 or not significant,
        f"{detail}, or more when not significant at {gate.significance:g}): {paired.describe()}",
    )


def _unchanged(paired: Paired, champion_version: str | None) -> Check:
    return Check(
        "a change from the champion",
        False,
        f"the same data version and params as champion v{champion_version}, and the same answer on all "
        f"{paired.images} test images: nothing to promote",
    )


def _family_floors(families: dict[str, float], floors: dict[str, float]) -> Check:
    missing = sorted(set(floors) - set(families))
    if missing:
        return Check("out-of-distribution floors", False, f"no score for {', '.join(missing)}: the suite did not run them")
    low = {name: families[name] for name, floor in floors.items() if families[name] < floor}
    shown = low or {name: families[name] for name in floors}
    detail = ", ".join(f"{name} {accuracy:.4f} vs floor {floors[name]:.4f}" for name, accuracy in shown.items())
    return Check("out-of-distribution floors", not low, detail)


def _family_drops(
    families: dict[str, float], champion_families: dict[str, float], champion_version: str | None, margins: dict[str, float]
) -> Check:
    compared = {name: margin for name, margin in margins.items() if name in families and name in champion_families}
    worse = {name for name, margin in compared.items() if champion_families[name] - families[name] > margin + 1e-12}
    detail = ", ".join(
        f"{name} {families[name]:.4f} vs champion v{champion_version} {champion_families[name]:.4f} (allowed drop {margin:.4f})"
        for name, margin in compared.items()
        if not worse or name in worse
    )
    return Check("out of distribution, not worse than champion", not worse, detail or "no family in common to compare")
