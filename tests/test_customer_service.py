"""Scenario ``customer-service`` (Banking77 intents) and the TF-IDF + LR baseline in every classification report:
the Banking77 layout and its label spellings, unknown intents, the bundled attributed sample and answer templates,
the baseline on separable and on shuffled labels, and one `finetune-flows run` registering a version with the
baseline metrics and the answers file."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from finetune_flows.plugins import SCENARIOS, DataError
from finetune_flows.plugins.scenarios.customer_service import INTENTS, RAW_INTENTS, intent_name
from finetune_flows.tasks.classification.answers import ANSWERS_ARTIFACT, check_coverage, read_answers
from finetune_flows.tasks.classification.baseline import tfidf_baseline
from finetune_flows.tasks.classification.evaluation import comparison_markdown, with_baseline
from finetune_flows.tasks.core.evaluating import EvalResult
from finetune_flows.tasks.core.ingestion import IngestOptions, ingest_files
from tests.conftest import run_cli, services_environment

SCENARIO = "customer-service"
SAMPLE = Path(__file__).resolve().parents[1] / "plugins" / "scenarios" / "data" / "banking77_sample"
MESSAGES = {  # raw Banking77 spellings, two of which are not valid MLflow metric keys as they stand
    "card_arrival": ["Where is my new card", "My card has still not arrived", "When will the card get here"],
    "Refund_not_showing_up": ["The refund is not in my account", "Still no refund from the shop", "Refund missing"],
    "reverted_card_payment?": ["Why was my payment reverted", "A card payment went back", "Payment was reversed"],
    "lost_or_stolen_card": ["Someone stole my card", "I lost my card yesterday", "My card is gone"],
}


def banking_csv(path: Path, rows_per_intent: int, extra: str = "") -> Path:
    """A Banking77-layout CSV (text,category) with ``rows_per_intent`` distinct texts per intent of MESSAGES."""
    rows = [(f"{texts[n % len(texts)]} ({n})", raw) for raw, texts in MESSAGES.items() for n in range(rows_per_intent)]
    pd.DataFrame(rows, columns=["text", "category"]).to_csv(path, index=False)
    if extra:
        path.write_text(path.read_text(encoding="utf-8") + extra, encoding="utf-8")
    return path


# -- the scenario ---------------------------------------------------------------------------------


def test_the_banking77_layout_reads_with_clean_intent_names(tmp_path: Path) -> None:
    train = banking_csv(tmp_path / "train.csv", 12)
    result = ingest_files(train, None, SCENARIOS.get(SCENARIO), IngestOptions(eval_fraction=0.25), tmp_path / "c")
    assert (result.text_column, result.label_column) == ("text", "category")
    # '?' and capitals do not survive: per-class metrics are MLflow keys, which allow neither '?' nor surprises.
    assert result.labels == ["card_arrival", "lost_or_stolen_card", "refund_not_showing_up", "reverted_card_payment"]
    assert result.train_rows + result.eval_rows == 48
    frame = pd.read_parquet(Path(result.dataset_dir) / "train.parquet")
    assert set(frame["label"]) == set(result.labels)


def test_the_generic_layout_and_the_clean_spelling_read_too(tmp_path: Path) -> None:
    path = tmp_path / "generic.csv"
    rows = [(f"{t} ({n})", intent_name(raw)) for raw, ts in MESSAGES.items() for t in ts for n in range(3)]
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(path, index=False)
    result = ingest_files(path, None, SCENARIOS.get(SCENARIO), IngestOptions(eval_fraction=0.25), tmp_path / "c")
    assert (result.text_column, result.label_column) == ("text", "label")
    assert "reverted_card_payment" in result.labels


def test_an_unknown_intent_fails_naming_file_row_column_and_value(tmp_path: Path) -> None:
    train = banking_csv(tmp_path / "train.csv", 12, extra="Can I get a mortgage,mortgage_offer\n")
    with pytest.raises(DataError, match=rf"unknown label for scenario 'customer-service'; known: \[.*\] \(file "
                       rf"{re.escape(str(train))}, row 49, column 'category', value 'mortgage_offer'\)"):  # fmt: skip
        ingest_files(train, None, SCENARIOS.get(SCENARIO), IngestOptions(eval_fraction=0.25), tmp_path / "c")


def test_the_scenario_knows_the_77_intents_and_decides_by_accuracy() -> None:
    scenario = SCENARIOS.get(SCENARIO)
    assert len(RAW_INTENTS) == len(INTENTS) == 77
    assert set(scenario.label_names.values()) == set(INTENTS)
    assert all(re.fullmatch(r"[a-z0-9_]+", intent) for intent in INTENTS)
    assert scenario.label_names["reverted_card_payment?"] == "reverted_card_payment"
    assert scenario.primary_metric == "accuracy" and scenario.head == "sequence-classification"
    assert scenario.defaults.max_length == 64


def test_the_bundled_sample_is_attributed_stratified_and_covers_every_intent() -> None:
    sample = SCENARIOS.get(SCENARIO).sample()
    assert sample is not None and sample.eval is not None
    assert "Casanueva et al. 2020" in sample.attribution and "CC BY 4.0" in sample.attribution
    assert "Attribution 4.0 International" in (SAMPLE / "LICENSE").read_text(encoding="utf-8")
    original = json.loads((SAMPLE / "categories.json").read_text(encoding="utf-8"))
    assert tuple(original) == RAW_INTENTS
    for path, per_intent in ((sample.train, 20), (sample.eval, 5)):
        counts = pd.read_csv(path)["category"].value_counts()
        assert set(counts.index) == set(RAW_INTENTS) and set(counts) == {per_intent}, path
    assert sum(p.stat().st_size for p in SAMPLE.iterdir()) < 200_000


def test_the_answer_templates_cover_every_intent_with_a_reply_and_a_link() -> None:
    path = SCENARIOS.get(SCENARIO).answer_templates()
    answers = read_answers(path)
    assert set(answers) == set(INTENTS)
    assert all(a.reply.endswith(".") and 20 <= len(a.reply) <= 200 and a.link for a in answers.values())
    check_coverage(answers, list(INTENTS), path)  # nothing missing: no error


def test_answer_templates_fail_on_a_missing_intent_a_repeat_or_an_empty_reply(tmp_path: Path) -> None:
    path = tmp_path / "answers.csv"
    path.write_text("intent,reply,link\ncard_arrival,Cards arrive in 5 days.,Cards\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"no reply for 1 of the model's 2 labels: \['pin_blocked'\] \(file "):
        check_coverage(read_answers(path), ["card_arrival", "pin_blocked"], path)
    path.write_text("intent,reply,link\ncard_arrival,Soon.,\ncard_arrival,Later.,\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"intent listed twice \(file .*, row 2, column 'intent', value"):
        read_answers(path)
    path.write_text("intent,reply\npin_blocked, \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty reply \(file .*, row 1, column 'reply'"):
        read_answers(path)


# -- the baseline ---------------------------------------------------------------------------------

WORDS = {0: "parcel courier delivery", 1: "refund money back", 2: "pin code blocked", 3: "exchange rate currency"}
FILLERS = ["please help", "hello there", "quick question", "thanks a lot", "urgent", "today", "again", "hi"]


def prepared(folder: Path, labels_of: dict[str, list[int]], seed: int = 0) -> Path:
    """A prepared dataset folder (train/eval/test parquet: text, label_id) whose texts carry their label's words."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, label_ids in labels_of.items():
        texts = [f"{rng.choice(FILLERS)} {WORDS[i]} {rng.choice(FILLERS)} {n}" for n, i in enumerate(label_ids)]
        pd.DataFrame({"text": texts, "label_id": label_ids}).to_parquet(folder / f"{split}.parquet", index=False)
    return folder


