"""Limits and checks before any training (issue 11, item 4): size caps on files, rows and text cells, a class
imbalance warning, the parity gate's minimum eval size, and the MLflow store and output folders, each failing
(or warning) before anything tokenizes or trains, naming file, row, column and value, and registering nothing.

Most cases run the CLI in a subprocess against a fresh state folder, as a user meets them; one trains a tiny
model (the imbalance warning, which is not an error)."""

from __future__ import annotations

import gzip
import http.server
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from finetune_flows.plugins import SCENARIOS, ConfigError, DataError
from finetune_flows.tasks.core.config import FinetuneConfig, parse_overrides
from finetune_flows.tasks.core.data_checks import class_imbalance, clean_rows
from finetune_flows.tasks.core.data_preparation import check_parity_size
from finetune_flows.tasks.core.ingestion import IngestOptions, ingest_files
from finetune_flows.tasks.core.preflight import check_store, local_path, reach_server
from finetune_flows.tasks.core.tables import read_table
from tests.conftest import NEGATIVE, POSITIVE, free_port, run_cli, services_environment, write_tsv

ROWS = [(t, "1") for t in POSITIVE] + [(t, "0") for t in NEGATIVE]
TINY = ["--set", "model.max_length=32", "--set", "training.max_steps=2", "--set", "training.eval_every_steps=2"]


