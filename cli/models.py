"""``digits status``, ``promote`` and ``rollback``: the champion in the MLflow Model Registry."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cli.common import JsonOption, fail, load, quiet_libraries, reported_errors


def status(
    as_json: JsonOption = False,
    show_all: Annotated[bool, typer.Option("--all", help="List every registered version and the promotion history.")] = False,
) -> None:
    """Show the champion: model name, version, run id, test metrics, data version, promoted-at."""
    quiet_libraries()
    from app import promotion
    from pipeline.settings import get_settings

    report = promotion.status(get_settings(), show_all)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    champion = report["champion"]
    if champion is None:
        typer.echo(f"{report['model_name']}: no champion yet. Run `digits retrain` to train and promote one.")
        return
    typer.echo(f"{report['model_name']} champion: v{champion['version']} (previous: {report['previous_champion'] or 'none'})")
    for key in ("run_id", "data_version", "git_commit", "promoted_at", "promoted_by", "promotion_reason"):
        typer.echo(f"  {key:<17} {champion[key]}")
    typer.echo(f"  {'overrides':<17} {_overrides(champion['overrides'])}")
    for key, value in champion["metrics"].items():
        typer.echo(f"  {key:<17} {value:.4f}")
    if challenger := report["challenger"]:
        typer.echo(f"challenger: v{challenger['version']}, run in the shadows")
        live = challenger["live"]
        if "problem" in live:
            typer.echo(f"  {live['problem']}")
        elif live["requests"]:
            typer.echo(f"  agrees with the served answer on {live['agreement']:.1%} of {live['requests']:,} live requests")
            if live["feedback"]:
                typer.echo(
                    f"  on the {live['feedback']} of them people corrected or confirmed: served "
                    f"{live['served_accuracy_on_feedback']:.1%}, challenger {live['challenger_accuracy_on_feedback']:.1%}"
                )
        else:
            typer.echo("  no live request answered in the shadows yet")
    for version in report.get("versions", []):
        typer.echo(
            f"  v{version['version']}: accuracy {version['metrics'].get('test_accuracy', float('nan')):.4f}, "
            f"data {str(version['data_version'])[:12]}, promoted {version['promoted_at'] or '-'}, "
            f"overrides {_overrides(version['overrides'])}, reproduced {version['reproduced'] or '-'}"
        )


def promote(
    version: Annotated[str | None, typer.Argument(help="Registered version number to make champion (or challenger).")] = None,
    allow_regression: Annotated[bool, typer.Option(help="Promote even if less accurate than the current champion.")] = False,
    shadow: Annotated[
        bool,
        typer.Option(
            "--shadow",
            help="Make it the challenger instead: the service also runs it on live traffic after answering, "
            "and logs its answers; `digits status` compares the two. Without VERSION: stop the shadow run.",
        ),
    ] = False,
) -> None:
    """Make a registered version the champion, through the same checks as the flow.

    The version is re-scored on the test set against the floors in params.yaml, compared with the
    current champion (skip with --allow-regression), and must load from the registry and answer.
    With --shadow it becomes the challenger instead, which answers nobody: promoting it later still
    goes through the checks.
    """
    from app import promotion

    settings, params = load()
    if shadow:
        with reported_errors():
            ref = promotion.shadow(settings, version)
        typer.echo(f"challenger is now v{ref.version}: the service runs it in the shadows" if ref else "no challenger any more")
        return
    if version is None:
        fail("name the version to promote (see `digits status --all`), or use --shadow without one to stop a shadow run", 2)
    with reported_errors():
        _report(promotion.override(settings, params, version, allow_regression))


def rollback() -> None:
    """Move `champion` back to `previous-champion` (floors and smoke checks still apply)."""
    from app import promotion

    settings, params = load()
    with reported_errors():
        _report(promotion.rollback(settings, params))


def _report(outcome) -> None:
    typer.echo(outcome.decision.to_markdown())
    if not outcome.decision.promote:
        fail("the champion did not move", 1)
    typer.echo(f"champion is now v{outcome.champion.version}")


def evaluate(
    version: Annotated[str | None, typer.Argument(help="Registered version number (default: the champion).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Score a registered version as the service runs it, on MNIST's test set and the out-of-distribution suite.

    The suite's families (README, "Beyond MNIST") are rendered from MNIST's test images: shifted,
    rotated, thick strokes, noisy, photographed on paper... Each image goes through the service's
    photo path; one the path refuses counts as wrong. Prints accuracy per family, and how far the
    answers' confidence can be trusted on MNIST and on the photographed family.
    """
    from app import evaluation

    settings, params = load(progress=not as_json)
    with reported_errors():
        report = evaluation.evaluate_version(settings, params, version)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"{report['model_name']} v{report['version']} as served ({report['runtime']})")
    typer.echo(f"  {'mnist (test set)':<18} {report['mnist']:.4f}")
    for name, accuracy in report["families"].items():
        refused = report["refused"][name]
        note = f"  ({refused} of {report['images_per_family']} refused)" if refused else ""
        typer.echo(f"  {name:<18} {accuracy:.4f}{note}")
    for name, figures in report["confidence"].items():
        typer.echo(
            f"  confidence on {name}: {figures['unsure_share']:.1%} marked unsure, accuracy {figures['accuracy_sure']:.4f} "
            f"on the others, {figures['confident_error_share']:.2%} wrong without 'unsure', ECE {report['ece'][name]:.4f}"
        )


def reproduce(
    version: Annotated[str, typer.Argument(help="Registered version number to retrain and compare.")],
    as_json: JsonOption = False,
) -> None:
    """Retrain a registered version from its record and say whether the result is the same model.

    In a temporary clone of the project at the version's git commit, with its data version from the DVC
    cache or remote and its recorded params and seed: `digits train`, then the two models compared
    (weights, the answer on every test image, test accuracy) and the machines they trained on (Python,
    TensorFlow, Keras, NumPy, CPU instruction sets, threads). Exits 0 when identical, or equal within
    tolerance (same answers, same accuracy) where the machine differs; 1 otherwise, saying what
    differs and the likely cause. The verdict is tagged on the version (`digits status --all`).
    """
    quiet_libraries()
    from app.reproduce import reproduce_version
    from pipeline.settings import get_settings

    with reported_errors("Nothing was compared."):
        result = reproduce_version(get_settings(), version, say=lambda line: typer.echo(line, err=True))
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        typer.echo(f"version {result.version} (run {result.run_id}, commit {result.git_commit[:12]}, data {result.data_version})")
        typer.echo(result.comparison.summary())
    if not result.comparison.reproduced:
        raise typer.Exit(1)


def _overrides(overrides: dict | None) -> str:
    """A version's params overrides as --set options; "none" for params.yaml as it was, "unknown" when not recorded."""
    if overrides is None:
        return "unknown"
    return " ".join(f"--set {key}={json.dumps(value)}" for key, value in overrides.items()) or "none"


def trace(
    target: Annotated[str, typer.Argument(help="A request id (from an answer) or a registered version number.")],
    as_json: JsonOption = False,
) -> None:
    """Follow an answer (or a version) back to its origins, with MLflow UI links.

    answer -> model version (gate verdict, reproduced?) -> training run (what started it) -> the data
    versions it used (DVC digests) -> the validation report -> the git commit -> who promoted it, when
    and why. The links open in `digits ui` (or on the tracking server's UI).
    """
    quiet_libraries()
    from app.trace import render, trace
    from pipeline.settings import get_settings

    with reported_errors():
        chain = trace(get_settings(), target)
    typer.echo(json.dumps(chain, indent=2, default=str) if as_json else render(chain))