def test_the_baseline_separates_separable_classes(tmp_path: Path) -> None:
    labels = ["delivery", "refund", "pin", "exchange"]
    folder = prepared(tmp_path / "d", {"train": [i % 4 for i in range(80)], "eval": [i % 4 for i in range(40)],
                                       "test": [i % 4 for i in range(20)]})  # fmt: skip
    scores = tfidf_baseline(folder, labels)
    assert scores["accuracy"] == scores["macro_f1"] == 1.0
    assert scores["test_accuracy"] == scores["test_macro_f1"] == 1.0
    assert 0 < scores["fit_seconds"] < 30


def test_the_baseline_is_near_chance_when_eval_labels_are_shuffled(tmp_path: Path) -> None:
    labels = ["delivery", "refund", "pin", "exchange"]
    texts_of = [i % 4 for i in range(400)]
    folder = prepared(tmp_path / "d", {"train": [i % 4 for i in range(80)], "eval": texts_of})
    shuffled = np.random.default_rng(0).permutation(texts_of)  # each text now carries a random label
    frame = pd.read_parquet(folder / "eval.parquet").assign(label_id=shuffled)
    frame.to_parquet(folder / "eval.parquet", index=False)
    scores = tfidf_baseline(folder, labels)
    assert 0.15 < scores["accuracy"] < 0.35  # chance is 0.25; learning from the words cannot help here
    assert "test_accuracy" not in scores  # no test split, no test figures


def test_the_report_carries_the_baseline_next_to_the_model(tmp_path: Path) -> None:
    labels = ["delivery", "refund", "pin", "exchange"]
    folder = prepared(tmp_path / "d", {"train": [i % 4 for i in range(80)], "eval": [i % 4 for i in range(40)],
                                       "test": [i % 4 for i in range(20)]})  # fmt: skip
    report = tmp_path / "report"
    report.mkdir()
    model = EvalResult(metrics={"accuracy": 0.5, "macro_f1": 0.4, "ece": 0.1}, primary_metric="accuracy",
                       report_dir=str(report), headline=["accuracy", "macro_f1", "ece"],
                       test_metrics={"accuracy": 0.45, "macro_f1": 0.35, "ece": 0.2})  # fmt: skip
    result = with_baseline(model, folder, labels, seed=42)
    assert result.metrics["baseline_accuracy"] == result.metrics["baseline_macro_f1"] == 1.0
    assert result.test_metrics is not None and result.test_metrics["baseline_accuracy"] == 1.0
    assert result.headline == ["accuracy", "macro_f1", "ece", "baseline_accuracy", "baseline_macro_f1"]
    assert json.loads((report / "baseline.json").read_text())["accuracy"] == 1.0
    table = comparison_markdown(result).splitlines()
    assert table[0] == "| model | eval accuracy | eval macro-F1 | test accuracy | test macro-F1 |"
    assert table[2] == "| fine-tuned | 0.5000 | 0.4000 | 0.4500 | 0.3500 |"
    assert table[3] == "| TF-IDF + LR baseline | 1.0000 | 1.0000 | 1.0000 | 1.0000 |"


