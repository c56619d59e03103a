"""What a finished search reports: the trial table in Prefect, the best values on the tune run in MLflow.

``record_best`` publishes every trial (state, value, drawn values, MLflow run) as the Prefect table
artifact ``tune-<study>`` and logs the best trial's values (``best.<key>`` parameters) and value
(``best_<metric>``) to the tune run; ``link_best_run`` nests the normal run of the best values under it.
"""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING, Any

from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, ConfigDict

from finetune_flows.plugins import ConfigError
from finetune_flows.tasks.core.settings import get_settings
from finetune_flows.tasks.core.tracking import RunInfo, tag_run
from finetune_flows.tasks.tuning.config import TuneConfig
from finetune_flows.tasks.tuning.study import study_file, study_table

if TYPE_CHECKING:
    import optuna

logger = logging.getLogger(__name__)


class SearchOutcome(BaseModel):
    """What a finished search found."""

    model_config = ConfigDict(frozen=True)

    study_name: str
    study_file: str
    metric: str
    """The scenario's primary metric; a trial's value is its best ``eval_<metric>`` while training."""
    trials_run: int
    """Trials this call ran (a resumed study had others already)."""
    complete: int
    pruned: int
    failed: int
    best_trial: int
    best_value: float
    best_values: dict[str, Any]
    """The best trial's training values as dotted overrides (``training.learning_rate`` ...)."""
    tune_run_id: str


def artifact_key(study_name: str) -> str:
    """A Prefect artifact key for the study (lowercase letters, digits and dashes)."""
    return "tune-" + re.sub(r"[^a-z0-9-]+", "-", study_name.lower()).strip("-")


def record_best(config: TuneConfig, name: str, study: optuna.Study, run: RunInfo, trials_run: int) -> SearchOutcome:
    """Publish the trial table (Prefect) and log the best trial's values and value to the tune run (MLflow); a study
    without a complete trial is a ``ConfigError`` saying how many were pruned and failed."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    states = [trial.state.name for trial in study.get_trials(deepcopy=False)]
    counts = {state: states.count(state) for state in ("COMPLETE", "PRUNED", "FAIL")}
    metric = config.base_config().primary_metric
    create_table_artifact(
        key=artifact_key(name),
        table=study_table(study),
        description=f"Trials of study {name} ({config.scenario}); value: the best eval {metric} while training",
    )
    if not counts["COMPLETE"]:
        raise ConfigError(
            f"study {name!r}: no trial completed ({counts['PRUNED']} pruned, {counts['FAIL']} failed); loosen the "
            "pruning (pruning=off, a later pruning_warmup_evals) or widen the search space, and resume the study"
        )
    best = study.best_trial
    assert best.value is not None  # (a complete trial has its value; narrows the type for mypy)
    overrides: dict[str, Any] = best.user_attrs["overrides"]
    client = MlflowClient(tracking_uri=run.tracking_uri())
    client.log_batch(
        run.run_id,
        metrics=[Metric(f"best_{metric}", best.value, int(time.time() * 1000), 0)],
        params=[Param(f"best.{key}", str(value)) for key, value in overrides.items()],
    )
    tag_run(run, {"tune.best_trial": str(best.number), "tune.trials": str(len(states))})
    summary = SearchOutcome(
        study_name=name, study_file=str(study_file(get_settings().state / "tuning", name)), metric=metric,
        trials_run=trials_run, complete=counts["COMPLETE"], pruned=counts["PRUNED"], failed=counts["FAIL"],
        best_trial=best.number, best_value=best.value, best_values=overrides, tune_run_id=run.run_id,
    )  # fmt: skip
    logger.info("tune %s: best trial %d, %s %.4f with %s", name, best.number, metric, best.value, overrides)
    return summary


def link_best_run(run: RunInfo, best_run_id: str, study_name: str) -> None:
    """Nest the normal run of the best values under the tune run (``mlflow.parentRunId``) and name it there."""
    from mlflow import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    client = MlflowClient(tracking_uri=run.tracking_uri())
    client.set_tag(best_run_id, MLFLOW_PARENT_RUN_ID, run.run_id)
    client.set_tag(best_run_id, "tune.study", study_name)
    tag_run(run, {"tune.best_run_id": best_run_id})
