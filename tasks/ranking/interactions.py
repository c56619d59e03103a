"""Reading interaction logs with item text: the MovieLens layout and a generic one.

    MovieLens  ratings.csv userId,movieId,rating,timestamp; movies.csv movieId,title,genres;
               tags.csv userId,movieId,tag,timestamp (optional)
    generic    interactions.csv user,item,rating,timestamp; items.csv item,text

Bad interaction rows (unknown item, non-numeric rating, unparsable timestamp, empty id) are not
fatal: each becomes a ``Problem`` naming file, row, column and value, and the good rows go on. A
folder with no good row, or a missing or malformed file, raises ``DataError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from pydantic import BaseModel, ConfigDict

from finetune_flows.plugins import DataError
from finetune_flows.tasks.core.tables import read_table

MOVIELENS = ("ratings.csv", "movies.csv")
GENERIC = ("interactions.csv", "items.csv")
INTERACTION_COLUMNS = ("user", "item", "rating", "timestamp")


class Problem(BaseModel):
    """One skipped input row and why."""

    model_config = ConfigDict(frozen=True)

    file: str
    row: int
    column: str
    value: str
    problem: str


@dataclass
class Interactions:
    """Valid interactions (user, item, rating, timestamp) and item texts (item, text)."""

    ratings: pd.DataFrame
    items: pd.DataFrame
    layout: str
    problems: list[Problem] = field(default_factory=list)


def _require(frame: pd.DataFrame, path: Path, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(
            f"missing column(s) {', '.join(missing)}",
            file=path,
            hint=f"Columns found: {', '.join(map(str, frame.columns))}; expected {', '.join(columns)}",
        )


def item_text(title: str, genres: str, tags: list[str]) -> str:
    """``Title (year). Genre, Genre. Tags: a, b`` from MovieLens fields."""
    parts = [title.strip()]
    genre_list = [g for g in genres.split("|") if g and g != "(no genres listed)"]
    if genre_list:
        parts.append(", ".join(genre_list))
    if tags:
        parts.append("Tags: " + ", ".join(tags))
    return ". ".join(parts)


def top_tags(tags: pd.DataFrame, max_tags: int) -> dict[str, list[str]]:
    """Each item's most frequent tags (case-folded, ties by name), at most ``max_tags``."""
    if tags.empty or max_tags == 0:
        return {}
    folded = tags.assign(tag=tags["tag"].str.strip().str.lower())
    folded = folded[folded["tag"] != ""]
    counts = folded.groupby(["item", "tag"]).size().reset_index(name="n")
    counts = counts.sort_values(["item", "n", "tag"], ascending=[True, False, True])
    return {str(item): list(group["tag"].head(max_tags)) for item, group in counts.groupby("item", sort=False)}


def _read_movielens(folder: Path, max_tags: int) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    ratings_path, movies_path = folder / "ratings.csv", folder / "movies.csv"
    raw = read_table(ratings_path)
    _require(raw, ratings_path, ("userId", "movieId", "rating", "timestamp"))
    movies = read_table(movies_path)
    _require(movies, movies_path, ("movieId", "title", "genres"))
    tags = pd.DataFrame(columns=["item", "tag"])
    if (folder / "tags.csv").is_file():
        tag_frame = read_table(folder / "tags.csv")
        _require(tag_frame, folder / "tags.csv", ("movieId", "tag"))
        tags = tag_frame.rename(columns={"movieId": "item"})[["item", "tag"]]
    tag_map = top_tags(tags, max_tags)
    items = pd.DataFrame(
        {
            "item": movies["movieId"].str.strip(),
            "text": [
                item_text(t, g, tag_map.get(m.strip(), []))
                for m, t, g in zip(movies["movieId"], movies["title"], movies["genres"], strict=True)
            ],
        }
    )
    ratings = raw.rename(columns={"userId": "user", "movieId": "item"})[list(INTERACTION_COLUMNS)]
    return ratings, items, ratings_path


