"""A model card for a registered version: what it is, what it learnt from, how it does, why it was promoted, its limits.

Pure: ``CardFacts`` holds what the version's run logged (``app.cards`` reads it from MLflow); the
card is a list of blocks rendered as markdown (the MLflow model version's description, kept short:
a tracking server's database holds 5,000 characters of it) or as a standalone HTML page with the
run's plots embedded.
"""

from __future__ import annotations

import base64
import html
import shlex
from dataclasses import dataclass, field
from typing import Any, NamedTuple

# a model version's description is a varchar(5000) in MLflow's database schema
DESCRIPTION_LIMIT = 5000
# the run's plots the HTML card shows, in order, with their captions
PLOTS = {
    "plots/per_class_scores.png": "Precision, recall and F1 per digit on the test set",
    "plots/confusion_matrix.png": "Confusion matrix on the test set",
    "plots/suite.png": "Accuracy on MNIST's test set and on each family of the out-of-distribution suite",
    "plots/reliability.png": "Reliability on the test set, before and after calibration",
    "plots/learning_curves.png": "Learning curves",
    "plots/misclassified.png": "Known limits: the most confident mistakes on the test set",
    "plots/mistakes_explained.png": "Known limits: the most confident mistakes, and where their ink counted for the wrong answer",
    "plots/suite_mistakes.png": "Known limits: mistakes on the weakest families of the suite, as the model saw them",
}
# params that decide what training produces, and so belong in the command that reproduces it
REPRODUCING_SECTIONS = ("model", "train", "confidence")
# the run's tags that describe the machine it trained on (pipeline/reproduce.py records them)
ENVIRONMENT_TAG = "env."
# the suite's families are shown beside this slice of harvested corrections when the data version has one
FEEDBACK = "feedback"


class Link(NamedTuple):
    text: str
    url: str


Inline = str | Link | list  # a list mixes text and links


@dataclass(frozen=True)
class DataInput:
    """One dataset input of the run (see ``pipeline.lineage``)."""

    name: str
    context: str
    digest: str
    source: str
    rows: int | None = None


@dataclass(frozen=True)
class CardFacts:
    """What a registered version's run logged, as the card needs it."""

    model_name: str
    version: str
    run_id: str
    experiment_id: str
    params: dict[str, Any]  # params.json: nested sections
    metrics: dict[str, float]
    tags: dict[str, str]  # the run's tags: data_version, git_commit, serving_runtime, validation, trigger ...
    version_tags: dict[str, str] = field(default_factory=dict)  # promoted_at, promoted_by, gate ...
    datasets: tuple[DataInput, ...] = ()
    per_class: dict[str, Any] | None = None  # evaluation/metrics.json
    suite: dict[str, Any] | None = None  # evaluation/suite.json
    gate: dict[str, Any] | None = None  # gate/gate_decision.json
    validation_report: str | None = None  # artifact path of the validation report's index page
    registered_at: str | None = None


@dataclass(frozen=True)
class Block:
    kind: str  # "h2", "p", "ul", "table", "code", "img"
    content: Any
    header: tuple[str, ...] = ()
    full_only: bool = False  # left out of the short (markdown) card, which the description's limit constrains
    short_only: bool = False  # in the short card only
    optional: bool = False  # the short card drops it first when it is too long


# ---------------------------------------------------------------- facts -> figures


def weakest_classes(per_class: dict[str, Any], count: int = 3) -> list[tuple[int, float, int | None, int]]:
    """(digit, recall, the digit it is most often read as, how often) for the ``count`` lowest recalls."""
    recall = per_class["class_recall"]
    confusion = per_class.get("confusion")
    out = []
    for digit in sorted(range(len(recall)), key=lambda d: (recall[d], d))[:count]:
        confused, times = None, 0
        if confusion:
            row = [(n, other) for other, n in enumerate(confusion[digit]) if other != digit]
            times, confused = max(row) if row else (0, None)
        out.append((digit, float(recall[digit]), confused if times else None, int(times)))
    return out


def weakest_families(suite: dict[str, Any], count: int = 3) -> list[tuple[str, float]]:
    families = {name: value for name, value in suite.get("families", {}).items() if name != FEEDBACK}
    return sorted(families.items(), key=lambda item: (item[1], item[0]))[:count]


