"""Top-k recommendations from a registered bi-encoder (its ONNX encoder; torch is never imported).

A user's profile is their most recent positives, as in training. Item vectors come from a cache
keyed by text and model version (tasks.ranking.item_vectors: only new texts are embedded); the
search is the exact matrix product for catalogues below ``ann_min_items`` and a recall-gated faiss
index above (tasks.ranking.ann_index); items the user already rated are excluded. In cold-start
mode the candidates are only the given new items (item, text), which nobody rated. With
``engine=dask`` the users are scored in partitions on a Dask cluster (tasks.ranking.partitioned).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from prefect import task
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, ConfigDict, Field

from finetune_flows.plugins import ConfigError, DataError
from finetune_flows.tasks.batch.engine import Engine, EngineConfig
from finetune_flows.tasks.batch.runner import ScoreRun, resolve_version
from finetune_flows.tasks.core.reports import write_csv
from finetune_flows.tasks.core.settings import get_settings
from finetune_flows.tasks.core.tables import read_table, records
from finetune_flows.tasks.ranking.ann_index import SearchOptions, SearchReport, build_neighbours
from finetune_flows.tasks.ranking.dataset import interaction_folder
from finetune_flows.tasks.ranking.interactions import read_interactions
from finetune_flows.tasks.ranking.item_vectors import EmbeddingStats, embeddings_folder, item_vectors
from finetune_flows.tasks.ranking.neighbours import Neighbours
from finetune_flows.tasks.ranking.split import profile_text, short_title
from finetune_flows.tasks.serving.encoder import SentenceEncoder
from finetune_flows.tasks.serving.pair_scorer import encoder_of

logger = logging.getLogger(__name__)

SCORE_SCALE = 20.0  # scores are 20 x cosine, as the bi-encoder scores pairs


class RecommendConfig(EngineConfig):
    """Whom to recommend for, from which model, and where the lists go.

    The engine fields (``engine``, ``workers``, ...) choose where the users are scored: in this process
    (the default) or in partitions of ``partition_rows`` users on a Dask cluster, with the same lists
    (tasks.ranking.partitioned)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_name: str = Field(default="recommendation", min_length=1, max_length=200, description="Registered model.")
    alias: str = Field(default="champion", min_length=1, max_length=100, description="Model alias to score with.")
    data_path: str | None = Field(
        default=None, description="Interaction folder (as for training). Empty: the bundled MovieLens sample."
    )
    users: list[str] = Field(default_factory=list, description="User ids; empty: every user in the data.")
    k: int = Field(default=10, ge=1, le=1000, description="Items per user.")
    cold_start_items: str | None = Field(
        default=None, description="CSV of new items (item,text): rank only these, e.g. titles nobody rated yet."
    )
    positive_threshold: float = Field(default=4.0, description="Ratings at or above are positives (the profile).")
    profile_items: int = Field(default=10, ge=1, le=200, description="Recent positives written into a profile.")
    output_path: str | None = Field(
        default=None,
        description="CSV or Parquet file for the lists. Empty: <state>/recommendations/<name>-v<version>-<time>.csv",
    )
    ann_min_items: int = Field(
        default=50_000,
        ge=1,
        description="Catalogues of at least this many items are searched through a faiss index; smaller ones exactly.",
    )
    min_recall: float = Field(
        default=0.95,
        gt=0.0,
        le=1.0,
        description="Recall@10 against exact search the index must reach when built; below it, exact search is used.",
    )
    ann_index: Literal["hnsw", "ivf"] = Field(default="hnsw", description="faiss index kind: HNSW graph or IVF-Flat.")

    def search_options(self) -> SearchOptions:
        """The search settings of this request."""
        return SearchOptions(ann_min_items=self.ann_min_items, min_recall=self.min_recall, index=self.ann_index)


class RecommendResult(BaseModel):
    """Where the lists are and what scored them."""

    model_config = ConfigDict(frozen=True)

    output_path: str
    model_uri: str
    users: int
    candidates: int
    rows: int
    seconds: float
    search: SearchReport
    embedding: EmbeddingStats
    partitions: ScoreRun | None = Field(default=None, description="engine=dask: the user partitions run.")


