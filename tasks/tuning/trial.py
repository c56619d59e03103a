"""One trial of a study: train with the drawn values, scored on the split that chooses the checkpoint.

A trial reads the data the ``tune`` run prepared and tokenized once. It trains in its own folder under
the tune run's folder and logs to its own MLflow run, a child of the tune run (tag ``mlflow.parentRunId``):
the drawn values as parameters, Trainer's metrics, and ``objective`` (the best ``eval_<primary metric>``).
Its value is measured on the eval split (the select split when ``data.select_fraction`` carves one), never
on test. A pruned trial's run ends FINISHED with tag ``tune.state=PRUNED``; a failed one FAILED. Its
checkpoints and model are deleted once it ends: the best values are trained again by the normal pipeline.

``TrialRequest`` holds only names, paths and small models, so the trial can run as a Prefect subflow; it
finds its Optuna trial again through the study's storage.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from finetune_flows.plugins import ConfigError
from finetune_flows.tasks.core.adapters import AdapterConfig
from finetune_flows.tasks.core.sections import TrainingConfig
from finetune_flows.tasks.core.tracking import RunInfo, tracking_uri_for
from finetune_flows.tasks.tuning.config import Pruning

logger = logging.getLogger(__name__)


class TrialRequest(BaseModel):
    """What one trial needs: its study and number, the tokenized data, the base model, its training values."""

    model_config = ConfigDict(frozen=True)

    study_name: str
    storage_url: str
    number: int
    pruning: Pruning
    pruning_warmup_evals: int
    pruning_startup_trials: int
    prune_below: float
    tokenized_dir: str
    model_dir: str
    head: str
    id2label: dict[int, str]
    primary_metric: str
    training: TrainingConfig
    adapter: AdapterConfig = AdapterConfig()
    """Full fine-tune or LoRA, as the run of the best values will train."""
    drawn: dict[str, Any]
    """The values drawn for this trial (dotted keys), logged as the run's parameters."""
    run: RunInfo
    """The trial's own folder and MLflow run (a child of the tune run)."""


class TrialResult(BaseModel):
    """How a trial ended: its state in Optuna terms ("COMPLETE", "PRUNED"), value and evaluations."""

    model_config = ConfigDict(frozen=True)

    number: int
    state: str
    value: float | None
    evaluations: int
    steps: int
    train_seconds: float
    run_id: str


def open_trial_run(parent: RunInfo, number: int, study_name: str) -> RunInfo:
    """A folder under the tune run's and an MLflow run nested under it, named ``trial-<number>``."""
    from mlflow import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    folder = Path(parent.run_dir) / "trials" / f"trial-{number}"
    folder.mkdir(parents=True, exist_ok=False)
    client = MlflowClient(tracking_uri=tracking_uri_for(parent))
    run = client.create_run(
        parent.experiment_id,
        run_name=f"trial-{number}",
        tags={MLFLOW_PARENT_RUN_ID: parent.run_id, "tune.study": study_name, "tune.trial": str(number)},
    )
    return RunInfo(
        run_dir=str(folder),
        run_id=run.info.run_id,
        experiment_id=parent.experiment_id,
        tracking_uri_redacted=parent.tracking_uri_redacted,
    )


def load_trial(request: TrialRequest) -> Any:
    """The study's live ``optuna.trial.Trial`` number ``request.number``, with the request's pruner."""
    import optuna

    from finetune_flows.tasks.tuning.study import make_pruner

    pruner = make_pruner(
        request.pruning, request.pruning_warmup_evals, request.pruning_startup_trials, request.prune_below
    )
    storage = optuna.storages.RDBStorage(request.storage_url)
    study = optuna.load_study(study_name=request.study_name, storage=storage, pruner=pruner)
    study_id = storage.get_study_id_from_name(request.study_name)
    return optuna.trial.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id, request.number))


def run_trial(request: TrialRequest) -> TrialResult:
    """Train with the trial's values, reporting every evaluation to its pruner; log it to its MLflow run."""
    import mlflow

    from finetune_flows.tasks.core.training import train_model
    from finetune_flows.tasks.tuning.pruning import PruneOnEval

    trial = load_trial(request)
    callback = PruneOnEval(trial, request.primary_metric)
    mlflow.set_tracking_uri(request.run.tracking_uri())
    try:
        with mlflow.start_run(run_id=request.run.run_id):  # ends FINISHED, or FAILED on an exception
            mlflow.log_params({key: str(value) for key, value in request.drawn.items()})
            trained = train_model(
                Path(request.tokenized_dir), Path(request.model_dir), request.head, request.id2label,
                request.training, Path(request.run.run_dir), request.primary_metric, callbacks=[callback],
                report_to_mlflow=True, adapter=request.adapter,
            )  # fmt: skip
            value = trained.best_metric
            if value is None and not callback.pruned:
                raise ConfigError(
                    f"head {request.head!r} does not evaluate while training: a trial has no value to compare; "
                    "tune a scenario whose head chooses its checkpoint on eval"
                )
            state = "PRUNED" if callback.pruned else "COMPLETE"
            if value is not None:
                mlflow.log_metric("objective", value)
            mlflow.set_tags({"tune.state": state, "tune.objective": f"eval_{request.primary_metric}"})
    finally:
        for leftover in ("checkpoints", "model"):
            shutil.rmtree(Path(request.run.run_dir) / leftover, ignore_errors=True)
    logger.info("trial %d %s: %s %s", request.number, state, request.primary_metric, value)
    return TrialResult(
        number=request.number,
        state=state,
        value=value,
        evaluations=callback.evaluations,
        steps=trained.steps,
        train_seconds=trained.train_seconds,
        run_id=request.run.run_id,
    )
