"""Recommend on a Dask cluster: the users in partitions, one part file each, resumable (``engine=dask``).

The flow process reads the interactions, embeds the catalogue once (through the item-vector cache)
and builds the search once (exact, or the recall-gated index, saved in the cache folder as in one
process; only the profiles the gate samples are embedded here). It then writes a work folder,
``<state>/recommendations/parts/<name>-v<version>-<request digest>``: ``users.parquet`` (user,
profile, rated candidates; one row group per partition), ``items.parquet`` (the candidates) and
``vectors.npy`` (their vectors, memory-mapped by the workers). The digest covers the model version,
k, the search options, the users, their profiles and rated items and the candidates, so the same
request over the same data finds the same folder. Partitions of ``partition_rows`` users, with ids
from their user ids and range, run through ``tasks.batch.runner.run_partitions`` (part files written
whole or not at all, a manifest, complete parts skipped): a killed run resumes where it stopped.

A worker process loads the encoder, the candidates, their vectors and the search once per work
folder; each partition embeds its users' profiles, searches and writes ``part-<id>.parquet`` with
the columns of the single-process output. The output file is assembled from the parts in user
order: the same rows, ranks and items as ``recommend_for`` (scores within float rounding; with
``partition_rows`` a multiple of 256 the profile batches are the same as there too). The vectors'
copy is removed when the run completes; the parts stay, so a rerun skips them all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from finetune_flows.tasks.batch.partitions import Partition, read_partition
from finetune_flows.tasks.batch.runner import PartResult, part_path, read_output, run_partitions, write_part
from finetune_flows.tasks.core.secrets import guard
from finetune_flows.tasks.core.settings import get_settings
from finetune_flows.tasks.ranking.ann_index import build_neighbours, gate_draw, index_folder, open_neighbours
from finetune_flows.tasks.ranking.item_vectors import embeddings_folder, item_vectors, model_key
from finetune_flows.tasks.ranking.neighbours import Neighbours
from finetune_flows.tasks.ranking.recommending import (
    Audience,
    RecommendConfig,
    RecommendResult,
    audience_of,
    embed_profiles,
    finish,
    labelled,
    top_k,
)
from finetune_flows.tasks.serving.encoder import SentenceEncoder
from finetune_flows.tasks.serving.pair_scorer import encoder_of

logger = logging.getLogger(__name__)

USERS_FILE = "users.parquet"
ITEMS_FILE = "items.parquet"
VECTORS_FILE = "vectors.npy"
_LOADED: dict[tuple[str, str, int], tuple[SentenceEncoder, pd.DataFrame, Neighbours]] = {}
_LOCK = threading.Lock()


class SharedInputs(BaseModel):
    """What every partition of one request reads besides its users."""

    model_config = ConfigDict(frozen=True)

    work: str
    model_dir: str
    k: int
    search: str  # the SearchReport's kind: exact, hnsw or ivf
    index_folder: str | None


def request_digest(model_uri: str, config: RecommendConfig, audience: Audience, rated: list[list[str]]) -> str:
    """16 hex digits over everything the lists depend on (not where they run or go)."""
    digest = hashlib.sha256()
    head = {"model": model_uri, "k": config.k, "search": config.search_options().model_dump(mode="json")}
    digest.update(json.dumps(head, sort_keys=True).encode())
    digest.update(json.dumps([audience.users, audience.profiles, rated]).encode())
    digest.update(pd.util.hash_pandas_object(audience.candidates[["item", "text"]], index=False).to_numpy().tobytes())
    return digest.hexdigest()[:16]


def user_partitions(users_file: Path, users: list[str], rows: int) -> list[Partition]:
    """Partitions of at most ``rows`` users of ``users_file``; an id is its users' digest and row range."""
    parts = []
    for start in range(0, len(users), rows):
        stop = min(start + rows, len(users))
        digest = hashlib.sha256(json.dumps(users[start:stop]).encode()).hexdigest()[:16]
        parts.append(
            Partition(
                id=f"{digest}-{start}-{stop}", file=str(users_file), format="parquet", text_column="profile",
                start=start, stop=stop,
            )
        )  # fmt: skip
    return parts