def current_profiles(
    ratings: pd.DataFrame, items: pd.DataFrame, users: list[str], threshold: float, limit: int
) -> list[str]:
    """Each user's profile now: their latest positives, newest first."""
    titles = {i: short_title(t) for i, t in zip(items["item"], items["text"], strict=True)}
    positives = ratings[ratings["rating"] >= threshold].sort_values(["user", "timestamp", "item"], kind="stable")
    by_user = positives.groupby("user")["item"].apply(list)
    return [profile_text([titles[i] for i in by_user.get(u, [])[::-1][:limit]]) for u in users]


def top_k(
    encoder: SentenceEncoder,
    profiles: list[str],
    items: pd.DataFrame,
    exclude: list[set[str]],
    k: int,
    batch_users: int = 256,
    neighbours: Neighbours | None = None,
    profile_vectors: np.ndarray | None = None,
) -> pd.DataFrame:
    """user index, rank, item, score: the k best items per profile outside its ``exclude`` set.

    ``neighbours`` searches the item vectors (rows in ``items`` order); None: embed the items and
    search them exactly. ``profile_vectors``: the profiles already embedded (``embed_profiles``).
    """
    item_ids = items["item"].to_numpy()
    search = neighbours if neighbours is not None else Neighbours(encoder.encode(list(items["text"])))
    position = {item: index for index, item in enumerate(item_ids)}
    rows: list[tuple[int, int, str, float]] = []
    for start in range(0, len(profiles), batch_users):
        chunk = profiles[start : start + batch_users]
        users = encoder.encode(chunk) if profile_vectors is None else profile_vectors[start : start + len(chunk)]
        seen = [[position[i] for i in exclude[start + o] if i in position] for o in range(len(users))]
        for offset, (best, scores) in enumerate(search.search(users, k, seen, SCORE_SCALE, batch_users)):
            rows.extend(
                (start + offset, rank + 1, item_ids[i], float(s))
                for rank, (i, s) in enumerate(zip(best, scores, strict=True))
            )
    return pd.DataFrame(rows, columns=["user_index", "rank", "item", "score"])


def embed_profiles(encoder: SentenceEncoder, profiles: list[str], batch_users: int = 256) -> np.ndarray:
    """The profiles' vectors, embedded ``batch_users`` at a time (as ``top_k`` batches them)."""
    chunks = [encoder.encode(profiles[s : s + batch_users]) for s in range(0, len(profiles), batch_users)]
    return np.concatenate(chunks) if chunks else encoder.encode([])


def new_items(path: Path) -> pd.DataFrame:
    """The cold-start item table (item, text)."""
    frame = read_table(path)
    missing = [c for c in ("item", "text") if c not in frame.columns]
    if missing:
        raise DataError(
            f"missing column(s) {', '.join(missing)}", file=path, hint=f"Columns found: {list(frame.columns)}"
        )
    return frame[["item", "text"]].assign(item=frame["item"].str.strip())


def default_output(model_uri: str, when: datetime) -> Path:
    """<state>/recommendations/<name>-v<version>-<UTC time>.csv for ``models:/<name>/<version>``."""
    name, version = model_uri.removeprefix("models:/").rsplit("/", 1)
    return get_settings().state / "recommendations" / f"{name}-v{version}-{when:%Y%m%dT%H%M%SZ}.csv"


def write_frame(frame: pd.DataFrame, path: Path) -> None:
    """Parquet for a .parquet path (the data as it is), a formula-safe report CSV otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        write_csv(frame, path)


@dataclass(frozen=True)
class Audience:
    """Whom a request recommends for and what it may recommend: users (in order), their profiles and
    rated items, and the candidate items (item, text)."""

    users: list[str]
    profiles: list[str]
    exclude: list[set[str]]
    candidates: pd.DataFrame


def audience_of(config: RecommendConfig, folder: Path) -> Audience:
    """The users (all, or the configured ones, which must have interactions), their profiles, what they rated,
    and the candidates (the catalogue, or the cold-start items)."""
    log = read_interactions(folder)
    known = sorted(log.ratings["user"].unique())
    users = list(config.users) or known
    unknown = [u for u in users if u not in set(known)]
    if unknown:
        raise ConfigError(
            f"unknown user(s) {unknown[:10]} in {folder}; {len(known)} users have interactions, e.g. {known[:5]}"
        )
    candidates = new_items(Path(config.cold_start_items)) if config.cold_start_items else log.items
    rated = log.ratings.groupby("user")["item"].apply(set)
    profiles = current_profiles(log.ratings, log.items, users, config.positive_threshold, config.profile_items)
    return Audience(users, profiles, [rated.get(u, set()) for u in users], candidates)


def labelled(lists: pd.DataFrame, users: list[str], candidates: pd.DataFrame) -> pd.DataFrame:
    """``top_k``'s rows as written: user, rank, item, score, text."""
    texts = candidates.set_index("item")["text"]
    lists = lists.copy()
    lists.insert(0, "user", [users[i] for i in lists.pop("user_index")])
    lists["text"] = lists["item"].map(texts).to_numpy()
    return lists


