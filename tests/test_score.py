"""Batch scoring in partitions (``tasks/batch``, flow ``score``) and the monitor on the same engine.

Fast: planning and reading partitions (CSV byte ranges with quoted newlines, JSONL, Parquet row
groups) and the errors that name file, row, column and value. Flows: a tiny ONNX classifier
registered through the publishing core scores a CSV + JSONL folder in one process and on two
Dask workers (an existing local cluster reached by address) with the same rows, labels and
probabilities as the pyfunc called on all texts at once, and no torch in the workers; the
monitor stores the same records with engine=dask (a LocalCluster it starts) as by default; a
run whose partition fails is resumed and skips the parts it wrote (their files untouched). Slow: a
score run and a monitor run killed mid-way (flow process and Dask workers) resume where they stopped.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.pyfunc import PythonModel
from pydantic import BaseModel, ValidationError

from finetune_flows.plugins import DataError
from finetune_flows.tasks.batch.engine import EngineConfig, local_cluster_kwargs
from finetune_flows.tasks.batch.partitions import plan_partitions, read_partition
from finetune_flows.tasks.batch.runner import MANIFEST, cached_model, read_output
from finetune_flows.tasks.monitoring.scoring import MonitorConfig
from tests.conftest import NEGATIVE, POSITIVE, state_folder
from tests.test_monitor import TEMPLATES, KeywordModel, stream, window_rows, write_csv

TEXTS = [f"{t} {suffix}" for suffix in ("indeed", "overall", "at last") for t in POSITIVE + NEGATIVE]  # 72 texts


class FlakyModel(PythonModel):
    """Label by length; a text ``explode <path>`` fails while the file at ``path`` exists."""

    def predict(self, context: object, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        for text in model_input["text"]:
            if text.startswith("explode ") and Path(text.split(" ", 1)[1]).exists():
                raise RuntimeError(f"explode: {text}")
        return pd.DataFrame({"label": ["long" if len(t) > 20 else "short" for t in model_input["text"]]})


def log_pyfunc(name: str, python_model: PythonModel) -> None:
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=python_model, pip_requirements=["mlflow"])
    version = mlflow.register_model(info.model_uri, name).version
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", str(version))


@pytest.fixture(scope="module")
def registry(
    prefect_harness: str, tiny_classifier_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """A state folder whose MLflow store holds tiny-sentiment (ONNX), flaky and finance-monitoring (keywords)."""
    from finetune_flows.tasks.core.model_source import tokenizer_hash
    from finetune_flows.tasks.export.model_export import export_head
    from finetune_flows.tasks.publishing.registration import ServedModel, publish_version
    from finetune_flows.tasks.publishing.stage import entry_file
    from finetune_flows.tasks.serving.classifier import ONNX_ARTIFACT, TOKENIZER_ARTIFACT
    from finetune_flows.tasks.serving.packaging import SERVING_REQUIREMENTS, served_code_paths

    state = tmp_path_factory.mktemp("score-state")
    with state_folder(state) as settings:
        onnx = export_head(
            tiny_classifier_dir, "sequence-classification", state / "classifier.onnx", 64,
            tokenizer_hash(tiny_classifier_dir),
        )  # fmt: skip
        client = mlflow.MlflowClient()
        experiment = client.create_experiment("score-test", artifact_location=f"{settings.artifact_root}/score")
        mlflow.set_experiment(experiment_id=experiment)
        served = ServedModel(
            python_model=str(entry_file("sequence-classification")),
            artifacts={ONNX_ARTIFACT: str(onnx), TOKENIZER_ARTIFACT: str(tiny_classifier_dir / "tokenizer.json")},
            code_paths=served_code_paths(state / "staged"),
            pip_requirements=SERVING_REQUIREMENTS,
            input_example=TEXTS[:2],
        )
        run_id = client.create_run(experiment).info.run_id
        publish_version(run_id, "tiny-sentiment", served, metric=0.5, primary_metric="macro_f1", eval_hash="t")
        log_pyfunc("flaky", FlakyModel())
        log_pyfunc("finance-monitoring", KeywordModel())
        yield state


def text_folder(folder: Path) -> Path:
    """72 texts: 40 in a CSV (with an id column and a quoted newline), 32 in a JSONL file."""
    folder.mkdir()
    rows = [{"id": f"r{i}", "text": t.replace(" , ", ",\n") if i == 3 else t} for i, t in enumerate(TEXTS)]
    pd.DataFrame(rows[:40]).to_csv(folder / "a.csv", index=False)
    (folder / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[40:]), encoding="utf-8")
    return folder


# -- fast: partitions ---------------------------------------------------------------------------------------


def test_partitions_read_back_every_record_in_order(tmp_path: Path) -> None:
    folder = text_folder(tmp_path / "in")
    pd.DataFrame({"text": TEXTS, "n": range(72)}).to_parquet(folder / "c.parquet", row_group_size=7)
    parts = plan_partitions(folder, rows=10)
    assert [(Path(p.file).name, p.start, p.stop) for p in parts][:5] == [
        ("a.csv", 0, 10), ("a.csv", 10, 20), ("a.csv", 20, 30), ("a.csv", 30, 40), ("b.jsonl", 0, 10),
    ]  # fmt: skip
    assert len(parts) == 4 + 4 + 8 and len({p.id for p in parts}) == len(parts)
    assert plan_partitions(folder, rows=10) == parts  # same bytes, same ids
    read = pd.concat([read_partition(p) for p in parts], ignore_index=True)
    assert read["text"].tolist() == [*TEXTS[:3], TEXTS[3].replace(" , ", ",\n"), *TEXTS[4:], *TEXTS]
    assert read["id"].iloc[:72].tolist() == [f"r{i}" for i in range(72)] and read["n"].iloc[72:].tolist() == list(
        range(72)
    )
    (folder / "a.csv").write_text("id,text\nx,changed\n", encoding="utf-8")
    assert plan_partitions(folder, rows=10)[0].id.split("-")[0] != parts[0].id.split("-")[0]


def test_bad_input_names_file_row_column_and_value(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text('id,text\n1,fine\n2,"two\nlines"\n3,"  "\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"empty text \(file .*empty\.csv, row 3, line 5, column 'text', value '  '\)"):
        plan_partitions(tmp_path / "empty.csv")
    (tmp_path / "short.csv").write_text("id,text\n1,fine\n2\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"expected 2 fields, got 1 \(file .*short\.csv, row 2, line 3, value '2'\)"):
        plan_partitions(tmp_path / "short.csv")
    (tmp_path / "n.jsonl").write_text('{"text": "a"}\n\n{"text": 7}\n', encoding="utf-8")
    with pytest.raises(
        DataError, match=r"text is not a string \(file .*n\.jsonl, row 2, line 3, column 'text', value 7"
    ):
        plan_partitions(tmp_path / "n.jsonl")
    pd.DataFrame({"body": ["a", None]}).to_parquet(tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"missing text \(null\) \(file .*p\.parquet, row 2, column 'body'\)"):
        plan_partitions(tmp_path / "p.parquet", text_column="body")
    with pytest.raises(DataError, match=r"no text column 'text'; columns found: \['body'\]"):
        plan_partitions(tmp_path / "p.parquet")
    (tmp_path / "u.csv").write_bytes(b"text\ncaf\xe9\n")
    with pytest.raises(DataError, match=r"not valid UTF-8 .*u\.csv, line 2"):
        plan_partitions(tmp_path / "u.csv")


def test_engine_config_is_bounded_and_local_only_binds_loopback() -> None:
    with pytest.raises(ValidationError, match="set engine=dask"):
        EngineConfig(address="tcp://10.0.0.5:8786")
    with pytest.raises(ValidationError, match="workers"):
        EngineConfig(engine="dask", workers=0)
    kwargs = local_cluster_kwargs(EngineConfig(engine="dask", workers=2, threads_per_worker=1))
    assert (kwargs["host"], kwargs["dashboard_address"], kwargs["n_workers"]) == ("127.0.0.1", None, 2)
    assert MonitorConfig(source="x.csv").engine.value == "local"  # today's single-process path stays the default


# -- flows ----------------------------------------------------------------------------------------------------


def test_score_on_two_dask_workers_equals_one_process(registry: Path, tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    from finetune_flows.flows.score import ScoreConfig, score

    folder = text_folder(tmp_path / "in")
    base = {"model_name": "tiny-sentiment", "input": str(folder), "partition_rows": 8}
    local = score(ScoreConfig(**base, output=str(tmp_path / "local")))
    assert (local.parts, local.scored_parts, local.rows, local.worker_pids) == (5 + 4, 9, 72, [os.getpid()])

    with LocalCluster(**local_cluster_kwargs(EngineConfig(engine="dask", workers=2))) as cluster:
        on_dask = score(
            ScoreConfig(**base, output=str(tmp_path / "dask"), engine="dask", address=cluster.scheduler_address)
        )
        with Client(cluster) as client:
            torch_in_workers = client.run(lambda: "torch" in sys.modules)
    assert on_dask.scored_parts == 9 and os.getpid() not in on_dask.worker_pids
    assert set(torch_in_workers.values()) == {False}

    one, two = read_output(tmp_path / "local"), read_output(tmp_path / "dask")
    assert list(one.columns) == ["id", "text", "label", "score", "prob_negative", "prob_positive", "model_version"]
    pd.testing.assert_frame_equal(
        one[["id", "text", "label", "model_version"]], two[["id", "text", "label", "model_version"]]
    )
    np.testing.assert_allclose(
        one[["prob_negative", "prob_positive"]], two[["prob_negative", "prob_positive"]], atol=1e-5
    )
    # ... and both what the pyfunc says about all 72 texts at once (in input order)
    whole = mlflow.pyfunc.load_model("models:/tiny-sentiment/1").predict(pd.DataFrame({"text": one["text"]}))
    assert one["label"].tolist() == whole["label"].tolist() and set(whole["label"]) == {"negative", "positive"}
    np.testing.assert_allclose(one["prob_positive"], whole["prob_positive"], atol=1e-5)
    session = cached_model("models:/tiny-sentiment/1", threads=1).unwrap_python_model().scorer.session
    assert session.get_session_options().intra_op_num_threads == 1


def test_monitor_on_dask_stores_the_same_records(registry: Path, tmp_path: Path) -> None:
    from finetune_flows.flows.monitor import monitor

    write_csv(tmp_path / "batch.csv", stream({"banks": (10, 6), "energy": (10, 2)}))
    default = monitor(MonitorConfig(source=str(tmp_path / "batch.csv"), store_dir=str(tmp_path / "one")))
    on_dask = monitor(
        MonitorConfig(
            source=str(tmp_path / "batch.csv"), store_dir=str(tmp_path / "two"), engine="dask", workers=2,
            partition_rows=40,
        )
    )  # fmt: skip
    assert on_dask.new_records == default.new_records == 160 and on_dask.alerts == default.alerts
    assert (
        len(list((tmp_path / "two" / "work" / on_dask.batch_id / "partitions" / "parts").glob("part-*.parquet"))) == 4
    )
    tables = []
    for store in ("one", "two"):
        with sqlite3.connect(tmp_path / store / "records.sqlite") as con:
            tables.append(con.execute("SELECT * FROM records ORDER BY text_sha256, ts_us, source").fetchall())
    assert tables[0] == tables[1] and len(tables[0]) == 160


def test_a_failed_run_resumes_and_skips_the_parts_it_wrote(registry: Path, tmp_path: Path) -> None:
    from finetune_flows.flows.score import ScoreConfig, score

    flag = tmp_path / "flag"
    flag.touch()
    texts = [f"text number {i}" for i in range(20)]
    texts[13] = f"explode {flag}"
    pd.DataFrame({"text": texts}).to_csv(tmp_path / "in.csv", index=False)
    config = ScoreConfig(
        model_name="flaky", input=str(tmp_path / "in.csv"), output=str(tmp_path / "out"), partition_rows=4,
        engine="dask", workers=1,  # one worker process: a cheaper cluster; two are tested above
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="explode"):
        score(config)
    out = tmp_path / "out"
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert len(written) == 4 and not list(out.glob(".*.tmp"))  # every other partition went on; no half files
    assert json.loads((out / MANIFEST).read_text())["complete"] is False

    flag.unlink()
    resumed = score(config)
    assert (resumed.parts, resumed.skipped_parts, resumed.scored_parts) == (5, 4, 1)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet") if p.name in written} == written
    assert (score(config).scored_parts, score(config).worker_pids) == (0, [])  # finished: nothing to start
    clean = score(config.model_copy(update={"output": str(tmp_path / "clean"), "engine": "local"}))
    assert clean.scored_parts == 5
    pd.testing.assert_frame_equal(read_output(out), read_output(tmp_path / "clean"))
    assert read_output(out)["label"].tolist()[12:15] == ["short", "long", "short"]


KILLED_RUN = """
import json, sys
from finetune_flows.flows.score import ScoreConfig, score
score(ScoreConfig.model_validate(json.loads(sys.argv[1])))
"""


def kill_when(script: str, config: BaseModel, ready: Callable[[], bool], log: Path) -> None:
    """Run ``script`` on ``config`` in its own process group against this Prefect server; SIGKILL the group (the
    flow process and its Dask workers) once ``ready()`` holds, and check it was killed, not finished."""
    import signal
    import subprocess
    import time

    from prefect.settings import PREFECT_API_URL

    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", script, config.model_dump_json()],
            env={**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())},
            stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline and not ready():
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, log.read_text()[-3000:]


@pytest.mark.slow
def test_a_killed_score_run_resumes_where_it_stopped(registry: Path, tmp_path: Path) -> None:
    from finetune_flows.flows.score import ScoreConfig, score

    texts = [f"{TEXTS[i % len(TEXTS)]} ({i})" for i in range(3000)]
    pd.DataFrame({"id": range(3000), "text": texts}).to_csv(tmp_path / "in.csv", index=False)
    out = tmp_path / "out"
    config = ScoreConfig(
        model_name="tiny-sentiment", input=str(tmp_path / "in.csv"), output=str(out), partition_rows=60,
        engine="dask", workers=1,
    )  # fmt: skip
    kill_when(KILLED_RUN, config, lambda: bool(list(out.glob("part-*.parquet"))), tmp_path / "killed.log")
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert 1 <= len(done) < 50 and json.loads((out / MANIFEST).read_text())["complete"] is False

    resumed = score(config.model_copy(update={"workers": 2}))
    assert (resumed.parts, resumed.skipped_parts, resumed.scored_parts) == (50, len(done), 50 - len(done))
    assert {n: t for n, t in done.items() if (out / n).stat().st_mtime_ns == t} == done  # untouched
    clean = score(config.model_copy(update={"output": str(tmp_path / "clean"), "engine": "local"}))
    one, two = read_output(out), read_output(tmp_path / "clean")
    assert len(one) == 3000 and one["id"].astype(int).tolist() == list(range(3000))
    pd.testing.assert_frame_equal(one[["id", "text", "label"]], two[["id", "text", "label"]])
    np.testing.assert_allclose(one["prob_positive"], two["prob_positive"], atol=1e-5)
    assert clean.scored_parts == 50


KILLED_MONITOR = """
import json, sys
from finetune_flows.flows.monitor import monitor
from finetune_flows.tasks.monitoring.scoring import MonitorConfig
monitor(MonitorConfig.model_validate(json.loads(sys.argv[1])))
"""


def store_rows(store: Path) -> list[tuple]:
    with sqlite3.connect(store / "records.sqlite") as con:
        return con.execute("SELECT * FROM records ORDER BY text_sha256, ts_us, source").fetchall()


@pytest.mark.slow
def test_a_killed_monitor_run_on_dask_resumes_and_stores_what_one_process_stores(
    registry: Path, tmp_path: Path
) -> None:
    from finetune_flows.flows.monitor import monitor

    rows = [r for hour in range(30) for topic in TEMPLATES for r in window_rows(topic, hour, 50, hour % 4)]
    write_csv(tmp_path / "batch.csv", rows)  # 3000 records
    store = tmp_path / "store"
    config = MonitorConfig(
        source=str(tmp_path / "batch.csv"), model_name="tiny-sentiment", store_dir=str(store), engine="dask",
        workers=1, partition_rows=60,
    )  # fmt: skip
    parts = "work/*/partitions/parts/part-*.parquet"
    kill_when(KILLED_MONITOR, config, lambda: bool(list(store.glob(parts))), tmp_path / "killed.log")
    done = {p: p.stat().st_mtime_ns for p in store.glob(parts)}
    assert 1 <= len(done) < 50
    assert not (store / "records.sqlite").exists() or not store_rows(store)  # killed before it stored anything

    resumed = monitor(config.model_copy(update={"workers": 2}))
    assert resumed.new_records == 3000 and resumed.duplicates_skipped == 0
    assert {p: t for p, t in done.items() if p.stat().st_mtime_ns == t} == done  # the parts it wrote: not redone
    clean = monitor(config.model_copy(update={"store_dir": str(tmp_path / "clean"), "engine": "local"}))
    assert (clean.new_records, clean.alerts) == (3000, resumed.alerts)
    assert store_rows(store) == store_rows(tmp_path / "clean")
