"""``digits trace``: from an answer (or a version) back to its origins, with MLflow UI links.

answer -> model version -> training run -> data versions -> validation report -> git commit -> who
promoted it and why (and whether it was reproduced).
"""

from __future__ import annotations

import re
from typing import Any

from pipeline import prediction_log, registry
from pipeline.settings import Settings

REQUEST_ID = re.compile(r"[0-9a-f]{32}")
# where `digits ui` shows the embedded store
LOCAL_UI = "http://127.0.0.1:5000"


class TraceError(LookupError):
    """Nothing to trace: the message says what was looked for and where."""


def trace(settings: Settings, target: str) -> dict[str, Any]:
    """The chain behind a request id (from the prediction log) or a registered version number."""
    answer = None
    if REQUEST_ID.fullmatch(target):
        engine = prediction_log.connect(settings.prediction_log_url)
        try:
            answer = prediction_log.answer_record(engine, target)
        finally:
            engine.dispose()
        if answer is None:
            raise TraceError(f"no answer has request id {target} in {prediction_log.safe_url(settings.prediction_log_url)}")
        version = answer["model_version"]
    elif target.isdigit():
        version = target
    else:
        raise TraceError(f"{target!r} is neither a request id (32 hex digits, from an answer) nor a version number")
    client = registry.connect(settings)
    try:
        ref = registry.get_version(client, settings.model_name, version)
    except registry.PromotionError as err:
        raise TraceError(str(err)) from None
    ui = ui_base(settings)
    chain: dict[str, Any] = {"answer": answer, "model_version": _version(ref, ui)}
    if ref.run_id:
        chain["run"] = _run(client, ref.run_id, ui)
    history = registry.promotion_history(client, settings.model_name)
    chain["promotions"] = [entry for entry in history if str(entry.get("version")) == ref.version]
    return chain


def ui_base(settings: Settings) -> str:
    """The MLflow UI's address: the tracking server's, else where `digits ui` serves the embedded store."""
    uri = settings.tracking_uri or ""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI


def _version(ref: registry.ModelRef, ui: str) -> dict[str, Any]:
    return ref.to_dict() | {"link": f"{ui}/#/models/{ref.model_name}/versions/{ref.version}"}


def _run(client, run_id: str, ui: str) -> dict[str, Any]:
    run = client.get_run(run_id)
    tags = run.data.tags
    link = f"{ui}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    artifacts = {item.path for item in client.list_artifacts(run_id)}
    return {
        "run_id": run_id,
        "name": run.info.run_name,
        "status": run.info.status,
        "link": link,
        "trigger": tags.get("trigger"),
        "git_commit": tags.get("git_commit"),
        "data_version": tags.get("data_version"),
        "datasets": [
            {"name": d.dataset.name, "digest": d.dataset.digest, "source": d.dataset.source, "context": _context(d)}
            for d in run.inputs.dataset_inputs
        ],
        "validation": tags.get("validation"),
        "validation_report": f"{link}/artifacts/validation_report" if "validation_report" in artifacts else None,
        "overrides": tags.get("overrides"),
        "machine": {name.removeprefix("env."): value for name, value in tags.items() if name.startswith("env.")},
    }


def _context(dataset_input) -> str | None:
    return next((tag.value for tag in dataset_input.tags if tag.key == "mlflow.data.context"), None)


def render(chain: dict[str, Any]) -> str:
    """The chain for people, one link of it a line."""
    lines = []
    if answer := chain["answer"]:
        corrected = f", corrected to {answer['label']} ({answer['correction_status']})" if answer["label"] is not None else ""
        lines.append(
            f"answer {answer['request_id']}: {answer['digit']} ({answer['confidence']:.1%}) at {answer['created_at']} UTC "
            f"via {answer['route']}, {answer['runtime']}{corrected}"
        )
    version = chain["model_version"]
    lines.append(f"  <- model {version['model_name']} v{version['version']}  {version['link']}")
    if version.get("verdict") or version.get("reproduced"):
        lines.append(f"     gate verdict {version.get('verdict') or '-'}; reproduced {version.get('reproduced') or '-'}")
    if run := chain.get("run"):
        lines.append(f"  <- run {run['run_id']} ({run['status']}, started by {run['trigger'] or 'manual'})  {run['link']}")
        for dataset in run["datasets"] or [{"name": "data", "digest": run["data_version"], "source": "DVC", "context": None}]:
            context = f" for {dataset['context']}" if dataset["context"] else ""
            lines.append(f"  <- data {dataset['name']} {dataset['digest']}{context} ({dataset['source']})")
        report = run["validation_report"] or "no report logged"
        lines.append(f"  <- validation {run['validation'] or 'not recorded'}: {report}")
        lines.append(f"  <- git commit {run['git_commit'] or 'not recorded'}")
    for promotion in chain["promotions"]:
        lines.append(f"  promoted {promotion.get('at')} by {promotion.get('by')}, after v{promotion.get('from') or '-'}")
    if chain["promotions"]:
        lines.append(f"  why (the last promotion): {version.get('promotion_reason') or 'not recorded'}")
    else:
        lines.append("  never promoted")
    return "\n".join(lines)
