"""The recommendation scenario's comparison stage: the model against collaborative-filtering baselines on the same
split and the same candidates, and a hybrid of the model with MF.

Runs after the bi-encoder's own evaluation (whose score matrices it reuses) and before
registration: the ranking table (CSV and Markdown) goes to MLflow, to a Prefect table artifact
and into the served model; the hybrid's figures and weight become version tags. The hybrid
blends the standardised model and MF scores with a weight chosen on validation, applied once to test.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from prefect.artifacts import create_table_artifact

from finetune_flows.tasks.core.reports import write_csv
from finetune_flows.tasks.core.stages import StageContext, StageOutput
from finetune_flows.tasks.core.tables import records
from finetune_flows.tasks.ranking.baselines import (
    Catalogue,
    MfOptions,
    blend,
    item_knn_scores,
    mf_scores,
    popularity_scores,
    train_bpr,
)
from finetune_flows.tasks.ranking.evaluation import SCORES_FILE, SPLITS, split_frames
from finetune_flows.tasks.ranking.metrics import score_metrics
from finetune_flows.tasks.serving.pair_scorer import RANKING_TABLE_ARTIFACT

logger = logging.getLogger(__name__)

MODEL, HYBRID = "model", "hybrid"
BLEND_WEIGHTS = tuple(round(0.05 * i, 2) for i in range(21))


def baseline_scores(dataset_dir: Path, positive_threshold: float, mf: MfOptions) -> dict[str, dict[str, np.ndarray]]:
    """{method: {split: scores}} for popularity, item-kNN and BPR-MF."""
    train = pd.read_parquet(dataset_dir / "train_interactions.parquet")
    frames = split_frames(dataset_dir)
    items = pd.read_parquet(dataset_dir / "items.parquet")
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


def metric_names(table: pd.DataFrame) -> dict[str, float]:
    """``val_item-knn_ndcg_at_10``-style MLflow names for every cell of the table."""
    metrics: dict[str, float] = {}
    for row in table.to_dict("records"):
        prefix = "val" if row["split"] == "validation" else "test"
        for name in ("hr_at_10", "ndcg_at_10", "mrr"):
            metrics[f"{prefix}_{row['method']}_{name}"] = float(row[name])
    return metrics


def hybrid_tags(table: pd.DataFrame) -> dict[str, str]:
    """``hybrid.eval.ndcg_at_10``-style version tags from the ranking table (the blend is not registered itself)."""
    return {
        f"hybrid.{'eval' if row.split == 'validation' else 'test'}.{metric}": f"{getattr(row, metric):.4f}"
        for row in table[table["method"] == HYBRID].itertuples()
        for metric in ("hr_at_10", "ndcg_at_10", "mrr")
    }


def compare_with_baselines(context: StageContext) -> StageOutput:
    """Score popularity, item-kNN, BPR-MF and the hybrid next to the model; table to MLflow, Prefect and the model."""
    import mlflow

    assert context.data is not None and context.evaluation is not None
    config, run = context.config, context.run
    dataset = Path(context.data.dataset_dir)
    mf = MfOptions(factors=config.ranking.mf_factors, epochs=config.ranking.mf_epochs, seed=config.training.seed)
    scores = baseline_scores(dataset, config.ranking.positive_threshold, mf)
    with np.load(Path(context.evaluation.report_dir) / SCORES_FILE) as saved:
        scores[MODEL] = {split: saved[split] for split in SPLITS}
    weight = tune_blend(scores[MODEL]["validation"], scores["mf-bpr"]["validation"])
    scores[HYBRID] = {s: blend(scores[MODEL][s], scores["mf-bpr"][s], weight) for s in SPLITS}
    table = ranking_table(scores)
    csv_path, md_path = Path(run.run_dir) / "ranking_table.csv", Path(run.run_dir) / "ranking_table.md"
    write_csv(table, csv_path)
    md_path.write_text(markdown_table(table, context.data.eval_rows, weight), encoding="utf-8")
    mlflow.set_tracking_uri(run.tracking_uri())
    with mlflow.start_run(run_id=run.run_id):
        mlflow.log_metrics(metric_names(table) | {"hybrid_weight": weight})
        mlflow.log_artifact(str(csv_path))
        mlflow.log_artifact(str(md_path))
    create_table_artifact(
        key=f"{config.scenario}-ranking",
        table=records(table.round(4)),
        description=f"HR@10, NDCG@10, MRR of the model, baselines and hybrid (weight {weight:g})",
    )
    logger.info("ranking:\n%s", md_path.read_text())
    return StageOutput(
        tags={"hybrid_weight": f"{weight:g}", **hybrid_tags(table)},
        served_artifacts={RANKING_TABLE_ARTIFACT: str(csv_path)},
        report=str(md_path),
    )
