"""The model card's content and rendering (pure: facts in, markdown and HTML out)."""

from __future__ import annotations

import base64
import html.parser
import io
import shlex

import yaml

from pipeline import model_card
from pipeline.model_card import CardFacts, DataInput

RECALL = [0.99, 0.995, 0.97, 0.98, 0.93, 0.985, 0.96, 0.975, 0.99, 0.95]


def _confusion() -> list[list[int]]:
    rows = [[100 if i == j else 0 for j in range(10)] for i in range(10)]
    rows[4][9] = 7  # 4 is most often read as 9
    rows[4][1] = 2
    rows[9][4] = 3
    return rows


def _facts(**changes) -> CardFacts:
    facts = dict(
        model_name="digits-cnn",
        version="3",
        run_id="abc123",
        experiment_id="1",
        params={
            "model": {
                "conv_filters": [32, 64, 128],
                "batch_norm": True,
                "dense_units": 128,
                "dropout": 0.3,
                "augment_shift": 0.1,
                "augment_stroke": 0.5,
            },
            "train": {"seed": 42, "epochs": 15, "learning_rate": 0.002},
            "confidence": {"max_confident_error": 0.002},
            "gate": {"min_family_accuracy": {"rotated": 0.9}},
        },
        metrics={
            "test_accuracy": 0.9931,
            "test_min_class_recall": 0.93,
            "temperature": 1.21,
            "unsure_threshold": 0.8,
            "test_ece": 0.01,
            "test_ece_calibrated": 0.004,
        },
        tags={
            "data_version": "627efe430bc4b4ed0d31af56ca1fb5c6.dir",
            "git_commit": "0123abcd-dirty",
            "serving_runtime": "tflite-int8",
            "validation": "passed",
        },
        version_tags={"promoted_at": "2026-12-06T09:00:00+00:00", "promoted_by": "ana"},
        datasets=(
            DataInput("mnist-train", "training", "627efe430bc4b4ed0d31af56ca1fb5c6.dir", "/remote/files/md5/62/7efe.dir", 60000),
            DataInput("ood-suite", "evaluation", "f" * 32, "/remote/files/md5/62/7efe.dir", 13000),
        ),
        per_class={
            "class_precision": [0.99] * 10,
            "class_recall": RECALL,
            "class_f1": [0.98] * 10,
            "confusion": _confusion(),
        },
        suite={
            "families": {"rotated": 0.91, "thick": 0.97, "photographed": 0.95, "inverted": 0.99, "feedback": 0.88},
            "refused": {"photographed": 4},
        },
        gate={
            "promote": True,
            "checks": [
                {"name": "accuracy floor", "passed": True, "detail": "test accuracy 0.9931 vs floor 0.9850"},
                {"name": "not worse than champion", "passed": True, "detail": "only the candidate right on 12 | p = 0.02"},
            ],
            "champion_version": "2",
            "champion_accuracy": 0.9925,
            "notes": [],
        },
        validation_report="validation_report/index.html",
        registered_at="2026-12-06T08:59:00+00:00",
    )
    return CardFacts(**{**facts, **changes})


def test_the_weakest_classes_name_what_they_are_read_as():
    weakest = model_card.weakest_classes(_facts().per_class)
    assert [(d, c, n) for d, _, c, n in weakest] == [(4, 9, 7), (9, 4, 3), (6, None, 0)]


def test_the_weakest_families_leave_the_feedback_slice_apart():
    assert model_card.weakest_families(_facts().suite, 2) == [("rotated", 0.91), ("photographed", 0.95)]


def test_the_reproduce_command_sets_every_training_param_and_reads_back_as_yaml():
    command = model_card.reproduce_command(_facts())
    checkout, pull, retrain = command.splitlines()
    assert checkout == "git checkout 0123abcd"  # the dirty marker is not part of a commit
    assert "627efe430bc4b4ed0d31af56ca1fb5c6.dir" in pull
    words = shlex.split(retrain)
    assert words[:2] == ["digits", "retrain"]
    sets = dict(w.split("=", 1) for w in words[3::2])
    assert set(words[2::2]) == {"--set"}
    assert yaml.safe_load(sets["model.conv_filters"]) == [32, 64, 128]
    assert yaml.safe_load(sets["model.batch_norm"]) is True and yaml.safe_load(sets["train.seed"]) == 42
    assert "confidence.max_confident_error" in sets and not any(k.startswith("gate.") for k in sets)


