"""The ``label`` flow (``tasks/labelling``): uncertain texts -> Prefect UI forms -> label files -> retraining event.

Plain functions: the fitted temperature recovers the one that generated the labels and lowers the
calibration error; diversification takes one text per group of near-duplicates; the form offers
the model's labels and ``skip``; saved labels and skips are appended atomically and excluded from
the next pool. The flow, in its own process against a Prefect server: it pauses with a form per
batch, the answers (given through the API, as the UI's *Resume* sends them) are saved before the
next form, a run killed while a form waits keeps the labels of the batches answered before, the
rerun does not ask about them again, and enough labels raise ``finetune-flows.data.new-labels``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.pyfunc import PythonModel

from finetune_flows.plugins.errors import DataError
from finetune_flows.tasks.labelling.asking import SKIP, Answer, answers_of, label_form, save_labels
from finetune_flows.tasks.labelling.label_files import SKIPS_FILE, label_count, labelled_texts
from finetune_flows.tasks.labelling.picking import LabelConfig, eval_rows
from finetune_flows.tasks.labelling.selection import diversified, expected_calibration_error, fit_temperature, scaled

LABELS = ["negative", "neutral", "positive"]


class HashModel(PythonModel):
    """A stand-in classifier whose probabilities vary from text to text (a hash of it), with prob_<label> columns."""

    def predict(self, context: object, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        rows = []
        for text in model_input["text"]:
            digest = hashlib.sha256(text.encode()).digest()
            logits = np.array([digest[0], digest[1], digest[2]], dtype=float) / 40.0
            probs = np.exp(logits) / np.exp(logits).sum()
            label = ["negative", "neutral", "positive"][int(probs.argmax())]
            rows.append(
                {"label": label, "score": probs.max(), **{f"prob_{k}": p for k, p in zip(LABELS, probs, strict=True)}}
            )
        return pd.DataFrame(rows)


# -- plain functions ----------------------------------------------------------------------------------------


def test_the_fitted_temperature_recovers_the_true_one_and_calibrates() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(4000, 3))
    true = np.exp(logits / 2.5) / np.exp(logits / 2.5).sum(1, keepdims=True)  # the world is 2.5x less sure
    labels = np.array([rng.choice(3, p=p) for p in true])
    overconfident = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    temperature = fit_temperature(overconfident, labels)
    assert 2.2 < temperature < 2.8
    before = expected_calibration_error(overconfident, labels)
    after = expected_calibration_error(scaled(overconfident, temperature), labels)
    assert after < 0.03 < before
    assert (scaled(overconfident, temperature).argmax(1) == overconfident.argmax(1)).all()


def test_diversification_takes_one_text_per_group_of_near_duplicates() -> None:
    rng = np.random.default_rng(1)
    centres = np.eye(4) * 10
    vectors = np.vstack([centres[i % 4] + rng.normal(scale=0.1, size=4) for i in range(40)])
    uncertainty = np.linspace(1.0, 0.0, 40)
    uncertainty[[0, 4, 8, 12]] = [2.0, 1.99, 1.98, 1.97]  # the four most uncertain all sit in group 0
    picked = diversified(uncertainty, vectors, 4)
    assert sorted(i % 4 for i in picked) == [0, 1, 2, 3] and picked[0] == 0
    assert [int(i) for i in np.argsort(-uncertainty)[:4]] == [0, 4, 8, 12]  # plain top-4 would be one group


def test_the_eval_file_is_read_as_the_versions_scenario_reads_its_data(tmp_path: Path) -> None:
    phrasebank = tmp_path / "eval.txt"
    phrasebank.write_text("Profit rose 20 % .@positive\nThe company is based in Espoo .@neutral\n", encoding="utf-8")
    rows = eval_rows(phrasebank, {"scenario": "finance-monitoring"})
    assert rows[["text", "label"]].values.tolist() == [
        ["Profit rose 20 % .", "positive"], ["The company is based in Espoo .", "neutral"],
    ]  # fmt: skip
    numbered = tmp_path / "eval.csv"
    pd.DataFrame({"sentence": ["Sales fell .", "Sales grew ."], "label": ["0", "2"]}).to_csv(numbered, index=False)
    tags = {"scenario": "finance-monitoring", "data.label_map": "0:negative,1:neutral,2:positive"}
    assert eval_rows(numbered, tags)["label"].tolist() == ["negative", "positive"]
    with pytest.raises(DataError) as caught:
        eval_rows(
            numbered, {"scenario": "finance-monitoring"}
        )  # without the version's label map, "0" is no finance label
    assert (caught.value.row, caught.value.column, caught.value.value) == (1, "label", "0")
    with pytest.raises(DataError, match="missing column 'text'"):
        eval_rows(numbered, {})  # a version that names no scenario: text and label columns


def test_the_form_offers_the_labels_and_skip_and_answers_map_back() -> None:
    texts = ["Profit rose", "x" * 200]
    form = label_form(LABELS, texts, 1)
    schema = form.model_json_schema()
    choice = schema["$defs"]["Choice1"]["enum"]
    assert choice == [*LABELS, SKIP] and schema["required"] == ["labelled_by"]
    assert schema["properties"]["text_2"]["title"].endswith("...") and schema["properties"]["text_2"]["description"]
    assert (
        schema["properties"]["text_1"]["title"] == "1. Profit rose"
        and "description" not in schema["properties"]["text_1"]
    )
    answered = form(labelled_by="ana", text_1="positive", text_2="skip")
    assert answers_of(answered, texts, [0.9, 0.8]) == [
        Answer(text="Profit rose", label="positive", uncertainty=0.9),
        Answer(text="x" * 200, label=SKIP, uncertainty=0.8),
    ]
    with pytest.raises(ValueError, match="text_1"):
        form(labelled_by="ana", text_1="bullish")


def test_saved_labels_and_skips_are_appended_and_left_out_of_the_next_pool(tmp_path: Path) -> None:
    config = LabelConfig(data_folder=str(tmp_path / "data"))
    labels_file = str(tmp_path / "data" / "labels-1.csv")
    first = [Answer(text="a", label="negative", uncertainty=1.0), Answer(text="b", label=SKIP, uncertainty=0.9)]
    save_labels.fn(first, "ana", config, labels_file, "3")
    save_labels.fn([Answer(text="c", label="positive", uncertainty=0.5)], "bo", config, labels_file, "3")
    saved = pd.read_csv(labels_file)
    assert saved[["text", "label", "labelled_by", "model_version"]].values.tolist() == [
        ["a", "negative", "ana", 3],
        ["c", "positive", "bo", 3],
    ]
    assert pd.read_csv(tmp_path / "data" / SKIPS_FILE)["text"].tolist() == ["b"]
    assert labelled_texts(tmp_path / "data") == {"a", "b", "c"} and label_count(tmp_path / "data") == 2
    assert not list((tmp_path / "data").glob("*.partial"))


# -- the flow -----------------------------------------------------------------------------------------------

LABEL_RUN = """
import json, sys
from finetune_flows.flows.label import label
from finetune_flows.plugins.errors import DataError
from finetune_flows.tasks.labelling.picking import LabelConfig, eval_rows
print("SUMMARY " + label(LabelConfig.model_validate(json.loads(sys.argv[1]))).model_dump_json())
"""


def register_hash_model() -> None:
    from finetune_flows.tasks.core.settings import get_settings

    settings = get_settings()
    mlflow.set_tracking_uri(settings.tracking_uri)
    experiment = mlflow.create_experiment("label-test", artifact_location=f"{settings.artifact_root}/label-test")
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=HashModel(),
            pip_requirements=["mlflow"],
            registered_model_name="finance-monitoring",
        )
    mlflow.MlflowClient().set_registered_model_alias(
        "finance-monitoring", "champion", str(info.registered_model_version)
    )


def start_label_run(config: LabelConfig, log: Path) -> subprocess.Popen[str]:
    from prefect.settings import PREFECT_API_URL

    with log.open("w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-c", LABEL_RUN, config.model_dump_json()],
            env={**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())},
            stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True,
        )  # fmt: skip


def wait_paused(process: subprocess.Popen[str], log: Path, key: str, seen: set[UUID]) -> UUID:
    """The id of a flow run of ``label`` that is paused on the pause ``key`` (not one of ``seen``)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateName

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        with get_client(sync_client=True) as client:
            paused = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Paused"])))
            )
        for run in paused:
            if run.id not in seen and run.state and run.state.state_details.pause_key == key:
                return run.id
        time.sleep(0.5)
    raise AssertionError(f"no run paused on {key}: {log.read_text()[-3000:]}")


