"""The recommendation scenario through the one fine-tune flow, with a tiny model built from a config:
fine-tune the bi-encoder, rank against the baselines, register (gate on NDCG@10), then ``recommend``
from the champion, including cold-start items that nobody rated. Through the same pipeline as the
classifiers it gets idempotency keys, alias rollback, torchrun and the gpu-pool hand-off."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest

from finetune_flows.flows.finetune import finetune
from finetune_flows.flows.recommend import recommend
from finetune_flows.plugins import DataError, PromotionError
from finetune_flows.tasks.core.config import FinetuneConfig
from finetune_flows.tasks.core.train_request import RESULT_FILE, TrainResult
from finetune_flows.tasks.ranking.recommending import RecommendConfig
from tests.conftest import COOKING, SPACE

pytestmark = pytest.mark.usefixtures("prefect_harness")


def config_for(model_dir: Path, folder: Path, **overrides: object) -> FinetuneConfig:
    """Dotted overrides; a bare key (``epochs``) is a training field."""
    return FinetuneConfig.for_scenario(
        "recommendation",
        {
            "model.source": str(model_dir),
            "model.max_length": 32,
            "data.train_path": str(folder),
            "ranking.pairs_per_user": 10,
            "ranking.mf_epochs": 20,
            "training.batch_size": 16,
            "training.learning_rate": 2e-3,
            "training.epochs": 4,
            "training.precision": "fp32",
            **{k if "." in k else f"training.{k}": v for k, v in overrides.items()},
        },
    )


def test_recommender_registers_ranks_and_recommends(
    state_dir: Path, tiny_model_dir: Path, log_folder: Path, tmp_path: Path
) -> None:
    first = finetune(config_for(tiny_model_dir, log_folder))
    assert (first.version, first.aliases, first.decision) == (
        "1",
        ["challenger", "champion"],
        "promoted: no champion yet",
    )
    # unknown item and non-numeric rating skipped; one user with a single rating
    assert "2 bad rows and 1 users with too few positives skipped" in first.data_summary
    (report,) = first.reports
    table = pd.read_csv(Path(report).with_suffix(".csv"))
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
    second = finetune(config_for(tiny_model_dir, log_folder, learning_rate=1e-7, epochs=1))
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
        finetune(config_for(tiny_model_dir, folder))
    state = finetune(config_for(tiny_model_dir, folder), return_state=True)
    assert state.is_failed() and str(state.message).startswith("stage prepare-interactions failed: DataError: ")
    assert mlflow.MlflowClient().search_registered_models() == []


@pytest.mark.slow  # default suite: test_publishing covers idempotency keys
def test_one_idempotency_key_twice_gives_one_recommender_version(
    state_dir: Path, tiny_model_dir: Path, log_folder: Path
) -> None:
    key = {"registration.idempotency_key": "nightly-2024-06-01", "epochs": 1}
    config = config_for(tiny_model_dir, log_folder, **key)
    first, second = finetune(config), finetune(config)
    assert (first.version, second.version) == ("1", "1")
    assert not first.reused_version and second.reused_version
    versions = mlflow.MlflowClient().search_model_versions("name='recommendation'")
    assert [str(v.version) for v in versions] == ["1"]


@pytest.mark.slow  # default suite: test_flow's alias rollback
def test_a_recommender_registration_failing_after_register_leaves_the_champion(
    state_dir: Path, tiny_model_dir: Path, log_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = finetune(config_for(tiny_model_dir, log_folder))
    assert first.aliases == ["challenger", "champion"]

    real = mlflow.MlflowClient.set_registered_model_alias

    def refuse_challenger(self: mlflow.MlflowClient, name: str, alias: str, version: str) -> None:
        if alias == "challenger" and str(version) == "2":  # the new version is registered by now
            raise RuntimeError("registry went away while moving the alias")
        real(self, name, alias, version)

    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", refuse_challenger)
    with pytest.raises(PromotionError, match="registry went away"):
        finetune(config_for(tiny_model_dir, log_folder, epochs=1))
    monkeypatch.undo()
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("recommendation", "champion").version) == "1"
    assert [str(v.version) for v in client.search_model_versions("name='recommendation'")] == ["1"]


@pytest.mark.slow  # default suite: test_distributed trains on two processes
def test_the_recommender_trains_with_torchrun_on_two_processes(
    state_dir: Path, tiny_model_dir: Path, log_folder: Path
) -> None:
    summary = finetune(config_for(tiny_model_dir, log_folder, **{"infrastructure.processes": 2, "epochs": 1}))
    run_dir = Path(mlflow.MlflowClient().get_run(summary.run_id).data.tags["run_dir"])
    result = TrainResult.model_validate_json((run_dir / RESULT_FILE).read_text())
    assert result.world_size == 2 and result.steps > 0
    assert summary.version == "1" and summary.metrics["hr_at_10"] > 0.0
    assert (run_dir / "model" / "model.safetensors").is_file() and (run_dir / "model" / "tokenizer.json").is_file()
