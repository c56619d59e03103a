"""A gated faiss index over unit item vectors: built, tuned on recall@10 against exact search, kept on disk.

Below ``ann_min_items`` items the search is exact (``neighbours.py``). Above, a faiss index (HNSW by
default, or IVF-Flat) is built and gated on recall@10 against exact search, measured on held-out
catalogue items (up to ``recall_queries``, at most a tenth of the catalogue: the index is built
without them, gated, then they are added) and on a sample of the real queries when the caller passes
them (user profiles may sit where items are sparse, and fare worse than items). efSearch (nprobe) is
raised step by step within a budget until the worse of the two recalls reaches ``min_recall``; an
index that never does is not used: the search falls back to exact and the report says so.

The index, its item order and its report are kept in a folder named after the vectors' digest and
the options, so a rerun over the same catalogue with the same model reuses them (and the gate
measured when it was built).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from finetune_flows.plugins.errors import ConfigError
from finetune_flows.tasks.ranking.neighbours import Neighbours, exact_search

logger = logging.getLogger(__name__)

RECALL_AT = 10
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.npy"
REPORT_FILE = "report.json"
ADD_CHUNK = 65_536


class SearchOptions(BaseModel):
    """When to use an ANN index, which one, and the recall it must reach."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ann_min_items: int = Field(default=50_000, ge=1, description="Catalogues this large or larger use an ANN index.")
    min_recall: float = Field(default=0.95, gt=0.0, le=1.0, description="Recall@10 vs exact the index must reach.")
    index: Literal["hnsw", "ivf"] = Field(default="hnsw", description="faiss index: HNSW graph or IVF-Flat lists.")
    hnsw_m: int = Field(default=32, ge=4, le=128, description="HNSW links per node.")
    ef_construction: int = Field(default=64, ge=8, le=1024, description="HNSW candidate list while building.")
    max_ef_search: int = Field(default=512, ge=1, le=4096, description="Largest efSearch tried to reach min_recall.")
    ivf_lists: int | None = Field(
        default=None, ge=1, description="IVF lists; empty: 4 x sqrt(items), at most items / 39."
    )
    max_nprobe: int = Field(default=256, ge=1, description="Most IVF lists probed to reach min_recall.")
    recall_queries: int = Field(
        default=1000, ge=10, le=100_000, description="Held-out items (and real queries) gated on."
    )
    seed: int = Field(default=0, description="Seed of the gate's query sample and of IVF training.")


class SearchReport(BaseModel):
    """What answers the queries (``kind``) and how well the index did at build time."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["exact", "hnsw", "ivf"]
    items: int
    dim: int
    build_seconds: float
    recall_at_10: float | None = Field(description="Gated recall@10 vs exact (the worse of the two below).")
    item_recall_at_10: float | None = Field(default=None, description="On held-out catalogue items as queries.")
    query_recall_at_10: float | None = Field(default=None, description="On a sample of the real queries, if given.")
    min_recall: float
    queries: int = Field(description="Held-out items used as gate queries.")
    real_queries: int = Field(default=0, description="Real queries (e.g. user profiles) used as gate queries.")
    params: dict[str, int]
    reused: bool = False
    note: str


def recall_at_10(neighbours: Neighbours, queries: np.ndarray, truth: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean share of each query's exact top-10 that the index also returns."""
    found = neighbours.ann_search(queries, RECALL_AT, [[]] * len(queries), 1.0)
    hits = [
        len(np.intersect1d(got, want)) / max(len(want), 1) for (got, _), (want, _) in zip(found, truth, strict=True)
    ]
    return float(np.mean(hits))


