"""Bringing your own data, as a user meets it on the command line: a label map (0/1/2 -> names), the splits
asked for (a preset test split only without an eval file), an optional selection split that keeps eval held
out, `run --help` listing every field, absolute paths and hashes on the version, checkpoint cleanup and `gc`.

The CLI runs in a subprocess against a fresh state folder, with a tiny BERT built from a config."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest

from finetune_flows.plugins import SCENARIOS, ConfigError, DataError
from finetune_flows.tasks.core.config import FinetuneConfig, parse_overrides
from finetune_flows.tasks.core.data_preparation import data_files, ingest_options
from finetune_flows.tasks.core.ingestion import ingest_files
from tests.conftest import NEGATIVE, POSITIVE, run_cli, services_environment, write_tsv

REPO = Path(__file__).resolve().parents[1]
NEWS = {  # raw labels as Twitter Financial News writes them: 0 bearish, 1 bullish, 2 neutral
    "0": ["Operating profit fell sharply", "The company will cut 200 jobs", "Net sales decreased", "Shares slumped"],
    "1": ["Operating profit rose clearly", "Orders grew by a third", "Net sales increased strongly", "Shares jumped"],
    "2": ["The annual meeting is held in May", "The company is based in Helsinki", "The report is out", "Board met"],
}
LABEL_MAP = "0:negative,1:positive,2:neutral"
TINY = ["--set", "model.max_length=32", "--set", "training.learning_rate=5e-3"]


def news_files(folder: Path) -> tuple[Path, Path]:
    """384 training rows (128 per raw label 0/1/2) and 48 eval rows with other texts, as CSV."""
    folder.mkdir(parents=True, exist_ok=True)
    train = [(f"{t} in quarter {q} of {y}", raw) for raw, ts in NEWS.items() for t in ts for q in range(1, 5)
             for y in range(2001, 2009)]  # fmt: skip
    evaluation = [(f"{t} in {m} {y}", raw) for raw, ts in NEWS.items() for t in ts for m in ("May", "June")
                  for y in (2020, 2021)]  # fmt: skip
    pd.DataFrame(train, columns=["text", "label"]).to_csv(folder / "train.csv", index=False)
    pd.DataFrame(evaluation, columns=["text", "label"]).to_csv(folder / "valid.csv", index=False)
    return folder / "train.csv", folder / "valid.csv"


def relative(path: Path) -> str:
    """``path`` relative to the repository root (where the CLI runs), as a user would type it."""
    return os.path.relpath(path, REPO)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, prefect_harness: str) -> dict[str, Any]:
    """Three `finetune-flows run`s in one state folder: finance with a label map, an eval file and a select split;
    sentiment without a select split keeping no checkpoints; finance failing on a raw label the map lacks."""
    work = tmp_path_factory.mktemp("own-data")
    state = work / "state"
    env = services_environment(state, prefect_harness)
    train, valid = news_files(work / "news")
    model = ["--set", f"model.source={tiny_model_dir}", *TINY]
    finance = run_cli(
        env, "run", "finance-monitoring", "--data", relative(train), relative(valid),
        "--set", f"data.label_map={LABEL_MAP}", "--set", "data.select_fraction=0.2",
        "--set", "training.max_steps=8", "--set", "training.eval_every_steps=2", *model, timeout=600,
    )  # fmt: skip
    rows = [(t, "1") for t in POSITIVE] + [(t, "0") for t in NEGATIVE]
    words = ("indeed", "overall", "really", "truly", "honestly", "frankly", "clearly", "simply", "surely", "plainly",
             "certainly", "obviously")  # fmt: skip
    sst_train = write_tsv(work / "sst_train.tsv", [(f"{t} {w}", lab) for w in words for t, lab in rows])
    sst_dev = write_tsv(
        work / "sst_dev.tsv", [(f"{t} {w}", lab) for w in ("in the end", "all in all") for t, lab in rows]
    )
    sentiment = run_cli(
        env, "run", "sentiment", "--data", str(sst_train), str(sst_dev), "--set", "training.max_steps=4",
        "--set", "training.eval_every_steps=2", "--set", "training.keep_checkpoints=model_only", *model, timeout=600,
    )  # fmt: skip
    unmapped = work / "unmapped.csv"
    unmapped.write_text(train.read_text(encoding="utf-8") + "A merger was announced,3\n", encoding="utf-8")
    failed = run_cli(
        env, "run", "finance-monitoring", "--data", str(unmapped), str(valid), "--set", f"data.label_map={LABEL_MAP}",
        *model, timeout=600,
    )  # fmt: skip
    return {"env": env, "state": state, "train": train, "valid": valid, "unmapped": unmapped,
            "finance": finance, "sentiment": sentiment, "failed": failed}  # fmt: skip


def client(state: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{state / 'mlflow.db'}")


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


# -- 1. label map ---------------------------------------------------------------------------------


def test_a_label_map_trains_on_raw_labels_and_the_version_carries_it(cli_runs: dict[str, Any]) -> None:
    out = ok(cli_runs["finance"])
    assert "version          : 1" in out and "labels negative, neutral, positive" in out
    store = client(cli_runs["state"])
    version = store.get_model_version("finance-monitoring", "1")
    assert version.tags["data.label_map"] == LABEL_MAP
    assert store.get_run(version.run_id).data.params["data.label_map"] == LABEL_MAP


def test_a_raw_label_the_map_lacks_fails_naming_file_row_and_value(cli_runs: dict[str, Any]) -> None:
    failed = cli_runs["failed"]
    assert failed.returncode == 2, failed.stdout[-2000:] + failed.stderr[-3000:]
    assert re.search(
        rf"finetune-flows: error: unknown label for scenario 'finance-monitoring'; .*data\.label_map maps "
        rf"\['0', '1', '2'\] \(file {re.escape(str(cli_runs['unmapped']))}, row 385, column 'label', value '3'\)",
        failed.stderr,
    ), failed.stderr[-3000:]


def test_a_label_map_target_the_scenario_lacks_fails_before_anything_runs(tmp_path: Path) -> None:
    env = services_environment(tmp_path / "state")
    result = run_cli(env, "run", "finance-monitoring", "--set", "data.label_map=0:bearish,1:positive", timeout=120)
    assert result.returncode == 2
    assert (
        "data.label_map: target 'bearish' (of raw label '0') is not a label of scenario 'finance-monitoring'; "
        "allowed: ['negative', 'neutral', 'positive']"
    ) in result.stderr
    assert not (tmp_path / "state" / "runs").exists()  # no run was opened


def test_the_label_map_file_form_reads_csv_and_json_and_checks_targets(tmp_path: Path) -> None:
    train, _ = news_files(tmp_path / "news")
    as_csv = tmp_path / "labels.csv"
    as_csv.write_text("raw,label\n0,negative\n1,positive\n2,neutral\n", encoding="utf-8")
    as_json = tmp_path / "labels.json"
    as_json.write_text(json.dumps({"0": "negative", "1": "positive", "2": "neutral"}), encoding="utf-8")
    scenario = SCENARIOS.get("finance-monitoring")
    for number, path in enumerate((as_csv, as_json)):
        config = FinetuneConfig.for_scenario(
            "finance-monitoring", {"data.train_path": str(train), "data.label_map_path": str(path)}
        )
        result = ingest_files(train, None, scenario, ingest_options(config.data, config.scenario, 42), tmp_path / "c")
        assert result.labels == ["negative", "neutral", "positive"] and result.label_map == LABEL_MAP
        assert result.cached == (number == 1)  # the same map in another form is the same data
    as_json.write_text(json.dumps({"0": "bearish"}), encoding="utf-8")
    config = FinetuneConfig.for_scenario("finance-monitoring", {"data.label_map_path": str(as_json)})
    with pytest.raises(DataError, match=rf"target 'bearish' .*allowed: .*\(file {re.escape(str(as_json))}\)"):
        ingest_options(config.data, config.scenario, 42)
    with pytest.raises(ConfigError, match=r"give data\.label_map or data\.label_map_path, not both"):
        FinetuneConfig.for_scenario(
            "finance-monitoring", {"data.label_map": LABEL_MAP, "data.label_map_path": str(as_json)}
        )


# -- 2. splits you asked for ----------------------------------------------------------------------


def test_with_an_eval_file_the_preset_carves_no_test_split(cli_runs: dict[str, Any]) -> None:
    out = ok(cli_runs["finance"])
    # 384 rows: 20% of each class (26) select the checkpoint; the preset's 20% test split is not carved.
    assert "data             : 306 train / 78 select / 48 eval / 0 test rows" in out
    assert "splits           : train 306 rows from train.csv; select 78 rows (20% of train, stratified) choose the " \
           "checkpoint; eval 48 rows from valid.csv; no test split" in out  # fmt: skip


@pytest.mark.parametrize(
    ("sets", "test_rows"),
    [
        ([], 78),  # no eval file: the preset's stratified 20% test split (26 per class)
        (["data.eval_path={valid}"], 0),  # an eval file: the user chose the held-out data
        (["data.eval_path={valid}", "data.test_fraction=0.2"], 78),  # asked for explicitly
        (["data.test_fraction=0"], 0),
    ],
)
def test_the_preset_test_split_applies_only_without_an_eval_file_or_when_asked(
    sets: list[str], test_rows: int, tmp_path: Path
) -> None:
    train, valid = news_files(tmp_path / "news")
    overrides = parse_overrides([f"data.train_path={train}", f"data.label_map={LABEL_MAP}"] +
                                [s.format(valid=valid) for s in sets])  # fmt: skip
    config = FinetuneConfig.for_scenario("finance-monitoring", overrides)  # as `run` builds it
    scenario = SCENARIOS.get(config.scenario)
    train_file, eval_file, test_file = data_files(config.data, scenario)
    options = ingest_options(config.data, config.scenario, config.training.seed)
    result = ingest_files(train_file, eval_file, scenario, options, tmp_path / "cache", test_file)
    assert result.test_rows == test_rows
    assert ("no test split" in result.splits) == (test_rows == 0)


# -- 3. which split chose the checkpoint ----------------------------------------------------------


def test_a_select_split_keeps_eval_held_out_and_the_version_says_so(cli_runs: dict[str, Any]) -> None:
    out = ok(cli_runs["finance"])
    assert "eval figures     : eval is held out: the select split chose the checkpoint" in out
    tags = client(cli_runs["state"]).get_model_version("finance-monitoring", "1").tags
    assert tags["eval.selected_checkpoint"] == "false"


def test_without_a_select_split_the_eval_figures_are_marked_optimistic(cli_runs: dict[str, Any]) -> None:
    out = ok(cli_runs["sentiment"])
    assert "eval figures     : eval figures are optimistic: the same split chose the checkpoint" in out
    assert client(cli_runs["state"]).get_model_version("sentiment", "1").tags["eval.selected_checkpoint"] == "true"


# -- 4. run --help ---------------------------------------------------------------------------------


def test_run_help_lists_every_field_with_type_default_bounds_and_description(tmp_path: Path) -> None:
    env = services_environment(tmp_path / "state")
    plain = ok(run_cli(env, "run", "--help", timeout=120))
    assert "training.epochs  (float; default 1.0; > 0.0, <= 100.0)\n      Passes over the training data." in plain
    for section, field in FinetuneConfig.model_fields.items():
        for name in getattr(field.annotation, "model_fields", {}):
            assert f"  {section}.{name}  (" in plain
    finance = ok(run_cli(env, "run", "finance-monitoring", "--help", timeout=120))
    assert "defaults of scenario 'finance-monitoring'" in finance
    assert "training.learning_rate  (float; default 0.0001; > 0.0, <= 1.0)" in finance
    assert "training.keep_checkpoints  (best_and_last|all|model_only; default 'best_and_last')" in finance


def test_scenario_help_imports_neither_prefect_nor_torch() -> None:
    probe = (
        "import sys\nfrom finetune_flows.flows.cli.main import main\ntry:\n    main(['run', 'sentiment', '--help'])\n"
        "except SystemExit:\n    pass\nprint(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'torch', "
        "'transformers', 'mlflow'}), file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert result.stderr.strip().splitlines()[-1] == "[]", result.stderr


# -- 5. what the run read ---------------------------------------------------------------------------


def test_the_version_records_absolute_paths_and_content_hashes(cli_runs: dict[str, Any]) -> None:
    ok(cli_runs["finance"])
    store = client(cli_runs["state"])
    version = store.get_model_version("finance-monitoring", "1")
    train, valid = cli_runs["train"], cli_runs["valid"]
    expected = {
        "data.train_file": str(train.resolve()),
        "data.train_sha256": sha256(train),
        "data.eval_file": str(valid.resolve()),
        "data.eval_sha256": sha256(valid),
    }
    assert {k: version.tags.get(k) for k in expected} == expected
    run = store.get_run(version.run_id)
    assert {k: run.data.tags.get(k) for k in expected} == expected
    assert run.data.params["data.train_path"] == relative(train)  # as given, next to the file it named


# -- 6. disk ---------------------------------------------------------------------------------------


def run_dir(state: Path, model: str) -> Path:
    store = client(state)
    return Path(store.get_run(store.get_model_version(model, "1").run_id).data.tags["run_dir"])


def test_after_a_run_only_the_best_and_last_checkpoints_remain(cli_runs: dict[str, Any]) -> None:
    ok(cli_runs["finance"])
    checkpoints = run_dir(cli_runs["state"], "finance-monitoring") / "checkpoints"
    left = sorted(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    last = left[-1]
    assert last.name == "checkpoint-8"  # 8 steps, a checkpoint every 2
    best = Path(json.loads((last / "trainer_state.json").read_text())["best_model_checkpoint"])
    assert set(left) == {best, last}

    ok(cli_runs["sentiment"])  # training.keep_checkpoints=model_only: the trained model only
    folder = run_dir(cli_runs["state"], "sentiment")
    assert not list((folder / "checkpoints").glob("checkpoint-*")) and (folder / "model" / "config.json").is_file()


def test_gc_frees_run_folders_no_version_refers_to_and_keeps_the_rest(cli_runs: dict[str, Any]) -> None:
    state, env = cli_runs["state"], cli_runs["env"]
    assert cli_runs["failed"].returncode == 2
    kept = {run_dir(state, "finance-monitoring"), run_dir(state, "sentiment")}
    folders = {p for p in (state / "runs").iterdir() if p.is_dir()}
    (failed,) = folders - kept  # the run that failed on the unmapped label opened a folder and an MLflow run
    # A run in progress stays; a folder no MLflow run names goes once it is old enough.
    store = client(state)
    running = state / "runs" / "sentiment-running"
    running.mkdir()
    experiment = store.get_experiment_by_name("finetune-sentiment").experiment_id
    store.create_run(experiment, tags={"run_dir": str(running)})
    (state / "runs" / "sentiment-opening").mkdir()

    # By default a folder written in the last 6 hours may be a run in progress (its MLflow run reads FINISHED
    # between stages), so nothing from this test's runs is freed.
    recent = ok(run_cli(env, "gc", timeout=120))
    assert re.search(rf"^keep .* {failed.name}  written 0\.0 h ago \(under 6 h\)", recent, re.M), recent
    assert "0 of 5 run folders" in recent

    report = ok(run_cli(env, "gc", "--min-age-hours", "0", timeout=120))
    assert re.search(rf"^free .* {failed.name}  run \w+ FAILED, no model version$", report, re.M), report
    assert re.search(r"^free .* sentiment-opening  no MLflow run names it$", report, re.M), report
    assert re.search(r"^keep .* sentiment-running  run \w+ is RUNNING$", report, re.M), report
    for folder in kept:
        assert re.search(rf"^keep .* {folder.name}  registered as (finance-monitoring|sentiment) v1$", report, re.M)
    assert "2 of 5 run folders" in report and "`finetune-flows gc --yes` frees them" in report
    assert failed.is_dir()  # only reported

    freed = ok(run_cli(env, "gc", "--yes", "--min-age-hours", "0", timeout=120))
    assert "from 2 of 5 run folders" in freed
    assert not failed.exists() and all(folder.is_dir() for folder in kept) and running.is_dir()
