"""A TF-IDF + logistic-regression baseline, trained and scored on the run's own split.

Every classification report sets the fine-tuned model next to this cheap bag-of-words model: it
is fitted on the prepared ``train.parquet`` and scored on ``eval.parquet`` (and ``test.parquet``
when there is one) with the same metric code as the model, so the two rows compare like with
like. Word 1-2-grams, sublinear tf, at most 50,000 features, L2-regularised multinomial logistic
regression (C=10, saga): about 1 s to fit on Banking77's 9,000 training rows and 77 classes on 2 CPU cores.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import numpy as np

from finetune_flows.tasks.classification.evaluation import classification_metrics

logger = logging.getLogger(__name__)

BASELINE_NAME = "TF-IDF + LR baseline"
METRICS = ("accuracy", "macro_f1")
"""The baseline's metrics in a report (as ``baseline_accuracy``, ``baseline_macro_f1``)."""


def tfidf_baseline(
    dataset_dir: Path,
    labels: list[str],
    *,
    max_features: int = 50_000,
    c: float = 10.0,
    max_train_rows: int = 200_000,
    seed: int = 42,
) -> dict[str, float]:
    """Fit TF-IDF + logistic regression on the train split; its ``accuracy`` and ``macro_f1`` on eval, and
    ``test_accuracy``, ``test_macro_f1`` when the prepared dataset has a test split, plus ``fit_seconds``.

    ``labels`` are the class names in id order (``label_id`` indexes them). At most ``max_train_rows`` training
    rows are used (a seeded sample), which bounds the cost on large data."""
    import pandas as pd
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    train = pd.read_parquet(dataset_dir / "train.parquet", columns=["text", "label_id"])
    if len(train) > max_train_rows:
        train = train.sample(n=max_train_rows, random_state=seed)
    started = time.perf_counter()
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, max_features=max_features, min_df=1)
    features = vectorizer.fit_transform(train["text"].astype(str))
    # saga: about 10x faster than lbfgs with dozens of classes on sparse TF-IDF (1 s vs 13 s on Banking77), same
    # accuracy. Not converging within max_iter is logged, not raised: a baseline never fails the run.
    model = LogisticRegression(C=c, solver="saga", tol=1e-3, max_iter=1000, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(features, train["label_id"].to_numpy())
    for warning in caught:
        logger.warning("%s: %s", BASELINE_NAME, warning.message)
    fit_seconds = time.perf_counter() - started

    results: dict[str, float] = {"fit_seconds": fit_seconds}
    for split, prefix in (("eval", ""), ("test", "test_")):
        path = dataset_dir / f"{split}.parquet"
        if not path.is_file():
            continue
        frame = pd.read_parquet(path, columns=["text", "label_id"])
        probs = np.zeros((len(frame), len(labels)))
        probs[:, model.classes_] = model.predict_proba(vectorizer.transform(frame["text"].astype(str)))
        metrics = classification_metrics(frame["label_id"].to_numpy(), probs.argmax(axis=1), probs, labels)
        results.update({f"{prefix}{name}": float(metrics[name]) for name in METRICS})
    logger.info(
        "%s: fitted on %d rows in %.1f s; eval accuracy %.4f, macro-F1 %.4f",
        BASELINE_NAME,
        len(train),
        fit_seconds,
        results["accuracy"],
        results["macro_f1"],
    )
    return results
