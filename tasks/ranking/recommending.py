"""Top-k recommendations from a registered bi-encoder (its ONNX encoder; torch is never imported).

A user's profile is their most recent positives, as in training; every catalogue item is
embedded once and ranked by a matrix product; items the user already rated are excluded. In
cold-start mode the candidates are only the given new items (item, text), which nobody rated.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, ConfigDict, Field

from finetune_flows.plugins import ConfigError, DataError
from finetune_flows.tasks.core.reports import write_csv
from finetune_flows.tasks.core.secrets import guard
from finetune_flows.tasks.core.settings import get_settings
from finetune_flows.tasks.core.tables import read_table, records
from finetune_flows.tasks.ranking.dataset import interaction_folder
from finetune_flows.tasks.ranking.interactions import read_interactions
from finetune_flows.tasks.ranking.split import profile_text, short_title
from finetune_flows.tasks.serving.encoder import SentenceEncoder
from finetune_flows.tasks.serving.pair_scorer import encoder_of

logger = logging.getLogger(__name__)


class RecommendConfig(BaseModel):
    """Whom to recommend for, from which model, and where the lists go."""

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


class RecommendResult(BaseModel):
    """Where the lists are and what scored them."""

    model_config = ConfigDict(frozen=True)

    output_path: str
    model_uri: str
    users: int
    candidates: int
    rows: int
    seconds: float


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
) -> pd.DataFrame:
    """user index, rank, item, score: the k best items per profile outside its ``exclude`` set."""
    item_ids = items["item"].to_numpy()
    vectors = encoder.encode(list(items["text"]))
    position = {item: index for index, item in enumerate(item_ids)}
    rows: list[tuple[int, int, str, float]] = []
    for start in range(0, len(profiles), batch_users):
        users = encoder.encode(profiles[start : start + batch_users])
        scores = 20.0 * users @ vectors.T
        for offset, row in enumerate(scores):
            seen = [position[i] for i in exclude[start + offset] if i in position]
            row[seen] = -np.inf
            n = min(k, int(np.isfinite(row).sum()))
            best = np.argpartition(-row, n - 1)[:n] if n else np.array([], dtype=int)
            best = best[np.argsort(-row[best], kind="stable")]
            rows.extend((start + offset, rank + 1, item_ids[i], float(row[i])) for rank, i in enumerate(best))
    return pd.DataFrame(rows, columns=["user_index", "rank", "item", "score"])


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


def recommend_for(config: RecommendConfig, folder: Path, encoder: SentenceEncoder, model_uri: str) -> RecommendResult:
    """Score with ``encoder`` (the model ``model_uri`` names) and write the lists; returns where they are."""
    started = datetime.now(UTC)
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
    lists = top_k(encoder, profiles, candidates, [rated.get(u, set()) for u in users], config.k)
    texts = candidates.set_index("item")["text"]
    lists.insert(0, "user", [users[i] for i in lists.pop("user_index")])
    lists["text"] = lists["item"].map(texts).to_numpy()
    out = Path(config.output_path) if config.output_path else default_output(model_uri, started)
    write_frame(lists, out)
    seconds = (datetime.now(UTC) - started).total_seconds()
    logger.info("recommend: %d users x %d candidates -> %s in %.1f s", len(users), len(candidates), out, seconds)
    return RecommendResult(
        output_path=str(out),
        model_uri=model_uri,
        users=len(users),
        candidates=len(candidates),
        rows=len(lists),
        seconds=seconds,
    )


@task(name="fetch-scorer", retries=2, retry_delay_seconds=5)
def fetch_scorer(config: RecommendConfig) -> tuple[str, str]:
    """(local folder, models:/name/version) of the model the alias points to."""
    import mlflow

    mlflow.set_tracking_uri(guard(get_settings().tracking_uri))
    version = mlflow.MlflowClient().get_model_version_by_alias(config.model_name, config.alias)
    uri = f"models:/{config.model_name}/{version.version}"
    return mlflow.artifacts.download_artifacts(uri), uri


@task(name="recommend-items")
def recommend_items(config: RecommendConfig, model_dir: str, model_uri: str) -> RecommendResult:
    """Top-k lists for the configured users, written to a file and shown as a table artifact."""
    folder = interaction_folder(config.data_path, "recommendation")
    result = recommend_for(config, folder, encoder_of(Path(model_dir)), model_uri)
    path = Path(result.output_path)
    head = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, dtype={"user": str, "item": str})
    create_table_artifact(
        key="recommendations",
        table=records(head.head(200).round(4)),
        description=f"Top-{config.k} from {model_uri} for {result.users} users ({result.output_path})",
    )
    return result
