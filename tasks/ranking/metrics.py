"""Ranking metrics for one target among sampled candidates: HR@k, NDCG@k and MRR.

Scores come as a (users, candidates) matrix with the target in column 0. Ties are broken by a
seeded random order, so a scorer that gives every candidate the same score gets chance-level
results, not a perfect or a zero one.
"""

from __future__ import annotations

import numpy as np

K = 10


def target_ranks(scores: np.ndarray, seed: int = 0) -> np.ndarray:
    """0-based rank of column 0 in each row, highest score first, ties in a seeded random order."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] < 1:
        raise ValueError(f"scores must be (users, candidates), got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    tie_break = np.random.default_rng(seed).random(scores.shape)
    target = scores[:, :1]
    ahead = (scores > target) | ((scores == target) & (tie_break < tie_break[:, :1]))
    return ahead[:, 1:].sum(axis=1)


def ranking_metrics(ranks: np.ndarray, k: int = K) -> dict[str, float]:
    """Mean HR@k, NDCG@k and MRR over the users whose target ranks are given (0-based)."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("no ranks to average")
    hit = ranks < k
    return {
        f"hr_at_{k}": float(hit.mean()),
        f"ndcg_at_{k}": float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean()),
        "mrr": float((1.0 / (ranks + 1.0)).mean()),
    }


def score_metrics(scores: np.ndarray, k: int = K, seed: int = 0) -> dict[str, float]:
    """``ranking_metrics`` of a score matrix with the target in column 0."""
    return ranking_metrics(target_ranks(scores, seed), k)
