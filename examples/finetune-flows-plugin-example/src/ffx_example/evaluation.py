"""Evaluation of head ``mean-pooled-classifier``: the exported ONNX graph scores the eval (and test) split.

The core's ``ClassificationEvaluator`` loads the checkpoint with ``AutoModelForSequenceClassification``,
which this head's checkpoints are not. Scoring the exported graph instead needs no torch at all
and measures exactly what is served; the metrics, plots and Prefect report are the core's own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from finetune_flows.plugins import HEADS, PluginError
from finetune_flows.tasks.classification.evaluation import (
    ClassificationEvaluator,
    classification_metrics,
    publish_report,
    training_classification_metrics,
)
from finetune_flows.tasks.classification.plots import plot_confusion, plot_reliability
from finetune_flows.tasks.core.evaluating import EvalRequest, EvalResult
from finetune_flows.tasks.serving.classifier import OnnxTextClassifier


def score_split(scorer: OnnxTextClassifier, request: EvalRequest, split: str, report_dir: Path) -> EvalResult:
    """Metrics of ``split`` (eval or test) scored by ``scorer``; writes metrics.json, predictions and two plots."""
    frame = pd.read_parquet(Path(request.dataset_dir) / f"{split}.parquet")
    logits = scorer.logits(frame["text"].astype(str).tolist(), batch_size=request.evaluation.batch_size)
    predicted, probs = HEADS.get(request.head).predict(logits)
    truth = frame["label_id"].to_numpy()
    bins = request.evaluation.calibration_bins
    metrics = classification_metrics(truth, predicted, probs, request.labels, bins)
    confusion = np.array(metrics.pop("confusion_matrix"))

    report_dir.mkdir(parents=True, exist_ok=True)
    plots = [report_dir / "confusion_matrix.png", report_dir / "reliability_diagram.png"]
    plot_confusion(confusion, request.labels, plots[0])
    plot_reliability(probs.max(axis=-1), predicted == truth, bins, metrics["ece"], plots[1])
    (report_dir / "metrics.json").write_text(
        json.dumps({**metrics, "confusion_matrix": confusion.tolist(), "labels": request.labels}, indent=2)
    )
    frame.assign(predicted=[request.labels[i] for i in predicted], confidence=probs.max(axis=-1)).to_parquet(
        report_dir / "predictions.parquet", index=False
    )
    return EvalResult(
        metrics=metrics,
        primary_metric=request.primary_metric,
        report_dir=str(report_dir),
        headline=list(OnnxClassificationEvaluator.headline),
        plots=[str(p) for p in plots],
    )


class OnnxClassificationEvaluator:
    """The classification report (accuracy, macro-F1, ECE, per-class scores) of the exported graph."""

    headline: ClassVar[tuple[str, ...]] = ("accuracy", "macro_f1", "ece")

    def training_metrics(self, head: str, predictions: Any, label_ids: Any, labels: list[str]) -> dict[str, float]:
        """The core's classification metrics of the head's predictions while training."""
        return training_classification_metrics(head, predictions, label_ids, labels)

    def evaluate(self, request: EvalRequest) -> EvalResult:
        """Score eval (and test, into ``report_dir/test``) with the ONNX graph and the model's tokenizer."""
        scorer = OnnxTextClassifier(request.onnx_path, Path(request.model_dir) / "tokenizer.json")
        if scorer.labels != request.labels:
            raise PluginError(
                f"head {request.head!r}: the graph {request.onnx_path} reports labels {scorer.labels}, "
                f"the prepared data has {request.labels}"
            )
        result = score_split(scorer, request, "eval", Path(request.report_dir))
        if (Path(request.dataset_dir) / "test.parquet").is_file():
            test = score_split(scorer, request, "test", Path(request.report_dir) / "test")
            result = result.model_copy(update={"test_metrics": test.metrics})
        rows = len(pd.read_parquet(Path(request.dataset_dir) / "eval.parquet", columns=["label_id"]))
        publish_report(result, request.labels, rows, request.scenario)
        return result

    def score_graph(self, onnx_path: str, request: EvalRequest) -> float:
        """A candidate graph of the export ladder scored as the core scores classifiers."""
        return ClassificationEvaluator().score_graph(onnx_path, request)

    def score_champion(self, model_uri: str, request: EvalRequest) -> float | None:
        """The registered champion scored on the same eval texts through its pyfunc, as the core does."""
        return ClassificationEvaluator().score_champion(model_uri, request)
