"""The recommendation flows end to end with a tiny model built from a config: fine-tune, rank
against the baselines, register (gate on NDCG@10), then ``recommend`` from the champion,
including cold-start items that nobody rated."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest

from finetune_flows.flows.recommend import recommend
from finetune_flows.flows.recommender import finetune_recommender
from finetune_flows.plugins import DataError
from finetune_flows.tasks.ranking.config import RecommenderConfig
from finetune_flows.tasks.ranking.recommending import RecommendConfig

pytestmark = pytest.mark.usefixtures("prefect_harness")

SPACE = [f"Rocket mission {i}. Space, Science Fiction. Tags: astronauts, orbit" for i in range(40)]
COOKING = [f"Pasta kitchen {i}. Cooking, Food. Tags: recipes, chef" for i in range(40)]


@pytest.fixture
def log_folder(tmp_path: Path) -> Path:
    """40 users, half of whom like space films and half cooking shows; plus three bad inputs."""
    folder = tmp_path / "log"
    folder.mkdir()
    items = [(f"s{i}", t) for i, t in enumerate(SPACE)] + [(f"c{i}", t) for i, t in enumerate(COOKING)]
    pd.DataFrame(items, columns=["item", "text"]).to_csv(folder / "items.csv", index=False)
    rows = []
    for user in range(40):
        liked, other = ("s", "c") if user % 2 == 0 else ("c", "s")
        for step in range(12):
            item = (user * 3 + step * 7) % 40
            rows.append((f"u{user}", f"{liked}{item}", 5, 1000 + 10 * step))
            if step % 4 == 0:
                rows.append((f"u{user}", f"{other}{item}", 1, 1005 + 10 * step))
    rows += [("u0", "x999", 5, 5000), ("u1", "s1", "great", 5000), ("lonely", "s2", 5, 10)]
    pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"]).to_csv(folder / "interactions.csv", index=False)
    return folder


def config_for(model_dir: Path, folder: Path, **training: object) -> RecommenderConfig:
    return RecommenderConfig.for_scenario(
        "recommendation",
        {
            "model.source": str(model_dir),
            "model.max_length": 32,
            "data.path": str(folder),
            "data.pairs_per_user": 10,
            "training.batch_size": 16,
            "training.learning_rate": 2e-3,
            "training.epochs": 4,
            "baselines.mf_epochs": 20,
            **{f"training.{k}": v for k, v in training.items()},
        },
    )


def test_recommender_registers_ranks_and_recommends(
    state_dir: Path, tiny_model_dir: Path, log_folder: Path, tmp_path: Path
) -> None:
    first = finetune_recommender(config_for(tiny_model_dir, log_folder))
    assert (first.version, first.aliases, first.decision) == (
        "1",
        ["challenger", "champion"],
        "promoted: no champion yet",
    )
    assert (first.skipped_rows, first.skipped_users) == (2, 1)  # unknown item, non-numeric rating; a 1-rating user
    table = pd.read_csv(Path(first.ranking_table).with_suffix(".csv"))
    assert set(table["method"]) == {"popularity", "item-knn", "mf-bpr", "model", "hybrid"}
    assert len(table) == 10 and table[["hr_at_10", "ndcg_at_10", "mrr"]].le(1).all().all()
    # The trained encoder separates the two tastes: far above chance (HR@10 over 100 candidates ~ 0.1).
    assert first.metrics["hr_at_10"] > 0.5, first.metrics

    client = mlflow.MlflowClient()
    tags = client.get_model_version("recommendation", "1").tags
    assert float(tags["challenger.ndcg_at_10"]) == pytest.approx(first.metrics["ndcg_at_10"], abs=1e-6)
    assert {"test.hr_at_10", "test.ndcg_at_10", "test.mrr", "hybrid_weight", "hybrid.test.ndcg_at_10"} <= set(tags)
    hybrid = table[(table["method"] == "hybrid") & (table["split"] == "test")].iloc[0]
    assert tags["hybrid.test.hr_at_10"] == f"{hybrid['hr_at_10']:.4f}"
    local = Path(mlflow.artifacts.download_artifacts("models:/recommendation@champion"))
    assert (local / "artifacts" / "ranking_table.csv").is_file()
    scorer = mlflow.pyfunc.load_model("models:/recommendation@champion")
    scores = scorer.predict(
        pd.DataFrame({"query": ["Liked recently: Rocket mission 1"] * 2, "item": [SPACE[5], COOKING[5]]})
    )
    assert scores["score"].iloc[0] > scores["score"].iloc[1]

    # A worse challenger (barely trained) stays challenger; the gate compares NDCG@10 on the same candidates.
    second = finetune_recommender(config_for(tiny_model_dir, log_folder, learning_rate=1e-7, epochs=1))
    assert second.version == "2" and second.aliases == ["challenger"], second.decision
    assert second.decision.startswith("kept champion")
    assert str(client.get_model_version_by_alias("recommendation", "champion").version) == "1"

    out = tmp_path / "lists.csv"
    result = recommend(RecommendConfig(data_path=str(log_folder), users=["u0", "u1"], k=5, output_path=str(out)))
    lists = pd.read_csv(out, dtype={"user": str, "item": str})
    assert result.model_uri == "models:/recommendation/1" and result.rows == 10
    log = pd.read_csv(log_folder / "interactions.csv", dtype=str)
    for user, group in lists.groupby("user"):
        assert group["rank"].tolist() == [1, 2, 3, 4, 5]
        assert not set(group["item"]) & set(log.loc[log["user"] == user, "item"])  # nothing already rated
        assert group["score"].is_monotonic_decreasing

    # Cold start: new items nobody rated, ranked by text alone.
    new = tmp_path / "new_items.csv"
    pd.DataFrame(
        {"item": ["n1", "n2", "n3"], "text": [COOKING[0] + " special", "Rocket mission 99. Space", "Gardening tips"]}
    ).to_csv(new, index=False)
    cold = recommend(RecommendConfig(data_path=str(log_folder), users=["u0"], k=3, cold_start_items=str(new)))
    top = pd.read_csv(cold.output_path, dtype={"user": str, "item": str})
    assert top["item"].iloc[0] == "n2"  # u0 likes space films


def test_a_log_without_good_rows_fails_and_registers_nothing(
    state_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    pd.DataFrame({"item": ["a"], "text": ["A film"]}).to_csv(folder / "items.csv", index=False)
    pd.DataFrame({"user": ["u"], "item": ["zzz"], "rating": [5], "timestamp": [1]}).to_csv(
        folder / "interactions.csv", index=False
    )
    with pytest.raises(
        DataError,
        match=r"no valid interaction among 1 rows.*interactions.csv.*row 1, column 'item', value 'zzz': unknown item",
    ):
        finetune_recommender(config_for(tiny_model_dir, folder))
    state = finetune_recommender(config_for(tiny_model_dir, folder), return_state=True)
    assert state.is_failed() and str(state.message).startswith("stage prepare-interactions failed: DataError: ")
    assert mlflow.MlflowClient().search_registered_models() == []
