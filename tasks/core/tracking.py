"""The run's bookkeeping: its working folder (never reused) and its MLflow run.

Every stage of one flow run logs to the same MLflow run, re-opened by id; the run folder holds
checkpoints, the exported graph and reports.

``RunInfo`` travels as a Prefect parameter (stored in Prefect's database, shown in its UI), so it
holds the tracking URI only redacted (``tracking_uri_redacted``); a stage reaches the store with
``run.tracking_uri()`` (``tracking_uri_for``), the URI of its own environment, checked against the run's (see
``finetune_flows.tasks.core.secrets``).
"""

from __future__ import annotations

import fcntl
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol

from prefect import task
from pydantic import BaseModel, ConfigDict, field_validator

from finetune_flows.plugins.errors import ConfigError
from finetune_flows.tasks.core.secrets import guard, redact
from finetune_flows.tasks.core.settings import get_settings

RUN_RECORD = "run.json"
_HELD: dict[str, IO[str]] = {}


class RunConfig(Protocol):
    """What opening a run needs from a flow's parameter model (``FinetuneConfig``, ``RecommenderConfig``)."""

    @property
    def scenario(self) -> str: ...

    @property
    def head_name(self) -> str: ...

    @property
    def experiment_name(self) -> str: ...

    def model_dump(self, *, mode: str = ...) -> dict[str, Any]: ...


class RunInfo(BaseModel):
    """Identifies one pipeline run: its folder and its MLflow run (the store's URI only with credentials redacted)."""

    model_config = ConfigDict(frozen=True)

    run_dir: str
    run_id: str
    experiment_id: str
    tracking_uri_redacted: str

    @field_validator("tracking_uri_redacted")
    @classmethod
    def _no_credentials(cls, value: str) -> str:
        return redact(value)

    def tracking_uri(self) -> str:
        """The tracking URI to give MLflow, from this process's environment (``tracking_uri_for``)."""
        return tracking_uri_for(self)


def tracking_uri_for(run: RunInfo) -> str:
    """The URI to give MLflow for ``run``: this process's settings (which must name the run's store), guarded.

    See ``secrets.guard``: for ``http(s)://user:pw@host/`` MLflow gets ``http(s)://host/`` and the
    credentials through its own environment variables.
    """
    uri = get_settings().tracking_uri
    if redact(uri) != run.tracking_uri_redacted:
        raise ConfigError(
            f"run {run.run_id} was opened in the MLflow store {run.tracking_uri_redacted} but this process's "
            f"FINETUNE_FLOWS_MLFLOW_TRACKING_URI / FINETUNE_FLOWS_STATE_DIR name {redact(uri)}: "
            "give every worker the environment of the flow that started the run"
        )
    return guard(uri)


@contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
    """Hold an exclusive lock beside a SQLite store while touching it first: two first runs on a new state folder
    would both create its tables ("table latest_metrics already exists"). Other stores need none."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    lock = Path(tracking_uri.removeprefix("sqlite:///") + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def configure_mlflow(tracking_uri: str, experiment: str, artifact_root: str) -> str:
    """Point MLflow at the store and make sure the experiment exists (the store created once, under a lock);
    returns its id."""
    import mlflow

    mlflow.set_tracking_uri(guard(tracking_uri))
    with store_lock(tracking_uri):
        found = mlflow.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id
            if found
            else mlflow.create_experiment(experiment, artifact_location=f"{artifact_root.rstrip('/')}/{experiment}")
        )
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"training": {"epochs": 1}}`` -> ``{"training.epochs": "1"}`` for ``mlflow.log_params``."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{name}."))
        else:
            flat[name] = redact(str(value))[:6000]
    return flat


def new_run_dir(runs_dir: Path, scenario: str) -> Path:
    """A fresh folder ``<runs_dir>/<scenario>-<UTC time>-<random>``; an existing one is never reused."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = runs_dir / f"{scenario}-{stamp}-{uuid.uuid4().hex[:6]}"
    path.mkdir(parents=True, exist_ok=False)
    return path


