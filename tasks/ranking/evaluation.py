"""Stage 4 of the recommender: rank every target against its candidates, for the model (its ONNX
encoder, as served), the baselines and the hybrid, on the same split and the same candidates.

The hybrid blends the standardised model and MF scores; its weight is chosen on validation and
then applied once to test. The report table (CSV and Markdown) lists every method on both splits.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, ConfigDict

from finetune_flows.tasks.core.tables import records
from finetune_flows.tasks.core.tracking import RunInfo
from finetune_flows.tasks.ranking.baselines import (
    Catalogue,
    MfOptions,
    blend,
    item_knn_scores,
    mf_scores,
    popularity_scores,
    train_bpr,
)
from finetune_flows.tasks.ranking.config import RecommenderConfig
from finetune_flows.tasks.ranking.dataset import SPLITS, RankingData
from finetune_flows.tasks.ranking.metrics import score_metrics
from finetune_flows.tasks.serving.encoder import SentenceEncoder

logger = logging.getLogger(__name__)

MODEL, HYBRID = "model", "hybrid"
BLEND_WEIGHTS = tuple(round(0.05 * i, 2) for i in range(21))


class RankingEvalResult(BaseModel):
    """Ranking metrics of the model and the table with every method."""

    model_config = ConfigDict(frozen=True)

    metrics: dict[str, float]
    """The model on validation (promotion uses ndcg@10 from here)."""
    test_metrics: dict[str, float]
    hybrid_weight: float
    table_csv: str
    table_markdown: str

    @property
    def primary(self) -> float:
        return self.metrics["ndcg_at_10"]


def encoder_scores(
    encoder: SentenceEncoder, items: pd.DataFrame, frames: dict[str, pd.DataFrame], batch_size: int = 64
) -> dict[str, np.ndarray]:
    """Per frame, (users, candidates) cosine similarities of each profile with its candidates' texts.

    Every candidate item is embedded once, whichever frames it appears in.
    """
    texts = items.set_index("item")["text"]
    needed = pd.unique(np.concatenate([np.asarray(c) for f in frames.values() for c in f["candidates"]]))
    vectors = encoder.encode([texts[i] for i in needed], batch_size=batch_size)
    row_of = {item: index for index, item in enumerate(needed)}
    scores = {}
    for name, frame in frames.items():
        profiles = encoder.encode(list(frame["profile"]), batch_size=batch_size)
        candidate_rows = np.stack([[row_of[i] for i in c] for c in frame["candidates"]])
        scores[name] = np.einsum("ud,ucd->uc", profiles, vectors[candidate_rows])
    return scores


def model_split_scores(encoder: SentenceEncoder, data: RankingData) -> dict[str, np.ndarray]:
    """The encoder's score matrix for validation and test."""
    return encoder_scores(encoder, data.frame("items"), {name: data.frame(name) for name in SPLITS})


def baseline_scores(data: RankingData, positive_threshold: float, mf: MfOptions) -> dict[str, dict[str, np.ndarray]]:
    """{method: {split: scores}} for popularity, item-kNN and BPR-MF."""
    train = data.frame("train")
    frames = {name: data.frame(name) for name in SPLITS}
    items = data.frame("items")
    catalogue = Catalogue(sorted(set(train["user"]) | set(frames["validation"]["user"])), list(items["item"]))
    positives = train[train["rating"] >= positive_threshold][["user", "item"]]
    # At test time the validation target is part of the user's past.
    history = {
        "validation": positives,
        "test": pd.concat([positives, frames["validation"].rename(columns={"target": "item"})[["user", "item"]]]),
    }
    factors = train_bpr(positives, catalogue, mf)
    return {
        "popularity": {s: popularity_scores(train, catalogue, f["candidates"]) for s, f in frames.items()},
        "item-knn": {
            s: item_knn_scores(positives, history[s], catalogue, f["user"], f["candidates"]) for s, f in frames.items()
        },
        "mf-bpr": {s: mf_scores(factors, catalogue, f["user"], f["candidates"]) for s, f in frames.items()},
    }


def tune_blend(model: np.ndarray, mf: np.ndarray) -> float:
    """The model weight in ``BLEND_WEIGHTS`` with the best validation NDCG@10 (the smaller on ties)."""
    results = [(score_metrics(blend(model, mf, w))["ndcg_at_10"], -w) for w in BLEND_WEIGHTS]
    return -max(results)[1]


