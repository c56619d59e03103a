"""Disk housekeeping: the checkpoints a finished training leaves, and run folders no model version needs.

A run folder (``<state>/runs/<scenario>-<time>-<id>``) holds checkpoints, the trained model, the
ONNX export and reports; the registered version keeps its own copy of what it serves in the MLflow
artifact store. ``prune_checkpoints`` runs when training succeeded; ``survey_run_folders`` and
``free_run_folders`` back ``finetune-flows gc``: a folder is freed only when no registered model
version was trained in it, its MLflow run is not running and nothing in it was written lately. (The
age rule is what protects a run in progress: each stage re-opens and closes the MLflow run, so
between stages a live run reads FINISHED.)
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_flows.tasks.core.config import KeepCheckpoints
from finetune_flows.tasks.core.secrets import guard
from finetune_flows.tasks.core.tracking import RUN_RECORD, folder_in_use

_STEP = re.compile(r"^checkpoint-(\d+)$")
LIVE_STATUSES = frozenset({"RUNNING", "SCHEDULED"})


def folder_size(path: Path) -> int:
    """Bytes of the files under ``path`` (links are not followed)."""
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def last_written(path: Path) -> float:
    """The newest modification time of ``path`` and everything under it (seconds since the epoch)."""
    return max([path.lstat().st_mtime, *(f.lstat().st_mtime for f in path.rglob("*"))])


def checkpoint_folders(checkpoints: Path) -> list[Path]:
    """The ``checkpoint-<step>`` folders under ``checkpoints``, by step."""
    if not checkpoints.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoints.iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
    return [path for _, path in sorted(found)]


def prune_checkpoints(checkpoints: Path, best: str | Path | None, keep: KeepCheckpoints) -> list[Path]:
    """Remove the checkpoints ``keep`` does not keep (best_and_last: all but ``best`` and the latest); the removed."""
    if keep is KeepCheckpoints.ALL:
        return []
    folders = checkpoint_folders(checkpoints)
    kept: set[Path] = set()
    if keep is KeepCheckpoints.BEST_AND_LAST and folders:
        kept.add(folders[-1].resolve())
        if best is not None:
            kept.add(Path(best).resolve())
    removed = [folder for folder in folders if folder.resolve() not in kept]
    for folder in removed:
        shutil.rmtree(folder)
    return removed


@dataclass(frozen=True)
class RunFolder:
    """A run folder, its size, and why it must stay (``keep_reason``) or may go (None)."""

    path: Path
    size: int
    run_id: str | None
    status: str | None
    versions: tuple[str, ...]
    keep_reason: str | None

    @property
    def reclaimable(self) -> bool:
        return self.keep_reason is None


def _paged(call: Any, **kwargs: Any) -> list[Any]:
    """Every item of an MLflow search that pages with ``page_token``."""
    items: list[Any] = []
    token = None
    while True:
        page = call(page_token=token, **kwargs)
        items.extend(page)
        token = page.token
        if not token:
            return items


def tracked_runs(client: Any) -> dict[Path, tuple[str, str]]:
    """Every MLflow run with a ``run_dir`` tag: resolved run folder -> (run id, status)."""
    from mlflow.entities import ViewType

    experiments = [e.experiment_id for e in _paged(client.search_experiments, view_type=ViewType.ALL)]
    runs: dict[Path, tuple[str, str]] = {}
    for start in range(0, len(experiments), 100):
        found = _paged(client.search_runs, experiment_ids=experiments[start : start + 100], run_view_type=ViewType.ALL)
        for run in found:
            folder = run.data.tags.get("run_dir")
            if folder:
                runs[Path(folder).resolve()] = (run.info.run_id, run.info.status)
    return runs


def versions_by_run(client: Any) -> dict[str, list[str]]:
    """Every registered model version: run id -> ["<model> v<version>", ...]."""
    by_run: dict[str, list[str]] = {}
    for model in _paged(client.search_registered_models):
        for version in _paged(client.search_model_versions, filter_string=f"name='{model.name}'"):
            if version.run_id:
                by_run.setdefault(version.run_id, []).append(f"{model.name} v{version.version}")
    return by_run


def survey_run_folders(runs_dir: Path, tracking_uri: str, min_age_s: float = 6 * 3600.0) -> list[RunFolder]:
    """Each folder under ``runs_dir``, whether a model version or a live run still needs it, and its size.

    A folder with anything written in the last ``min_age_s`` seconds is kept: it may be a run in progress."""
    from mlflow import MlflowClient

    if not runs_dir.is_dir():
        return []
    client = MlflowClient(tracking_uri=guard(tracking_uri))
    runs = tracked_runs(client)
    versions = versions_by_run(client)
    folders = []
    for path in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        run_id, status = runs.get(path.resolve(), (None, None))
        used_by = tuple(versions.get(run_id, [])) if run_id else ()
        if used_by:
            reason: str | None = f"registered as {', '.join(used_by)}"
        elif status in LIVE_STATUSES and (path / RUN_RECORD).is_file() and not folder_in_use(path):
            reason = (
                f"run {run_id} was interrupted ({status}, no process works on it): `finetune-flows resume {path.name}`"
            )
        elif status in LIVE_STATUSES:
            reason = f"run {run_id} is {status}"
        elif (age := time.time() - last_written(path)) < min_age_s:
            reason = f"written {age / 3600:.1f} h ago (under {min_age_s / 3600:g} h): may be a run in progress"
        else:
            reason = None
        folders.append(RunFolder(path, folder_size(path), run_id, status, used_by, reason))
    return folders


def free_run_folders(folders: list[RunFolder]) -> int:
    """Delete the reclaimable folders of a survey; the bytes freed."""
    freed = 0
    for folder in folders:
        if folder.reclaimable and folder.path.is_dir():
            shutil.rmtree(folder.path)
            freed += folder.size
    return freed


def human_size(size: float) -> str:
    """``1536`` -> ``"1.5 KB"`` (powers of 1024)."""
    unit = "B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            break
        size /= 1024
    return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
