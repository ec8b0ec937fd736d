"""Follow ``models:/<name>@champion`` in the MLflow registry: load it, warm it, swap it in.

Used by the BentoML service (which polls in a background thread) and by ``digits predict`` (which
loads once). No BentoML here: this module only needs MLflow, TensorFlow and ``pipeline``.

A swap is one reference assignment: the new version is loaded and warmed completely while the old
one keeps answering, so a request never sees a half-loaded model; each request reads the reference
once and answers with that model's name, version and run id.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pipeline.registry import CHAMPION
from pipeline.served import LoadedModel, load
from pipeline.settings import Settings

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

NO_CHAMPION = "no model has been promoted yet; run `digits retrain` to train one and promote it"
# after a version fails to load, wait this long before trying the same version again
RETRY_FAILED_SECONDS = 60.0


class ModelUnavailable(RuntimeError):
    """No model can answer right now; the message says why and what to do."""


def _settle_garbage_collector() -> None:
    """Keep the long-lived objects of TensorFlow and the model out of future garbage collections.

    Without this, a full collection walks TensorFlow's large object graph every few seconds under
    load and stalls every request for most of a second (benchmarks/README.md has the figures).
    Objects of a replaced model are unfrozen and collected here, once per swap.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def missing_store(settings: Settings) -> str | None:
    """Why there can be no champion yet when the embedded store does not even exist (else None).

    Checked first so that looking for a champion never creates an empty store in the wrong folder.
    """
    database = settings.mlflow_dir / "mlflow.db"
    if settings.tracking_uri is None and not database.exists():
        return (
            f"{NO_CHAMPION} (there is no MLflow store at {database}: run from the project folder "
            "or set DIGITS_HOME, or MLFLOW_TRACKING_URI for a tracking server)"
        )
    return None


def load_champion(settings: Settings) -> LoadedModel:
    """The current champion, loaded once (for ``digits predict``); ModelUnavailable when none."""
    from pipeline.registry import get_alias, store_client

    if reason := missing_store(settings):
        raise ModelUnavailable(reason)
    from pipeline.registry import IntegrityError

    ref = get_alias(store_client(settings), settings.model_name)
    if ref is None:
        raise ModelUnavailable(f"{NO_CHAMPION} (model {settings.model_name} in {settings.resolved_tracking_uri})")
    try:
        return load(ref, settings.serve_runtime, settings.serve_tf_threads, settings.unsure_threshold, verify=True)
    except IntegrityError as err:
        raise ModelUnavailable(f"champion v{ref.version} refused: {err}") from None


