"""Leave-one-out by time: profiles, training pairs and candidate sets, with no look-ahead.

For each user with enough positives (rating >= threshold), the latest positive is the test
target and the one before it the validation target. Everything the model or a baseline learns
from comes strictly before the user's validation moment; a profile for a moment ``t`` holds only
positives rated strictly before ``t``, newest first. Each target is ranked against ``negatives``
items the user never rated, drawn with a fixed seed. Users with too few positives are listed in
the split's report, not dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

PROFILE_PREFIX = "Liked recently: "


class SplitOptions(BaseModel):
    """How the interaction log becomes a ranking task."""

    model_config = ConfigDict(frozen=True)

    positive_threshold: float = Field(default=4.0, description="A rating at or above this is a positive.")
    min_positives: int = Field(default=3, ge=3, description="Users need this many positives to be evaluated.")
    negatives: int = Field(default=99, ge=1, description="Never-rated items ranked against each target.")
    profile_items: int = Field(default=10, ge=1, description="Most recent positives written into a profile.")
    pairs_per_user: int = Field(default=8, ge=1, description="Training pairs per user (the most recent).")
    seed: int = Field(default=42, ge=0)


@dataclass
class RankingSplit:
    """Frames of the split (all ids are strings)."""

    train: pd.DataFrame
    """Interactions before each evaluated user's validation moment (all of an unevaluated user's)."""
    pairs: pd.DataFrame
    """Training pairs: user, profile (text), item, timestamp."""
    validation: pd.DataFrame
    """user, profile, target, candidates (target first, then negatives), moment."""
    test: pd.DataFrame
    skipped_users: pd.DataFrame
    """user, positives: users with too few positives to evaluate."""


def profile_text(titles: list[str]) -> str:
    """The user's recent positives, newest first, as one text."""
    return PROFILE_PREFIX + "; ".join(titles)


def profile_before(positives: pd.DataFrame, moment: int, titles: dict[str, str], limit: int) -> str | None:
    """Profile from ``positives`` (one user's, sorted by time) rated strictly before ``moment``."""
    earlier = positives[positives["timestamp"] < moment]
    if earlier.empty:
        return None
    newest_first = earlier["item"].to_numpy()[::-1][:limit]
    return profile_text([titles[i] for i in newest_first])


def sample_negatives(rated: set[str], catalogue: np.ndarray, n: int, rng: np.random.Generator) -> list[str]:
    """``n`` distinct catalogue items outside ``rated`` (fewer when the catalogue runs out)."""
    pool_size = len(catalogue) - len(rated)
    n = min(n, max(pool_size, 0))
    chosen: list[str] = []
    seen: set[str] = set()
    while len(chosen) < n:
        for index in rng.integers(0, len(catalogue), size=2 * (n - len(chosen)) + 8):
            item = str(catalogue[index])
            if item not in rated and item not in seen:
                seen.add(item)
                chosen.append(item)
                if len(chosen) == n:
                    break
    return chosen


def short_title(text: str) -> str:
    """The part of an item text before the first '. ' (the title for MovieLens item texts)."""
    return text.split(". ", 1)[0]


def leave_one_out(ratings: pd.DataFrame, items: pd.DataFrame, options: SplitOptions) -> RankingSplit:
    """Split ``ratings`` (user, item, rating, timestamp) into training data and evaluation sets."""
    rng = np.random.default_rng(options.seed)
    titles = {i: short_title(t) for i, t in zip(items["item"], items["text"], strict=True)}
    catalogue = items["item"].to_numpy()
    ordered = ratings.sort_values(["user", "timestamp", "item"], kind="stable")
    train_parts: list[pd.DataFrame] = []
    pairs: list[dict[str, object]] = []
    skipped: list[dict[str, object]] = []
    evals: dict[str, list[dict[str, object]]] = {"validation": [], "test": []}
    for user, history in ordered.groupby("user", sort=True):
        positives = history[history["rating"] >= options.positive_threshold]
        if len(positives) < options.min_positives:
            skipped.append({"user": user, "positives": len(positives)})
            train_parts.append(history)
            continue
        val_row, test_row = positives.iloc[-2], positives.iloc[-1]
        before = history[history["timestamp"] < val_row["timestamp"]]
        train_parts.append(before)
        train_positives = before[before["rating"] >= options.positive_threshold]
        for _, row in train_positives.iloc[-options.pairs_per_user :].iterrows():
            profile = profile_before(train_positives, row["timestamp"], titles, options.profile_items)
            if profile is not None:
                pairs.append({"user": user, "profile": profile, "item": row["item"], "timestamp": row["timestamp"]})
        rated = set(history["item"])
        for name, row in (("validation", val_row), ("test", test_row)):
            profile = profile_before(positives, row["timestamp"], titles, options.profile_items)
            evals[name].append(
                {
                    "user": user,
                    "profile": profile or profile_text([]),
                    "target": row["item"],
                    "candidates": [row["item"], *sample_negatives(rated, catalogue, options.negatives, rng)],
                    "moment": int(row["timestamp"]),
                }
            )
    return RankingSplit(
        train=pd.concat(train_parts, ignore_index=True) if train_parts else ratings.iloc[:0],
        pairs=pd.DataFrame(pairs, columns=["user", "profile", "item", "timestamp"]),
        validation=pd.DataFrame(evals["validation"], columns=["user", "profile", "target", "candidates", "moment"]),
        test=pd.DataFrame(evals["test"], columns=["user", "profile", "target", "candidates", "moment"]),
        skipped_users=pd.DataFrame(skipped, columns=["user", "positives"]),
    )
