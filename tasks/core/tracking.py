"""The run's bookkeeping: its working folder (never reused) and its MLflow run.

Every stage of one flow run logs to the same MLflow run, re-opened by id; the run folder holds
checkpoints, the exported graph and reports.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from prefect import task
from pydantic import BaseModel, ConfigDict

from finetune_flows.tasks.core.settings import get_settings


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
    """Identifies one pipeline run: its folder and its MLflow run."""

    model_config = ConfigDict(frozen=True)

    run_dir: str
    run_id: str
    experiment_id: str
    tracking_uri: str


def configure_mlflow(tracking_uri: str, experiment: str, artifact_root: str) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
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
            flat[name] = str(value)[:6000]
    return flat


def new_run_dir(runs_dir: Path, scenario: str) -> Path:
    """A fresh folder ``<runs_dir>/<scenario>-<UTC time>-<random>``; an existing one is never reused."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = runs_dir / f"{scenario}-{stamp}-{uuid.uuid4().hex[:6]}"
    path.mkdir(parents=True, exist_ok=False)
    return path


def open_run(config: RunConfig, tracking_uri: str, artifact_root: str, runs_dir: Path) -> RunInfo:
    """Create the run folder and an MLflow run tagged with the scenario and holding the config."""
    import mlflow

    experiment_id = configure_mlflow(tracking_uri, config.experiment_name, artifact_root)
    run_dir = new_run_dir(runs_dir, config.scenario)
    with mlflow.start_run(run_name=run_dir.name, tags={"scenario": config.scenario, "head": config.head_name}) as run:
        mlflow.log_params(flat_params(config.model_dump(mode="json")))
        mlflow.set_tag("run_dir", str(run_dir))
    return RunInfo(run_dir=str(run_dir), run_id=run.info.run_id, experiment_id=experiment_id, tracking_uri=tracking_uri)


def tag_run(run: RunInfo, tags: dict[str, str]) -> None:
    """Add ``tags`` to the run's MLflow run (e.g. the absolute paths and hashes of the files it read)."""
    from mlflow import MlflowClient
    from mlflow.entities import RunTag

    if tags:
        MlflowClient(tracking_uri=run.tracking_uri).log_batch(run.run_id, tags=[RunTag(k, v) for k, v in tags.items()])


@task(name="start-run")
def start_run(config: RunConfig) -> RunInfo:
    """Open the MLflow run and the run folder that the later stages write to."""
    settings = get_settings()
    return open_run(config, settings.tracking_uri, settings.artifact_root, settings.runs_dir)
