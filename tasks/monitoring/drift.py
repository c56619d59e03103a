"""Text drift of a window of incoming texts against the training data recorded on the model version.

A ``DriftReference`` is measured once, when a version is registered (``drift_reference.py``): a
sample of training-text embeddings, the training vocabulary and text lengths, and the model's
label distribution and mean confidence on the held-out eval texts (predictions on its own training
texts would be over-confident). A window of incoming texts is compared with it on five signals:

- ``embedding``: a two-sample test of the window's sentence embeddings against the reference
  sample, maximum mean discrepancy (MMD, Gretton et al. 2012) with a Gaussian kernel whose width is
  the reference's median pairwise distance, p-value by permutation (seeded by the window, so a
  replay gives the same figure). Fires when p < ``alpha``.
- ``prediction``: total-variation distance between the window's predicted-label shares and the
  reference's. Fires above ``max_prediction_shift``.
- ``confidence``: how far the mean top-class probability fell below the reference's.
- ``vocabulary``: how far the share of words outside the training vocabulary rose above the
  share among the eval texts (the rate a new text of the training distribution has).
- ``length``: Kolmogorov-Smirnov statistic of words per text against the training texts.

The rule (``DriftRule``) names which signals count; a window drifts when any of them fires.
"""

from __future__ import annotations

import re
from collections import Counter
from enum import StrEnum

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

WORD = re.compile(r"[^\W\d_]+")
PERMUTATIONS = 1000
REFERENCE_SAMPLE = 500  # reference embeddings in one test (of those recorded), drawn per window


class DriftSignal(StrEnum):
    """A kind of drift the monitor can judge."""

    EMBEDDING = "embedding"
    PREDICTION = "prediction"
    CONFIDENCE = "confidence"
    VOCABULARY = "vocabulary"
    LENGTH = "length"


class DriftRule(BaseModel):
    """When a window counts as drifted: any of ``signals`` past its limit."""

    model_config = ConfigDict(frozen=True)

    signals: list[DriftSignal]
    alpha: float
    max_prediction_shift: float
    max_confidence_drop: float
    max_oov_increase: float
    max_length_ks: float


class DriftReference(BaseModel):
    """What a window is compared with (the embeddings travel next to it, in ``embeddings.npy``)."""

    model_config = ConfigDict(frozen=True)

    label_shares: dict[str, float] = Field(description="The model's label shares on the eval texts.")
    mean_confidence: float = Field(description="Mean top-class probability on the eval texts.")
    oov_rate: float = Field(description="Share of eval-text words outside the training vocabulary.")
    vocabulary: list[str]
    lengths: list[int] = Field(description="Words per training text (of the sample).")
    bandwidth: float = Field(description="Kernel width: median pairwise distance of the reference embeddings.")
    texts: int = Field(description="Training texts the sample was drawn from.")


class WindowDrift(BaseModel):
    """One window's drift figures and the signals that fired."""

    model_config = ConfigDict(frozen=True)

    window: int
    volume: int
    mmd: float
    embedding_p: float
    prediction_shift: float
    confidence_drop: float
    oov_rate: float
    oov_increase: float
    length_ks: float
    fired: list[DriftSignal]


def words(text: str) -> list[str]:
    """Lower-cased alphabetic words of ``text``."""
    return WORD.findall(text.lower())


def oov_rate(texts: list[str], vocabulary: set[str]) -> float:
    """Share of the words of ``texts`` not in ``vocabulary`` (0 when there are none)."""
    tokens = [w for t in texts for w in words(t)]
    return sum(w not in vocabulary for w in tokens) / len(tokens) if tokens else 0.0


def label_shares(labels: list[str]) -> dict[str, float]:
    """Each label's share of ``labels``."""
    counts = Counter(labels)
    return {label: n / len(labels) for label, n in sorted(counts.items())} if labels else {}


