"""Collaborative-filtering baselines scored on the exact candidates the model ranks.

``popularity`` (training interactions per item), ``item_knn`` (cosine of item co-occurrence
among training positives, summed over the user's history) and ``bpr_mf`` (matrix factorisation
trained with the BPR loss, a small torch implementation). Each returns a (users, candidates)
score matrix, target in column 0, like the model's.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)


class MfOptions(BaseModel):
    """BPR matrix factorisation."""

    model_config = ConfigDict(frozen=True)

    factors: int = Field(default=32, ge=2, le=1024)
    epochs: int = Field(default=40, ge=1, le=1000)
    learning_rate: float = Field(default=0.01, gt=0.0)
    l2: float = Field(default=1e-3, ge=0.0)
    batch_size: int = Field(default=1024, ge=1)
    seed: int = 42


class Catalogue:
    """Dense indices for users and items."""

    def __init__(self, users: list[str], items: list[str]) -> None:
        self.users = {u: i for i, u in enumerate(users)}
        self.items = {x: i for i, x in enumerate(items)}

    def item_ids(self, items: list[str]) -> np.ndarray:
        return np.array([self.items[x] for x in items], dtype=np.int64)


def _candidate_matrix(catalogue: Catalogue, candidates: pd.Series) -> np.ndarray:
    return np.stack([catalogue.item_ids(list(c)) for c in candidates])


def popularity_scores(train: pd.DataFrame, catalogue: Catalogue, candidates: pd.Series) -> np.ndarray:
    """Number of training interactions of each candidate."""
    counts = np.zeros(len(catalogue.items))
    np.add.at(counts, catalogue.item_ids(list(train["item"])), 1.0)
    return counts[_candidate_matrix(catalogue, candidates)]


def positives_matrix(positives: pd.DataFrame, catalogue: Catalogue) -> np.ndarray:
    """Binary users x items matrix of ``positives`` (user, item)."""
    matrix = np.zeros((len(catalogue.users), len(catalogue.items)), dtype=np.float32)
    rows = np.array([catalogue.users[u] for u in positives["user"]], dtype=np.int64)
    matrix[rows, catalogue.item_ids(list(positives["item"]))] = 1.0
    return matrix


def item_knn_scores(
    train_positives: pd.DataFrame, history: pd.DataFrame, catalogue: Catalogue, users: pd.Series, candidates: pd.Series
) -> np.ndarray:
    """Sum over the user's history items of cosine(candidate, item), co-occurrence in ``train_positives``."""
    x = positives_matrix(train_positives, catalogue)
    inv_norm = 1.0 / np.sqrt(np.maximum(x.sum(axis=0), 1.0))
    h = positives_matrix(history, catalogue)[[catalogue.users[u] for u in users]] * inv_norm
    scores = ((h @ x.T) @ x) * inv_norm  # (users, items): h D^-1/2 X^T X D^-1/2
    return np.take_along_axis(scores, _candidate_matrix(catalogue, candidates), axis=1)


def train_bpr(train_positives: pd.DataFrame, catalogue: Catalogue, options: MfOptions) -> tuple[np.ndarray, np.ndarray]:
    """User and item factors (numpy) trained with BPR on uniformly sampled negatives."""
    import torch

    generator = torch.Generator().manual_seed(options.seed)
    users = torch.tensor([catalogue.users[u] for u in train_positives["user"]])
    items = torch.from_numpy(catalogue.item_ids(list(train_positives["item"])))
    user_f = torch.nn.Embedding(len(catalogue.users), options.factors)
    item_f = torch.nn.Embedding(len(catalogue.items), options.factors)
    item_b = torch.nn.Embedding(len(catalogue.items), 1)
    for table in (user_f, item_f):
        torch.nn.init.normal_(table.weight, std=0.1, generator=generator)
    torch.nn.init.zeros_(item_b.weight)
    params = [*user_f.parameters(), *item_f.parameters(), *item_b.parameters()]
    optimiser = torch.optim.Adam(params, lr=options.learning_rate)
    for epoch in range(options.epochs):
        order = torch.randperm(len(users), generator=generator)
        total = 0.0
        for start in range(0, len(order), options.batch_size):
            batch = order[start : start + options.batch_size]
            u, i = users[batch], items[batch]
            j = torch.randint(0, len(catalogue.items), (len(batch),), generator=generator)
            pu, qi, qj = user_f(u), item_f(i), item_f(j)
            diff = (pu * (qi - qj)).sum(-1) + (item_b(i) - item_b(j)).squeeze(-1)
            reg = options.l2 * (pu.pow(2).sum() + qi.pow(2).sum() + qj.pow(2).sum()) / len(batch)
            loss = -torch.nn.functional.logsigmoid(diff).mean() + reg
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(batch)
        if epoch == options.epochs - 1:
            logger.info("bpr: epoch %d loss %.4f", epoch + 1, total / len(users))
    with torch.no_grad():
        item_vectors = torch.cat([item_f.weight, item_b.weight], dim=1).numpy()
        user_vectors = torch.cat([user_f.weight, torch.ones(len(catalogue.users), 1)], dim=1).numpy()
    return user_vectors, item_vectors


def mf_scores(
    factors: tuple[np.ndarray, np.ndarray], catalogue: Catalogue, users: pd.Series, candidates: pd.Series
) -> np.ndarray:
    """Dot products of user and candidate factors (the item bias included)."""
    user_vectors, item_vectors = factors
    u = user_vectors[[catalogue.users[x] for x in users]]
    return np.einsum("uf,ucf->uc", u, item_vectors[_candidate_matrix(catalogue, candidates)])


def standardise_rows(scores: np.ndarray) -> np.ndarray:
    """Each row to mean 0 and standard deviation 1 (a constant row becomes zeros)."""
    std = scores.std(axis=1, keepdims=True)
    return (scores - scores.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1.0)


def blend(model: np.ndarray, mf: np.ndarray, weight: float) -> np.ndarray:
    """``weight`` x standardised model score + (1 - weight) x standardised MF score."""
    return weight * standardise_rows(model) + (1.0 - weight) * standardise_rows(mf)
