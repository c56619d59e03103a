"""Top-k search over unit item vectors: an exact matrix product, or a faiss index searched past exclusions.

Vectors are L2-normalised, so inner product is cosine. Without an index the search is the exact
matrix product recommend has always used (same batches, same tie order). With one (built and gated
by ``ann_index.py``), items a query must not return (what the user rated) are searched past: k +
|excluded| neighbours are fetched (rounded up to a power of two, searched deeper than the gated
depth when that is over 16) and dropped; a query needing more than ``DEEPEST_FETCH``, or left short,
is answered exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

GATE_FETCH = 16  # what a top-10 query fetches (the next power of two), as the gate measures it
DEEPEST_FETCH = 2048  # a query needing more neighbours than this (k + its exclusions) is answered exactly
Excluded = Sequence[Sequence[int] | np.ndarray]  # item rows each query must not return


class Neighbours:
    """Top-k by inner product over fixed item vectors, exact or through a faiss index."""

    def __init__(self, vectors: np.ndarray, index: Any = None, ids: np.ndarray | None = None) -> None:
        """``ids``: the item row of each index entry (entries were added in that order); None: the same rows."""
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.index = index
        self.ids = ids

    def search(
        self, queries: np.ndarray, k: int, exclude: Excluded, scale: float = 1.0, batch: int = 256
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """(item rows, ``scale`` x scores), best first, of the k best items per query outside its ``exclude``."""
        if self.index is None:
            return exact_search(self.vectors, queries, k, exclude, scale, batch)
        return self.ann_search(queries, k, exclude, scale)

    def ann_search(
        self, queries: np.ndarray, k: int, exclude: Excluded, scale: float
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Fetch k + |excluded| neighbours (rounded up to a power of two) at a search depth of at least twice
        that, drop the excluded ones; a query that needs more than ``DEEPEST_FETCH``, or comes back short,
        is answered exactly."""
        n = len(self.vectors)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        banned = [np.unique(np.asarray(e, dtype=np.int64)) for e in exclude]
        wanted = [min(k, n - len(b)) for b in banned]
        fetch = np.array([min(n, 1 << int(np.ceil(np.log2(max(k + len(b), 1))))) for b in banned])
        out: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0, np.int64), np.zeros(0, np.float32))] * len(queries)
        exact: list[int] = [int(row) for row in np.flatnonzero(fetch > DEEPEST_FETCH)]
        for size in np.unique(fetch[fetch <= DEEPEST_FETCH]):
            rows = np.flatnonzero(fetch == size)
            scores, ids = self.index.search(queries[rows], int(size), params=self.depth(int(size)))
            if self.ids is not None:
                ids = np.where(ids >= 0, self.ids[ids], -1)
            for row, found, score in zip(rows, ids, scores, strict=True):
                keep = (found >= 0) & ~np.isin(found, banned[row])
                if keep.sum() < wanted[row]:  # the index returned too few: exact for this query
                    exact.append(int(row))
                out[row] = (found[keep][: wanted[row]], score[keep][: wanted[row]] * np.float32(scale))
        if exact:
            answers = exact_search(self.vectors, queries[exact], k, [banned[r] for r in exact], scale)
            for at, answer in zip(exact, answers, strict=True):
                out[at] = answer
        return out

    def depth(self, fetch: int) -> Any:
        """faiss search parameters for ``fetch`` results: the gated depth for up to 16 (the gate's top-10
        fetch), deeper for longer lists (efSearch at least 2 x fetch; nprobe up to 4 x the gated one)."""
        import faiss

        params: Any
        deeper = fetch > GATE_FETCH
        if hasattr(self.index, "hnsw"):
            params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
            params.efSearch = max(self.index.hnsw.efSearch, 2 * fetch if deeper else 0)
        else:
            params = faiss.SearchParametersIVF()
            factor = min(4, fetch // GATE_FETCH) if deeper else 1
            params.nprobe = min(self.index.nlist, self.index.nprobe * max(1, factor))
        return params


def exact_search(
    vectors: np.ndarray,
    queries: np.ndarray,
    k: int,
    exclude: Excluded,
    scale: float = 1.0,
    batch: int = 256,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The brute-force top-k: one matrix product per ``batch`` queries, excluded items set to -inf."""
    batch = max(1, min(batch, (1 << 26) // max(len(vectors), 1)))  # at most 256 MiB of scores at a time
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for start in range(0, len(queries), batch):
        scores = scale * queries[start : start + batch] @ vectors.T
        for offset, row in enumerate(scores):
            row[np.asarray(exclude[start + offset], dtype=np.int64)] = -np.inf
            n = min(k, int(np.isfinite(row).sum()))
            best = np.argpartition(-row, n - 1)[:n] if n else np.array([], dtype=int)
            best = best[np.argsort(-row[best], kind="stable")]
            out.append((best, row[best]))
    return out