def store(state: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{state / 'mlflow.db'}")


def no_versions(state: Path) -> bool:
    """Nothing registered in the state folder's store (True also when the store was never created)."""
    if not (state / "mlflow.db").exists():
        return True
    client = store(state)
    return client.search_registered_models() == [] and client.search_model_versions() == []


def failed(result: subprocess.CompletedProcess[str]) -> str:
    """The CLI's stderr after a run that must end with exit code 2 (a finetune-flows error)."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stderr


def trained_nothing(state: Path) -> None:
    """No tokens, no checkpoint, no model version."""
    assert not (state / "cache" / "tokenized").exists()
    assert not list((state / "runs").glob("*/checkpoint-*")) and not list((state / "runs").glob("*/model"))
    assert no_versions(state)


# -- 1. size caps, through the CLI -----------------------------------------------------------------------


def test_a_file_over_max_file_mb_fails_before_it_is_read(tmp_path: Path, prefect_harness: str) -> None:
    state, train = tmp_path / "state", write_tsv(tmp_path / "big.tsv", ROWS * 3)
    size = train.stat().st_size
    assert size > 1048  # over the 0.001 MB cap below
    result = run_cli(services_environment(state, prefect_harness), "run", "sentiment", "--data", str(train),
                     "--set", "data.max_file_mb=0.001")  # fmt: skip
    assert (
        f"finetune-flows: error: file of {size:,} bytes is larger than data.max_file_mb (0.001 MB, 1,048 bytes) "
        f"(file {train}). Raise data.max_file_mb, or split or sample the file"
    ) in failed(result)
    trained_nothing(state)


def test_a_file_over_max_rows_fails_naming_it_and_the_count(tmp_path: Path, prefect_harness: str) -> None:
    state, train = tmp_path / "state", write_tsv(tmp_path / "rows.tsv", ROWS)
    result = run_cli(services_environment(state, prefect_harness), "run", "sentiment", "--data", str(train),
                     "--set", "data.max_rows=20")  # fmt: skip
    assert f"finetune-flows: error: 24 data rows, more than data.max_rows (20) (file {train})" in failed(result)
    trained_nothing(state)


def test_a_text_over_max_text_bytes_names_file_row_column_value_and_size(tmp_path: Path, prefect_harness: str) -> None:
    state = tmp_path / "state"
    huge = "a very long review " + "é" * 3000  # 6,019 UTF-8 bytes in 3,019 characters
    train = write_tsv(tmp_path / "long.tsv", [*ROWS[:2], (huge, "1"), *ROWS[2:]])
    result = run_cli(services_environment(state, prefect_harness), "run", "sentiment", "--data", str(train),
                     "--set", "data.max_text_bytes=5000")  # fmt: skip
    assert (
        "finetune-flows: error: text of 6,019 UTF-8 bytes, more than data.max_text_bytes (5,000); the value shown is "
        f"its first 40 characters (file {train}, row 3, column 'sentence', value 'a very long review {'é' * 21}...')"
    ) in failed(result)
    trained_nothing(state)


# -- 1b. the caps in the reader (no CLI) ---------------------------------------------------------------------


def test_a_gzip_file_that_decompresses_past_the_cap_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bomb.csv.gz"
    path.write_bytes(gzip.compress(b"text,label\n" + b"a" * (3 << 20) + b",1\n"))
    assert path.stat().st_size < 1 << 20
    with pytest.raises(DataError, match=rf"decompresses to more than data\.max_file_mb \(1 MB, 1,048,576 bytes\) "
                       rf"\(file {re.escape(str(path))}\)"):  # fmt: skip
        read_table(path, max_file_mb=1)
    assert len(read_table(path, max_file_mb=4)) == 1


def test_a_jsonl_file_stops_at_the_first_row_over_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(f'{{"text": "t{i}", "label": "1"}}\n' for i in range(5)), encoding="utf-8")
    with pytest.raises(DataError, match=rf"more than data\.max_rows \(3\) data rows \(file {re.escape(str(path))}, "
                       r"line 4\)"):  # fmt: skip
        read_table(path, max_rows=3)
    assert len(read_table(path, max_rows=5)) == 5


def test_text_bytes_count_utf8_bytes_not_characters(tmp_path: Path) -> None:
    sentiment, path = SCENARIOS.get("sentiment"), tmp_path / "t.csv"
    frame = pd.DataFrame({"sentence": ["ok", "€" * 10], "label": ["1", "0"]})  # 10 characters, 30 bytes
    assert len(clean_rows(frame, path, "sentence", "label", sentiment, max_text_bytes=30)) == 2
    with pytest.raises(DataError, match=r"text of 30 UTF-8 bytes, more than data\.max_text_bytes \(29\).*row 2, "
                       r"column 'sentence', value '€€€€€€€€€€'\)"):  # fmt: skip
        clean_rows(frame, path, "sentence", "label", sentiment, max_text_bytes=29)


def test_the_caps_are_part_of_the_config_with_defaults_and_bounds() -> None:
    data = FinetuneConfig().data
    assert (data.max_file_mb, data.max_rows, data.max_text_bytes, data.max_imbalance_ratio) == (
        2048.0, 5_000_000, 100_000, 20.0
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"data\.max_text_bytes"):
        FinetuneConfig.for_scenario("sentiment", parse_overrides(["data.max_text_bytes=0"]))


# -- 2. class imbalance ------------------------------------------------------------------------------------


def test_class_imbalance_is_named_only_above_the_ratio() -> None:
    labels = pd.Series(["positive"] * 597 + ["negative"] * 3)
    assert class_imbalance(labels, 20.0) == "597:3 (199x) positive/negative"
    assert class_imbalance(pd.Series(["a"] * 41 + ["b"] * 2 + ["c"] * 10), 20.0) == "41:2 (20.5x) a/b"
    assert class_imbalance(pd.Series(["a"] * 40 + ["b"] * 2), 20.0) is None


def test_an_imbalanced_file_trains_with_a_warning_and_a_run_and_version_tag(
    tmp_path: Path, tiny_model_dir: Path, prefect_harness: str
) -> None:
    state = tmp_path / "state"
    rows = [(f"{POSITIVE[i % 12]} take {i}", "1") for i in range(300)] + [(t, "0") for t in NEGATIVE[:3]]
    train = write_tsv(tmp_path / "skewed.tsv", rows)
    result = run_cli(services_environment(state, prefect_harness), "run", "sentiment", "--data", str(train),
                     "--set", f"model.source={tiny_model_dir}", *TINY, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    expected = "270:2 (135x) positive/negative"  # 10% held out per class, at least one: 30 + 1 rows
    assert re.search(
        rf"WARNING .*ingest: the training classes are imbalanced: {re.escape(expected)} rows \(largest/smallest "
        rf"class\) in {re.escape(str(train))}, more than data\.max_imbalance_ratio 20; .*class_weights=balanced",
        result.stderr,
    ), result.stderr[-4000:]
    client = store(state)
    version = client.get_model_version("sentiment", "1")
    assert version.tags["class_imbalance"] == expected
    assert client.get_run(str(version.run_id)).data.tags["class_imbalance"] == expected


def test_balanced_data_has_no_imbalance_tag(tmp_path: Path) -> None:
    train = write_tsv(tmp_path / "train.tsv", ROWS)
    result = ingest_files(train, None, SCENARIOS.get("sentiment"), IngestOptions(), tmp_path / "cache")
    assert result.class_imbalance is None and "class_imbalance" not in result.provenance()


# -- 3. the parity gate's minimum, checked at ingest ---------------------------------------------------------


def test_a_60_row_file_fails_at_ingest_not_after_training(tmp_path: Path, prefect_harness: str) -> None:
    state = tmp_path / "state"
    rows = [(f"{t} take {i}", label) for i in range(3) for t, label in ROWS][:60]
    train = write_tsv(tmp_path / "small.tsv", rows)
    result = run_cli(services_environment(state, prefect_harness), "run", "sentiment", "--data", str(train))
    assert (
        "finetune-flows: error: too few rows for the ONNX parity gate after training: 6 eval rows (the split held "
        "out of small.tsv) + 54 train rows = 60 texts, and the gate needs at least 256; the run would train and then "
        f"fail (file {train}). Give at least 256 rows in the training and eval files together"
    ) in failed(result)
    trained_nothing(state)
    client = store(state)
    experiment = client.get_experiment_by_name("finetune-sentiment")
    assert experiment is not None
    (run,) = client.search_runs(experiment_ids=[experiment.experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["failed_stage"] == "ingest"


def test_an_eval_file_too_small_for_the_gate_is_named(tmp_path: Path) -> None:
    train = write_tsv(tmp_path / "train.tsv", [(f"{t} take {i}", lab) for i in range(8) for t, lab in ROWS])
    dev = write_tsv(tmp_path / "dev.tsv", [(f"{t} at last", lab) for t, lab in ROWS])
    result = ingest_files(train, dev, SCENARIOS.get("sentiment"), IngestOptions(), tmp_path / "cache")
    assert (result.train_rows, result.eval_rows) == (192, 24)
    with pytest.raises(DataError, match=rf"24 eval rows \+ 192 train rows = 216 texts, .*at least 256; .*"
                       rf"\(file {re.escape(str(dev))}\)"):  # fmt: skip
        check_parity_size(result, "sequence-classification")


# -- 4. the MLflow store and the output folders, before the run opens ---------------------------------------


def test_an_unreachable_mlflow_server_fails_fast_naming_it_redacted_and_creates_nothing(
    tmp_path: Path, prefect_harness: str
) -> None:
    state, port = tmp_path / "state", free_port()
    env = services_environment(state, prefect_harness) | {
        "FINETUNE_FLOWS_MLFLOW_TRACKING_URI": f"http://alice:CANARY@127.0.0.1:{port}/"
    }
    result = run_cli(env, "run", "sentiment", "--data", str(write_tsv(tmp_path / "t.tsv", ROWS)))
    assert (
        f"finetune-flows: error: the MLflow tracking server http://***@127.0.0.1:{port}/ is not reachable "
        "(ConnectionRefusedError: [Errno 111] Connection refused on GET /health within 5 s): start it "
        "(`finetune-flows up`) or correct FINETUNE_FLOWS_MLFLOW_TRACKING_URI; nothing was run"
    ) in failed(result)
    assert "CANARY" not in result.stdout + result.stderr
    assert not [p.name for p in state.iterdir() if p.name in ("runs", "cache", "mlartifacts", "mlflow.db")]


def test_a_state_folder_that_cannot_be_written_fails_before_the_run_opens(tmp_path: Path, prefect_harness: str) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "runs").write_text("a file where the run folders go\n", encoding="utf-8")
    result = run_cli(
        services_environment(state, prefect_harness),
        "run",
        "sentiment",
        "--data",
        str(write_tsv(tmp_path / "t.tsv", ROWS)),
    )
    assert re.search(
        rf"finetune-flows: error: cannot write run folders to {re.escape(str(state / 'runs'))} \(FileExistsError: "
        r".*\): change FINETUNE_FLOWS_STATE_DIR to a folder you can write, or fix its permissions; nothing was run",
        failed(result),
    ), result.stderr[-3000:]
    assert not (state / "mlflow.db").exists() and not (state / "cache").exists()


class _Server(http.server.BaseHTTPRequestHandler):
    routes: dict[str, int] = {}

    def do_GET(self) -> None:
        self.send_response(self.routes.get(self.path.split("?")[0], 404))
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Server]]]:
    """A local HTTP server whose routes (path -> status) a test sets."""
    handler = type("Handler", (_Server,), {"routes": {}})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_server_answering_health_or_the_search_route_is_reachable(server: tuple[str, type[_Server]]) -> None:
    uri, handler = server
    handler.routes = {"/health": 200}
    reach_server(uri + "/", "X")
    handler.routes = {"/api/2.0/mlflow/experiments/search": 401}  # no /health, login refused: it still answered
    reach_server(uri, "X")
    handler.routes = {"/health": 503}
    with pytest.raises(ConfigError, match=r"is not reachable \(HTTP 503 .* on GET /health within 5 s\)"):
        reach_server(uri.replace("http://", "http://bob:CANARY@"), "X")


def test_sqlite_and_file_stores_need_a_writable_folder(tmp_path: Path) -> None:
    assert local_path(f"sqlite:///{tmp_path}/m.db") == tmp_path / "m.db"
    assert local_path("sqlite:///rel.db") == Path("rel.db") and local_path("postgresql://u@h/x") is None
    check_store(f"sqlite:///{tmp_path}/new/m.db", "X")
    assert (tmp_path / "new").is_dir()
    (tmp_path / "blocked").write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"cannot write the MLflow store to {re.escape(str(tmp_path))}/blocked "):
        check_store(f"sqlite:///{tmp_path}/blocked/m.db", "FINETUNE_FLOWS_MLFLOW_TRACKING_URI")
