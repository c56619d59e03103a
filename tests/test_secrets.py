"""Credentials in the tracking URI stay out of everything the project writes: the redaction itself,
log records, failed states, ``RunInfo`` (a Prefect parameter) and, end to end, a whole ``finetune``
run against a real MLflow server reached with ``http://user:CANARY@127.0.0.1:<port>/``."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from finetune_flows.plugins import ConfigError, DataError
from finetune_flows.tasks.core.failures import stage_failed
from finetune_flows.tasks.core.secrets import (
    MLFLOW_MUTE_VARIABLE,
    RedactingFilter,
    has_credentials,
    install_log_redaction,
    redact,
)
from finetune_flows.tasks.core.settings import get_settings
from finetune_flows.tasks.core.tracking import RunInfo, open_run, tracking_uri_for
from tests.conftest import NEGATIVE, POSITIVE, free_port, write_tsv

CANARY = "CANARY-s3cr3t-7f1e"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"http://user:{CANARY}@host/", "http://***@host/"),
        (f"https://{CANARY}@mlflow.example:5000/prefix?x=1", "https://***@mlflow.example:5000/prefix?x=1"),
        (f"postgresql://u:{CANARY}@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
        (f"mysql+pymysql://u:{CANARY}@db/x", "mysql+pymysql://***@db/x"),
        (f"http://u:p@ss{CANARY}@host/x", "http://***@host/x"),  # an unescaped @ in the password
        (
            f"failed: API request to http://u:{CANARY}@h:1/api/2.0/runs (see http://other/a@b)",
            "failed: API request to http://***@h:1/api/2.0/runs (see http://other/a@b)",
        ),
        (f"['http://host','x_https://t:{CANARY}@h2/']", "['http://host','x_https://***@h2/']"),
        ("sqlite:////tmp/state/mlflow.db", "sqlite:////tmp/state/mlflow.db"),
        ("http://127.0.0.1:5000/#/models/m", "http://127.0.0.1:5000/#/models/m"),
        ("mail me at someone@example.org", "mail me at someone@example.org"),
        (f"https://host/api?token={CANARY}&x=1", "https://host/api?token=***&x=1"),
        (f"see http://h/?x=1&Access_Token={CANARY}; then", "see http://h/?x=1&Access_Token=***; then"),
        (f"https://h/a?api_key={CANARY}#top", "https://h/a?api_key=***#top"),
        ("https://h/a?monkey=banana&tokens_left=3", "https://h/a?monkey=banana&tokens_left=3"),
    ],
)
def test_redact_hides_the_credentials_of_every_uri_in_a_text(text, expected) -> None:
    assert redact(text) == expected
    assert has_credentials(text) == (text != expected)


def test_the_filter_redacts_message_arguments_and_traceback() -> None:
    try:
        raise ConnectionError(f"cannot reach http://user:{CANARY}@host/")
    except ConnectionError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "store %s: %d", (f"https://t:{CANARY}@h/", 3), None)
        record.exc_info = sys.exc_info()
    assert RedactingFilter().filter(record)
    text = logging.Formatter().format(record)
    assert "store https://***@h/: 3" in text and "cannot reach http://***@host/" in text and CANARY not in text


@pytest.fixture
def redacting_logs() -> Iterator[None]:
    previous = logging.getLogRecordFactory()
    install_log_redaction()
    install_log_redaction()  # idempotent: one wrapper
    yield
    logging.setLogRecordFactory(previous)


def test_every_log_record_of_the_process_is_redacted(redacting_logs, caplog) -> None:
    with caplog.at_level(logging.INFO):
        logging.getLogger("finetune_flows.tests").info("tracking at %s", f"http://u:{CANARY}@h/")
        logging.getLogger("mlflow").warning(f"postgresql://u:{CANARY}@db/x unreachable")
    assert "tracking at http://***@h/" in caplog.text and "postgresql://***@db/x unreachable" in caplog.text
    assert CANARY not in caplog.text


def test_a_failed_state_message_has_no_credentials() -> None:
    exc = DataError(f"MLflow store http://user:{CANARY}@host:5000/ is unreachable")
    state = stage_failed(exc, [])
    assert state.message == "failed: DataError: MLflow store http://***@host:5000/ is unreachable"
    assert state.data is exc  # the caller still gets the exception itself


@pytest.fixture
def mlflow_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's credential and link variables unset now and restored after the test."""
    for name in (MLFLOW_MUTE_VARIABLE, "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_run_info_holds_the_uri_only_redacted(state_dir, mlflow_variables, monkeypatch) -> None:
    secret_uri = f"http://user:{CANARY}@127.0.0.1:1/"
    run = RunInfo(run_dir="/r", run_id="abc", experiment_id="1", tracking_uri_redacted=secret_uri)
    assert run.tracking_uri_redacted == "http://***@127.0.0.1:1/" and CANARY not in run.model_dump_json()

    monkeypatch.setenv("FINETUNE_FLOWS_MLFLOW_TRACKING_URI", secret_uri)
    assert tracking_uri_for(run) == run.tracking_uri() == "http://127.0.0.1:1/"  # MLflow never sees the password
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("user", CANARY)

    token_uri = f"https://{CANARY}@127.0.0.1:1/"
    monkeypatch.setenv("FINETUNE_FLOWS_MLFLOW_TRACKING_URI", token_uri)
    token_run = run.model_copy(update={"tracking_uri_redacted": redact(token_uri)})
    assert token_run.tracking_uri() == token_uri and os.environ[MLFLOW_MUTE_VARIABLE] == "true"  # no "View run at"

    monkeypatch.setenv("FINETUNE_FLOWS_MLFLOW_TRACKING_URI", f"http://user:{CANARY}@elsewhere:1/")
    with pytest.raises(
        ConfigError, match=r"opened in the MLflow store http://\*\*\*@127\.0\.0\.1:1/ .* http://\*\*\*@elsewhere"
    ) as err:
        run.tracking_uri()
    assert CANARY not in str(err.value)


def test_a_local_store_run_keeps_its_plain_uri(state_dir, mlflow_variables) -> None:
    from finetune_flows.tasks.core.config import FinetuneConfig

    settings = get_settings()
    run = open_run(FinetuneConfig.for_scenario("sentiment", {}), settings.tracking_uri, settings.artifact_root,
                   settings.runs_dir)  # fmt: skip
    assert run.tracking_uri_redacted == settings.tracking_uri == f"sqlite:///{state_dir.resolve() / 'mlflow.db'}"
    assert run.tracking_uri() == settings.tracking_uri and MLFLOW_MUTE_VARIABLE not in os.environ


# --- end to end: a real MLflow server, reached with credentials it ignores


@pytest.fixture
def secret_store(
    state_dir: Path, tmp_path: Path, mlflow_variables: None, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """An MLflow server on the state folder's SQLite store; the settings reach it with a canary password."""
    port, log = free_port(), tmp_path / "mlflow-server.log"
    state_dir.mkdir(parents=True, exist_ok=True)
    artifacts = (state_dir / "mlartifacts").as_uri()
    argv = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{state_dir / 'mlflow.db'}", "--default-artifact-root", artifacts,
            "--artifacts-destination", artifacts]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    with log.open("wb") as out:
        server = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.5)
        monkeypatch.setenv("FINETUNE_FLOWS_MLFLOW_TRACKING_URI", f"http://user:{CANARY}@127.0.0.1:{port}/")
        yield state_dir
    finally:
        server.terminate()
        server.wait(timeout=30)