def median_distance(embeddings: np.ndarray) -> float:
    """Median Euclidean distance between distinct rows (the Gaussian kernel's width)."""
    squared = pairwise_squared(embeddings, embeddings)
    upper = squared[np.triu_indices(len(embeddings), k=1)]
    return float(np.sqrt(max(np.median(upper), 1e-12))) if len(upper) else 1.0


def pairwise_squared(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances between the rows of ``a`` and ``b``."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    squared = (a64**2).sum(1)[:, None] + (b64**2).sum(1)[None, :] - 2.0 * a64 @ b64.T
    return np.maximum(squared, 0.0)


def mmd_test(reference: np.ndarray, window: np.ndarray, bandwidth: float, seed: int) -> tuple[float, float]:
    """(MMD^2, permutation p-value) of ``window`` against ``reference`` with a Gaussian kernel.

    The biased estimate a'Ka, a = +1/m on reference rows and -1/n on window rows; the p-value is
    (1 + #permutations at least as large) / (1 + PERMUTATIONS), all permutations in one matrix product.
    """
    pooled = np.vstack([reference, window])
    kernel = np.exp(-pairwise_squared(pooled, pooled) / (2.0 * bandwidth**2))
    m, n = len(reference), len(window)
    signs = np.concatenate([np.full(m, 1.0 / m), np.full(n, -1.0 / n)])
    observed = float(signs @ kernel @ signs)
    rng = np.random.default_rng(seed)
    shuffled = np.stack([rng.permutation(signs) for _ in range(PERMUTATIONS)], axis=1)
    null = np.einsum("ip,ip->p", shuffled, kernel @ shuffled)
    return observed, float((1 + np.sum(null >= observed - 1e-12)) / (1 + PERMUTATIONS))


def ks_statistic(a: list[int], b: list[int]) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    if not a or not b:
        return 0.0
    x, y = np.sort(a), np.sort(b)
    grid = np.concatenate([x, y])
    return float(
        np.max(np.abs(np.searchsorted(x, grid, "right") / len(x) - np.searchsorted(y, grid, "right") / len(y)))
    )


def window_drift(
    window: int,
    texts: list[str],
    labels: list[str],
    confidences: list[float],
    embeddings: np.ndarray,
    reference: DriftReference,
    reference_embeddings: np.ndarray,
    rule: DriftRule,
) -> WindowDrift:
    """The five signals of one window (``embeddings``: of a sample of ``texts``) and which of the rule's fired."""
    rng = np.random.default_rng(window)
    pick = rng.choice(len(reference_embeddings), min(REFERENCE_SAMPLE, len(reference_embeddings)), replace=False)
    mmd, p_value = mmd_test(reference_embeddings[pick], embeddings, reference.bandwidth, seed=window)
    shares = label_shares(labels)
    every = set(shares) | set(reference.label_shares)
    shift = 0.5 * sum(abs(shares.get(k, 0.0) - reference.label_shares.get(k, 0.0)) for k in every)
    drop = reference.mean_confidence - float(np.mean(confidences)) if confidences else 0.0
    rate = oov_rate(texts, set(reference.vocabulary))
    length = ks_statistic([len(words(t)) for t in texts], reference.lengths)
    passed = {
        DriftSignal.EMBEDDING: p_value < rule.alpha,
        DriftSignal.PREDICTION: shift > rule.max_prediction_shift,
        DriftSignal.CONFIDENCE: drop > rule.max_confidence_drop,
        DriftSignal.VOCABULARY: rate - reference.oov_rate > rule.max_oov_increase,
        DriftSignal.LENGTH: length > rule.max_length_ks,
    }
    return WindowDrift(
        window=window,
        volume=len(texts),
        mmd=mmd,
        embedding_p=p_value,
        prediction_shift=shift,
        confidence_drop=drop,
        oov_rate=rate,
        oov_increase=rate - reference.oov_rate,
        length_ks=length,
        fired=[s for s in rule.signals if passed[s]],
    )