def reproduce_command(facts: CardFacts) -> str:
    """The commands that retrain this version by hand: its code, its data version, its params."""
    commit = facts.tags.get("git_commit", "unknown")
    sets = []
    for section in REPRODUCING_SECTIONS:
        for key, value in (facts.params.get(section) or {}).items():
            sets.append(f"--set {shlex.quote(f'{section}.{key}={_yaml(value)}')}")
    lines = [
        f"git checkout {commit.removesuffix('-dirty')}",
        "dvc pull   # data.dvc must name data version " + facts.tags.get("data_version", "unknown"),
        "digits retrain " + " ".join(sets),
    ]
    return "\n".join(lines)


def _yaml(value: Any) -> str:
    """A params value as ``--set`` reads it back (YAML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_yaml(v) for v in value) + "]"
    if value is None:
        return "null"
    return str(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# ---------------------------------------------------------------- the card's blocks


def blocks(facts: CardFacts, ui: str = "") -> list[Block]:
    """The card, section by section. ``ui`` is the MLflow UI's address ('' inside the UI itself: links stay relative)."""
    m, p, tags = facts.metrics, facts.params, facts.tags
    run_url = f"{ui}#/experiments/{facts.experiment_id}/runs/{facts.run_id}"
    model, train = p.get("model") or {}, p.get("train") or {}
    out: list[Block] = []

    verdict = (facts.gate or {}).get("promote")
    out.append(
        Block(
            "p",
            [
                f"Version {facts.version} of {facts.model_name}, registered {facts.registered_at or '-'} from run ",
                Link(facts.run_id, run_url),
                f"; gate: {'promoted' if verdict else 'rejected' if verdict is False else 'no decision logged'}"
                + (f" (champion since {facts.version_tags['promoted_at']})" if facts.version_tags.get("promoted_at") else "")
                + ".",
            ],
        )
    )

    out.append(Block("h2", "What it is"))
    filters = model.get("conv_filters")
    out.append(
        Block(
            "p",
            "A convolutional network that reads one handwritten digit (a 28x28 grey image, white ink on black, as the "
            "service normalises any photo or drawing) and answers the ten digits' probabilities. "
            f"{len(filters) if filters else '?'} convolution blocks ({', '.join(map(str, filters or []))} filters"
            f"{', batch norm' if model.get('batch_norm') else ''}), a dense layer of {model.get('dense_units', '?')} units, "
            f"dropout {model.get('dropout', '?')}; trained {train.get('epochs', '?')} epochs (seed {train.get('seed', '?')}) "
            f"with random shifts of up to {100 * float(model.get('augment_shift', 0)):.0f} % and "
            f"{100 * float(model.get('augment_stroke', 0)):.0f} % of images a pixel thinner or thicker. "
            f'Served as `{tags.get("serving_runtime", "keras")}`, answers below the calibrated threshold say "unsure".',
        )
    )

    out.append(Block("h2", "Data"))
    validation = tags.get("validation", "not run")
    report = (
        Link(
            "validation report",
            f"{ui}#/experiments/{facts.experiment_id}/runs/{facts.run_id}/artifacts/{facts.validation_report}",
        )
        if facts.validation_report
        else "no validation report logged"
    )
    out.append(
        Block(
            "p",
            [f"Data version `{tags.get('data_version', 'unknown')}` (DVC); validation {validation}: ", report, "."],
        )
    )
    if facts.datasets:
        rows = [[d.name, d.context, f"`{d.digest[:12]}`", "-" if d.rows is None else f"{d.rows:,}"] for d in facts.datasets]
        out.append(Block("table", rows, ("dataset", "used for", "digest", "images")))

    out.append(Block("h2", "Performance"))
    overall = [
        ["test accuracy", _pct(m.get("test_accuracy"))],
        ["test accuracy as served", _pct(m.get("served_test_accuracy"))],
        ["lowest class recall", _pct(m.get("test_min_class_recall"))],
        ["validation accuracy", _pct(m.get("final_val_accuracy"))],
    ]
    out.append(Block("table", [r for r in overall if r[1] != "-"], ("metric", "value")))
    if facts.per_class:
        pc = facts.per_class
        support = [sum(row) for row in pc.get("confusion") or []] or [None] * 10
        rows = [
            [str(d), _num(pc["class_precision"][d]), _num(pc["class_recall"][d]), _num(pc["class_f1"][d]), str(support[d] or "-")]
            for d in range(len(pc["class_recall"]))
        ]
        out.append(Block("table", rows, ("digit", "precision", "recall", "F1", "images"), full_only=True))
        out.append(
            Block(
                "p",
                "Recall per digit: " + ", ".join(f"{d} {_num(r, 3)}" for d, r in enumerate(pc["class_recall"])) + ".",
                short_only=True,
                optional=True,
            )
        )
    if facts.suite and facts.suite.get("families"):
        floors = (p.get("gate") or {}).get("min_family_accuracy") or {}
        families = {k: v for k, v in facts.suite["families"].items() if k != FEEDBACK}
        refused = facts.suite.get("refused", {})
        out.append(Block("h2", "Beyond MNIST"))
        rows = [[name, _pct(value), str(refused.get(name, 0)), _pct(floors.get(name))] for name, value in families.items()]
        out.append(Block("table", rows, ("family", "accuracy", "refused", "floor"), full_only=True))
        out.append(
            Block(
                "p",
                "Out-of-distribution suite, as served: " + ", ".join(f"{k} {_pct(v)}" for k, v in families.items()) + ".",
                short_only=True,
                optional=True,
            )
        )
        if FEEDBACK in facts.suite["families"]:
            out.append(
                Block(
                    "p",
                    "Feedback slice (harvested corrections held out for testing): accuracy "
                    f"{_pct(facts.suite['families'][FEEDBACK])}.",
                )
            )

    out.append(Block("h2", "Calibration"))
    calibration = [
        ["temperature", _num(m.get("temperature"), 3)],
        ["unsure below", _num(m.get("unsure_threshold"), 4)],
        ["test ECE before / after", f"{_num(m.get('test_ece'))} / {_num(m.get('test_ece_calibrated'))}"],
        ["test answers marked unsure", _pct(m.get("test_unsure_share"))],
        ["test accuracy on the others", _pct(m.get("test_accuracy_sure"))],
        ['wrong without "unsure"', _pct(m.get("test_confident_error_share"))],
        ["photographed: marked unsure", _pct(m.get("served_photographed_unsure_share"))],
    ]
    out.append(Block("table", [r for r in calibration if r[1] not in ("-", "- / -")], ("figure", "value")))

    out.append(Block("h2", "Known limits"))
    limits: list[Inline] = []
    if facts.per_class:
        for digit, recall, confused, times in weakest_classes(facts.per_class):
            read_as = f", most often read as {confused} ({times} images)" if confused is not None else ""
            limits.append(f"digit {digit}: recall {_num(recall, 3)}{read_as}")
    if facts.suite:
        for name, accuracy in weakest_families(facts.suite):
            limits.append(f"{name}: {_pct(accuracy)} of the suite's {name} images right")
    limits.append("trained on MNIST-style digits only: anything that is not a single digit still gets a digit (often unsure)")
    out.append(Block("ul", limits))
    out.append(Block("p", "Examples of its mistakes are in the full card's figures.", short_only=True))

    out.append(Block("h2", "Gate decision"))
    if facts.gate:
        gate = facts.gate
        head = "**promoted**" if gate.get("promote") else "**rejected**"
        if gate.get("champion_version"):
            head += f" against champion v{gate['champion_version']} (test accuracy {_num(gate.get('champion_accuracy'))})"
        out.append(Block("p", head))
        out.append(
            Block(
                "table",
                [[c["name"], "pass" if c["passed"] else "FAIL", c["detail"]] for c in gate.get("checks", [])],
                ("check", "result", "detail"),
            )
        )
        if gate.get("notes"):
            out.append(Block("ul", list(gate["notes"])))
    else:
        out.append(Block("p", "No gate decision was logged in the run."))
    who = facts.version_tags.get("promoted_by")
    if who:
        out.append(Block("p", f"Promoted by {who} at {facts.version_tags.get('promoted_at', '-')}.", full_only=True))

    out.append(Block("h2", "Reproduce"))
    commit = tags.get("git_commit", "unknown")
    note = " (the working tree had uncommitted changes: they are not in the commit)" if commit.endswith("-dirty") else ""
    out.append(
        Block(
            "p",
            f"Git commit `{commit}`{note}. `digits reproduce {facts.version}` retrains it from this record (a clone at "
            "the commit, the data version from DVC, the params and seed) and compares weights and answers; by hand:",
        )
    )
    out.append(Block("code", reproduce_command(facts)))
    machine = {k.removeprefix(ENVIRONMENT_TAG): v for k, v in sorted(tags.items()) if k.startswith(ENVIRONMENT_TAG)}
    if machine:
        out.append(Block("p", "Trained on: " + ", ".join(f"{k} {v}" for k, v in machine.items()) + ".", full_only=True))
    if facts.version_tags.get("reproduced"):
        out.append(Block("p", f"`digits reproduce` said: {facts.version_tags['reproduced']}."))

    return out


