"""Which texts people should label: the ones the model is least sure of, spread over the pool.

Uncertainty is the entropy of the model's class probabilities after temperature scaling (Guo et
al. 2017): one temperature, fitted on labelled eval texts by minimising their negative
log-likelihood, so that "sure" means what it says (without eval labels the temperature is 1).
The ``n`` texts are then diversified: the ``POOL_FACTOR * n`` most uncertain are clustered into
``n`` groups by k-means on their sentence embeddings and the most uncertain text of each group is
taken, so one batch is not ten near-copies of the same confusing headline.
"""

from __future__ import annotations

import itertools

import numpy as np

POOL_FACTOR = 5
TEMPERATURES = np.exp(np.linspace(np.log(0.05), np.log(20.0), 400))


def log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """Natural logs of ``probabilities`` (rows), floored so that a hard 0 stays finite."""
    return np.log(np.clip(probabilities, 1e-12, 1.0))


def scaled(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): the probabilities a temperature-scaled model would give (same argmax)."""
    logits = log_probabilities(probabilities) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return np.asarray(exp / exp.sum(axis=1, keepdims=True))


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises the negative log-likelihood of ``labels`` (class indices), by grid search."""
    if len(labels) == 0:
        return 1.0
    rows = np.arange(len(labels))
    losses = [-np.log(np.clip(scaled(probabilities, t)[rows, labels], 1e-12, 1.0)).mean() for t in TEMPERATURES]
    return float(TEMPERATURES[int(np.argmin(losses))])


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by their share of texts."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    error = 0.0
    for low, high in itertools.pairwise(edges):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            error += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(error)


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Entropy of each row, in nats."""
    return np.asarray(-(probabilities * log_probabilities(probabilities)).sum(axis=1))


def diversified(uncertainty: np.ndarray, vectors: np.ndarray, n: int, seed: int = 0) -> list[int]:
    """``n`` indices: the most uncertain text of each of ``n`` k-means clusters of the most uncertain texts.

    Ordered most uncertain first. With no more than ``n`` texts, all of them.
    """
    order = np.argsort(-uncertainty, kind="stable")
    if len(order) <= n:
        return order.tolist()
    top = order[: min(len(order), POOL_FACTOR * n)]
    from sklearn.cluster import KMeans

    clusters = KMeans(n_clusters=n, n_init=3, random_state=seed).fit_predict(vectors[top])
    picked = [int(top[clusters == c][0]) for c in range(n) if (clusters == c).any()]  # top is sorted: [0] is max
    chosen = set(picked)
    rest = [int(i) for i in top if int(i) not in chosen]
    picked += rest[: n - len(picked)]  # k-means may leave a cluster empty
    return sorted(picked, key=lambda i: (-uncertainty[i], i))


def random_pick(count: int, n: int, seed: int = 0) -> list[int]:
    """``n`` indices of ``count`` drawn uniformly (the baseline the active-learning benchmark compares with)."""
    return sorted(np.random.default_rng(seed).choice(count, min(n, count), replace=False).tolist())
