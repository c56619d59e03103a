"""Stage 4, evaluate: accuracy, macro-F1, per-class precision/recall/F1, confusion matrix and
expected calibration error, plus the confusion matrix and reliability diagram as PNGs, and a
TF-IDF + logistic-regression baseline fitted and scored on the same split (``baseline_accuracy``,
``baseline_macro_f1``; a row next to the fine-tuned model in the report).

``classification_metrics`` is pure numpy (Trainer's ``compute_metrics`` uses it too);
``evaluate_checkpoint`` scores the eval split with the trained model and writes a report folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from finetune_flows.plugins import HEADS
from finetune_flows.tasks.classification.plots import plot_confusion, plot_reliability
from finetune_flows.tasks.core.evaluating import EvalRequest, EvalResult

logger = logging.getLogger(__name__)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE: the bin-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray, labels: list[str], bins: int = 15
) -> dict[str, Any]:
    """Float metrics (accuracy, macro_f1, ece, per-class p/r/f1) plus the confusion matrix (a list)."""
    y_true = np.asarray(y_true).astype(int)
    y_pred = np.asarray(y_pred).astype(int)
    n = len(labels)
    confusion = np.zeros((n, n), dtype=int)  # rows: true label, columns: predicted label
    np.add.at(confusion, (y_true, y_pred), 1)
    metrics: dict[str, Any] = {"accuracy": float((y_true == y_pred).mean())}
    f1s = []
    for i, label in enumerate(labels):
        tp = confusion[i, i]
        precision = tp / confusion[:, i].sum() if confusion[:, i].sum() else 0.0
        recall = tp / confusion[i, :].sum() if confusion[i, :].sum() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        f1s.append(f1)
        metrics[f"precision_{label}"] = float(precision)
        metrics[f"recall_{label}"] = float(recall)
        metrics[f"f1_{label}"] = float(f1)
    metrics["macro_f1"] = float(np.mean(f1s))
    metrics["ece"] = expected_calibration_error(probs.max(axis=-1), y_true == y_pred, bins)
    metrics["confusion_matrix"] = confusion.tolist()
    return metrics


def training_classification_metrics(head: str, predictions: Any, label_ids: Any, labels: list[str]) -> dict[str, float]:
    """Accuracy, macro-F1, ECE and per-class scores of ``head``'s predictions during training (float values only)."""
    predicted, probs = HEADS.get(head).predict(predictions)
    metrics = classification_metrics(label_ids, predicted, probs, labels)
    return {k: v for k, v in metrics.items() if isinstance(v, float)}


def predict_logits(model_dir: Path, texts: list[str], max_length: int, batch_size: int) -> np.ndarray:
    """Logits of the checkpoint at ``model_dir`` for ``texts``, batched by similar length."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), use_safetensors=True).eval()
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in idx], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
            )
            out[idx] = model(**batch).logits.float().numpy()
    return out


def evaluate_checkpoint(
    model_dir: Path,
    dataset_dir: Path,
    labels: list[str],
    head_name: str,
    max_length: int,
    primary_metric: str,
    report_dir: Path,
    bins: int = 15,
    batch_size: int = 128,
    split: str = "eval",
) -> EvalResult:
    """Score one split (``eval`` or ``test``), write metrics.json, predictions.parquet and the two PNGs."""
    import pandas as pd

    frame = pd.read_parquet(dataset_dir / f"{split}.parquet")
    logits = predict_logits(model_dir, frame["text"].tolist(), max_length, batch_size)
    predicted, probs = HEADS.get(head_name).predict(logits)
    truth = frame["label_id"].to_numpy()
    metrics = classification_metrics(truth, predicted, probs, labels, bins)
    confusion = np.array(metrics.pop("confusion_matrix"))

    report_dir.mkdir(parents=True, exist_ok=True)
    confusion_png, reliability_png = report_dir / "confusion_matrix.png", report_dir / "reliability_diagram.png"
    plot_confusion(confusion, labels, confusion_png)
    plot_reliability(probs.max(axis=-1), predicted == truth, bins, metrics["ece"], reliability_png)
    (report_dir / "metrics.json").write_text(
        json.dumps({**metrics, "confusion_matrix": confusion.tolist(), "labels": labels}, indent=2)
    )
    frame.assign(predicted=[labels[i] for i in predicted], confidence=probs.max(axis=-1)).to_parquet(
        report_dir / "predictions.parquet", index=False
    )
    logger.info(
        "evaluate %s: %s %.4f, macro-F1 %.4f, ECE %.4f",
        split,
        primary_metric,
        metrics[primary_metric],
        metrics["macro_f1"],
        metrics["ece"],
    )
    return EvalResult(
        metrics=metrics,
        primary_metric=primary_metric,
        report_dir=str(report_dir),
        headline=list(ClassificationEvaluator.headline),
        plots=[str(confusion_png), str(reliability_png)],
    )


BASELINE_FILE = "baseline.json"
BASELINE_KEYS = ("baseline_accuracy", "baseline_macro_f1")
"""The baseline's metrics in ``EvalResult.metrics`` and ``test_metrics`` (logged as ``final_``/``test_`` + key)."""


