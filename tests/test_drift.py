"""Text drift in the monitor (``tasks/monitoring/drift*.py``).

Plain functions: the MMD test keeps its size on same-distribution samples and finds a shift; each
signal fires on its own limit; on real Financial PhraseBank sentences embedded by a tiny encoder
(random weights, MiniLM's tokenizer, exported as the monitor serves it), a day whose topic mix
shifts drifts and steady days do not. The flow: a registered stand-in model that carries a drift
reference; steady days raise nothing, the shifted day raises one ``model.drift`` event, a rerun
and a later batch into the same day raise none, and finance-retrain's trigger (from
deployments/prefect.yaml) starts exactly one run for that event and a burst after it; a version
without a reference is reported.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import mlflow
import numpy as np
import pandas as pd
import pytest

from finetune_flows.tasks.monitoring.drift import (
    DriftReference,
    DriftRule,
    DriftSignal,
    median_distance,
    mmd_test,
    window_drift,
)
from finetune_flows.tasks.monitoring.drift_reference import DRIFT_ARTIFACT, build_reference, write_reference
from finetune_flows.tasks.monitoring.scoring import MonitorConfig
from finetune_flows.tasks.serving.encoder import SentenceEncoder
from finetune_flows.tasks.serving.topics import ENCODER_FILE, TOKENIZER_FILE
from tests.test_monitor import KeywordModel, classify

ROOT = Path(__file__).resolve().parents[1]
PHRASEBANK = ROOT / "plugins" / "scenarios" / "data" / "financial_phrasebank" / "Sentences_50Agree.txt"
RULE = MonitorConfig(source="x").drift_rule()
DAY0 = datetime(2024, 6, 3, tzinfo=UTC)


def sentences() -> tuple[list[str], list[str]]:
    """PhraseBank sentences split in two: ~60% for the reference (training), the rest for the stream."""
    lines = PHRASEBANK.read_text(encoding="latin-1").splitlines()
    texts = sorted({line.rpartition("@")[0].strip() for line in lines if "@" in line})
    random.Random(7).shuffle(texts)
    cut = int(0.6 * len(texts))
    return texts[:cut], texts[cut:]


def about_results(text: str) -> bool:
    """Sentences about profit or sales: about 18% of the stream."""
    return "profit" in text.lower() or "sales" in text.lower()


def day_texts(pool: list[str], day: int, n: int, shifted: bool) -> list[str]:
    """``n`` texts of the stream for one day: the natural mix, or 90% about profit or sales when ``shifted``."""
    rng = random.Random(day)
    if not shifted:
        return rng.sample(pool, n)
    results = [t for t in pool if about_results(t)]
    other = [t for t in pool if not about_results(t)]
    return rng.sample(results, int(0.9 * n)) + rng.sample(other, n - int(0.9 * n))


@pytest.fixture(scope="module")
def encoder_folder(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune_flows.tasks.export.model_export import export_sentence_encoder

    folder = tmp_path_factory.mktemp("drift-encoder") / DRIFT_ARTIFACT
    export_sentence_encoder(tiny_model_dir, folder / ENCODER_FILE)
    (folder / TOKENIZER_FILE).write_bytes((tiny_model_dir / "tokenizer.json").read_bytes())
    return folder


@pytest.fixture(scope="module")
def reference(encoder_folder: Path) -> tuple[DriftReference, np.ndarray]:
    """The reference of a keyword model 'trained' on the first part of PhraseBank; written next to the encoder."""
    train, stream = sentences()
    held_out = stream[:300]
    labels = [classify(t)[0] for t in held_out]
    encoder = SentenceEncoder(encoder_folder / ENCODER_FILE, encoder_folder / TOKENIZER_FILE)
    built = build_reference(train, held_out, labels, [0.9] * len(held_out), encoder)
    write_reference(*built, encoder_folder, DRIFT_ARTIFACT)
    return built


# -- plain functions ----------------------------------------------------------------------------------------


def test_the_mmd_test_keeps_its_size_and_finds_a_small_shift() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(400, 16))
    width = median_distance(reference)
    same = [mmd_test(reference, rng.normal(size=(150, 16)), width, seed=i)[1] for i in range(20)]
    assert sum(p < 0.05 for p in same) <= 3 and min(same) > 1 / 500  # about 5% below 0.05, none at the floor
    shifted = rng.normal(size=(150, 16)) + np.eye(16)[0] * 0.6
    mmd, p_value = mmd_test(reference, shifted, width, seed=0)
    assert p_value < 0.005 and mmd > max(mmd_test(reference, rng.normal(size=(150, 16)), width, seed=1)[0], 0)


def test_each_signal_fires_on_its_own_limit() -> None:
    rng = np.random.default_rng(1)
    embeddings = rng.normal(size=(600, 8))
    reference = DriftReference(
        label_shares={"negative": 0.2, "positive": 0.8}, mean_confidence=0.9, oov_rate=0.02,
        vocabulary=["and", "fell", "profit", "rose", "sales", "the"], lengths=[3] * 200,
        bandwidth=median_distance(embeddings), texts=200,
    )  # fmt: skip
    rule = DriftRule(
        signals=list(DriftSignal), alpha=0.002, max_prediction_shift=0.25, max_confidence_drop=0.1,
        max_oov_increase=0.1, max_length_ks=0.3,
    )  # fmt: skip
    sample = embeddings[:100]  # drawn from the reference itself: no embedding drift

    def fired(texts: list[str], labels: list[str], confidence: float) -> list[DriftSignal]:
        return window_drift(
            7, texts, labels, [confidence] * len(texts), sample, reference, embeddings[100:], rule
        ).fired

    steady = ["the sales rose", "the profit fell"] * 50
    assert fired(steady, ["positive"] * 80 + ["negative"] * 20, 0.9) == []
    assert fired(steady, ["negative"] * 60 + ["positive"] * 40, 0.9) == [DriftSignal.PREDICTION]
    assert fired(steady, ["positive"] * 80 + ["negative"] * 20, 0.7) == [DriftSignal.CONFIDENCE]
    assert fired(["the zorbles quanted"] * 100, ["positive"] * 80 + ["negative"] * 20, 0.9) == [DriftSignal.VOCABULARY]
    assert fired(["the sales rose and the profit fell"] * 100, ["positive"] * 80 + ["negative"] * 20, 0.9) == [
        DriftSignal.LENGTH  # 7 words against 3: every text longer, all words known
    ]
    far = rng.normal(size=(100, 8)) + 1.0
    drifted = window_drift(7, steady, ["positive"] * 80 + ["negative"] * 20, [0.9] * 100, far, reference,
                           embeddings[100:], rule)  # fmt: skip
    assert drifted.fired == [DriftSignal.EMBEDDING] and drifted.embedding_p < 0.002


def test_a_topic_mix_shift_drifts_and_steady_days_do_not(
    encoder_folder: Path, reference: tuple[DriftReference, np.ndarray]
) -> None:
    _, stream = sentences()
    encoder = SentenceEncoder(encoder_folder / ENCODER_FILE, encoder_folder / TOKENIZER_FILE)
    results = {}
    for day, shifted in [(1, False), (2, False), (3, False), (4, True)]:
        texts = day_texts(stream[300:], day, 200, shifted)
        labels = [classify(t)[0] for t in texts]
        results[day] = window_drift(day, texts, labels, [0.9] * 200, encoder.encode(texts), *reference, RULE)
    assert [d for d, r in results.items() if r.fired] == [4], {d: r.embedding_p for d, r in results.items()}
    assert DriftSignal.EMBEDDING in results[4].fired
    assert all(results[d].embedding_p > 0.01 for d in (1, 2, 3))


# -- the flow -----------------------------------------------------------------------------------------------


def register_with_reference(name: str, folder: Path | None) -> str:
    """The keyword stand-in registered as ``name``@champion, carrying the drift reference in ``folder``."""
    from finetune_flows.tasks.core.settings import get_settings

    settings = get_settings()
    mlflow.set_tracking_uri(settings.tracking_uri)
    experiment = mlflow.create_experiment(f"drift-{name}", artifact_location=f"{settings.artifact_root}/drift-{name}")
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=KeywordModel(), pip_requirements=["mlflow"], registered_model_name=name,
            artifacts={DRIFT_ARTIFACT: str(folder)} if folder else None,
        )  # fmt: skip
    version = str(info.registered_model_version)
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", version)
    return version


def write_day(path: Path, texts: list[str], day: int) -> Path:
    start = DAY0 + timedelta(days=day)
    rows = [
        {"timestamp": (start + timedelta(minutes=5 * i)).isoformat(), "source": "wire", "text": t}
        for i, t in enumerate(texts)
    ]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def deploy_finance_retrain() -> UUID:
    """finance-retrain with its triggers from deployments/prefect.yaml, as ``prefect deploy`` creates them
    (no work pool: its runs stay scheduled)."""
    import yaml
    from prefect.client.orchestration import get_client
    from prefect.events import DeploymentTriggerTypes
    from pydantic import TypeAdapter

    from finetune_flows.flows.retrain import retrain

    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text(encoding="utf-8"))
    (deployment,) = [d for d in spec["deployments"] if d["name"] == "finance-retrain"]
    with get_client(sync_client=True) as client:
        deployment_id = client.create_deployment(
            flow_id=client.create_flow(retrain), name="finance-retrain", entrypoint=deployment["entrypoint"],
            parameters=deployment["parameters"],
        )  # fmt: skip
        for spec_trigger in deployment["triggers"]:
            trigger = TypeAdapter(DeploymentTriggerTypes).validate_python(spec_trigger)
            trigger.set_deployment_id(deployment_id)
            client.create_automation(trigger.as_automation())
    return deployment_id


def runs_of(deployment_id: UUID) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


@pytest.mark.usefixtures("prefect_harness")
def test_monitor_raises_model_drift_once_for_the_shifted_day_and_the_trigger_starts_one_retrain(
    state_dir: Path, tmp_path: Path, encoder_folder: Path, reference: tuple[DriftReference, np.ndarray]
) -> None:
    from prefect.events import emit_event

    from finetune_flows.flows.monitor import monitor
    from finetune_flows.tasks.monitoring.drift_check import DRIFT_EVENT
    from finetune_flows.tasks.monitoring.record_store import window_start

    deployment_id = deploy_finance_retrain()
    version = register_with_reference("finance-monitoring", encoder_folder)
    _, stream = sentences()
    pool = stream[300:]
    folder = tmp_path / "incoming"
    folder.mkdir()
    for day in (1, 2, 3):
        write_day(folder / f"day{day}.csv", day_texts(pool, day, 200, shifted=False), day)
    config = MonitorConfig(source=str(folder))

    steady = monitor(config)
    assert len(steady.drift) == 3 and steady.drift_raised == [] and steady.events == []
    assert not any(w.fired for w in steady.drift)

    write_day(folder / "day4.csv", day_texts(pool, 4, 200, shifted=True)[:150], 4)
    shifted = monitor(config)
    day4 = (DAY0 + timedelta(days=4) - datetime(1970, 1, 1, tzinfo=UTC)).days
    assert [w.window for w in shifted.drift] == [day4] and shifted.drift_raised == [day4]
    assert window_start(day4, 1440) == DAY0 + timedelta(days=4) and len(shifted.events) == 1
    table = json.loads(read_drift_artifact())
    assert table[0]["window_start"] == "2024-06-07 00:00" and "embedding" in table[0]["fired"]
    for _ in range(4):  # a burst: more drift events about the same model within the trigger's window
        emit_event(event=DRIFT_EVENT, resource={"prefect.resource.id": "model.finance-monitoring"})
    emit_event(event=DRIFT_EVENT, resource={"prefect.resource.id": "model.another-model"})
    deadline = time.monotonic() + 120
    while not runs_of(deployment_id) and time.monotonic() < deadline:
        time.sleep(1)
    time.sleep(8)  # time for a second run to appear if the burst were not debounced
    (run,) = runs_of(deployment_id)
    assert run.parameters["config"]["data_folder"] == "data/retrain/finance"

    assert monitor(config).drift_raised == []  # a rerun: nothing new, nothing judged
    write_day(folder / "day4-late.csv", day_texts(pool, 4, 200, shifted=True)[150:], 4)
    later = monitor(config)
    assert [w.window for w in later.drift] == [day4] and later.drift[0].volume == 200 and later.drift_raised == []
    with sqlite3.connect(later.store) as con:
        rows = con.execute("SELECT model_version, window, fired FROM drift WHERE window = ?", (day4,)).fetchall()
    assert len(rows) == 2 and {r[0] for r in rows} == {version} and all("embedding" in r[2] for r in rows)


@pytest.mark.usefixtures("prefect_harness")
def test_a_version_without_a_reference_is_reported_and_not_judged(state_dir: Path, tmp_path: Path) -> None:
    from finetune_flows.flows.monitor import monitor

    register_with_reference("plain-model", None)
    _, stream = sentences()
    write_day(tmp_path / "day.csv", stream[:100], 1)
    summary = monitor(MonitorConfig(source=str(tmp_path / "day.csv"), model_name="plain-model"))
    assert summary.drift == [] and summary.new_records == 100
    assert summary.drift_note == "models:/plain-model/1 carries no drift reference: drift is not judged"


def read_drift_artifact() -> str:
    from tests.test_monitor import read_artifact

    return read_artifact("monitor-drift")
