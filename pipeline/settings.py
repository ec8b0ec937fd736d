"""The one settings object: where things live and which servers to talk to, from the environment."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from pipeline.prediction_log import FeedbackPolicy


class Settings(BaseSettings):
    """Read from ``DIGITS_*`` variables (and ``MLFLOW_TRACKING_URI``); defaults are the embedded set-up."""

    model_config = SettingsConfigDict(env_prefix="DIGITS_", extra="ignore")

    home: Path = Field(default_factory=Path.cwd, description="project folder holding params.yaml, data/ and mlflow/")
    tracking_uri: str | None = Field(
        default=None,
        validation_alias="MLFLOW_TRACKING_URI",
        description="MLflow tracking/registry URI; default: the sqlite store under mlflow/",
    )
    promotion_lock_url: str | None = Field(
        None,
        description="PostgreSQL URL (SQLAlchemy) where promotions take their lock, shared by every machine: the tracking "
        "server's database; default: MLFLOW_TRACKING_URI when it names PostgreSQL, else a file lock in mlflow/",
    )
    experiment: str = "digits"
    stale_run_hours: float = Field(
        24.0, gt=0, description="a run another machine opened and left RUNNING this long is marked FAILED by the next retrain"
    )
    monitoring_experiment: str = Field("digits-monitoring", description="MLflow experiment of `digits monitor`: a run a call")
    model_name: str = "digits-cnn"
    promoted_by: str | None = Field(default=None, description="who promotes; default: the OS user")
    serve_host: str = "127.0.0.1"
    serve_port: int = 3000
    api_key: SecretStr | None = Field(
        None,
        description="when set, the service's POST routes need it (Authorization: Bearer KEY or X-API-Key: KEY); "
        "GET routes and pages stay open",
    )
    champion_poll_seconds: float = Field(10.0, gt=0, description="how often the service looks for a new champion")
    max_batch_images: int = Field(1000, ge=1, description="largest batch the service accepts in one request")
    # more threads fight the HTTP event loop for the cores: scale out with replicas instead
    serve_tf_threads: int = Field(1, ge=1, description="TensorFlow (or LiteRT) threads per model call in the service")
    serve_runtime: Literal["tflite-int8", "tflite", "keras"] = Field(
        "tflite-int8",
        description="the fastest runtime the service may use: the champion's int8 TensorFlow Lite export when its run "
        "kept one, else its float32 export, else Keras; `tflite` starts at the float32 export, `keras` is always Keras",
    )
    unsure_threshold: float = Field(
        0.9,
        ge=0,
        le=1,
        description="answers less confident than this say unsure, for versions trained without a calibration of their own",
    )
    # the prediction log (pipeline/prediction_log.py)
    log_enabled: bool = Field(True, description="record every answer in the prediction log")
    log_db_url: str | None = Field(
        None, description="SQLAlchemy URL of the prediction log, e.g. postgresql+psycopg2://...; default: logs/predictions.db"
    )
    log_queue_size: int = Field(10_000, ge=1, description="answers waiting to be written; beyond it they are dropped and counted")
    log_retention_days: float = Field(30.0, gt=0, description="`digits log prune` deletes uncorrected answers older than this")
    log_upload_bytes: int = Field(
        0, ge=0, description="keep original uploads up to this size with their answer; 0 (the default) keeps none"
    )
    feedback_quarantine_confidence: float = Field(
        0.95, ge=0, le=1, description="a correction contradicting an answer this confident waits for `digits feedback review`"
    )
    feedback_client_daily_cap: int = Field(
        100, ge=0, description="corrections a sender may make a day before the rest wait for review"
    )
    # scale-out on a Prefect server (`digits deploy`, `digits retrain --deployment`)
    work_pool: str = Field("digits", description="Prefect process work pool that `digits deploy` creates and workers poll")
    deployment: str = Field("digits", description="name of the Prefect deployment retrain-digits/<name>")
    retrain_cron: str = Field("0 3 * * 1", description="the deployment's schedule (cron, UTC); empty: no schedule")
    monitor_cron: str = Field("0 * * * *", description="the monitor deployment's schedule (cron, UTC); empty: no schedule")
    monitor_window: str = Field("24h", description="how far back the monitor deployment looks each time it runs")
    # the sweep's Dask cluster (`digits sweep`): a local one sized for this machine unless an address is given
    dask_address: str | None = Field(None, description="Dask scheduler for sweeps (tcp://host:8786); default: a local cluster")
    dask_workers: int | None = Field(None, ge=1, description="local cluster size; default: one a core, at most one a candidate")
    sweep_tf_threads: int | None = Field(
        None, ge=1, description="TensorFlow threads per sweep training; default on a local cluster: cores / workers"
    )

    @property
    def params_path(self) -> Path:
        return self.home / "params.yaml"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def mlflow_dir(self) -> Path:
        return self.home / "mlflow"

    @property
    def cache_dir(self) -> Path:
        return self.home / ".cache"

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    @property
    def prediction_log_url(self) -> str:
        return self.log_db_url or f"sqlite:///{(self.home / 'logs' / 'predictions.db').resolve()}"

    @property
    def feedback_policy(self) -> FeedbackPolicy:
        from pipeline.prediction_log import FeedbackPolicy

        return FeedbackPolicy(self.feedback_quarantine_confidence, self.feedback_client_daily_cap)

    @property
    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{(self.mlflow_dir / 'mlflow.db').resolve()}"

    @property
    def tracking_server(self) -> str | None:
        """The tracking server's base URL when MLFLOW_TRACKING_URI names one (http/https), else None."""
        uri = self.tracking_uri
        return uri.rstrip("/") if uri and uri.split(":", 1)[0].lower() in ("http", "https") else None

    @property
    def artifact_location(self) -> str | None:
        """Where a new experiment keeps artifacts; None lets a tracking server decide."""
        if self.tracking_uri and not self.tracking_uri.startswith("sqlite:"):
            return None
        return (self.mlflow_dir / "artifacts").resolve().as_uri()

    @property
    def promotion_lock(self) -> Path:
        return self.mlflow_dir / "promotion.lock"

    @property
    def promotion_lock_database(self) -> str | None:
        """The database promotions lock in (PostgreSQL), or None for the file lock of one machine."""
        if self.promotion_lock_url:
            return self.promotion_lock_url
        uri = self.tracking_uri or ""
        return uri if uri.split(":", 1)[0].split("+", 1)[0].lower() == "postgresql" else None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings are read on first use, never at import time."""
    return Settings()