def finish(
    config: RecommendConfig, model_uri: str, started: datetime, audience: Audience, lists: pd.DataFrame, **facts: Any
) -> RecommendResult:
    """Write ``lists`` to the output path and say what was done (``facts``: search, embedding, partitions)."""
    out = Path(config.output_path) if config.output_path else default_output(model_uri, started)
    write_frame(lists, out)
    seconds = (datetime.now(UTC) - started).total_seconds()
    logger.info(
        "recommend: %d users x %d candidates (%s search) -> %s in %.1f s",
        len(audience.users),
        len(audience.candidates),
        facts["search"].kind,
        out,
        seconds,
    )
    return RecommendResult(
        output_path=str(out),
        model_uri=model_uri,
        users=len(audience.users),
        candidates=len(audience.candidates),
        rows=len(lists),
        seconds=seconds,
        **facts,
    )


def recommend_for(config: RecommendConfig, folder: Path, encoder: SentenceEncoder, model_uri: str) -> RecommendResult:
    """Score with ``encoder`` (the model ``model_uri`` names) in this process and write the lists."""
    started = datetime.now(UTC)
    audience = audience_of(config, folder)
    cache = embeddings_folder(model_uri)
    vectors, embedding = item_vectors(encoder, list(audience.candidates["text"]), cache)
    queries = embed_profiles(encoder, audience.profiles)
    neighbours, search = build_neighbours(vectors, config.search_options(), cache, queries)
    lists = top_k(
        encoder, audience.profiles, audience.candidates, audience.exclude, config.k,
        neighbours=neighbours, profile_vectors=queries,
    )  # fmt: skip
    lists = labelled(lists, audience.users, audience.candidates)
    return finish(config, model_uri, started, audience, lists, search=search, embedding=embedding)


def retry_unless_config_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: a store that does not answer is worth a retry, a missing alias is not."""
    try:
        state.result()
    except ConfigError:
        return False
    except Exception:
        return True
    return True


@task(name="fetch-scorer", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_config_error)
def fetch_scorer(config: RecommendConfig) -> tuple[str, str]:
    """(local folder, models:/name/version) of the model the alias points to; a ``ConfigError`` when none has it."""
    import mlflow

    uri = f"models:/{config.model_name}/{resolve_version(config.model_name, config.alias)}"
    return mlflow.artifacts.download_artifacts(uri), uri


@task(name="recommend-items")
def recommend_items(config: RecommendConfig, model_dir: str, model_uri: str) -> RecommendResult:
    """Top-k lists for the configured users, written to a file and shown as a table artifact."""
    folder = interaction_folder(config.data_path, "recommendation")
    if config.engine is Engine.DASK:
        from finetune_flows.tasks.ranking.partitioned import recommend_in_partitions

        result = recommend_in_partitions(config, folder, Path(model_dir), model_uri)
    else:
        result = recommend_for(config, folder, encoder_of(Path(model_dir)), model_uri)
    path = Path(result.output_path)
    head = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, dtype={"user": str, "item": str})
    create_table_artifact(
        key="recommendations",
        table=records(head.head(200).round(4)),
        description=f"Top-{config.k} from {model_uri} for {result.users} users ({result.output_path})",
    )
    create_table_artifact(
        key="recommendations-search",
        table=[
            {**result.search.model_dump(exclude={"params"}), **result.search.params, **result.embedding.model_dump()}
        ],
        description=f"Search over {result.candidates} items: {result.search.note}",
    )
    return result
