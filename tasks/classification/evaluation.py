"""Stage 4, evaluate: accuracy, macro-F1, per-class precision/recall/F1, confusion matrix and
expected calibration error, plus the confusion matrix and reliability diagram as PNGs.

``classification_metrics`` is pure numpy (Trainer's ``compute_metrics`` uses it too);
``evaluate_checkpoint`` scores the eval split with the trained model and writes a report folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, ConfigDict

from finetune_flows.plugins import HEADS, SCENARIOS
from finetune_flows.tasks.core.config import FinetuneConfig
from finetune_flows.tasks.core.ingestion import IngestResult
from finetune_flows.tasks.core.tracking import RunInfo

logger = logging.getLogger(__name__)


class EvalResult(BaseModel):
    """Headline metrics and where the full report and plots are."""

    model_config = ConfigDict(frozen=True)

    metrics: dict[str, float]
    report_dir: str
    confusion_png: str
    reliability_png: str
    primary_metric: str
    test_metrics: dict[str, float] | None = None
    """The same metrics on the test split, when there is one (reported only, never used to choose)."""

    @property
    def primary(self) -> float:
        return self.metrics[self.primary_metric]


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


def plot_confusion(confusion: np.ndarray, labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2.5, 1.2 * len(labels) + 2))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), count in np.ndenumerate(confusion):
        color = "white" if count > confusion.max() / 2 else "black"
        ax.text(j, i, str(count), ha="center", va="center", color=color)
    ax.set_title("Confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(confidence: np.ndarray, correct: np.ndarray, bins: int, ece: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    centers = (edges[:-1] + edges[1:]) / 2
    accuracy = [correct[which == b].mean() if (which == b).any() else 0.0 for b in range(bins)]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.bar(centers, accuracy, width=1.0 / bins, edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability diagram (ECE {ece:.3f})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
        "evaluate: %s %.4f, macro-F1 %.4f, ECE %.4f",
        primary_metric,
        metrics[primary_metric],
        metrics["macro_f1"],
        metrics["ece"],
    )
    return EvalResult(
        metrics=metrics,
        report_dir=str(report_dir),
        confusion_png=str(confusion_png),
        reliability_png=str(reliability_png),
        primary_metric=primary_metric,
    )


@task(name="evaluate")
def evaluate_model(model_dir: str, data: IngestResult, config: FinetuneConfig, run: RunInfo) -> EvalResult:
    """Score the eval split; log metrics and plots to MLflow and show them as Prefect artifacts."""
    import mlflow

    def score(split: str, folder: str) -> EvalResult:
        return evaluate_checkpoint(
            Path(model_dir),
            Path(data.dataset_dir),
            data.labels,
            config.head_name,
            config.model.max_length,
            SCENARIOS.get(config.scenario).primary_metric,
            Path(run.run_dir) / folder,
            bins=config.evaluation.calibration_bins,
            batch_size=config.evaluation.batch_size,
            split=split,
        )

    result = score("eval", "evaluation")
    test = score("test", "test") if data.test_rows else None
    mlflow.set_tracking_uri(run.tracking_uri)
    with mlflow.start_run(run_id=run.run_id):
        mlflow.log_metrics({f"final_{k}": v for k, v in result.metrics.items()})
        mlflow.log_artifacts(result.report_dir, artifact_path="evaluation")
        if test is not None:
            mlflow.log_metrics({f"test_{k}": v for k, v in test.metrics.items()})
            mlflow.log_artifacts(test.report_dir, artifact_path="test")
    if test is not None:
        result = result.model_copy(update={"test_metrics": test.metrics})
    create_table_artifact(
        key=f"{config.scenario}-metrics",
        description="Per-class precision, recall and F1 on the eval set",
        table=[
            {
                "label": label,
                "precision": round(result.metrics[f"precision_{label}"], 4),
                "recall": round(result.metrics[f"recall_{label}"], 4),
                "f1": round(result.metrics[f"f1_{label}"], 4),
            }
            for label in data.labels
        ],
    )
    confusion = json.loads((Path(result.report_dir) / "metrics.json").read_text())["confusion_matrix"]
    header = "| true \\ predicted | " + " | ".join(data.labels) + " |\n|---|" + "---|" * len(data.labels)
    rows = "\n".join(
        f"| {label} | " + " | ".join(map(str, row)) + " |" for label, row in zip(data.labels, confusion, strict=True)
    )
    create_markdown_artifact(
        key=f"{config.scenario}-evaluation",
        description="Headline metrics and confusion matrix",
        markdown=(
            f"### Evaluation on {data.eval_rows} texts\n\n"
            f"accuracy **{result.metrics['accuracy']:.4f}**, macro-F1 **{result.metrics['macro_f1']:.4f}**, "
            f"ECE {result.metrics['ece']:.4f}\n\n{header}\n{rows}\n\n"
            f"Plots: `{result.confusion_png}`, `{result.reliability_png}` (also in the MLflow run)."
        ),
    )
    return result