def _read_generic(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    inter_path, items_path = folder / "interactions.csv", folder / "items.csv"
    raw = read_table(inter_path)
    _require(raw, inter_path, INTERACTION_COLUMNS)
    items = read_table(items_path)
    _require(items, items_path, ("item", "text"))
    empty = items["text"].str.strip() == ""
    if empty.any():
        row = int(empty.to_numpy().argmax()) + 1
        raise DataError("empty item text", file=items_path, row=row, column="text", value=items["item"].iloc[row - 1])
    return raw[list(INTERACTION_COLUMNS)], items[["item", "text"]].assign(item=items["item"].str.strip()), inter_path


def validate_ratings(raw: pd.DataFrame, known_items: set[str], path: Path) -> tuple[pd.DataFrame, list[Problem]]:
    """Typed rows (user, item, rating float, timestamp int seconds) and one Problem per bad row."""
    problems: list[Problem] = []
    users = raw["user"].str.strip()
    items = raw["item"].str.strip()
    ratings = pd.to_numeric(raw["rating"].str.strip(), errors="coerce")
    numeric_ts = pd.to_numeric(raw["timestamp"].str.strip(), errors="coerce")
    parsed_ts = pd.to_datetime(raw["timestamp"].str.strip(), errors="coerce", utc=True, format="ISO8601")
    seconds = numeric_ts.where(numeric_ts.notna(), parsed_ts.astype("int64", errors="ignore") // 10**9)
    seconds = seconds.where(numeric_ts.notna() | parsed_ts.notna())
    checks = [
        (users == "", "user", raw["user"], "empty user id"),
        (items == "", "item", raw["item"], "empty item id"),
        ((items != "") & ~items.isin(known_items), "item", raw["item"], "unknown item (not in the item table)"),
        (ratings.isna(), "rating", raw["rating"], "rating is not a number"),
        (seconds.isna(), "timestamp", raw["timestamp"], "unparsable timestamp (unix seconds or ISO 8601)"),
    ]
    bad = pd.Series(False, index=raw.index)
    for mask, column, values, problem in checks:
        for position in (mask & ~bad).to_numpy().nonzero()[0]:
            problems.append(
                Problem(
                    file=str(path),
                    row=int(position) + 1,
                    column=column,
                    value=str(values.iloc[position]),
                    problem=problem,
                )
            )
        bad |= mask
    good = pd.DataFrame({"user": users, "item": items, "rating": ratings, "timestamp": seconds})[~bad.to_numpy()]
    good = good.astype({"timestamp": "int64"}).drop_duplicates(["user", "item"], keep="last")
    return good.reset_index(drop=True), problems


def read_interactions(folder: Path, max_tags: int = 5) -> Interactions:
    """Read a folder in either layout; bad interaction rows are listed, not fatal."""
    if not folder.is_dir():
        raise DataError("interaction folder not found", file=folder)
    if all((folder / name).is_file() for name in MOVIELENS):
        layout, (raw, items, path) = "movielens", _read_movielens(folder, max_tags)
    elif all((folder / name).is_file() for name in GENERIC):
        layout, (raw, items, path) = "generic", _read_generic(folder)
    else:
        found = sorted(p.name for p in folder.iterdir())
        raise DataError(
            "no known interaction layout",
            file=folder,
            hint=f"Expected {' + '.join(MOVIELENS)} (MovieLens) or {' + '.join(GENERIC)}; found {found}",
        )
    duplicated = items["item"].duplicated()
    if duplicated.any():
        row = int(duplicated.to_numpy().argmax()) + 1
        raise DataError(
            "duplicate item id in the item table", row=row, column="item", value=items["item"].iloc[row - 1]
        )
    ratings, problems = validate_ratings(raw, set(items["item"]), path)
    if ratings.empty:
        first = problems[0] if problems else None
        raise DataError(
            f"no valid interaction among {len(raw)} rows ({len(problems)} bad)",
            file=path,
            hint=f"First: row {first.row}, column {first.column!r}, value {first.value!r}: {first.problem}"
            if first
            else None,
        )
    return Interactions(ratings=ratings, items=items.reset_index(drop=True), layout=layout, problems=problems)