def with_baseline(result: EvalResult, dataset_dir: Path, labels: list[str], seed: int) -> EvalResult:
    """``result`` with the TF-IDF + LR baseline's accuracy and macro-F1 added (eval and test) and in its headline;
    the figures also go to ``baseline.json`` in the report folder. A baseline that cannot be fitted (no word in
    any text) is logged and left out: it never fails the run."""
    from finetune_flows.tasks.classification.baseline import BASELINE_NAME, tfidf_baseline

    try:
        scores = tfidf_baseline(dataset_dir, labels, seed=seed)
    except ValueError as exc:  # e.g. "empty vocabulary": texts without any two-character word
        logger.warning("%s skipped: %s", BASELINE_NAME, exc)
        return result
    (Path(result.report_dir) / BASELINE_FILE).write_text(json.dumps({"model": BASELINE_NAME, **scores}, indent=2))
    test = result.test_metrics
    if test is not None and "test_accuracy" in scores:
        test = {**test, **{key: scores[f"test_{key.removeprefix('baseline_')}"] for key in BASELINE_KEYS}}
    return result.model_copy(
        update={
            "metrics": {**result.metrics, **{key: scores[key.removeprefix("baseline_")] for key in BASELINE_KEYS}},
            "test_metrics": test,
            "headline": [*result.headline, *BASELINE_KEYS],
        }
    )


def comparison_markdown(result: EvalResult) -> str:
    """The fine-tuned model and the baseline side by side (eval, and test when scored); "" without a baseline."""
    from finetune_flows.tasks.classification.baseline import BASELINE_NAME

    if not all(key in result.metrics for key in BASELINE_KEYS):
        return ""
    test = result.test_metrics
    splits = [("eval", result.metrics)] + ([("test", test)] if test and all(k in test for k in BASELINE_KEYS) else [])
    header = "| model | " + " | ".join(f"{s} accuracy | {s} macro-F1" for s, _ in splits) + " |"
    rule = "|---|" + "---|---|" * len(splits)
    rows = [
        f"| {name} | "
        + " | ".join(f"{m[f'{prefix}accuracy']:.4f} | {m[f'{prefix}macro_f1']:.4f}" for _, m in splits)
        + " |"
        for name, prefix in (("fine-tuned", ""), (BASELINE_NAME, "baseline_"))
    ]
    return "\n".join([header, rule, *rows]) + "\n\n"


def publish_report(result: EvalResult, labels: list[str], rows: int, scenario: str) -> None:
    """The per-class table and the headline, the baseline comparison and the confusion matrix as Prefect
    artifacts."""
    create_table_artifact(
        key=f"{scenario}-metrics",
        description="Per-class precision, recall and F1 on the eval set",
        table=[
            {
                "label": label,
                "precision": round(result.metrics[f"precision_{label}"], 4),
                "recall": round(result.metrics[f"recall_{label}"], 4),
                "f1": round(result.metrics[f"f1_{label}"], 4),
            }
            for label in labels
        ],
    )
    confusion = json.loads((Path(result.report_dir) / "metrics.json").read_text())["confusion_matrix"]
    header = "| true \\ predicted | " + " | ".join(labels) + " |\n|---|" + "---|" * len(labels)
    table = "\n".join(
        f"| {label} | " + " | ".join(map(str, row)) + " |" for label, row in zip(labels, confusion, strict=True)
    )
    create_markdown_artifact(
        key=f"{scenario}-evaluation",
        description="Headline metrics and confusion matrix",
        markdown=(
            f"### Evaluation on {rows} texts\n\n"
            f"accuracy **{result.metrics['accuracy']:.4f}**, macro-F1 **{result.metrics['macro_f1']:.4f}**, "
            f"ECE {result.metrics['ece']:.4f}\n\n{comparison_markdown(result)}{header}\n{table}\n\n"
            f"Plots: {', '.join(f'`{p}`' for p in result.plots)} (also in the MLflow run)."
        ),
    )


