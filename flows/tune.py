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
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from prefect import flow

from finetune_flows.flows.finetune import FinetuneSummary, run_pipeline
from finetune_flows.tasks.core.data_preparation import ingest_data, prepare_data
from finetune_flows.tasks.core.failures import ending_run, stage_failed
from finetune_flows.tasks.core.model_source import fetch_model
from finetune_flows.tasks.core.settings import get_settings
from finetune_flows.tasks.core.tokenization import tokenize_data
from finetune_flows.tasks.core.tracking import RunInfo, start_run, tag_run
from finetune_flows.tasks.tuning.config import TuneConfig
from finetune_flows.tasks.tuning.results import SearchOutcome, link_best_run, record_best
from finetune_flows.tasks.tuning.space import suggest
from finetune_flows.tasks.tuning.study import (
    finished_trials,
    hold_study,
    make_pruner,
    open_study,
    storage_url,
    study_file,
)
from finetune_flows.tasks.tuning.trial import TrialRequest, TrialResult, open_trial_run, run_trial

if TYPE_CHECKING:
    import optuna

logger = logging.getLogger(__name__)


class TuneSummary(SearchOutcome):
    """What a finished search found, and the run that trained its best values."""

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
        with ending_run(run, STAGES):  # an interrupted study resumes (a running trial is run again)
            return search(config, name, study, run)


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
    """Record the best trial and the trial table, then train, register and gate the best values as a normal run."""
    summary = TuneSummary(**record_best(config, name, study, run, len(results)).model_dump())
    if not config.register_best:
        return summary
    final = run_pipeline(config.trial_config(summary.best_values))
    link_best_run(run, final.run_id, name)
    return summary.model_copy(update={"finetune": final})