# ---------------------------------------------------------------- rendering


def _md_inline(value: Inline) -> str:
    if isinstance(value, Link):
        return f"[{value.text}]({value.url})"
    if isinstance(value, list):
        return "".join(_md_inline(v) for v in value)
    return str(value)


def _md_cell(value: Inline) -> str:
    return _md_inline(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(facts: CardFacts, ui: str = "", card_url: str | None = None, limit: int = DESCRIPTION_LIMIT) -> str:
    """The short card, for the model version's description (at most ``limit`` characters).

    Too long, it shortens long table cells, then drops the optional paragraphs, then is cut (the
    sections a reader needs most come first; the full card has everything).
    """
    text = ""
    for cell_limit, optional in ((None, True), (160, True), (160, False)):
        text = _markdown(facts, ui, card_url, cell_limit, optional)
        if len(text) <= limit:
            return text
    cut = "\n\n(shortened to fit the description: see the full card)\n"
    return text[: limit - len(cut)].rsplit("\n", 1)[0] + cut


def _markdown(facts: CardFacts, ui: str, card_url: str | None, cell_limit: int | None, optional: bool) -> str:
    def cell(value: Inline) -> str:
        text = _md_cell(value)
        return text if cell_limit is None or len(text) <= cell_limit else text[: cell_limit - 1].rstrip("\\") + "…"

    lines = [f"# Model card: {facts.model_name} v{facts.version}", ""]
    if card_url:
        lines += [f"The full card, with its figures and example mistakes: [model card]({card_url}).", ""]
    for block in blocks(facts, ui):
        if block.full_only or (block.optional and not optional):
            continue
        if block.kind == "h2":
            lines += [f"## {block.content}", ""]
        elif block.kind == "p":
            lines += [_md_inline(block.content), ""]
        elif block.kind == "ul":
            lines += [f"- {_md_inline(item)}" for item in block.content] + [""]
        elif block.kind == "code":
            lines += ["```sh", block.content, "```", ""]
        elif block.kind == "table":
            lines += ["| " + " | ".join(block.header) + " |", "|" + "---|" * len(block.header)]
            lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in block.content] + [""]
    return "\n".join(lines).rstrip() + "\n"