def asked(state: Path) -> list[str]:
    """The texts of the newest run's candidates file."""
    newest = max((state / "label" / "finance-monitoring").glob("*/candidates.parquet"), key=lambda p: p.stat().st_mtime)
    return pd.read_parquet(newest)["text"].tolist()


def resume(run_id: UUID, answers: dict[str, Any]) -> None:
    from prefect.flow_runs import resume_flow_run

    resume_flow_run(run_id, run_input=answers)


@pytest.mark.usefixtures("prefect_harness")
def test_label_flow_saves_each_batch_survives_a_kill_and_requests_retraining(state_dir: Path, tmp_path: Path) -> None:
    register_hash_model()
    pool = [f"Company {i} said its {w} changed" for i, w in enumerate(["sales", "profit", "outlook", "staff"] * 10)]
    pd.DataFrame({"text": pool}).to_csv(tmp_path / "pool.csv", index=False)
    data = tmp_path / "data"
    config = LabelConfig(data_folder=str(data), source=str(tmp_path / "pool.csv"), texts=6, batch_size=3,
                         retrain_after=5)  # fmt: skip

    first = start_label_run(config, tmp_path / "first.log")
    try:
        run = wait_paused(first, tmp_path / "first.log", "batch-1", set())
        batch1 = asked(state_dir)[:3]
        resume(run, {"labelled_by": "ana", "text_1": "negative", "text_2": "skip", "text_3": "positive"})
        wait_paused(first, tmp_path / "first.log", "batch-2", set())
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # a crash while the second form waits
        first.communicate()
    files = list(data.glob("labels-*.csv"))
    assert len(files) == 1 and pd.read_csv(files[0])["text"].tolist() == [batch1[0], batch1[2]]
    assert pd.read_csv(data / SKIPS_FILE)["text"].tolist() == [batch1[1]]

    second = start_label_run(config, tmp_path / "second.log")
    try:
        run2 = wait_paused(second, tmp_path / "second.log", "batch-1", {run})
        again = asked(state_dir)
        assert len(again) == 6 and not set(again) & set(batch1)  # answered and skipped texts are not asked again
        resume(run2, {"labelled_by": "bo", **{f"text_{i}": "neutral" for i in (1, 2, 3)}})
        wait_paused(second, tmp_path / "second.log", "batch-2", {run})
        resume(run2, {"labelled_by": "bo", "text_1": "positive", "text_2": "negative", "text_3": "negative"})
        out, _ = second.communicate(timeout=180)
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
            second.communicate()
    assert second.returncode == 0, (tmp_path / "second.log").read_text()[-3000:]
    summary = json.loads(out.split("SUMMARY ", 1)[1])
    assert (summary["asked"], summary["labelled"], summary["skipped"]) == (6, 6, 0)
    assert summary["retrain_event"] and label_count(data) == 8  # 2 + 6 labels: past retrain_after (5)
    labels = pd.read_csv(summary["labels_file"])
    assert labels["label"].tolist() == ["neutral"] * 3 + ["positive", "negative", "negative"]
    assert set(labels["labelled_by"]) == {"bo"} and labels["text"].tolist() == again
    assert json.loads((data / ".label-state.json").read_text()) == {"labels_at_request": 8}