def test_markdown_holds_every_section_and_links_inside_the_ui():
    text = model_card.to_markdown(_facts(), card_url="#/experiments/1/runs/abc123/artifacts/model_card/model_card.html")
    for heading in (
        "# Model card: digits-cnn v3",
        "## What it is",
        "## Data",
        "## Performance",
        "## Beyond MNIST",
        "## Calibration",
        "## Gate decision",
        "## Reproduce",
        "## Known limits",
    ):
        assert heading in text, heading
    assert "[validation report](#/experiments/1/runs/abc123/artifacts/validation_report/index.html)" in text
    assert "[model card](#/experiments/1/runs/abc123/artifacts/model_card/model_card.html)" in text
    assert "| mnist-train | training | `627efe430bc4` | 60,000 |" in text
    assert "digit 4: recall 0.930, most often read as 9 (7 images)" in text
    assert "rotated: 91.00 %" in text and "Feedback slice" in text and "88.00 %" in text
    assert "`0123abcd-dirty` (the working tree had uncommitted changes" in text and "`digits reproduce 3` retrains it" in text
    assert "only the candidate right on 12 \\| p = 0.02" in text  # a pipe in a cell does not break the table
    assert "**promoted** against champion v2" in text


def test_markdown_fits_the_description_limit_however_long_the_facts():
    checks = [{"name": f"check {i}", "passed": False, "detail": "x" * 400} for i in range(30)]
    facts = _facts(gate={"promote": False, "checks": checks, "notes": []})
    text = model_card.to_markdown(facts)
    assert len(text) <= model_card.DESCRIPTION_LIMIT
    assert text.rstrip().endswith("(shortened to fit the description: see the full card)")
    assert "## Known limits" in text  # before the gate's details, which are cut
    assert len(model_card.to_markdown(facts, limit=10**6)) > model_card.DESCRIPTION_LIMIT


def test_a_long_card_shortens_its_details_before_its_limits():
    families = {f"family_{i}": 0.9 + i / 200 for i in range(14)}
    detail = ", ".join(f"{name} {value:.4f} vs floor 0.9000" for name, value in families.items())
    checks = [{"name": f"check {i}", "passed": True, "detail": detail} for i in range(4)]
    params = {**_facts().params, "train": {f"knob_{i}": i for i in range(30)}}
    facts = _facts(gate={"promote": True, "checks": checks, "notes": []}, suite={"families": families}, params=params)
    assert len(model_card.to_markdown(facts, limit=10**6)) > model_card.DESCRIPTION_LIMIT
    text = model_card.to_markdown(facts)
    assert len(text) <= model_card.DESCRIPTION_LIMIT and "shortened" not in text
    assert "digit 4: recall 0.930, most often read as 9 (7 images)" in text and "family_0: 90.00 %" in text
    assert detail not in text and detail[:100] in text and "…" in text  # the gate's long details, cut
    assert "--set train.knob_29=29" in text  # the command that reproduces it stays whole


def test_a_card_without_gate_suite_or_per_class_still_renders():
    facts = _facts(per_class=None, suite=None, gate=None, datasets=(), validation_report=None, metrics={})
    text = model_card.to_markdown(facts)
    assert "No gate decision was logged" in text and "no validation report logged" in text
    assert "## Beyond MNIST" not in text
    model_card.to_html(facts, {})


class _Page(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict] = []
        self.links: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        if tag == "a":
            self.links.append(dict(attrs)["href"])

    def handle_data(self, data):
        self.text.append(data)


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (4, 3), 128).save(buffer, format="PNG")
    return buffer.getvalue()


def test_html_embeds_the_plots_and_escapes_what_the_run_logged():
    png = _png()
    tags = {**_facts().tags, "serving_runtime": "<script>alert(1)</script>", "env.cpu": "AVX2", "env.tensorflow": "2.21.0"}
    facts = _facts(tags=tags, version_tags={"reproduced": "identical (2026-12-06 10:00 UTC)"})
    page = model_card.to_html(
        facts, {"plots/confusion_matrix.png": png, "plots/misclassified.png": png}, "http://127.0.0.1:5000/"
    )
    assert "<script>" not in page and "&lt;script&gt;" in page
    parsed = _Page()
    parsed.feed(page)
    assert [i["data-plot"] for i in parsed.images] == ["confusion_matrix.png", "misclassified.png"]  # in the card's order
    assert all(base64.b64decode(i["src"].split(",", 1)[1]) == png for i in parsed.images)
    assert "http://127.0.0.1:5000/#/experiments/1/runs/abc123" in parsed.links
    text = " ".join(parsed.text)
    assert "Known limits" in text and "digit 4" in text and "Per" not in parsed.links
    # the full card has what the short one leaves out: the per-class table and the family floors
    assert "<th>precision</th>" in page and "<th>floor</th>" in page
    assert "Recall per digit" not in page and "full card" not in page  # the short card's own lines
    assert "Trained on: cpu AVX2, tensorflow 2.21.0." in page and "digits reproduce</code> said: identical" in page