def open_run(config: RunConfig, tracking_uri: str, artifact_root: str, runs_dir: Path) -> RunInfo:
    """Create the run folder (held by this process, see ``hold_run_folder``) and an MLflow run tagged with the
    scenario and holding the config; the folder keeps the config and the run's ids (``RUN_RECORD``) for a resume."""
    import mlflow

    experiment_id = configure_mlflow(tracking_uri, config.experiment_name, artifact_root)
    run_dir = new_run_dir(runs_dir, config.scenario)
    hold_run_folder(run_dir)
    with mlflow.start_run(run_name=run_dir.name, tags={"scenario": config.scenario, "head": config.head_name}) as run:
        mlflow.log_params(flat_params(config.model_dump(mode="json")))
        mlflow.set_tag("run_dir", str(run_dir))
    info = RunInfo(
        run_dir=str(run_dir), run_id=run.info.run_id, experiment_id=experiment_id, tracking_uri_redacted=tracking_uri
    )
    write_run_record(info, config)
    return info


class RunRecord(BaseModel):
    """What a run folder keeps about its run (``<run_dir>/run.json``): enough to resume it."""

    run: RunInfo
    config: dict[str, Any]
    """The flow's parameters as JSON (``model_dump(mode="json")``)."""
    flow_run_ids: list[str] = []
    """The Prefect flow runs that worked on this run folder, the first one first."""


def write_run_record(run: RunInfo, config: RunConfig) -> None:
    """Keep the run's ids, its config and this flow run's id in the run folder (``RUN_RECORD``)."""
    from prefect.runtime import flow_run

    path = Path(run.run_dir) / RUN_RECORD
    known = RunRecord.model_validate_json(path.read_text(encoding="utf-8")).flow_run_ids if path.is_file() else []
    current = [str(flow_run.id)] if flow_run.id else []
    record = RunRecord(run=run, config=config.model_dump(mode="json"), flow_run_ids=[*known, *current])
    path.write_text(record.model_dump_json(indent=2), encoding="utf-8")


def hold_run_folder(run_dir: Path) -> None:
    """Lock ``run_dir`` for as long as this process works on it (the kernel drops the lock when the process dies,
    even by ``kill -9``): ``finetune-flows resume`` refuses a folder that is still held."""
    handle = (run_dir / ".lock").open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        handle.close()
        raise ConfigError(f"run folder {run_dir} is in use by a live process: it cannot be resumed now") from exc
    _HELD[str(run_dir)] = handle


def folder_in_use(run_dir: Path) -> bool:
    """Whether a live process holds ``run_dir`` (``hold_run_folder``); False for a folder without a lock file."""
    lock = run_dir / ".lock"
    if not lock.is_file():
        return False
    with lock.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def release_run_folder(run: RunInfo) -> None:
    """Drop the lock ``hold_run_folder`` took (the run ended, one way or another)."""
    handle = _HELD.pop(run.run_dir, None)
    if handle is not None:
        handle.close()


def tag_run(run: RunInfo, tags: dict[str, str]) -> None:
    """Add ``tags`` to the run's MLflow run (e.g. the absolute paths and hashes of the files it read)."""
    from mlflow import MlflowClient
    from mlflow.entities import RunTag

    if tags:
        client = MlflowClient(tracking_uri=tracking_uri_for(run))
        client.log_batch(run.run_id, tags=[RunTag(k, redact(v)) for k, v in tags.items()])


def end_run(run: RunInfo, status: str, stage: str | None) -> None:
    """End the run's MLflow run with ``status`` (FAILED, KILLED), naming the stage that was running."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri_for(run))
    if stage:
        client.set_tag(run.run_id, "failed_stage", stage)
    client.set_terminated(run.run_id, status=status)


@task(name="fail-run")
def fail_run(run: RunInfo, stage: str | None) -> None:
    """Mark the run's MLflow run FAILED (and which stage failed): a pipeline that stops at any stage, ingest
    included, is a failed run in MLflow, not a finished one."""
    end_run(run, "FAILED", stage)


@task(name="start-run")
def start_run(config: RunConfig) -> RunInfo:
    """Open the MLflow run and the run folder that the later stages write to, once the store answers and the
    folders can be written (``preflight.check_before_run``)."""
    from finetune_flows.tasks.core.preflight import check_before_run

    settings = get_settings()
    check_before_run(config, settings)
    return open_run(config, settings.tracking_uri, settings.artifact_root, settings.runs_dir)
