"""Evaluation: metrics and ECE against hand-computed values, and the report folder that
evaluate_checkpoint writes for a tiny classifier."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from finetune_flows.plugins import SCENARIOS
from finetune_flows.tasks.classification.evaluation import (
    classification_metrics,
    evaluate_checkpoint,
    expected_calibration_error,
)
from finetune_flows.tasks.core.ingestion import IngestOptions, ingest_files

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ID2LABEL = {0: "negative", 1: "positive"}


# -- expected calibration error -------------------------------------------------------------------
def test_ece_matches_hand_computed_value() -> None:
    # Two bins, (0, 0.5] and (0.5, 1].
    # Low bin: confidences 0.2, 0.4 (mean 0.3), one of two right (0.5): |0.5 - 0.3| * 2/4 = 0.1.
    # High bin: confidences 0.7, 0.9 (mean 0.8), one of two right (0.5): |0.5 - 0.8| * 2/4 = 0.15.
    confidence = np.array([0.2, 0.4, 0.7, 0.9])
    correct = np.array([False, True, True, False])

    assert expected_calibration_error(confidence, correct, bins=2) == pytest.approx(0.25, abs=1e-12)


def test_ece_bins_are_closed_on_the_right() -> None:
    # 0.5 falls in the low bin (0, 0.5]: low {0.2, 0.5} mean 0.35, acc 0.5 -> 0.15 * 2/4 = 0.075;
    # high {0.7, 0.9} mean 0.8, acc 0.5 -> 0.3 * 2/4 = 0.15. (With 0.5 in the high bin it would be 0.475.)
    confidence = np.array([0.2, 0.5, 0.7, 0.9])
    correct = np.array([True, False, True, False])

    assert expected_calibration_error(confidence, correct, bins=2) == pytest.approx(0.225, abs=1e-12)


def test_ece_is_zero_when_confidence_equals_accuracy() -> None:
    confidence = np.array([0.75, 0.75, 0.75, 0.75])
    correct = np.array([True, True, True, False])

    assert expected_calibration_error(confidence, correct, bins=4) == pytest.approx(0.0, abs=1e-12)


# -- classification metrics -----------------------------------------------------------------------
def test_classification_metrics_match_hand_computed_values() -> None:
    labels = ["a", "b", "c"]
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 1, 1, 1, 1, 2, 0])
    # Rows: predicted probabilities whose arg-max is y_pred; the maxima are the confidences.
    probs = np.array(
        [
            [0.9, 0.05, 0.05],  # right
            [0.8, 0.1, 0.1],  # right
            [0.3, 0.6, 0.1],  # wrong
            [0.2, 0.7, 0.1],  # wrong
            [0.05, 0.9, 0.05],  # right
            [0.2, 0.6, 0.2],  # right
            [0.3, 0.3, 0.4],  # right
            [0.5, 0.3, 0.2],  # wrong
        ]
    )

    metrics = classification_metrics(y_true, y_pred, probs, labels, bins=2)

    # Confusion (rows true, columns predicted):
    #   a: 2 2 0     column sums: 3 4 1
    #   b: 0 2 0     row sums:    4 2 2
    #   c: 1 0 1
    assert metrics["confusion_matrix"] == [[2, 2, 0], [0, 2, 0], [1, 0, 1]]
    assert metrics["accuracy"] == pytest.approx(5 / 8)
    # a: P 2/3, R 2/4, F1 2*(2/3)(1/2)/(7/6) = 4/7
    assert metrics["precision_a"] == pytest.approx(2 / 3)
    assert metrics["recall_a"] == pytest.approx(1 / 2)
    assert metrics["f1_a"] == pytest.approx(4 / 7)
    # b: P 2/4, R 2/2, F1 2/3
    assert metrics["precision_b"] == pytest.approx(1 / 2)
    assert metrics["recall_b"] == pytest.approx(1.0)
    assert metrics["f1_b"] == pytest.approx(2 / 3)
    # c: P 1/1, R 1/2, F1 2/3
    assert metrics["precision_c"] == pytest.approx(1.0)
    assert metrics["recall_c"] == pytest.approx(1 / 2)
    assert metrics["f1_c"] == pytest.approx(2 / 3)
    assert metrics["macro_f1"] == pytest.approx((4 / 7 + 2 / 3 + 2 / 3) / 3)
    # ECE with 2 bins on the row maxima: low bin {0.4 right, 0.5 wrong}: |0.5 - 0.45| * 2/8 = 0.0125;
    # high bin {0.9, 0.8, 0.6, 0.7, 0.9, 0.6}: mean 0.75, 4 of 6 right: |2/3 - 0.75| * 6/8 = 0.0625.
    assert metrics["ece"] == pytest.approx(0.075)
    assert all(isinstance(v, float) for k, v in metrics.items() if k != "confusion_matrix")


def test_class_never_predicted_scores_zero_not_nan() -> None:
    labels = ["a", "b"]
    y_true = np.array([0, 1, 1])
    y_pred = np.array([0, 0, 0])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3]])

    metrics = classification_metrics(y_true, y_pred, probs, labels)

    assert (metrics["precision_b"], metrics["recall_b"], metrics["f1_b"]) == (0.0, 0.0, 0.0)
    # a: P 1/3, R 1, F1 2*(1/3)/(4/3) = 1/2; macro-F1 averages in b's zero.
    assert metrics["f1_a"] == pytest.approx(1 / 2)
    assert metrics["macro_f1"] == pytest.approx(1 / 4)
    assert metrics["confusion_matrix"] == [[1, 0], [2, 0]]


# -- evaluate_checkpoint ------------------------------------------------------------------------
def _one_by_one(model_dir: Path, texts: list[str]) -> list[str]:
    """Predicted label names, scoring each text alone with PyTorch (no batching, no padding)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    with torch.inference_mode():
        return [ID2LABEL[int(model(**tokenizer(t, return_tensors="pt")).logits.argmax())] for t in texts]