def test_a_baseline_that_cannot_be_fitted_leaves_the_report_as_it_was(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    for split in ("train", "eval"):  # one-character "words" only: TF-IDF finds no vocabulary
        pd.DataFrame({"text": ["a", "b", "c", "d"], "label_id": [0, 1, 0, 1]}).to_parquet(folder / f"{split}.parquet")
    model = EvalResult(metrics={"accuracy": 0.5}, primary_metric="accuracy", report_dir=str(tmp_path), headline=[])
    assert with_baseline(model, folder, ["x", "y"], seed=0) == model
    assert comparison_markdown(model) == ""


# -- one run from the command line ----------------------------------------------------------------


def test_run_registers_a_version_with_the_baseline_and_the_answers(
    tiny_model_dir: Path, tmp_path: Path, prefect_harness: str
) -> None:
    state = tmp_path / "state"
    train = banking_csv(tmp_path / "banking.csv", 96)  # 384 rows: 3 intents' train + eval give the parity gate 256
    result = run_cli(
        services_environment(state, prefect_harness), "run", SCENARIO, "--data", str(train),
        "--set", "data.held_out_labels=1",
        "--set", f"model.source={tiny_model_dir}", "--set", "model.max_length=32",
        "--set", "training.learning_rate=5e-3", "--set", "training.max_steps=4", "--set", "training.eval_every_steps=2",
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    out = result.stdout
    assert "version          : 1" in out
    baseline = float(re.search(r"eval baseline_accuracy: (\d\.\d{4})", out).group(1))  # type: ignore[union-attr]
    assert baseline == 1.0  # every eval text's sentence occurs in training with its intent

    uri = f"sqlite:///{state / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    version = client.get_model_version(SCENARIO, "1")
    assert version.tags["eval.baseline_accuracy"] == "1.0000" and "eval.baseline_macro_f1" in version.tags
    assert version.tags["answers"] == "answers.csv" and version.tags["answers.intents"] == "77"
    answers = SCENARIOS.get(SCENARIO).answer_templates()
    metrics = client.get_run(version.run_id).data.metrics
    assert metrics["final_baseline_accuracy"] == 1.0 and "final_baseline_macro_f1" in metrics

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        folder = Path(mlflow.artifacts.download_artifacts(f"models:/{SCENARIO}/1", dst_path=str(tmp_path / "served")))
        texts = ["Where is my card", "I want to cancel my transfer", "what is the weather like", "card payment"]
        served = mlflow.pyfunc.load_model(f"models:/{SCENARIO}/1").predict(pd.DataFrame({"text": texts}))
    finally:
        mlflow.set_tracking_uri(previous)
    assert (folder / "artifacts" / "answers.csv").read_bytes() == answers.read_bytes()
    assert ANSWERS_ARTIFACT in (folder / "MLmodel").read_text(encoding="utf-8")  # the pyfunc names it
    assert set(served["intent"]) <= {intent_name(raw) for raw in MESSAGES}  # the served model still loads

    # The hand-off policy fitted on eval ships with the model; the served label is "handoff" exactly below it.
    policy = json.loads((folder / "artifacts" / "handoff.json").read_text(encoding="utf-8"))
    assert float(version.tags["handoff.threshold"]) == pytest.approx(policy["threshold"], abs=1e-6)
    assert metrics["handoff_temperature"] == pytest.approx(policy["temperature"])
    assert 0.0 <= metrics["handoff_eval_coverage"] <= 1.0 and policy["target_precision"] == 0.95
    below = served["score"] < policy["threshold"]
    assert (served["label"] == "handoff").tolist() == below.tolist()
    assert (served.loc[~below, "label"] == served.loc[~below, "intent"]).all()
    assert "Hand-off below calibrated confidence" in out

    # One intent (seeded) left out of training: its eval rows measure the hand-off as out-of-scope messages.
    held = re.search(r"held-out labels (\w+)\)", out)
    assert held, out[-3000:]
    id2label = json.loads((folder / "artifacts" / "model" / "config.json").read_text(encoding="utf-8"))["id2label"]
    assert held.group(1) in {intent_name(raw) for raw in MESSAGES} and held.group(1) not in id2label.values()
    assert len(id2label) == len(MESSAGES) - 1
    assert 0.0 <= metrics["handoff_eval_oos_recall"] <= 1.0 and 0.0 <= metrics["handoff_eval_oos_precision"] <= 1.0
    assert re.search(r"\| eval \| \d+ \+ \d+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", out), out[-3000:]