# -- watch-data: new files in the data folder -----------------------------------------------------------------


@pytest.mark.usefixtures("prefect_harness")
def test_watch_data_announces_each_new_or_changed_file_once(tmp_path: Path) -> None:
    from finetune_flows.flows.watch import watch_data
    from finetune_flows.tasks.labelling.arrivals import WatchConfig

    data = tmp_path / "data"
    config = WatchConfig(data_folder=str(data))
    assert watch_data(config).files == []  # no folder yet: nothing to announce, nothing fails
    data.mkdir()
    pd.DataFrame({"text": ["a", "b"], "label": ["negative", "positive"]}).to_csv(data / "team.csv", index=False)
    pd.DataFrame({"text": ["c"], "label": ["neutral"]}).to_csv(data / "labels-1-abc.csv", index=False)  # label's own
    (data / "notes.md").write_text("not data", encoding="utf-8")
    first = watch_data(config)
    assert first.files == ["team.csv"] and len(first.events) == 1 and first.watched == 1
    assert watch_data(config).files == []  # seen
    pd.DataFrame({"text": ["d"], "label": ["neutral"]}).to_csv(data / "more.csv", index=False)
    pd.DataFrame({"text": ["a", "e"], "label": ["negative", "neutral"]}).to_csv(data / "team.csv", index=False)
    assert watch_data(config).files == ["more.csv", "team.csv"]  # new, and changed