def prefect_database() -> Path:
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    url = str(PREFECT_API_DATABASE_CONNECTION_URL.value())
    assert url.startswith("sqlite"), url
    return Path(url.split(":///", 1)[1])


def files_holding(folder: Path, needle: bytes) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes()]


def sentiment_files(folder: Path) -> tuple[Path, Path]:
    """As tests/test_flow.py's ``files``: 288 train and 48 eval rows, enough for the parity gate."""
    rows = [(t, "1") for t in POSITIVE] + [(t, "0") for t in NEGATIVE]
    suffixes = "indeed overall really truly honestly frankly clearly simply surely plainly certainly obviously"
    train = [(f"{t} {s}", lab) for s in suffixes.split() for t, lab in rows]
    evaluation = [(f"{t} {s}", lab) for s in ("in the end", "all in all") for t, lab in rows]
    return write_tsv(folder / "train.tsv", train), write_tsv(folder / "dev.tsv", evaluation)


@pytest.mark.usefixtures("prefect_harness")
def test_a_full_and_two_failed_runs_leak_the_canary_nowhere(
    secret_store, tiny_model_dir, tmp_path, capfd, monkeypatch
) -> None:
    from prefect.logging.handlers import APILogWorker

    from finetune_flows.flows.finetune import finetune
    from tests.test_flow import config_for

    data = sentiment_files(tmp_path)
    result = finetune(config_for(tiny_model_dir, data, max_steps=1))
    assert result.version == "1"
    bad = tmp_path / "bad.tsv"
    bad.write_bytes(b"sentence\tstars\na fine film\t1\n")
    with pytest.raises(DataError, match="missing column 'label'"):
        finetune(config_for(tiny_model_dir, (bad, data[1]), max_steps=1))
    # the store gone: MLflow's own error names the URI it was given
    monkeypatch.setenv("FINETUNE_FLOWS_MLFLOW_TRACKING_URI", f"http://user:{CANARY}@127.0.0.1:{free_port()}/")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with pytest.raises(Exception, match=r"127\.0\.0\.1"):
        finetune(config_for(tiny_model_dir, data, max_steps=1))
    APILogWorker.drain_all()

    out, err = capfd.readouterr()
    assert "View run" in out and CANARY not in out + err  # MLflow's run link shows the URI without its password
    needle = CANARY.encode()
    assert files_holding(secret_store, needle) == []  # MLflow store, artifacts, run folders, caches
    database = prefect_database()
    stored = b"".join(p.read_bytes() for p in database.parent.glob(database.name + "*"))
    assert b"missing column 'label'" in stored and b"http://127.0.0.1:" in stored  # the failures' messages and logs
    assert needle not in stored, "the canary is in Prefect's database"
