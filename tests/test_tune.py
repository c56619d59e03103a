"""The ``tune`` flow on a tiny model: trials as subflows with nested MLflow runs, the best registered through the
normal gate, a study resumed by name, a pruned trial, a crashed trial run again; and the search space's checks."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import optuna
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort
from pydantic import ValidationError

from finetune_flows.flows.tune import tune
from finetune_flows.plugins import ConfigError
from finetune_flows.tasks.core.config import validated
from finetune_flows.tasks.tuning.config import Pruning, TuneConfig
from finetune_flows.tasks.tuning.space import SearchSpace, space_defaults, suggest
from finetune_flows.tasks.tuning.study import hold_study, make_pruner, open_study
from tests.conftest import NEGATIVE, POSITIVE, write_tsv

SUFFIXES = ["indeed", "overall", "really", "truly", "honestly", "frankly", "clearly", "simply", "surely", "plainly"]


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    """240 train rows and 48 eval rows (disjoint texts): enough for the 256-text parity gate."""
    rows = [(t, "1") for t in POSITIVE] + [(t, "0") for t in NEGATIVE]
    train = [(f"{t} {s}", lab) for s in SUFFIXES for t, lab in rows]
    evaluation = [(f"{t} {s}", lab) for s in ("in the end", "all in all") for t, lab in rows]
    return write_tsv(tmp_path / "train.tsv", train), write_tsv(tmp_path / "dev.tsv", evaluation)


def tune_config(model_dir: Path, files: tuple[Path, Path], **fields: object) -> TuneConfig:
    overrides = [
        f"model.source={model_dir}", "model.max_length=32", f"data.train_path={files[0]}",
        f"data.eval_path={files[1]}", "training.eval_every_steps=2", "training.max_steps=4",
        "training.keep_checkpoints=model_only",
    ]  # fmt: skip
    space = {"learning_rate_low": 1e-3, "learning_rate_high": 1e-2, "epochs": "1", "batch_sizes": "16,32"}
    return validated(TuneConfig, {"scenario": "sentiment", "overrides": overrides, "space": space, **fields})


def child_runs(parent_run_id: str) -> list[mlflow.entities.Run]:
    return mlflow.search_runs(
        search_all_experiments=True, filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", output_format="list"
    )


# --- the search space and the study, without training


def test_space_names_every_range_whose_ends_are_swapped() -> None:
    with pytest.raises(ValidationError, match=r"learning_rate_low \(0.001\) is above learning_rate_high \(0.0001\)"):
        SearchSpace(learning_rate_low=1e-3, learning_rate_high=1e-4)
    with pytest.raises(ConfigError, match=r"space: Value error, weight_decay_low \(0.2\) is above weight_decay_high"):
        validated(TuneConfig, {"scenario": "sentiment", "space": {"weight_decay_low": 0.2, "weight_decay_high": 0.1}})
    with pytest.raises(ConfigError, match=r"space.batch_sizes: .*expected comma-separated int values, got 'x'"):
        validated(TuneConfig, {"scenario": "sentiment", "space": {"batch_sizes": "16,x"}})
    with pytest.raises(ConfigError, match=r"space.epochs: .*0 is outside"):
        validated(TuneConfig, {"scenario": "sentiment", "space": {"epochs": "0,1"}})


def test_overrides_are_checked_like_run_set() -> None:
    with pytest.raises(ConfigError, match=r"overrides: .*training.epochs: Input should be greater than 0"):
        validated(TuneConfig, {"scenario": "sentiment", "overrides": ["training.epochs=0"]})
    with pytest.raises(ConfigError, match="set the seed with the field seed"):
        validated(TuneConfig, {"scenario": "sentiment", "overrides": ["training.seed=3"]})
    with pytest.raises(ConfigError, match="study name may hold only"):
        validated(TuneConfig, {"scenario": "sentiment", "study_name": "../x"})


def test_space_defaults_follow_the_scenario() -> None:
    finance = TuneConfig(scenario="finance-monitoring").space  # lr 1e-4, batch 16, layer decay 0.8, smoothing 0.1
    assert (finance.learning_rate_low, finance.learning_rate_high) == (2.5e-5, 4e-4)
    assert (finance.batch_sizes, finance.epochs) == ("8,16", "5")
    assert (finance.layer_lr_decay_low, finance.label_smoothing_high) == (0.8, 0.1)
    assert space_defaults("sentiment")["layer_lr_decay_low"] == 1.0  # no decay recommended: not searched
    given = TuneConfig(scenario="finance-monitoring", space={"epochs": "2,3"}).space
    assert (given.epochs, given.batch_sizes) == ("2,3", "8,16")


def test_suggest_draws_the_varying_fields_and_fixes_the_others() -> None:
    space = SearchSpace(epochs="2", batch_sizes="16,32", layer_lr_decay_low=0.7)
    trial = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0)).ask()
    drawn = suggest(trial, space)
    assert set(trial.params) == {"learning_rate", "warmup_ratio", "weight_decay", "layer_lr_decay", "batch_size"}
    assert drawn["training.epochs"] == 2.0 and drawn["training.label_smoothing"] == 0.0
    assert 1e-5 <= drawn["training.learning_rate"] <= 2e-4 and drawn["training.batch_size"] in (16, 32)


def test_a_trial_left_running_is_failed_and_run_again(tmp_path: Path) -> None:
    pruner = make_pruner(Pruning.OFF, 0, 0, 0.0)
    with hold_study(tmp_path, "crash"):
        study = open_study(tmp_path, "crash", "sentiment", 7, pruner)
        crashed = study.ask()
        drawn = suggest(crashed, SearchSpace())  # the process dies here: the trial stays RUNNING
        with (
            pytest.raises(ConfigError, match="study 'crash' is being tuned by a live process"),
            hold_study(tmp_path, "crash"),
        ):
            pass
    with hold_study(tmp_path, "crash"):
        resumed = open_study(tmp_path, "crash", "sentiment", 7, pruner)
        assert resumed.trials[0].state is optuna.trial.TrialState.FAIL
        again = resumed.ask()
        assert suggest(again, SearchSpace()) == drawn and again.user_attrs["retry_of"] == 0
        with pytest.raises(ConfigError, match="study 'crash' tunes scenario 'sentiment', not 'finance-monitoring'"):
            open_study(tmp_path, "crash", "finance-monitoring", 7, pruner)


def test_cli_reports_a_bad_space_before_anything_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from finetune_flows.flows.cli.main import main

    assert main(["tune", "sentiment", "--space", "learning_rate_low=1e-3", "--space", "learning_rate_high=1e-4"]) == 2
    assert "learning_rate_low (0.001) is above learning_rate_high (0.0001)" in capsys.readouterr().err


# --- the flow


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.slow  # 45 s; the default suite keeps the pruned-trial run through the same flow
def test_tune_registers_the_best_trial_and_resumes_by_study_name(state_dir, tiny_model_dir, files) -> None:
    first = tune(tune_config(tiny_model_dir, files, study_name="s1", n_trials=2, pruning="off"))
    assert (first.trials_run, first.complete, first.pruned) == (2, 2, 0)
    assert first.finetune is not None and first.finetune.version == "1"
    assert first.finetune.aliases == ["challenger", "champion"]  # the normal gate: no champion yet
    client = mlflow.MlflowClient()
    parent = client.get_run(first.tune_run_id)
    assert parent.data.tags["tune.study"] == "s1" and parent.data.tags["tune.best_run_id"] == first.finetune.run_id
    assert parent.data.metrics["best_accuracy"] == pytest.approx(first.best_value)
    lr = first.best_values["training.learning_rate"]
    assert float(parent.data.params["best.training.learning_rate"]) == pytest.approx(lr)
    children = {run.info.run_name: run for run in child_runs(first.tune_run_id)}
    final = client.get_run(first.finetune.run_id)  # the normal run of the best values, nested too
    assert set(children) == {"trial-0", "trial-1", final.info.run_name}
    trial = children[f"trial-{first.best_trial}"]
    assert trial.data.tags["tune.state"] == "COMPLETE" and trial.info.status == "FINISHED"
    assert trial.data.metrics["objective"] == pytest.approx(first.best_value)
    assert float(trial.data.params["training.learning_rate"]) == pytest.approx(lr)
    assert float(final.data.params["training.learning_rate"]) == pytest.approx(lr)  # the best values, same seed
    assert final.data.params["training.seed"] == "42"

    again = tune(tune_config(tiny_model_dir, files, study_name="s1", n_trials=3, pruning="off", register_best=False))
    assert (again.trials_run, again.complete) == (1, 3) and again.finetune is None
    assert [run.info.run_name for run in child_runs(again.tune_run_id)] == ["trial-2"]
    study = optuna.load_study(study_name="s1", storage=f"sqlite:///{state_dir / 'tuning' / 's1.db'}")
    assert len(study.trials) == 3

    timed = tune_config(tiny_model_dir, files, study_name="s1", n_trials=9, timeout_minutes=1e-6, register_best=False)
    assert (tune(timed).trials_run, len(study.trials)) == (1, 4)  # the time is up after the first trial

    with get_client(sync_client=True) as client:  # every trial of the study, in the Prefect UI
        tables = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["tune-s1"])), sort=ArtifactSort.CREATED_DESC
        )
    assert len(tables) == 3  # one per call, the latest first
    table = tables[0]
    assert table.type == "table"
    rows = json.loads(str(table.data))
    assert [row["trial"] for row in rows] == [0, 1, 2, 3] and {row["state"] for row in rows} == {"COMPLETE"}
    assert all(row["mlflow_run"] for row in rows)


@pytest.mark.usefixtures("prefect_harness")
def test_a_pruned_trial_ends_pruned_in_optuna_and_mlflow(state_dir, tiny_model_dir, files) -> None:
    config = tune_config(tiny_model_dir, files, study_name="p", n_trials=1, pruning="threshold", prune_below=1e6)
    with pytest.raises(ConfigError, match=r"study 'p': no trial completed \(1 pruned, 0 failed\)"):
        tune(config)
    study = optuna.load_study(study_name="p", storage=f"sqlite:///{state_dir / 'tuning' / 'p.db'}")
    (trial,) = study.trials
    assert trial.state is optuna.trial.TrialState.PRUNED and list(trial.intermediate_values) == [1]
    (run,) = mlflow.search_runs(
        search_all_experiments=True, filter_string="tags.`tune.study` = 'p' and tags.`tune.trial` = '0'",
        output_format="list",
    )  # fmt: skip
    assert (run.info.status, run.data.tags["tune.state"]) == ("FINISHED", "PRUNED")


def test_median_pruning_waits_for_the_warmup_evaluations() -> None:
    study = optuna.create_study(direction="maximize", pruner=make_pruner(Pruning.MEDIAN, 1, 2, 0.0))
    for _ in range(2):  # two finished trials, good at both evaluations
        trial = study.ask()
        trial.report(0.9, 1)
        trial.report(0.9, 2)
        study.tell(trial, 0.9)
    worse = study.ask()
    worse.report(0.1, 1)
    assert not worse.should_prune()  # evaluation 1 is the warmup
    worse.report(0.1, 2)
    assert worse.should_prune()  # from evaluation 2 on it is compared with the median
