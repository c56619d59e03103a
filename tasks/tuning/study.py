"""The Optuna study behind a ``tune`` run: where it is stored, how it resumes, its sampler and pruner.

A study lives in its own SQLite file, ``<state>/tuning/<study>.db``, so a second ``tune`` with the same
study name resumes it: its complete and pruned trials count toward the budget, and a trial a crash left
RUNNING is marked FAIL and its values are tried again first. One process works on a study at a time
(``hold_study``, a lock the kernel drops when the process dies). The sampler is TPE, seeded; the pruner
follows ``TuneConfig.pruning``. ``study_table`` is every trial as rows for the Prefect table artifact.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_flows.plugins import ConfigError
from finetune_flows.tasks.tuning.config import Pruning

if TYPE_CHECKING:
    import optuna

logger = logging.getLogger(__name__)

FINISHED = ("COMPLETE", "PRUNED")
"""Trial states that count toward ``n_trials``."""


def study_file(tuning_dir: Path, study_name: str) -> Path:
    """The SQLite file of ``study_name`` under ``tuning_dir``."""
    return tuning_dir / f"{study_name}.db"


def storage_url(tuning_dir: Path, study_name: str) -> str:
    """The SQLAlchemy URL Optuna opens ``study_name``'s storage with."""
    return f"sqlite:///{study_file(tuning_dir, study_name)}"


@contextmanager
def hold_study(tuning_dir: Path, study_name: str) -> Iterator[None]:
    """Hold ``study_name`` for this process (a second ``tune`` on it fails at once, naming it)."""
    tuning_dir.mkdir(parents=True, exist_ok=True)
    with (tuning_dir / f"{study_name}.lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise ConfigError(f"study {study_name!r} is being tuned by a live process; wait for it to end") from exc
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def make_pruner(
    pruning: Pruning, warmup_evals: int, startup_trials: int, prune_below: float
) -> optuna.pruners.BasePruner:
    """The Optuna pruner ``pruning`` names (steps are a trial's evaluations, counted from 1)."""
    import optuna

    if pruning is Pruning.MEDIAN:
        # Evaluations are reported as steps 1, 2, ...: the earliest prune is at evaluation warmup_evals + 1.
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_evals + 1)
    if pruning is Pruning.THRESHOLD:
        return optuna.pruners.ThresholdPruner(lower=prune_below)
    return optuna.pruners.NopPruner()


def open_study(
    tuning_dir: Path, study_name: str, scenario: str, seed: int, pruner: optuna.pruners.BasePruner
) -> optuna.Study:
    """Create ``study_name`` (maximizing the scenario's metric) or load it to resume: a trial left RUNNING (the
    process died) is marked FAIL and its values are queued to run again. Resuming a study of another scenario
    is a ``ConfigError``. Call under ``hold_study``."""
    import optuna
    from optuna.trial import TrialState

    tuning_dir.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=study_name,
        storage=storage_url(tuning_dir, study_name),
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=pruner,
        direction="maximize",
        load_if_exists=True,
    )
    known = study.user_attrs.get("scenario")
    if known is None:
        study.set_user_attr("scenario", scenario)
    elif known != scenario:
        raise ConfigError(f"study {study_name!r} tunes scenario {known!r}, not {scenario!r}; choose another study_name")
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        logger.warning(
            "trial %d of study %s was left running: marked FAIL, its values run again", stale.number, study_name
        )
        study.tell(stale.number, state=TrialState.FAIL)
        study.enqueue_trial(stale.params, user_attrs={"retry_of": stale.number})
    return study


def finished_trials(study: optuna.Study) -> int:
    """Trials that count toward the budget (complete or pruned)."""
    return sum(trial.state.name in FINISHED for trial in study.get_trials(deepcopy=False))


def study_table(study: optuna.Study) -> list[dict[str, Any]]:
    """Every trial of ``study`` as a row: number, state, value, its drawn values, its MLflow run."""
    return [
        {
            "trial": trial.number,
            "state": trial.state.name,
            "value": trial.value if trial.value is not None else "",
            "evaluations": len(trial.intermediate_values),
            **{name: trial.params.get(name, "") for name in sorted({p for t in study.trials for p in t.params})},
            "mlflow_run": trial.user_attrs.get("mlflow_run_id", ""),
        }
        for trial in study.get_trials(deepcopy=False)
    ]
