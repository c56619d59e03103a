"""Flow ``finetune-recommender``: interaction log + item text -> a fine-tuned bi-encoder, ranked
against collaborative-filtering baselines, exported to ONNX and registered.

Deployments reach it by entrypoint ``flows/recommender.py:finetune_recommender``.
"""

from __future__ import annotations

from prefect import flow
from pydantic import BaseModel, ConfigDict

from finetune_flows.flows.train import stage_failed
from finetune_flows.tasks.core.model_source import fetch_model
from finetune_flows.tasks.core.tracking import start_run
from finetune_flows.tasks.export.encoder_export import export_pair_encoder
from finetune_flows.tasks.ranking.config import RecommenderConfig
from finetune_flows.tasks.ranking.dataset import prepare_interactions
from finetune_flows.tasks.ranking.evaluation import evaluate_ranking
from finetune_flows.tasks.ranking.pair_training import fine_tune_pairs
from finetune_flows.tasks.ranking.registration import register_recommender

STAGES = (
    start_run,
    prepare_interactions,
    fetch_model,
    fine_tune_pairs,
    export_pair_encoder,
    evaluate_ranking,
    register_recommender,
)


class RecommenderSummary(BaseModel):
    """What a finished run produced."""

    model_config = ConfigDict(frozen=True)

    model_name: str
    version: str
    aliases: list[str]
    decision: str
    metrics: dict[str, float]
    hybrid_weight: float
    ranking_table: str
    onnx_path: str
    run_id: str
    train_seconds: float
    skipped_rows: int
    skipped_users: int


@flow(name="finetune-recommender", log_prints=False)
def finetune_recommender(config: RecommenderConfig = RecommenderConfig()) -> RecommenderSummary:  # noqa: B008
    """Fine-tune a text recommender, compare it with baselines on the same split, export and register it."""
    try:
        return run_pipeline(config)
    except Exception as exc:
        return stage_failed(exc, STAGES)


def run_pipeline(config: RecommenderConfig) -> RecommenderSummary:
    """The stages in order; each passes paths and small models to the next."""
    run = start_run(config)
    data = prepare_interactions(config)
    base_model = fetch_model(config, run)
    trained = fine_tune_pairs(data, base_model, config, run)
    exported = export_pair_encoder(trained.model_dir, data, config, run)
    evaluation = evaluate_ranking(data, exported.onnx_path, trained.model_dir, config, run)
    registered = register_recommender(trained, exported.onnx_path, evaluation, data, config, run)
    return RecommenderSummary(
        model_name=registered.model_name,
        version=registered.version,
        aliases=registered.aliases,
        decision=registered.decision,
        metrics={**evaluation.metrics, **{f"test_{k}": v for k, v in evaluation.test_metrics.items()}},
        hybrid_weight=evaluation.hybrid_weight,
        ranking_table=evaluation.table_markdown,
        onnx_path=exported.onnx_path,
        run_id=registered.run_id,
        train_seconds=trained.train_seconds,
        skipped_rows=data.problems,
        skipped_users=data.skipped_users,
    )