def ranking_table(scores: dict[str, dict[str, np.ndarray]]) -> pd.DataFrame:
    """One row per method and split with HR@10, NDCG@10 and MRR."""
    rows = [
        {"method": method, "split": split, **score_metrics(matrix)}
        for method, by_split in scores.items()
        for split, matrix in by_split.items()
    ]
    return pd.DataFrame(rows)


def markdown_table(table: pd.DataFrame, users: int, hybrid_weight: float) -> str:
    wide = table.pivot(index="method", columns="split", values=["hr_at_10", "ndcg_at_10", "mrr"])
    lines = [
        f"Leave-one-out by time, {users} users, each target ranked against its sampled negatives; "
        f"hybrid = {hybrid_weight:g} x model + {1 - hybrid_weight:g} x MF (standardised scores, weight tuned on "
        "validation).",
        "",
        "| method | val HR@10 | val NDCG@10 | val MRR | test HR@10 | test NDCG@10 | test MRR |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in table["method"].drop_duplicates():
        row = wide.loc[method]
        cells = [f"{row[(m, s)]:.4f}" for s in SPLITS for m in ("hr_at_10", "ndcg_at_10", "mrr")]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate_all(
    data: RankingData, encoder: SentenceEncoder, positive_threshold: float, mf: MfOptions, out_dir: Path
) -> RankingEvalResult:
    """Score the model, the baselines and the hybrid; write ranking_table.csv and .md to ``out_dir``."""
    scores = baseline_scores(data, positive_threshold, mf)
    scores[MODEL] = model_split_scores(encoder, data)
    weight = tune_blend(scores[MODEL]["validation"], scores["mf-bpr"]["validation"])
    scores[HYBRID] = {s: blend(scores[MODEL][s], scores["mf-bpr"][s], weight) for s in SPLITS}
    table = ranking_table(scores)
    csv_path, md_path = out_dir / "ranking_table.csv", out_dir / "ranking_table.md"
    table.to_csv(csv_path, index=False)
    md_path.write_text(markdown_table(table, data.evaluated_users, weight), encoding="utf-8")
    mine = table[table["method"] == MODEL].set_index("split").drop(columns="method")
    return RankingEvalResult(
        metrics={str(k): float(v) for k, v in mine.loc["validation"].to_dict().items()},
        test_metrics={str(k): float(v) for k, v in mine.loc["test"].to_dict().items()},
        hybrid_weight=weight,
        table_csv=str(csv_path),
        table_markdown=str(md_path),
    )


def metric_names(table: pd.DataFrame) -> dict[str, float]:
    """``val_item-knn_ndcg_at_10``-style MLflow names for every cell of the table."""
    metrics: dict[str, float] = {}
    for row in table.to_dict("records"):
        prefix = "val" if row["split"] == "validation" else "test"
        for name in ("hr_at_10", "ndcg_at_10", "mrr"):
            metrics[f"{prefix}_{row['method']}_{name}"] = float(row[name])
    return metrics


@task(name="evaluate-ranking")
def evaluate_ranking(
    data: RankingData, onnx_path: str, model_dir: str, config: RecommenderConfig, run: RunInfo
) -> RankingEvalResult:
    """Rank with the exported encoder and the baselines; log every method's metrics to MLflow."""
    import mlflow

    encoder = SentenceEncoder(onnx_path, Path(model_dir) / "tokenizer.json", max_length=config.model.max_length)
    mf = MfOptions(factors=config.baselines.mf_factors, epochs=config.baselines.mf_epochs, seed=config.training.seed)
    result = evaluate_all(data, encoder, config.data.positive_threshold, mf, Path(run.run_dir))
    table = pd.read_csv(result.table_csv)
    mlflow.set_tracking_uri(run.tracking_uri)
    with mlflow.start_run(run_id=run.run_id):
        mlflow.log_metrics(metric_names(table) | {"hybrid_weight": result.hybrid_weight})
        mlflow.log_artifact(result.table_csv)
        mlflow.log_artifact(result.table_markdown)
    create_table_artifact(
        key=f"{config.scenario}-ranking",
        table=records(table.round(4)),
        description=f"HR@10, NDCG@10, MRR of the model, baselines and hybrid (weight {result.hybrid_weight:g})",
    )
    logger.info("ranking:\n%s", Path(result.table_markdown).read_text())
    return result