class ClassificationEvaluator:
    """The classification report: accuracy, macro-F1, ECE, per-class precision/recall/F1, plots, and the TF-IDF +
    LR baseline on the same split."""

    headline: ClassVar[tuple[str, ...]] = ("accuracy", "macro_f1", "ece")

    def training_metrics(self, head: str, predictions: Any, label_ids: Any, labels: list[str]) -> dict[str, float]:
        """``classification_metrics`` of the head's predictions (its ``predict``), float values only."""
        return training_classification_metrics(head, predictions, label_ids, labels)

    def evaluate(self, request: EvalRequest) -> EvalResult:
        """Score eval (and test, into ``report_dir/test``) with the trained checkpoint, and the baseline on both."""

        def score(split: str, folder: Path) -> EvalResult:
            return evaluate_checkpoint(
                Path(request.model_dir),
                Path(request.dataset_dir),
                request.labels,
                request.head,
                request.max_length,
                request.primary_metric,
                folder,
                bins=request.evaluation.calibration_bins,
                batch_size=request.evaluation.batch_size,
                split=split,
            )

        result = score("eval", Path(request.report_dir))
        if (Path(request.dataset_dir) / "test.parquet").is_file():
            test = score("test", Path(request.report_dir) / "test")
            result = result.model_copy(update={"test_metrics": test.metrics})
        result = with_baseline(result, Path(request.dataset_dir), request.labels, request.seed)
        rows = int(np.sum(json.loads((Path(request.report_dir) / "metrics.json").read_text())["confusion_matrix"]))
        publish_report(result, request.labels, rows, request.scenario)
        return result

    def score_graph(self, onnx_path: str, request: EvalRequest) -> float:
        """The graph through the serving scorer on the eval texts: its arg-max labels scored against the gold ones."""
        import pandas as pd

        from finetune_flows.tasks.serving.classifier import OnnxTextClassifier

        frame = pd.read_parquet(Path(request.dataset_dir) / "eval.parquet")
        scorer = OnnxTextClassifier(onnx_path, Path(request.model_dir) / "tokenizer.json")
        logits = scorer.logits(frame["text"].astype(str).tolist(), request.evaluation.batch_size)
        predicted, probs = HEADS.get(request.head).predict(logits)
        metrics = classification_metrics(frame["label_id"].to_numpy(), predicted, probs, request.labels)
        return float(metrics[request.primary_metric])

    def score_champion(self, model_uri: str, request: EvalRequest) -> float | None:
        """The champion's pyfunc on the same eval texts; None when its labels differ (not comparable)."""
        import mlflow
        import pandas as pd

        champion = mlflow.pyfunc.load_model(model_uri)
        frame = pd.read_parquet(Path(request.dataset_dir) / "eval.parquet")
        predicted = champion.predict(pd.DataFrame({"text": frame["text"]}))
        champion_labels = [c.removeprefix("prob_") for c in predicted.columns if c.startswith("prob_")]
        if champion_labels != request.labels:
            logger.info("champion labels %s differ from %s: not comparable", champion_labels, request.labels)
            return None
        index = {label: i for i, label in enumerate(request.labels)}
        pred_ids = predicted["label"].map(index).to_numpy()
        probs = predicted[[f"prob_{label}" for label in request.labels]].to_numpy()
        metrics = classification_metrics(frame["label_id"].to_numpy(), pred_ids, probs, request.labels)
        return float(metrics[request.primary_metric])
