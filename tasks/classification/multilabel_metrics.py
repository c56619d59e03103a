"""Multi-label metrics and per-label thresholds: pure numpy, shared by the evaluation, training and the baseline.

``truth`` and ``predicted`` are (texts, labels) 0/1 arrays. Micro-F1 pools every (text, label)
decision; macro-F1 averages the per-label F1 over the labels that occur in the split's truth or
predictions (a label neither present nor predicted has no defined F1 and is left out, rather than
counted as 0 or 1); subset accuracy is the share of texts whose whole label set is right.

``tune_thresholds`` picks, per label, the probability cut that maximises that label's F1 on the
given (eval) split; a label never positive there keeps ``DEFAULT_THRESHOLD``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DEFAULT_THRESHOLD = 0.5


def label_counts(truth: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-label true positives, false positives and false negatives."""
    truth, predicted = np.asarray(truth).astype(bool), np.asarray(predicted).astype(bool)
    tp = (truth & predicted).sum(axis=0)
    fp = (~truth & predicted).sum(axis=0)
    fn = (truth & ~predicted).sum(axis=0)
    return tp, fp, fn


def f1_score(tp: float, fp: float, fn: float) -> float:
    """2tp / (2tp + fp + fn); 0 when there is nothing to count."""
    denominator = 2 * tp + fp + fn
    return float(2 * tp / denominator) if denominator else 0.0


def multilabel_metrics(truth: np.ndarray, predicted: np.ndarray, labels: list[str]) -> dict[str, float]:
    """``micro_f1``, ``micro_precision``, ``micro_recall``, ``macro_f1``, ``subset_accuracy``, ``hamming_loss``,
    and per label ``support_<label>`` plus, where defined, ``precision_<label>``, ``recall_<label>``,
    ``f1_<label>``."""
    truth, predicted = np.asarray(truth).astype(bool), np.asarray(predicted).astype(bool)
    if truth.shape != predicted.shape or truth.shape[1:] != (len(labels),):
        raise ValueError(f"truth {truth.shape} and predictions {predicted.shape} do not match {len(labels)} labels")
    tp, fp, fn = label_counts(truth, predicted)
    all_tp, all_fp, all_fn = int(tp.sum()), int(fp.sum()), int(fn.sum())
    metrics: dict[str, float] = {
        "micro_f1": f1_score(all_tp, all_fp, all_fn),
        "micro_precision": all_tp / (all_tp + all_fp) if all_tp + all_fp else 0.0,
        "micro_recall": all_tp / (all_tp + all_fn) if all_tp + all_fn else 0.0,
        "subset_accuracy": float((truth == predicted).all(axis=1).mean()) if len(truth) else 0.0,
        "hamming_loss": float((truth != predicted).mean()) if truth.size else 0.0,
    }
    f1s = []
    for i, label in enumerate(labels):
        metrics[f"support_{label}"] = float(tp[i] + fn[i])
        if tp[i] + fp[i] + fn[i] == 0:
            continue  # neither present nor predicted: F1 undefined
        metrics[f"precision_{label}"] = float(tp[i] / (tp[i] + fp[i])) if tp[i] + fp[i] else 0.0
        metrics[f"recall_{label}"] = float(tp[i] / (tp[i] + fn[i])) if tp[i] + fn[i] else 0.0
        metrics[f"f1_{label}"] = f1_score(tp[i], fp[i], fn[i])
        f1s.append(metrics[f"f1_{label}"])
    metrics["macro_f1"] = float(np.mean(f1s)) if f1s else 0.0
    return metrics


def best_threshold(probs: np.ndarray, truth: np.ndarray, default: float = DEFAULT_THRESHOLD) -> float:
    """The cut on one label's probabilities that maximises its F1 (``prob >= cut`` is predicted).

    Candidate cuts lie halfway between consecutive distinct probabilities (texts with equal probability are
    always on the same side), plus the lowest probability itself (every text predicted). Among cuts of equal F1
    the one nearest ``default`` wins. A label without a positive text keeps ``default``."""
    probs = np.asarray(probs, dtype=np.float64)
    truth = np.asarray(truth).astype(bool)
    positives = int(truth.sum())
    if positives == 0:
        return default
    order = np.argsort(-probs, kind="stable")
    ranked, hits = probs[order], np.cumsum(truth[order])
    k = np.arange(1, len(ranked) + 1)  # predict the top k
    cut_here = np.append(ranked[:-1] > ranked[1:], True)  # a cut after position k keeps ties together
    f1 = 2 * hits / (k + positives)
    cuts = np.where(k < len(ranked), (ranked + np.append(ranked[1:], 0.0)) / 2, ranked)
    candidates = np.flatnonzero(cut_here)
    best = f1[candidates].max()
    tied = candidates[np.isclose(f1[candidates], best, rtol=0.0, atol=1e-12)]
    return float(cuts[tied[np.argmin(np.abs(cuts[tied] - default))]])


def tune_thresholds(probs: np.ndarray, truth: np.ndarray, default: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """``best_threshold`` of every label (column) of ``probs`` against ``truth``."""
    probs, truth = np.asarray(probs), np.asarray(truth)
    return np.array([best_threshold(probs[:, j], truth[:, j], default) for j in range(probs.shape[1])])


def decide(probs: np.ndarray, thresholds: np.ndarray | float) -> np.ndarray:
    """0/1 predictions: a label is predicted where its probability reaches its threshold."""
    return (np.asarray(probs) >= np.asarray(thresholds)).astype(np.int64)


def thresholds_document(labels: list[str], thresholds: np.ndarray, split: str, rows: int) -> dict[str, Any]:
    """The content of ``thresholds.json``, which the served model reads (``labels``, ``thresholds``)."""
    return {
        "labels": list(labels),
        "thresholds": [float(t) for t in thresholds],
        "default": DEFAULT_THRESHOLD,
        "tuned_on": split,
        "rows": rows,
        "rule": "a label is predicted when its sigmoid probability >= its threshold",
    }