def build_index(vectors: np.ndarray, rows: np.ndarray, options: SearchOptions) -> tuple[Any, dict[str, int]]:
    """An untuned faiss index (inner product) over ``vectors[rows]``, in that order, and its build parameters."""
    import faiss

    dim = vectors.shape[1]
    index: Any
    if options.index == "hnsw":
        index = faiss.IndexHNSWFlat(dim, options.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = options.ef_construction
        params = {"M": options.hnsw_m, "efConstruction": options.ef_construction}
    else:
        default = min(int(4 * np.sqrt(len(vectors))), len(rows) // 39)  # faiss wants >= 39 training points a list
        lists = max(1, min(options.ivf_lists or default, len(rows)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = options.seed
        sample = np.random.default_rng(options.seed).choice(rows, size=min(len(rows), 64 * lists), replace=False)
        index.train(vectors[np.sort(sample)])
        params = {"nlist": lists}
    for start in range(0, len(rows), ADD_CHUNK):  # chunks: no second copy of a large catalogue
        index.add(vectors[rows[start : start + ADD_CHUNK]])
    return index, params


def ladder(limit: int, start: int) -> list[int]:
    """start, 2 x start, ... up to and including ``limit``."""
    steps = [min(start, limit)]
    while steps[-1] < limit:
        steps.append(min(limit, 2 * steps[-1]))
    return steps


def tune(
    index: Any, neighbours: Neighbours, options: SearchOptions, probes: np.ndarray, queries: np.ndarray | None
) -> tuple[list[float], dict[str, int]]:
    """Raise efSearch / nprobe until recall@10 on the held-out ``probes`` (and on ``queries``, when given)
    reaches ``min_recall`` or the budget ends: ([item recall, query recall], setting)."""
    gates = [neighbours.vectors[probes]] + ([queries] if queries is not None and len(queries) else [])
    truths = [exact_search(neighbours.vectors, q, RECALL_AT, [probes] * len(q)) for q in gates]  # probes: not in yet
    name, steps = (
        ("efSearch", ladder(options.max_ef_search, 16))
        if options.index == "hnsw"
        else ("nprobe", ladder(min(options.max_nprobe, index.nlist), 1))
    )
    recalls = [0.0] * len(gates)
    for value in steps:
        if options.index == "hnsw":
            index.hnsw.efSearch = value
        else:
            index.nprobe = value
        recalls = [recall_at_10(neighbours, q, truth) for q, truth in zip(gates, truths, strict=True)]
        logger.info("%s: %s %d -> recall@10 %s", options.index, name, value, [round(r, 4) for r in recalls])
        if min(recalls) >= options.min_recall:
            break
    return recalls, {name: value}


def index_folder(root: Path, vectors: np.ndarray, options: SearchOptions) -> Path:
    """``root/index-<kind>-<vectors digest>-<options digest>``."""
    data = hashlib.sha256(np.ascontiguousarray(vectors, dtype=np.float32).data).hexdigest()[:16]
    settings = hashlib.sha256(options.model_dump_json(exclude={"ann_min_items"}).encode()).hexdigest()[:8]
    return root / f"index-{options.index}-{data}-{settings}"


def load_neighbours(folder: Path, vectors: np.ndarray) -> tuple[Neighbours, SearchReport] | None:
    """A persisted index and its report, or None when ``folder`` holds no complete one."""
    if not (folder / REPORT_FILE).is_file():
        return None
    import faiss

    report = SearchReport.model_validate_json((folder / REPORT_FILE).read_text()).model_copy(update={"reused": True})
    if report.kind == "exact":
        return Neighbours(vectors), report
    index: Any = faiss.read_index(str(folder / INDEX_FILE))
    if report.kind == "hnsw":
        index.hnsw.efSearch = report.params["efSearch"]
    else:
        index.nprobe = report.params["nprobe"]
    logger.info("search: reusing %s index from %s (recall@10 %s)", report.kind, folder, report.recall_at_10)
    return Neighbours(vectors, index, np.load(folder / IDS_FILE)), report


def save_neighbours(folder: Path, neighbours: Neighbours, report: SearchReport) -> None:
    """Index and ids first, then the report (its presence marks the folder complete), each moved into place."""
    import faiss

    folder.mkdir(parents=True, exist_ok=True)
    if neighbours.index is not None and neighbours.ids is not None:
        partial = folder / f".{INDEX_FILE}.{os.getpid()}.partial"
        faiss.write_index(neighbours.index, str(partial))
        os.replace(partial, folder / INDEX_FILE)
        with (folder / f".{IDS_FILE}.{os.getpid()}.partial").open("wb") as fh:
            np.save(fh, neighbours.ids)
        os.replace(folder / f".{IDS_FILE}.{os.getpid()}.partial", folder / IDS_FILE)
    partial = folder / f".{REPORT_FILE}.{os.getpid()}.partial"
    partial.write_text(json.dumps(report.model_dump(), indent=2))
    os.replace(partial, folder / REPORT_FILE)


def gate_draw(items: int, queries: int, options: SearchOptions) -> tuple[np.ndarray, np.ndarray]:
    """(held-out probe items, rows of the real queries) that the gate of an index over ``items`` items uses,
    drawn from ``options.seed``: a caller that embeds its queries elsewhere (recommend on Dask) embeds only
    those rows and passes them in order, and the gate draws them all again."""
    rng = np.random.default_rng(options.seed)
    probes = np.sort(rng.choice(items, size=max(1, min(options.recall_queries, items // 10)), replace=False))
    if not queries:
        return probes, np.zeros(0, dtype=np.int64)
    return probes, np.sort(rng.choice(queries, size=min(queries, options.recall_queries), replace=False))


def open_neighbours(vectors: np.ndarray, kind: str, folder: Path | None) -> Neighbours:
    """The search ``build_neighbours`` chose for ``vectors`` (its report's ``kind``), without building or gating
    again: exact, or the index it saved in ``folder`` (``index_folder``); a ``ConfigError`` when that is gone."""
    if kind == "exact":
        return Neighbours(vectors)
    loaded = load_neighbours(folder, vectors) if folder is not None else None
    if loaded is None or loaded[0].index is None:
        raise ConfigError(
            f"no saved {kind} index in {folder}; it is built (and saved) by build_neighbours with a cache folder "
            "that this process can read"
        )
    return loaded[0]


def build_neighbours(
    vectors: np.ndarray, options: SearchOptions, cache: Path | None = None, queries: np.ndarray | None = None
) -> tuple[Neighbours, SearchReport]:
    """The search for ``vectors``: exact below ``ann_min_items``, else a gated faiss index (reused from
    ``cache`` when built before for the same vectors and options). ``queries``: real query vectors (user
    profiles); up to ``recall_queries`` of them are gated on too, as they may sit where items are sparse."""
    n, dim = vectors.shape
    if n < options.ann_min_items:
        note = f"{n} items < ann_min_items {options.ann_min_items}: exact search"
        report = SearchReport(
            kind="exact", items=n, dim=dim, build_seconds=0.0, recall_at_10=None,
            min_recall=options.min_recall, queries=0, params={}, note=note,
        )  # fmt: skip
        return Neighbours(vectors), report
    folder = index_folder(cache, vectors, options) if cache is not None else None
    if folder is not None and (reused := load_neighbours(folder, vectors)) is not None:
        return reused
    started = time.perf_counter()
    # Held-out probes: the index is built without them, gated on them as queries, then they are added.
    probes, rows = gate_draw(n, 0 if queries is None else len(queries), options)
    order = np.concatenate([np.setdiff1d(np.arange(n), probes), probes])
    neighbours = Neighbours(vectors, ids=order)
    neighbours.index, params = build_index(neighbours.vectors, order[: n - len(probes)], options)
    sample = queries[rows] if queries is not None and len(queries) else None
    recalls, setting = tune(neighbours.index, neighbours, options, probes, sample)
    recall = min(recalls)
    neighbours.index.add(neighbours.vectors[probes])
    passed = recall >= options.min_recall
    ((name, value),) = setting.items()
    note = (
        f"{options.index} recall@10 {recall:.4f} >= {options.min_recall} at {name} {value}"
        if passed
        else f"{options.index} recall@10 {recall:.4f} < {options.min_recall} at {name} {value} (the budget's end): "
        "the index is not used, exact search instead"
    )
    report = SearchReport(
        kind=options.index if passed else "exact", items=n, dim=dim, build_seconds=time.perf_counter() - started,
        recall_at_10=recall, item_recall_at_10=recalls[0], query_recall_at_10=recalls[1] if len(recalls) > 1 else None,
        min_recall=options.min_recall, queries=len(probes), real_queries=0 if sample is None else len(sample),
        params={**params, **setting}, note=note,
    )  # fmt: skip
    (logger.info if passed else logger.warning)("search: %s (built in %.1f s)", note, report.build_seconds)
    if not passed:
        neighbours.index = neighbours.ids = None
    if folder is not None:
        save_neighbours(folder, neighbours, report)
    return neighbours, report
