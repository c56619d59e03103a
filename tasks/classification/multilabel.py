"""The multi-label report: thresholds tuned per label on eval, micro/macro-F1, subset accuracy, per-label
precision/recall/F1, and a TF-IDF + one-vs-rest LR baseline scored the same way.

The evaluation scores eval (and test, reported only) with the exported ONNX graph through the served
scorer (``tasks.serving.multilabel``), so what is measured is what is served; it picks each
label's threshold on eval (``multilabel_metrics.tune_thresholds``) and applies those thresholds to
both splits, as the served model will. The eval figures therefore saw their own thresholds being
chosen (the test figures did not); ``untuned_micro_f1``/``untuned_macro_f1`` give eval at 0.5.

``thresholds.json`` is written into the report folder; the scenario's ``ship-thresholds`` stage
(``ship_thresholds``, a ``BEFORE_REGISTER`` stage) ships that file with the served model, whose
scorer (``tasks.serving.multilabel``) reads it. A multi-label model registered without it predicts
at 0.5 for every label.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from finetune_flows.plugins import HEADS, PluginError
from finetune_flows.tasks.classification.multilabel_baseline import BASELINE_NAME, targets, tfidf_multilabel_baseline
from finetune_flows.tasks.classification.multilabel_metrics import (
    DEFAULT_THRESHOLD,
    decide,
    multilabel_metrics,
    thresholds_document,
    tune_thresholds,
)
from finetune_flows.tasks.core.evaluating import EvalRequest, EvalResult
from finetune_flows.tasks.core.reports import write_csv
from finetune_flows.tasks.core.stages import StageContext, StageOutput
from finetune_flows.tasks.serving.multilabel import LABEL_SEPARATOR, THRESHOLDS_ARTIFACT, OnnxMultiLabelClassifier

logger = logging.getLogger(__name__)

THRESHOLDS_FILE = "thresholds.json"
HEADLINE = ("micro_f1", "macro_f1", "subset_accuracy")
BASELINE_KEYS = tuple(f"baseline_{name}" for name in HEADLINE)
TRAINING_KEYS = ("micro_f1", "macro_f1", "subset_accuracy", "micro_precision", "micro_recall")


def decisions_of(label_lists: pd.Series, labels: list[str]) -> np.ndarray:
    """0/1 matrix of ``;``-joined label names (as the served model writes them) over ``labels``."""
    index = {label: i for i, label in enumerate(labels)}
    out = np.zeros((len(label_lists), len(labels)), dtype=np.int64)
    for row, joined in enumerate(label_lists):
        for name in filter(None, str(joined).split(LABEL_SEPARATOR)):
            out[row, index[name]] = 1
    return out


def plot_label_f1(labels: list[str], splits: dict[str, dict[str, float]], path: Path) -> Path:
    """Per-label F1 on each split as horizontal bars, labels sorted by eval support (most frequent on top)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(labels, key=lambda label: splits["eval"].get(f"support_{label}", 0.0))
    fig, ax = plt.subplots(figsize=(7.0, 0.22 * len(labels) + 1.5))
    height = 0.8 / len(splits)
    for offset, (split, metrics) in enumerate(splits.items()):
        values = [metrics.get(f"f1_{label}", 0.0) for label in order]
        ax.barh(np.arange(len(order)) + offset * height, values, height=height, label=split)
    ax.set_yticks(np.arange(len(order)) + height * (len(splits) - 1) / 2, order, fontsize=7)
    ax.set(xlim=(0, 1), xlabel="F1 at the tuned thresholds", title="Per-label F1")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def label_table(labels: list[str], thresholds: np.ndarray, splits: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """One row per label: its threshold and, per split, support, precision, recall and F1 (blank where undefined)."""
    rows = []
    for label, threshold in zip(labels, thresholds, strict=True):
        row: dict[str, Any] = {"label": label, "threshold": round(float(threshold), 4)}
        for split, metrics in splits.items():
            row[f"{split}_support"] = int(metrics[f"support_{label}"])
            for name in ("precision", "recall", "f1"):
                value = metrics.get(f"{name}_{label}")
                row[f"{split}_{name}"] = "" if value is None else round(value, 4)
        rows.append(row)
    return rows


def comparison_markdown(metrics: dict[str, float], test: dict[str, float] | None) -> str:
    """The model and the baseline side by side on eval (and test); "" without baseline figures."""
    splits = [("eval", metrics)] + ([("test", test)] if test else [])
    splits = [(name, m) for name, m in splits if all(k in m for k in BASELINE_KEYS)]
    if not splits:
        return ""
    header = "| model | " + " | ".join(f"{s} micro-F1 | {s} macro-F1 | {s} subset acc." for s, _ in splits) + " |"
    rule = "|---|" + "---|---|---|" * len(splits)
    rows = [
        f"| {name} | " + " | ".join(" | ".join(f"{m[prefix + k]:.4f}" for k in HEADLINE) for _, m in splits) + " |"
        for name, prefix in (("fine-tuned", ""), (BASELINE_NAME, "baseline_"))
    ]
    return "\n".join([header, rule, *rows]) + "\n\n"


def served_scorer(request: EvalRequest) -> OnnxMultiLabelClassifier:
    """The served scorer of the exported graph (``request.onnx_path``) with the model's own tokenizer, at 0.5 for
    every label; its labels must be the prepared data's, in order."""
    scorer = OnnxMultiLabelClassifier(request.onnx_path, Path(request.model_dir) / "tokenizer.json")
    if scorer.labels != request.labels:
        raise PluginError(
            f"head {request.head!r}: the graph {request.onnx_path} reports labels {scorer.labels}, "
            f"the prepared data has {request.labels}"
        )
    return scorer


class MultiLabelEvaluator:
    """The multi-label report (see the module doc)."""

    headline: ClassVar[tuple[str, ...]] = (*HEADLINE, *BASELINE_KEYS)

    def training_metrics(self, head: str, predictions: Any, label_ids: Any, labels: list[str]) -> dict[str, float]:
        """Micro/macro-F1, subset accuracy, micro precision and recall with per-label thresholds tuned on these
        predictions, the rule the served model applies (at a flat 0.5 an early model predicts no label at all, so
        every checkpoint would tie at 0 and early stopping would keep the first)."""
        _, probs = HEADS.get(head).predict(np.asarray(predictions))
        truth = (np.asarray(label_ids) >= DEFAULT_THRESHOLD).astype(np.int64)
        metrics = multilabel_metrics(truth, decide(probs, tune_thresholds(probs, truth)), labels)
        return {key: metrics[key] for key in TRAINING_KEYS}

    def evaluate(self, request: EvalRequest) -> EvalResult:
        """Tune thresholds on eval, score eval and test with them, add the baseline, write and publish the report."""
        folder, report = Path(request.dataset_dir), Path(request.report_dir)
        labels = request.labels
        present = [s for s in ("eval", "test") if (folder / f"{s}.parquet").is_file()]
        frames = {s: pd.read_parquet(folder / f"{s}.parquet") for s in present}
        scorer = served_scorer(request)
        batch = request.evaluation.batch_size
        probs = {s: scorer.probabilities(f["text"].astype(str).tolist(), batch) for s, f in frames.items()}
        truth = {s: targets(f) for s, f in frames.items()}
        thresholds = tune_thresholds(probs["eval"], truth["eval"])
        splits = {s: multilabel_metrics(truth[s], decide(probs[s], thresholds), labels) for s in frames}
        untuned = multilabel_metrics(truth["eval"], decide(probs["eval"], DEFAULT_THRESHOLD), labels)
        metrics = {**splits["eval"], "untuned_micro_f1": untuned["micro_f1"], "untuned_macro_f1": untuned["macro_f1"]}
        test = splits.get("test")

        try:
            baseline = tfidf_multilabel_baseline(folder, labels, seed=request.seed)
        except ValueError as exc:  # e.g. "empty vocabulary": a baseline never fails the run
            logger.warning("%s skipped: %s", BASELINE_NAME, exc)
            baseline = {}
        if baseline:
            metrics.update({f"baseline_{k}": baseline[k] for k in HEADLINE})
            if test is not None:
                test = {**test, **{f"baseline_{k}": baseline[f"test_{k}"] for k in HEADLINE}}

        report.mkdir(parents=True, exist_ok=True)
        document = thresholds_document(labels, thresholds, "eval", len(frames["eval"]))
        (report / THRESHOLDS_FILE).write_text(json.dumps(document, indent=2), encoding="utf-8")
        if baseline:
            (report / "baseline.json").write_text(json.dumps({"model": BASELINE_NAME, **baseline}, indent=2))
        for split, frame in frames.items():
            where = report if split == "eval" else report / split
            where.mkdir(parents=True, exist_ok=True)
            (where / "metrics.json").write_text(json.dumps({**splits[split], "labels": labels}, indent=2))
            chosen = decide(probs[split], thresholds)
            predicted = [LABEL_SEPARATOR.join(labels[i] for i in np.flatnonzero(row)) for row in chosen]
            frame[["text", "labels", "file", "row"]].assign(predicted=predicted).to_parquet(
                where / "predictions.parquet", index=False
            )
        table = label_table(labels, thresholds, splits)
        write_csv(pd.DataFrame(table), report / "per_label.csv")
        plot = plot_label_f1(labels, splits, report / "label_f1.png")

        result = EvalResult(
            metrics=metrics,
            primary_metric=request.primary_metric,
            report_dir=str(report),
            headline=[k for k in self.headline if k in metrics],
            test_metrics=test,
            plots=[str(plot)],
        )
        publish_report(result, table, request.scenario, len(frames["eval"]))
        logger.info(
            "evaluate: eval micro-F1 %.4f (at 0.5: %.4f), macro-F1 %.4f, subset accuracy %.4f%s",
            metrics["micro_f1"], metrics["untuned_micro_f1"], metrics["macro_f1"], metrics["subset_accuracy"],
            f"; test micro-F1 {test['micro_f1']:.4f}" if test else "",
        )  # fmt: skip
        return result

    def score_graph(self, onnx_path: str, request: EvalRequest) -> float:
        """The graph's probabilities on eval, thresholds tuned on them as ``evaluate`` tunes them, scored."""
        scorer = served_scorer(request.model_copy(update={"onnx_path": onnx_path}))
        frame = pd.read_parquet(Path(request.dataset_dir) / "eval.parquet")
        probs = scorer.probabilities(frame["text"].astype(str).tolist(), request.evaluation.batch_size)
        truth = targets(frame)
        metrics = multilabel_metrics(truth, decide(probs, tune_thresholds(probs, truth)), request.labels)
        return float(metrics[request.primary_metric])

    def score_champion(self, model_uri: str, request: EvalRequest) -> float | None:
        """The champion's pyfunc (its own thresholds) on this eval split; None when its labels differ."""
        import mlflow

        champion = mlflow.pyfunc.load_model(model_uri)
        frame = pd.read_parquet(Path(request.dataset_dir) / "eval.parquet")
        predicted = champion.predict(pd.DataFrame({"text": frame["text"]}))
        champion_labels = [c.removeprefix("prob_") for c in predicted.columns if c.startswith("prob_")]
        if champion_labels != request.labels or "labels" not in predicted.columns:
            logger.info("champion labels %s differ from %s: not comparable", champion_labels, request.labels)
            return None
        metrics = multilabel_metrics(targets(frame), decisions_of(predicted["labels"], request.labels), request.labels)
        return float(metrics[request.primary_metric]) if request.primary_metric in metrics else None


def publish_report(result: EvalResult, table: list[dict[str, Any]], scenario: str, rows: int) -> None:
    """The per-label table and the headline with the baseline comparison as Prefect artifacts."""
    create_table_artifact(
        key=f"{scenario}-metrics",
        description="Per-label threshold (tuned on eval), support, precision, recall and F1 on eval and test",
        table=table,
    )
    m = result.metrics
    create_markdown_artifact(
        key=f"{scenario}-evaluation",
        description="Headline metrics and the baseline",
        markdown=(
            f"### Evaluation on {rows} texts (thresholds tuned per label on eval)\n\n"
            f"micro-F1 **{m['micro_f1']:.4f}** (at 0.5: {m['untuned_micro_f1']:.4f}), macro-F1 "
            f"**{m['macro_f1']:.4f}**, subset accuracy **{m['subset_accuracy']:.4f}**\n\n"
            f"{comparison_markdown(m, result.test_metrics)}"
            f"Plots: {', '.join(f'`{p}`' for p in result.plots)} (also in the MLflow run)."
        ),
    )


def ship_thresholds(context: StageContext) -> StageOutput:
    """The scenario's ``ship-thresholds`` stage: the evaluation's ``thresholds.json`` as served artifact
    ``thresholds`` (the served model's cut per label), with tags on the version."""
    if context.evaluation is None:
        raise ValueError("ship_thresholds runs after the evaluation")
    path = Path(context.evaluation.report_dir) / THRESHOLDS_FILE
    if not path.is_file():
        raise ValueError(f"{path} not found: the head's evaluation wrote no thresholds (is it the multi-label head?)")
    document = json.loads(path.read_text(encoding="utf-8"))
    values = np.array(document["thresholds"], dtype=np.float64)
    tuned = int((values != DEFAULT_THRESHOLD).sum())
    return StageOutput(
        metrics={"thresholds_tuned": float(tuned), "threshold_median": float(np.median(values))},
        tags={"thresholds": THRESHOLDS_FILE, "thresholds.tuned_on": str(document["tuned_on"]),
              "thresholds.labels": str(len(values))},
        served_artifacts={THRESHOLDS_ARTIFACT: str(path)},
    )  # fmt: skip