def _replace(path: Path, write: Any) -> None:
    """``write(temporary path)``, then move it to ``path``."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial{path.suffix}")
    write(temporary)
    os.replace(temporary, path)


def write_work(folder: Path, audience: Audience, rated: list[list[str]], vectors: np.ndarray, rows: int) -> None:
    """users.parquet (one row group per partition), items.parquet and vectors.npy (kept if already there)."""
    folder.mkdir(parents=True, exist_ok=True)
    users = pd.DataFrame({"user": audience.users, "profile": audience.profiles, "rated": rated})
    _replace(folder / USERS_FILE, lambda p: users.to_parquet(p, index=False, row_group_size=rows))
    items = audience.candidates[["item", "text"]].reset_index(drop=True)
    _replace(folder / ITEMS_FILE, lambda p: items.to_parquet(p, index=False))
    if not (folder / VECTORS_FILE).is_file():
        _replace(folder / VECTORS_FILE, lambda p: np.save(p, np.ascontiguousarray(vectors, dtype=np.float32)))


def shared_state(
    inputs: SharedInputs, model_uri: str, threads: int
) -> tuple[SentenceEncoder, pd.DataFrame, Neighbours]:
    """(encoder, candidates, search) of a request, loaded once per process; the vectors memory-mapped."""
    key = (inputs.work, model_uri, threads)
    with _LOCK:
        if key not in _LOADED:
            model_dir = Path(inputs.model_dir)
            if not model_dir.is_dir():  # a remote worker: fetch the model from the registry
                import mlflow

                mlflow.set_tracking_uri(guard(get_settings().tracking_uri))
                model_dir = Path(mlflow.artifacts.download_artifacts(model_uri))
            work = Path(inputs.work)
            vectors = np.load(work / VECTORS_FILE, mmap_mode="r")
            folder = Path(inputs.index_folder) if inputs.index_folder else None
            neighbours = open_neighbours(vectors, inputs.search, folder)
            if neighbours.index is not None and threads:
                import faiss

                faiss.omp_set_num_threads(threads)
            candidates = pd.read_parquet(work / ITEMS_FILE)
            _LOADED[key] = (encoder_of(model_dir, threads), candidates, neighbours)
            logger.info("recommend: loaded %s and %d candidates in process %d", model_uri, len(candidates), os.getpid())
        return _LOADED[key]


def recommend_partition(
    part: Partition, model_uri: str, model_version: str, output: str, inputs: SharedInputs, threads: int = 0
) -> PartResult:
    """Top-k lists of one partition's users into its part file (user, rank, item, score, text)."""
    started = time.perf_counter()
    encoder, candidates, neighbours = shared_state(inputs, model_uri, threads)
    frame = read_partition(part)
    users = frame["user"].tolist()
    exclude = [set(rated) for rated in frame["rated"]]
    lists = top_k(encoder, frame["profile"].tolist(), candidates, exclude, inputs.k, neighbours=neighbours)
    lists = labelled(lists, users, candidates)
    write_part(lists, part_path(Path(output), part))
    return PartResult(
        id=part.id, rows=len(lists), skipped=False, seconds=time.perf_counter() - started, pid=os.getpid()
    )


def list_lengths(audience: Audience, rated: list[list[str]], k: int) -> list[int]:
    """Rows each user gets: k, or fewer when the candidates they did not rate run out."""
    return [max(0, min(k, len(audience.candidates) - len(r))) for r in rated]


def recommend_in_partitions(config: RecommendConfig, folder: Path, model_dir: Path, model_uri: str) -> RecommendResult:
    """``recommend_for`` with the users scored in partitions on the configured engine (a Dask cluster)."""
    started = datetime.now(UTC)
    encoder = encoder_of(model_dir)
    audience = audience_of(config, folder)
    candidates = set(audience.candidates["item"])
    rated = [sorted(i for i in seen if i in candidates) for seen in audience.exclude]
    cache = embeddings_folder(model_uri)
    vectors, embedding = item_vectors(encoder, list(audience.candidates["text"]), cache)
    options = config.search_options()
    gate = None
    if len(vectors) >= options.ann_min_items:  # embed here only the profiles the index's gate samples
        _, rows = gate_draw(len(vectors), len(audience.users), options)
        gate = embed_profiles(encoder, [audience.profiles[r] for r in rows])
    _, search = build_neighbours(vectors, options, cache, gate)
    work = get_settings().state / "recommendations" / "parts"
    work = work / f"{model_key(model_uri)}-{request_digest(model_uri, config, audience, rated)}"
    write_work(work, audience, rated, vectors, config.partition_rows)
    parts = user_partitions(work / USERS_FILE, audience.users, config.partition_rows)
    lengths = np.cumsum([0, *list_lengths(audience, rated, config.k)])
    inputs = SharedInputs(
        work=str(work), model_dir=str(model_dir), k=config.k, search=search.kind,
        index_folder=None if search.kind == "exact" else str(index_folder(cache, vectors, options)),
    )  # fmt: skip
    run = run_partitions(
        parts, model_uri, model_uri.rsplit("/", 1)[-1], work, config.engine_settings(), work=recommend_partition,
        arguments={"inputs": inputs}, part_rows={p.id: int(lengths[p.stop] - lengths[p.start]) for p in parts},
    )  # fmt: skip
    (work / VECTORS_FILE).unlink(missing_ok=True)
    lists = read_output(work)
    if lists.empty:
        lists = pd.DataFrame(columns=["user", "rank", "item", "score", "text"])
    return finish(config, model_uri, started, audience, lists, search=search, embedding=embedding, partitions=run)
