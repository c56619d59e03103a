"""Flow ``tune``: an Optuna search over a scenario's training hyperparameters, then the best as a normal run.

Deployments reach it by entrypoint ``flows/tune.py:tune``. The data is prepared and tokenized once (the
tune run's own MLflow run and folder, tagged ``tune.study``); each trial is subflow ``tune-trial``
(flow run ``trial-<n>``) with an MLflow run nested under the tune run, pruned on its evaluations
(``tasks.tuning.pruning``) and scored on the eval split, never on test. Trials run one after another
until the study holds ``n_trials`` finished (complete or pruned) trials or ``timeout_minutes`` have passed; a
known ``study_name`` resumes the study (``tasks.tuning.study``). The best values and a table of every trial go
to the tune run and to a Prefect table artifact; with ``register_best`` the best values are trained by the
``finetune`` pipeline itself (same seed), so export, the test report, registration and the promotion gate
are the normal ones, and that run is nested under the tune run too.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prefect import flow
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, ConfigDict

from finetune_flows.flows.finetune import FinetuneSummary, run_pipeline
from finetune_flows.plugins import ConfigError
from finetune_flows.tasks.core.data_preparation import ingest_data, prepare_data
from finetune_flows.tasks.core.failures import failing_stage, stage_failed
from finetune_flows.tasks.core.model_source import fetch_model
from finetune_flows.tasks.core.settings import get_settings
from finetune_flows.tasks.core.tokenization import tokenize_data
from finetune_flows.tasks.core.tracking import RunInfo, end_run, fail_run, release_run_folder, start_run, tag_run
from finetune_flows.tasks.tuning.config import TuneConfig
from finetune_flows.tasks.tuning.space import suggest
from finetune_flows.tasks.tuning.study import (
    finished_trials,
    hold_study,
    make_pruner,
    open_study,
    storage_url,
    study_file,
    study_table,
)
from finetune_flows.tasks.tuning.trial import TrialRequest, TrialResult, open_trial_run, run_trial

if TYPE_CHECKING:
    import optuna

logger = logging.getLogger(__name__)


class TuneSummary(BaseModel):
    """What a finished search found, and the run that trained its best values."""

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
    finetune: FinetuneSummary | None = None
    """The normal run of the best values (``register_best``)."""


@flow(name="tune-trial", flow_run_name="trial-{request.number}", log_prints=False)
def tune_trial(request: TrialRequest) -> TrialResult:
    """Train one trial's values on the prepared data, pruned on its evaluations; its value is measured on eval."""
    return run_trial(request)


STAGES = (start_run, ingest_data, fetch_model, tokenize_data, tune_trial)


@flow(name="tune", log_prints=False)
def tune(config: TuneConfig = TuneConfig()) -> TuneSummary:  # noqa: B008
    """Search a scenario's training hyperparameters with Optuna; train, register and gate the best."""
    try:
        return run_tune(config)
    except Exception as exc:
        return stage_failed(exc, STAGES)


def artifact_key(study_name: str) -> str:
    """A Prefect artifact key for the study (lowercase letters, digits and dashes)."""
    return "tune-" + re.sub(r"[^a-z0-9-]+", "-", study_name.lower()).strip("-")


def run_tune(config: TuneConfig) -> TuneSummary:
    """Open (or resume) the study and the tune run, search, then hand the best values to the pipeline."""
    name = config.study_name or f"{config.scenario}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    tuning_dir = get_settings().state / "tuning"
    with hold_study(tuning_dir, name):
        pruner = make_pruner(
            config.pruning, config.pruning_warmup_evals, config.pruning_startup_trials, config.prune_below
        )
        study = open_study(tuning_dir, name, config.scenario, config.seed, pruner)
        run = start_run(config.base_config())
        try:
            return search(config, name, study, run)
        except Exception as exc:
            try:
                fail_run(run, failing_stage(exc, STAGES))
            except Exception as marking:
                exc.add_note(f"the MLflow run {run.run_id} could not be marked FAILED: {marking}")
            raise
        except BaseException as exc:  # SIGTERM or Ctrl-C: the study resumes (a running trial is run again)
            try:
                end_run(run, "KILLED", failing_stage(exc, STAGES))
            except Exception as marking:
                exc.add_note(f"the MLflow run {run.run_id} could not be marked KILLED: {marking}")
            raise
        finally:
            release_run_folder(run)


def search(config: TuneConfig, name: str, study: optuna.Study, run: RunInfo) -> TuneSummary:
    """Prepare the data once, run trials until the budget is spent, log the best, run the pipeline on it."""
    from optuna.trial import TrialState

    base = config.base_config()
    tuning_dir = get_settings().state / "tuning"
    tag_run(
        run,
        {"mlflow.runName": f"tune-{name}", "tune.study": name, "tune.study_file": str(study_file(tuning_dir, name))},
    )
    data = prepare_data(base, run)
    base_model = fetch_model(base.model, run)
    tokens = tokenize_data(data, base_model, base.head_name, base.model.max_length)
    deadline = time.monotonic() + 60 * config.timeout_minutes if config.timeout_minutes else None
    results: list[TrialResult] = []
    while finished_trials(study) < config.n_trials:
        if results and deadline is not None and time.monotonic() > deadline:  # each call runs one trial at least
            logger.info("tune %s: %g minutes have passed; no new trial", name, config.timeout_minutes)
            break
        trial = study.ask()
        drawn = suggest(trial, config.space)
        trial_config = config.trial_config(drawn)
        trial_run = open_trial_run(run, trial.number, name)
        trial.set_user_attr("overrides", drawn)
        trial.set_user_attr("mlflow_run_id", trial_run.run_id)
        request = TrialRequest(
            study_name=name, storage_url=storage_url(tuning_dir, name), number=trial.number,
            pruning=config.pruning, pruning_warmup_evals=config.pruning_warmup_evals,
            pruning_startup_trials=config.pruning_startup_trials, prune_below=config.prune_below,
            tokenized_dir=tokens.tokenized_dir, model_dir=base_model, head=base.head_name, id2label=data.id2label,
            primary_metric=base.primary_metric, training=trial_config.training, adapter=trial_config.adapter,
            drawn=drawn, run=trial_run,
        )  # fmt: skip
        try:
            result = tune_trial(request)
        except Exception:
            study.tell(trial, state=TrialState.FAIL)
            raise
        assert isinstance(result, TrialResult)  # (narrows Prefect's flow return type for mypy)
        if result.state == "PRUNED":
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, result.value)
        results.append(result)
    return report_best(config, name, study, run, results)


def report_best(
    config: TuneConfig, name: str, study: optuna.Study, run: RunInfo, results: list[TrialResult]
) -> TuneSummary:
    """Log the best trial to the tune run, publish the trial table, and run the pipeline on the best values."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

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
    summary = TuneSummary(
        study_name=name, study_file=str(study_file(get_settings().state / "tuning", name)), metric=metric,
        trials_run=len(results), complete=counts["COMPLETE"], pruned=counts["PRUNED"], failed=counts["FAIL"],
        best_trial=best.number, best_value=best.value, best_values=overrides, tune_run_id=run.run_id,
    )  # fmt: skip
    logger.info("tune %s: best trial %d, %s %.4f with %s", name, best.number, metric, best.value, overrides)
    if not config.register_best:
        return summary
    final = run_pipeline(config.trial_config(overrides))
    client.set_tag(final.run_id, MLFLOW_PARENT_RUN_ID, run.run_id)
    client.set_tag(final.run_id, "tune.study", name)
    tag_run(run, {"tune.best_run_id": final.run_id})
    return summary.model_copy(update={"finetune": final})