def test_evaluate_checkpoint_writes_report(
    tiny_classifier_dir: Path, sentiment_files: tuple[Path, Path], tmp_path: Path
) -> None:
    import pandas as pd

    scenario = SCENARIOS.get("sentiment")
    data = ingest_files(*sentiment_files, scenario, IngestOptions(), tmp_path / "cache")
    report = tmp_path / "report"

    result = evaluate_checkpoint(
        tiny_classifier_dir,
        Path(data.dataset_dir),
        data.labels,
        "sequence-classification",
        max_length=32,
        primary_metric=scenario.primary_metric,
        report_dir=report,
        bins=10,
        batch_size=7,
    )

    assert result.report_dir == str(report)
    assert result.primary_metric == "accuracy"
    assert result.primary == result.metrics["accuracy"]

    written = json.loads((report / "metrics.json").read_text())
    assert written["labels"] == ["negative", "positive"]
    assert np.array(written["confusion_matrix"]).sum() == data.eval_rows == 24
    assert written["accuracy"] == result.metrics["accuracy"]
    assert "confusion_matrix" not in result.metrics

    predictions = pd.read_parquet(report / "predictions.parquet")
    assert len(predictions) == data.eval_rows
    assert set(predictions["predicted"]) <= {"negative", "positive"}
    assert predictions["confidence"].between(0.5, 1.0).all()
    # The reported accuracy is the one the predictions file shows.
    assert (predictions["predicted"] == predictions["label"]).mean() == pytest.approx(result.primary)
    # Scoring is batched by length; each row must still carry its own text's prediction.
    assert predictions["predicted"].nunique() == 2  # premise of the next check: both labels occur
    assert predictions["predicted"].tolist() == _one_by_one(tiny_classifier_dir, predictions["text"].tolist())

    assert len(result.plots) == 2
    for png in map(Path, result.plots):
        path = Path(png)
        assert path.parent == report
        assert path.stat().st_size > 1000
        assert path.read_bytes()[:8] == PNG_SIGNATURE