class ChampionWatcher:
    """Keeps the champion loaded and follows the alias every ``poll_seconds`` in a daemon thread.

    ``current`` is the model that answers; it is replaced in one assignment, only by a model that
    loaded and answered a warm-up, and (for the champion) that carries the gate's verdict and whose
    downloaded files match the hashes recorded at its promotion. When the alias disappears, names a
    version that is refused, or the registry cannot be read, the loaded model keeps answering (and
    ``problem`` says what is wrong).
    """

    def __init__(
        self, settings: Settings, poll_seconds: float | None = None, tf_threads: int | None = None, alias: str = CHAMPION
    ) -> None:
        self.settings = settings
        # "challenger" follows the shadow alias instead: its absence is normal, and its removal unloads it
        self.alias = alias
        self.tf_threads = tf_threads
        self._tf_configured = False
        self.poll_seconds = float(poll_seconds or settings.champion_poll_seconds)
        self.current: LoadedModel | None = None
        self.problem: str | None = None
        self.checked_once = threading.Event()
        self.last_check: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: MlflowClient | None = None
        self._failed: dict[str, float] = {}  # version -> when it failed to load

    # ------------------------------------------------------------ lifecycle

    def start(self) -> ChampionWatcher:
        self._thread = threading.Thread(target=self._run, name=f"{self.alias}-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check()
            # no champion yet: import TensorFlow now, so that the first promotion loads quickly
            self._prepare_tensorflow()
            self._stop.wait(self.poll_seconds)

    def _prepare_tensorflow(self) -> None:
        """Import TensorFlow and size its thread pools, once, before it runs anything."""
        if self._tf_configured:
            return
        self._tf_configured = True
        from pipeline.model import limit_threads

        try:
            limit_threads(self.tf_threads)
        except Exception:  # loading will report a broken TensorFlow precisely
            log.exception("could not configure TensorFlow threads")

    # ------------------------------------------------------------ one poll

    def check(self) -> LoadedModel | None:
        """Look at the alias once; load and swap in a new champion. Never raises."""
        try:
            self._check()
        except Exception as err:  # a poll must never kill the watcher: report and try again later
            self._report(f"the model registry could not be read ({type(err).__name__}: {err}); retrying")
        finally:
            self.last_check = datetime.now(UTC).isoformat(timespec="seconds")
            self.checked_once.set()
        return self.current

    def _check(self) -> None:
        from pipeline.registry import IntegrityError, alias_version, get_version, store_client

        if self._client is None:
            if reason := missing_store(self.settings):
                self._report(NO_CHAMPION if self.alias == CHAMPION else None, reason)
                return
            self._client = store_client(self.settings)
        current = self.current
        # the cheap question first: every poll holds the GIL while it runs, and requests wait for it
        # (reading the whole version and its run a poll showed in the service's p99)
        version = alias_version(self._client, self.settings.model_name, self.alias)
        if current is not None and current.ref.version == version:
            self._report(None)
            return
        if version is None and self.alias != CHAMPION:
            if current is not None:
                log.info("the %s alias is gone: v%s no longer runs in the shadows", self.alias, current.ref.version)
            self.current = None
            self._report(None)
            return
        if version is None:
            self._report(
                NO_CHAMPION
                if current is None
                else (f"the champion alias of {self.settings.model_name} is gone; still serving v{current.ref.version}")
            )
            return
        failed_at = self._failed.get(version)
        if failed_at is not None and time.monotonic() - failed_at < max(RETRY_FAILED_SECONDS, self.poll_seconds):
            return
        ref = get_version(self._client, self.settings.model_name, version)
        log.info("loading %s %s v%s (run %s)", self.alias, ref.model_name, ref.version, ref.run_id)
        self._prepare_tensorflow()
        try:
            # the champion answers clients: only what the gate passed, byte for byte (a challenger answers nobody)
            loaded = load(
                ref,
                self.settings.serve_runtime,
                self.tf_threads or 1,
                self.settings.unsure_threshold,
                verify=self.alias == CHAMPION,
            )
        except IntegrityError as err:
            self._failed[ref.version] = time.monotonic()
            self._report(
                f"{self.alias} v{ref.version} refused: {err}; "
                + (f"still serving v{current.ref.version}" if current else "no model is served until a gated promotion")
            )
            return
        except Exception as err:
            self._failed[ref.version] = time.monotonic()
            self._report(
                f"{self.alias} v{ref.version} could not be loaded ({type(err).__name__}: {err})"
                + (f"; still serving v{current.ref.version}" if current else "")
            )
            return
        self.current = loaded  # the swap: one reference assignment
        self._failed.pop(ref.version, None)
        self._report(None)
        _settle_garbage_collector()
        log.info(
            "%s: %s v%s through %s (loaded in %.1f s; was %s)",
            "now serving" if self.alias == CHAMPION else f"in the shadows, as {self.alias}",
            ref.model_name,
            ref.version,
            loaded.runtime,
            loaded.load_seconds,
            f"v{current.ref.version}" if current else "none",
        )

    def _report(self, problem: str | None, detail: str | None = None) -> None:
        """Set what is wrong (shown to clients); log it once when it changes (with detail for the log)."""
        if problem != self.problem and problem is not None:
            log.warning("%s", detail or problem)
        self.problem = problem

    # ------------------------------------------------------------ for requests

    def require(self) -> LoadedModel:
        """The model that answers this request, or ModelUnavailable saying why there is none."""
        current = self.current
        if current is not None:
            return current
        if not self.checked_once.is_set():
            raise ModelUnavailable("the service is starting and loading the champion model; retry in a few seconds")
        raise ModelUnavailable(self.problem or NO_CHAMPION)