def _html_inline(value: Inline) -> str:
    if isinstance(value, Link):
        return f'<a href="{html.escape(value.url, quote=True)}">{html.escape(value.text)}</a>'
    if isinstance(value, list):
        return "".join(_html_inline(v) for v in value)
    return _html_text(str(value))


def _html_text(text: str) -> str:
    """Escaped text, with the card's own markup (`code` and **bold**) turned into tags."""
    out, parts = [], html.escape(text).split("`")
    for i, part in enumerate(parts):
        bold = part.split("**")
        part = "".join(f"<strong>{b}</strong>" if j % 2 else b for j, b in enumerate(bold))
        out.append(f"<code>{part}</code>" if i % 2 else part)
    return "".join(out)


STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 980px; margin: 2em auto; padding: 0 1em; color: #1b1f24; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .6em 0; } td, th { border: 1px solid #ddd; padding: .25em .6em; text-align: left; }
th { background: #f4f6f8; } code, pre { background: #f4f6f8; border-radius: 4px; padding: .1em .3em; }
pre { padding: .8em; overflow-x: auto; white-space: pre-wrap; } figure { margin: 1em 0; } figure img { max-width: 100%; }
figcaption { color: #57606a; font-size: .9em; }
"""


def to_html(facts: CardFacts, images: dict[str, bytes], ui: str = "") -> str:
    """The full card as one standalone page: every section, every table, the run's plots embedded as PNG."""
    title = f"Model card: {facts.model_name} v{facts.version}"
    body = [f"<h1>{html.escape(title)}</h1>"]
    for block in blocks(facts, ui):
        if block.short_only:
            continue
        if block.kind == "h2":
            body.append(f"<h2>{html.escape(block.content)}</h2>")
        elif block.kind == "p":
            body.append(f"<p>{_html_inline(block.content)}</p>")
        elif block.kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_html_inline(item)}</li>" for item in block.content) + "</ul>")
        elif block.kind == "code":
            body.append(f"<pre><code>{html.escape(block.content)}</code></pre>")
        elif block.kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block.header)
            rows = "".join("<tr>" + "".join(f"<td>{_html_inline(c)}</td>" for c in row) + "</tr>" for row in block.content)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    shown = [(path, caption) for path, caption in PLOTS.items() if path in images]
    if shown:
        body.append("<h2>Figures</h2>")
    for path, caption in shown:
        data = base64.b64encode(images[path]).decode("ascii")
        name = path.rsplit("/", 1)[-1]
        body.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption, quote=True)}" '
            f'data-plot="{html.escape(name)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
