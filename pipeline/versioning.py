"""Dataset versions with DVC, and the code version from git."""

from __future__ import annotations

import contextlib
import logging
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

log = logging.getLogger(__name__)


class VersioningError(RuntimeError):
    """DVC or git could not record or restore a version; the message says what to do."""


@dataclass(frozen=True)
class DataVersion:
    md5: str  # the DVC hash of data/ as recorded in data.dvc
    files: int
    size: int
    pushed: bool

    @property
    def short(self) -> str:
        return self.md5.removesuffix(".dir")[:12]


def pointer_path(root: Path, data_dir: Path) -> Path:
    return root / f"{data_dir.relative_to(root)}.dvc"


def read_pointer(pointer: Path) -> dict | None:
    """The ``outs`` entry of a .dvc file, or None if there is none."""
    if not pointer.exists():
        return None
    outs = (yaml.safe_load(pointer.read_text()) or {}).get("outs") or []
    return outs[0] if outs else None


def pointer_md5(pointer: Path) -> str | None:
    out = read_pointer(pointer)
    return out["md5"] if out else None


def _repo(root: Path):
    from dvc.repo import Repo

    try:
        return Repo(str(root))
    except Exception as err:  # NotDvcRepoError and friends
        raise VersioningError(f"{root} is not a DVC repository ({err}): run `dvc init` there") from None


def dvc_locations(root: Path) -> dict[str, str | None]:
    """Where the project keeps data versions: its cache folder and its default remote's URL (absolute; None without one)."""
    repo = _repo(root)
    try:
        remote = repo.config.get("core", {}).get("remote")
        url = repo.config.get("remote", {}).get(remote, {}).get("url") if remote else None
        return {"cache": str(repo.cache.local_cache_dir), "remote": url}
    finally:
        repo.close()


def pull(root: Path, data_dir: Path) -> bool:
    """Fetch the version ``data.dvc`` names from the cache or the remote; False if neither has it."""
    pointer = pointer_path(root, data_dir)
    if read_pointer(pointer) is None:
        return False
    repo = _repo(root)
    try:
        with _silenced("dvc_data"):  # its missing-cache warning is the line below, in the project's words
            repo.pull(targets=[str(pointer)])
    except Exception as err:  # the remote is empty, unreachable, or lacks this version
        log.info(
            "version %s of %s is in neither the DVC cache nor the remote (%s)",
            pointer_md5(pointer),
            data_dir.name,
            str(err).splitlines()[0] if str(err) else type(err).__name__,
        )
        return False
    finally:
        repo.close()
    return True


@contextlib.contextmanager
def _silenced(logger_name: str) -> Iterator[None]:
    """Only errors from ``logger_name`` while the block runs (importing DVC sets its loggers' levels itself)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def is_checked_out(root: Path, data_dir: Path) -> bool:
    """True when the files in data/ are exactly the version data.dvc names."""
    pointer = pointer_path(root, data_dir)
    if read_pointer(pointer) is None or not data_dir.exists():
        return False
    repo = _repo(root)
    try:
        return not repo.status(targets=[str(pointer)])
    finally:
        repo.close()


def record(root: Path, data_dir: Path, push: bool = True) -> DataVersion:
    """``dvc add`` data/ (a no-op when unchanged) and push it to the default remote."""
    pointer = pointer_path(root, data_dir)
    before = read_pointer(pointer)
    repo = _repo(root)
    repo.scm_context.quiet = True  # we say it once, below, instead of DVC's generic hints
    try:
        repo.add(str(data_dir.resolve()))
        pushed = False
        if push and repo.config.get("core", {}).get("remote"):
            try:
                repo.push(targets=[str(pointer)])
                pushed = True
            except Exception as err:
                # the version is recorded in the cache; pushing can be retried with `dvc push`
                log.warning("dvc push failed (%s): the data version is only in the local cache", err)
    finally:
        repo.close()
    out = read_pointer(pointer)
    if out is None:
        raise VersioningError(f"dvc add did not write {pointer}")
    if before is None or before.get("md5") != out["md5"]:
        log.info("%s now names data version %s: commit it (git add %s && git commit)", pointer.name, out["md5"], pointer.name)
    return DataVersion(md5=out["md5"], files=int(out.get("nfiles", 0)), size=int(out.get("size", 0)), pushed=pushed)


def lock_stages(root: Path) -> bool:
    """Record dvc.yaml's stages in dvc.lock as the flow just ran them, so ``dvc status`` is clean.

    The flow runs the same steps as ``dvc repro``; without this, DVC would think they never ran.
    Returns False where the project has no dvc.yaml or DVC could not record them.
    """
    if not (root / "dvc.yaml").exists():
        return False
    repo = _repo(root)
    try:
        with contextlib.chdir(root):  # DVC resolves stage files against the working directory
            repo.commit(force=True)
    except Exception as err:  # bookkeeping only: the run and its promotion stand
        log.warning("could not record the stages in dvc.lock (%s): `dvc status` will list them as changed", err)
        return False
    finally:
        repo.close()
    return True


def git_commit(root: Path) -> str | None:
    """The commit the code runs at, with ``-dirty`` when tracked files have changes; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
