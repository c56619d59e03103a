"""A TF-IDF + one-vs-rest logistic-regression baseline for multi-label data, trained and scored on the run's split.

The vectoriser is the single-label baseline's (``tasks.classification.baseline``: word 1-2-grams,
sublinear tf, at most 50,000 features); one L2-regularised binary logistic regression per label
(scikit-learn's ``OneVsRestClassifier``, liblinear, C=10). It is scored exactly as the model is:
per-label thresholds tuned on eval, applied to test, the same metric code. A label with no
positive (or no negative) training text gets a constant probability (its training rate) instead
of a classifier. Seconds on NLU++ banking (about 1,700 training texts, 48 labels).
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from finetune_flows.tasks.classification.multilabel_metrics import decide, multilabel_metrics, tune_thresholds

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

BASELINE_NAME = "TF-IDF + one-vs-rest LR baseline"
METRICS = ("micro_f1", "macro_f1", "subset_accuracy")
"""The baseline's metrics in a report (as ``baseline_micro_f1``...)."""
TARGETS = "multi_hot"


def targets(frame: pd.DataFrame) -> np.ndarray:
    """The (rows, labels) 0/1 matrix of a prepared split's ``multi_hot`` column."""
    values = frame[TARGETS].tolist()
    return np.array([list(v) for v in values], dtype=np.float64).reshape(len(values), -1)


def tfidf_multilabel_baseline(
    dataset_dir: Path, labels: list[str], *, max_features: int = 50_000, c: float = 10.0, seed: int = 42
) -> dict[str, float]:
    """Fit on train; ``micro_f1``, ``macro_f1``, ``subset_accuracy`` on eval at thresholds tuned on eval, the same
    with a ``test_`` prefix on test (when the prepared dataset has one) at those thresholds, and ``fit_seconds``."""
    import pandas as pd
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    train = pd.read_parquet(dataset_dir / "train.parquet", columns=["text", TARGETS])
    y = targets(train)
    started = time.perf_counter()
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, max_features=max_features, min_df=1)
    features = vectorizer.fit_transform(train["text"].astype(str))
    learnable = np.flatnonzero((y.min(axis=0) == 0) & (y.max(axis=0) == 1))  # both classes among training texts
    model = OneVsRestClassifier(LogisticRegression(C=c, solver="liblinear", max_iter=1000, random_state=seed))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        chosen = y[:, learnable].astype(int)
        if len(learnable):  # one column would read as a binary target: give it as a vector then
            model.fit(features, chosen[:, 0] if len(learnable) == 1 else chosen)
    for warning in caught:
        logger.warning("%s: %s", BASELINE_NAME, warning.message)
    fit_seconds = time.perf_counter() - started

    def probabilities(texts: pd.Series) -> np.ndarray:
        probs = np.tile(y.mean(axis=0), (len(texts), 1))  # constant labels: their training rate
        if len(learnable):
            predicted = model.predict_proba(vectorizer.transform(texts.astype(str)))
            probs[:, learnable] = predicted[:, -1:] if len(learnable) == 1 else predicted
        return probs

    results: dict[str, float] = {"fit_seconds": fit_seconds}
    evaluation = pd.read_parquet(dataset_dir / "eval.parquet", columns=["text", TARGETS])
    eval_probs, eval_truth = probabilities(evaluation["text"]), targets(evaluation)
    thresholds = tune_thresholds(eval_probs, eval_truth)
    scored = {"": (eval_probs, eval_truth)}
    if (dataset_dir / "test.parquet").is_file():
        test = pd.read_parquet(dataset_dir / "test.parquet", columns=["text", TARGETS])
        scored["test_"] = (probabilities(test["text"]), targets(test))
    for prefix, (probs, truth) in scored.items():
        metrics = multilabel_metrics(truth, decide(probs, thresholds), labels)
        results.update({f"{prefix}{name}": metrics[name] for name in METRICS})
    logger.info(
        "%s: fitted %d labels on %d rows in %.1f s; eval micro-F1 %.4f, macro-F1 %.4f",
        BASELINE_NAME, len(learnable), len(train), fit_seconds, results["micro_f1"], results["macro_f1"],
    )  # fmt: skip
    return results
