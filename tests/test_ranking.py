"""Recommendation pieces as plain functions: reading, the leave-one-out split (no leakage),
ranking metrics against hand-computed values, and the baselines."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from finetune_flows.plugins import DataError
from finetune_flows.tasks.ranking.baselines import (
    Catalogue,
    MfOptions,
    item_knn_scores,
    mf_scores,
    popularity_scores,
    train_bpr,
)
from finetune_flows.tasks.ranking.interactions import item_text, read_interactions, top_tags
from finetune_flows.tasks.ranking.metrics import ranking_metrics, score_metrics, target_ranks
from finetune_flows.tasks.ranking.split import PROFILE_PREFIX, SplitOptions, leave_one_out, short_title

ITEMS = {
    "1": "Alien (1979)",
    "2": "Aliens (1986)",
    "3": "Heat (1995)",
    "4": "Casino (1995)",
    "5": "Fargo (1996)",
    "6": "Up (2009)",
    "7": "Cars (2006)",
    "8": "Brave (2012)",
}


def write_generic(folder: Path, interactions: list[tuple[str, str, str, str]], items: dict[str, str] = ITEMS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["user,item,rating,timestamp", *(",".join(r) for r in interactions)]
    (folder / "interactions.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (folder / "items.csv").write_text(
        "item,text\n" + "".join(f'{k},"{v}. Genre"\n' for k, v in items.items()), encoding="utf-8"
    )
    return folder


HISTORY = [  # user a: five positives in time order, one negative rating in between
    ("a", "1", "5", "100"),
    ("a", "2", "4", "200"),
    ("a", "6", "1", "250"),
    ("a", "3", "5", "300"),
    ("a", "4", "4.5", "400"),
    ("a", "5", "5", "500"),
    ("b", "6", "5", "100"),
    ("b", "7", "4", "200"),
    ("b", "8", "5", "300"),
]


def split_of(folder: Path, **options: object) -> tuple:
    log = read_interactions(folder)
    return log, leave_one_out(log.ratings, log.items, SplitOptions(negatives=3, **options))


def titles_in(profile: str) -> list[str]:
    return [t for t in profile.removeprefix(PROFILE_PREFIX).split("; ") if t]


def test_targets_are_the_latest_positives_and_never_in_training(tmp_path: Path) -> None:
    _, split = split_of(write_generic(tmp_path / "log", HISTORY))
    a_val = split.validation.set_index("user").loc["a"]
    a_test = split.test.set_index("user").loc["a"]
    assert (a_val["target"], a_test["target"]) == ("4", "5")
    train_a = split.train[split.train["user"] == "a"]
    assert set(train_a["item"]) == {"1", "2", "6", "3"}  # strictly before the validation moment
    pairs_a = split.pairs[split.pairs["user"] == "a"]
    held_out = {ITEMS["4"], ITEMS["5"]}
    assert not set(pairs_a["item"]) & {"4", "5"}
    assert all(not held_out & set(titles_in(p)) for p in pairs_a["profile"])
    # Each candidate list starts with the target and holds only never-rated items after it.
    rated = set(train_a["item"]) | {"4", "5"}
    assert a_test["candidates"][0] == "5" and not set(a_test["candidates"][1:]) & rated


def test_profiles_hold_only_the_past_newest_first(tmp_path: Path) -> None:
    _, split = split_of(write_generic(tmp_path / "log", HISTORY))
    a_val = split.validation.set_index("user").loc["a"]
    a_test = split.test.set_index("user").loc["a"]
    assert titles_in(a_val["profile"]) == [ITEMS["3"], ITEMS["2"], ITEMS["1"]]
    assert titles_in(a_test["profile"]) == [ITEMS["4"], ITEMS["3"], ITEMS["2"], ITEMS["1"]]
    pair = split.pairs[(split.pairs["user"] == "a") & (split.pairs["item"] == "3")].iloc[0]
    assert titles_in(pair["profile"]) == [ITEMS["2"], ITEMS["1"]]  # the low rating (item 6) is no positive


def test_a_future_rating_does_not_change_past_profiles(tmp_path: Path) -> None:
    """A rating made after the validation moment reaches neither the validation profile, nor the pairs,
    nor the interactions the baselines learn from."""
    _, before = split_of(write_generic(tmp_path / "before", HISTORY))
    future = [*HISTORY, ("a", "7", "2", "450")]  # rated after the validation moment (400)
    _, after = split_of(write_generic(tmp_path / "after", future))
    assert after.validation.equals(before.validation.assign(candidates=after.validation["candidates"]))
    pd.testing.assert_frame_equal(after.pairs, before.pairs)
    assert "7" not in set(after.train.loc[after.train["user"] == "a", "item"])
    assert "7" not in after.test.set_index("user").loc["a"]["candidates"]  # rated, so never a negative


def test_no_profile_on_the_bundled_sample_looks_ahead() -> None:
    from finetune_flows.plugins import SCENARIOS

    log = read_interactions(SCENARIOS.get("recommendation").sample().train)
    split = leave_one_out(log.ratings, log.items, SplitOptions(profile_items=200))
    titles = {i: short_title(t) for i, t in zip(log.items["item"], log.items["text"], strict=True)}
    positives = {u: g for u, g in log.ratings[log.ratings["rating"] >= 4].groupby("user")}
    checked = 0
    for frame in (split.pairs.rename(columns={"timestamp": "moment"}), split.validation, split.test):
        for user, moment, profile in zip(frame["user"], frame["moment"], frame["profile"], strict=True):
            past = positives[user]
            assert set(titles_in(profile)) <= {titles[i] for i in past.loc[past["timestamp"] < moment, "item"]}
            checked += 1
    assert checked == len(split.pairs) + 2 * len(split.validation) > 1000
    held_out = set(zip(split.validation["user"], split.validation["target"], strict=True))
    held_out |= set(zip(split.test["user"], split.test["target"], strict=True))
    assert not held_out & set(zip(split.pairs["user"], split.pairs["item"], strict=True))
    assert not held_out & set(zip(split.train["user"], split.train["item"], strict=True))


def test_bad_rows_are_reported_with_row_and_value_and_the_rest_is_used(tmp_path: Path) -> None:
    rows = [*HISTORY, ("a", "999", "5", "600"), ("b", "1", "five", "400"), ("c", "1", "5", "100")]
    log, split = split_of(write_generic(tmp_path / "log", rows))
    found = {(p.row, p.column, p.value) for p in log.problems}
    assert found == {(10, "item", "999"), (11, "rating", "five")}
    assert all(p.file.endswith("interactions.csv") for p in log.problems)
    assert "unknown item" in log.problems[0].problem
    skipped = split.skipped_users.set_index("user")["positives"].to_dict()
    assert skipped == {"c": 1}  # a user with a single interaction is listed, not silently dropped
    assert set(split.validation["user"]) == {"a", "b"}


def test_a_folder_without_any_good_row_fails_clearly(tmp_path: Path) -> None:
    folder = write_generic(tmp_path / "log", [("a", "999", "5", "1"), ("a", "1", "x", "2")])
    with pytest.raises(DataError, match=r"no valid interaction among 2 rows \(2 bad\).*interactions.csv"):
        read_interactions(folder)


def test_an_unknown_layout_lists_what_was_found(tmp_path: Path) -> None:
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,5,1\n")
    with pytest.raises(DataError, match=r"no known interaction layout.*ratings.csv"):
        read_interactions(tmp_path)


def test_movielens_layout_builds_item_text_with_top_tags(tmp_path: Path) -> None:
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,5,10\n")
    (tmp_path / "movies.csv").write_text('movieId,title,genres\n1,"Toy Story (1995)",Animation|Comedy\n')
    (tmp_path / "tags.csv").write_text("userId,movieId,tag,timestamp\n1,1,Pixar,1\n2,1,pixar,2\n3,1,fun,3\n")
    log = read_interactions(tmp_path)
    assert log.layout == "movielens"
    assert log.items["text"].tolist() == ["Toy Story (1995). Animation, Comedy. Tags: pixar, fun"]
    assert item_text("X (2000)", "(no genres listed)", []) == "X (2000)"
    assert top_tags(pd.DataFrame({"item": ["1"] * 3, "tag": ["b", "a", "b"]}), 1) == {"1": ["b"]}


def test_metrics_match_hand_computed_values() -> None:
    ranks = np.array([0, 4, 12])
    metrics = ranking_metrics(ranks, k=10)
    assert metrics["hr_at_10"] == pytest.approx(2 / 3)
    assert metrics["ndcg_at_10"] == pytest.approx((1.0 + 1.0 / math.log2(6)) / 3)
    assert metrics["mrr"] == pytest.approx((1.0 + 1 / 5 + 1 / 13) / 3)
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3], [0.1, 0.2, 0.3]])  # target in column 0
    assert target_ranks(scores).tolist() == [0, 2, 2]
    assert score_metrics(scores, k=1) == ranking_metrics(np.array([0, 2, 2]), k=1)


def test_ties_are_broken_at_random_not_in_the_targets_favour() -> None:
    ranks = target_ranks(np.zeros((2000, 100)), seed=3)
    assert 45 < ranks.mean() < 54  # chance level: (100 - 1) / 2
    with pytest.raises(ValueError, match="NaN"):
        target_ranks(np.array([[np.nan, 1.0]]))


def test_baselines_score_the_same_candidates() -> None:
    train = pd.DataFrame(
        {"user": ["u", "u", "v", "v", "w"], "item": ["1", "2", "1", "2", "3"], "rating": 5.0, "timestamp": 1}
    )
    catalogue = Catalogue(["u", "v", "w"], ["1", "2", "3", "4"])
    candidates = pd.Series([["2", "3", "4"]])
    assert popularity_scores(train, catalogue, candidates).tolist() == [[2.0, 1.0, 0.0]]
    history = pd.DataFrame({"user": ["w2"], "item": ["1"]})
    catalogue_knn = Catalogue(["u", "v", "w", "w2"], ["1", "2", "3", "4"])
    knn = item_knn_scores(train, history, catalogue_knn, pd.Series(["w2"]), candidates)
    assert knn[0, 0] == pytest.approx(1.0) and knn[0, 1] == 0.0  # items 1 and 2 always co-occur
    factors = train_bpr(train, catalogue, MfOptions(factors=4, epochs=50, learning_rate=0.05))
    mf = mf_scores(factors, catalogue, pd.Series(["u"]), pd.Series([["2", "4"]]))
    assert mf[0, 0] > mf[0, 1]  # a seen positive above a never-seen item
